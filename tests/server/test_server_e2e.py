"""The real server (``cloudlet serve`` in a subprocess) with real QEMU VMs; kill -9, restart."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloudlet.config import Paths
from cloudlet.util.resident import drop_page_cache
from helpers import cli, qemu_pids_mentioning, uncached_data_pages, wait_until
from serverlib import MARKER, Server, page, register, start, upload, wait_op

pytestmark = pytest.mark.vm


def test_service_lifecycle_join_restart_and_idle_stop(
    server: Server, sample_overlay: Path, srv_home: Paths
) -> None:
    server.start("--no-bootstrap", "--idle-timeout", "600")
    with server.client() as c:
        o = upload(c, sample_overlay)
        register(c, o["id"], max_users=2, description="web", tags=["test"])
        # The CLI gives the same answer through the server as from the data dir.
        env = dict(os.environ, CLOUDLET_HOME=str(srv_home.home))
        remote = cli("service", "list", "--json", "--server", server.url, env=env)
        local = cli("service", "list", "--json", env=env)
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout) == json.loads(local.stdout)
        assert json.loads(remote.stdout)[0]["service_id"] == "org.example.web"

        a = start(c, "org.example.web", user="alice")
        inst = a["instance"]
        assert not a["joined"] and inst["state"] == "running"
        assert inst["start_kind"] == "synthesis" and inst["users"] == 1
        assert MARKER in page(inst)
        b = start(c, "org.example.web", user="bob")
        assert b["joined"] and b["instance"]["id"] == inst["id"]
        assert b["instance"]["users"] == 2 and b["instance"]["user_ids"] == ["alice", "bob"]
        # Full (max_users 2): a third user gets a second instance, from the cached snapshot.
        third = start(c, "org.example.web", user="carol")
        assert not third["joined"] and third["instance"]["id"] != inst["id"]
        assert third["instance"]["start_kind"] == "cached"
        assert MARKER in page(third["instance"])
        assert c.get("/v1/services/org.example.web").json()["instances"] == 2
        r = c.delete("/v1/services/org.example.web")
        assert r.status_code == 409  # in use
        assert c.delete(f"/v1/overlays/{o['id']}").status_code == 409
        assert c.delete("/v1/bases/tiny").status_code == 409

    # kill -9 in the middle: both instances are re-adopted, with their users and ports.
    vm_pids = qemu_pids_mentioning(str(srv_home.home))
    assert len(vm_pids) >= 2
    server.kill9()
    assert all(os.path.exists(f"/proc/{p}") for p in vm_pids)  # QEMU outlives the server
    server.start("--no-bootstrap", "--idle-timeout", "1")
    with server.client() as c:
        again = c.get(f"/v1/instances/{inst['id']}").json()
        assert again["state"] == "running" and again["users"] == 2
        assert again["endpoints"] == inst["endpoints"]
        assert MARKER in page(again)
        # ...and the server goes on: join, leave, stop.
        d = start(c, "org.example.web", user="carol")
        assert d["joined"] and d["instance"]["id"] == third["instance"]["id"]
        r = c.post(f"/v1/instances/{inst['id']}/leave", json={"user": "bob"})
        assert r.status_code == 200 and r.json()["users"] == 1
        r = c.post(f"/v1/instances/{inst['id']}/leave", json={"user": "bob"})
        assert r.status_code == 404
        r = c.post(f"/v1/instances/{inst['id']}/stop")
        assert r.status_code == 200 and r.json()["state"] == "stopped"
        assert c.get(f"/v1/instances/{inst['id']}").json()["users"] == 0
        # The other instance, once its last user left, is stopped by the idle reaper.
        c.post(f"/v1/instances/{third['instance']['id']}/leave", json={"user": "carol"})
        wait_until(
            lambda: c.get(f"/v1/instances/{third['instance']['id']}").json()["state"] == "stopped",
            timeout=20,
        )
        assert c.get("/v1/instances").json() == []
        # A QEMU that dies behind the server's back: its instance ends failed, and says why.
        d = start(c, "org.example.web", user="dave")
        vm = c.get(f"/v1/vms/{d['instance']['vm_id']}").json()
        os.kill(vm["pid"], signal.SIGKILL)
        wait_until(
            lambda: c.get(f"/v1/instances/{d['instance']['id']}").json()["state"] == "failed",
            timeout=20,
        )
        assert "crashed" in c.get(f"/v1/instances/{d['instance']['id']}").json()["error"]
        metrics = c.get("/metrics").text
        assert 'cloudlet_instances{state="stopped"} 2.0' in metrics
        assert 'route="/v1/instances/{iid}/leave",status="200"' in metrics

        # Only the standby VM (paused, made ahead for the next cached start) has a QEMU left.
        def spares() -> list[dict[str, Any]]:
            return [v for v in c.get("/v1/vms").json() if v["name"].startswith("inst-spare")]

        wait_until(lambda: [v["state"] for v in spares()] == ["paused"], timeout=30)
        assert len(qemu_pids_mentioning(str(srv_home.home))) == 1
        # Its RAM stays in memory while it waits, however long: the server holds it mapped.
        spare_ram = srv_home.vms / spares()[0]["id"] / "memory.ram"
        drop_page_cache(spare_ram)
        assert uncached_data_pages(spare_ram) == 0
    server.stop()
    assert qemu_pids_mentioning(str(srv_home.home)) == []  # standby VMs go with the server


def test_twenty_concurrent_join_starts_make_one_instance(
    server: Server, sample_overlay: Path
) -> None:
    server.start("--no-bootstrap")
    with server.client() as c:
        o = upload(c, sample_overlay)
        register(c, o["id"], sid="org.example.crowd", max_users=25)

    def one(i: int) -> tuple[int, dict[str, Any]]:
        with server.client() as c:
            r = c.post("/v1/instances", json={"service_id": "org.example.crowd", "user": f"u{i}"})
            return r.status_code, r.json()

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert {s for s, _ in results} <= {200, 202}, results
    ids = {d["instance"]["id"] for _, d in results}
    assert len(ids) == 1
    assert sum(not d["joined"] for _, d in results) == 1
    ops = {d["operation"] for _, d in results if d.get("operation")}
    assert len(ops) == 1  # joiners of the booting instance wait for that same boot
    with server.client() as c:
        assert wait_op(c, ops.pop())["state"] == "succeeded"
        (inst,) = c.get("/v1/instances").json()
        assert inst["users"] == 20 and sorted(inst["user_ids"]) == sorted(
            f"u{i}" for i in range(20)
        )
        assert MARKER in page(inst)
        m = c.get("/metrics").text
        assert "cloudlet_instance_users 20.0" in m


def test_kill_during_start_and_upload_leaves_nothing_half_done(
    server: Server, sample_overlay: Path, srv_home: Paths
) -> None:
    server.start("--no-bootstrap")
    with server.client() as c:
        o = upload(c, sample_overlay)
        register(c, o["id"], sid="org.example.crash")
        r = c.post("/v1/instances", json={"service_id": "org.example.crash", "join": False})
        assert r.status_code == 202
        op, iid = r.json()["operation"], r.json()["instance"]["id"]
        # An upload cut off by the kill: half the bytes, then the server dies.
        oid = c.post("/v1/overlays", json={"name": "half"}).json()["id"]
        data = sample_overlay.read_bytes()

        def slow() -> Any:
            yield data[: len(data) // 2]
            time.sleep(0.5)
            server.kill9()
            yield data[len(data) // 2 :]

        with pytest.raises(httpx.HTTPError):
            c.put(f"/v1/overlays/{oid}/file", content=slow())
    server.start("--no-bootstrap")
    with server.client() as c:
        assert c.get(f"/v1/overlays/{oid}").json()["state"] == "killed"
        assert list((srv_home.tmp / "uploads").iterdir()) == []
        assert not (srv_home.home / "overlays" / f"{oid}.overlay").exists()
        op_d = c.get(f"/v1/operations/{op}").json()
        inst = c.get(f"/v1/instances/{iid}").json()
        # Either the boot finished before the kill (then it was re-adopted) or it was cut.
        if op_d["state"] == "failed":
            assert op_d["error"]["message"] == "interrupted by server restart"
            assert inst["state"] == "failed" and inst["users"] == 0
        else:
            assert op_d["state"] == "succeeded" and inst["state"] == "running"
        live = {i["vm_id"] for i in c.get("/v1/instances").json()}
        vms = {v["id"] for v in c.get("/v1/vms").json() if not v["name"].startswith("inst-spare")}
        assert vms == live  # no VM left over from the interrupted boot
        # The cache holds complete entries only.
        for entry in (srv_home.cache / "services").glob("*/*"):
            assert not entry.name.startswith(".") and (entry / "snapshot.json").exists()
        # And it serves: a fresh start of the service works.
        d = start(c, "org.example.crash", join=False)
        assert MARKER in page(d["instance"])


def test_missing_overlay_file_is_409_and_packages_round_trip(
    server: Server, sample_overlay: Path, srv_home: Paths, tmp_path: Path
) -> None:
    server.start("--no-bootstrap")
    with server.client() as c:
        o = upload(c, sample_overlay)
        register(c, o["id"], sid="org.example.pkg", tags=["a", "b"], version="3.1")
        r = c.get("/v1/services/org.example.pkg/package")
        assert r.status_code == 200
        pkg = tmp_path / "svc.service"
        pkg.write_bytes(r.content)
        # Through the CLI and the server: the same package imports as the same service.
        env = dict(os.environ, CLOUDLET_HOME=str(srv_home.home))
        assert c.delete("/v1/services/org.example.pkg").status_code == 200
        res = cli("service", "import", str(pkg), "--json", "--server", server.url, env=env)
        assert res.returncode == 0, res.stderr
        d = json.loads(res.stdout)
        assert (d["service_id"], d["version"], d["tags"]) == ("org.example.pkg", "3.1", ["a", "b"])
        new = c.get(f"/v1/overlays/{d['overlay']}").json()
        assert new["state"] == "active" and new["sha256"] == o["sha256"]
        # A corrupt package is refused and registers nothing.
        bad = tmp_path / "bad.service"
        raw = bytearray(pkg.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        bad.write_bytes(bytes(raw))
        assert c.delete("/v1/services/org.example.pkg").status_code == 200
        r = c.post("/v1/services/import", content=bad.read_bytes())
        assert r.status_code == 202
        assert wait_op(c, r.json()["operation"])["state"] == "failed"
        assert c.get("/v1/services/org.example.pkg").status_code == 404
        # A service whose overlay file vanished cannot start, and says why.
        register(c, o["id"], sid="org.example.gone")
        (srv_home.home / "overlays" / f"{o['id']}.overlay").unlink()
        r = c.post("/v1/instances", json={"service_id": "org.example.gone"})
        assert r.status_code == 409 and "missing" in r.json()["message"]


def test_overlay_damaged_on_disk_fails_the_first_start_and_leaves_nothing(
    server: Server, sample_overlay: Path, srv_home: Paths
) -> None:
    """The first start applies the overlay while the VM's QEMU already waits for it: a segment
    damaged since the upload fails the start, names the segment, and no VM, QEMU or cache
    entry is left."""
    server.start("--no-bootstrap")
    with server.client() as c:
        o = upload(c, sample_overlay)
        register(c, o["id"], sid="org.example.rot")
        f = srv_home.home / "overlays" / f"{o['id']}.overlay"
        raw = bytearray(f.read_bytes())
        raw[len(raw) * 3 // 4] ^= 0x01
        f.write_bytes(bytes(raw))
        r = c.post("/v1/instances", json={"service_id": "org.example.rot"})
        assert r.status_code == 202
        op = wait_op(c, r.json()["operation"])
        assert op["state"] == "failed" and "segment" in op["error"]["message"], op
        inst = c.get(f"/v1/instances/{r.json()['instance']['id']}").json()
        assert inst["state"] == "failed"
        assert c.get("/v1/vms").json() == []
        assert qemu_pids_mentioning(str(srv_home.home)) == []
        assert list((srv_home.cache / "services").glob("*/*")) == []


def test_serve_warns_of_a_data_dir_open_to_other_users(server: Server, srv_home: Paths) -> None:
    srv_home.home.chmod(0o755)
    server.start("--no-bootstrap")
    server.stop()
    assert "is open to other users (mode 0755)" in server.log.read_text()
    server.log.unlink()
    srv_home.home.chmod(0o700)
    server.start("--no-bootstrap")
    server.stop()
    assert "cloudlet serving" in server.log.read_text()
    assert "open to other users" not in server.log.read_text()


def test_serve_json_says_everything_as_json_lines(server: Server, srv_home: Paths) -> None:
    srv_home.home.chmod(0o755)
    server.start("--no-bootstrap", "--json")
    server.stop()
    lines = [json.loads(ln) for ln in server.log.read_text().splitlines()]  # each one JSON
    events = {d["event"]: d for d in lines if "event" in d}
    assert events["serving"]["url"] == server.url
    assert events["serving"]["home"] == str(srv_home.home)
    assert events["admin_token"]["token"] == server.token  # the first admin token, made now
    logs = [d for d in lines if "event" not in d]
    assert {"time", "level", "logger", "message"} <= set(logs[0])
    started = [d for d in logs if d["logger"] == "cloudlet.server"]
    assert any(d["message"].startswith("started") for d in started)
    assert any(d["level"] == "warning" and "open to other users" in d["message"] for d in logs)
    assert any(d["logger"].startswith("uvicorn") for d in logs)


def test_first_start_bootstraps_the_sample_service_once(server: Server) -> None:
    server.start()  # with the bootstrap (base VM tiny is already here: that step is skipped)
    with server.client() as c:
        (op,) = [o for o in c.get("/v1/operations").json() if o["kind"] == "bootstrap"]
        early = c.post("/v1/instances", json={"service_id": "org.cloudlet.sample"})
        nope_early = c.get("/v1/services/org.example.nope").json()
        if early.status_code == 404:  # asked while the defaults are set up: told why
            assert op["id"] in early.json()["hint"], early.json()
            assert "still setting up" in early.json()["hint"]
        else:  # (the bootstrap was done already: it started)
            assert early.status_code in (200, 202), early.text
        done = wait_op(c, op["id"])
        assert done["state"] == "succeeded", done
        deadline = time.monotonic() + 10  # the server logs it just after the operation ends
        while "embedded defaults ready in" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.05)
        assert f"setting up the embedded defaults (operation {op['id']})" in server.log.read_text()
        # Any other missing service, then and now, gets the usual hint.
        assert nope_early["hint"] == "see `cloudlet service list`"
        nope = c.get("/v1/services/org.example.nope").json()
        assert nope["hint"] == "see `cloudlet service list`"
        assert done["result"]["created"] == ["service"]
        svc = c.get("/v1/services/org.cloudlet.sample").json()
        assert svc["base"] == "tiny" and svc["guest_ports"] == [80]
        d = start(c, "org.cloudlet.sample")
        assert "Hello from a cloudlet" in page(d["instance"], "/hello.html")
        assert "hello from org.cloudlet.sample" in page(d["instance"], "/cgi-bin/hello")
        c.post(f"/v1/instances/{d['instance']['id']}/stop")
    server.stop()
    server.start()
    with server.client() as c:  # a second start does nothing
        kinds = [o["kind"] for o in c.get("/v1/operations").json()]
        assert kinds.count("bootstrap") == 1


def test_cli_tokens_against_a_running_server(server: Server, srv_home: Paths) -> None:
    server.start("--no-bootstrap")
    env = dict(os.environ, CLOUDLET_HOME=str(srv_home.home), CLOUDLET_URL=server.url)
    env.pop("CLOUDLET_TOKEN", None)
    # Through the server with the admin token the server left for the local CLI.
    made = cli("token", "create", "--role", "device", "--name", "phone", "--json", env=env)
    assert made.returncode == 0, made.stderr
    dev = json.loads(made.stdout)
    assert dev["role"] == "device" and len(dev["token"]) >= 40
    denv = env | {"CLOUDLET_TOKEN": dev["token"]}
    assert cli("service", "list", "--json", env=denv).returncode == 0
    r = cli("service", "create", "org.example.x", "--base", "tiny", "--json", env=denv)
    assert r.returncode == 9 and "device token may not" in r.stderr
    bad = cli("service", "list", env=env | {"CLOUDLET_TOKEN": "wrong"})
    assert bad.returncode == 9 and "unknown, revoked or expired" in bad.stderr
    listed = json.loads(cli("token", "list", "--json", env=env).stdout)
    assert {t["role"] for t in listed} == {"admin", "device"}
    assert all("token" not in t for t in listed)
    # Without --server/CLOUDLET_URL the same command works on the data dir directly.
    local_env = {k: v for k, v in env.items() if k != "CLOUDLET_URL"}
    rv = cli("token", "revoke", dev["id"], "--json", env=local_env)
    assert rv.returncode == 0 and json.loads(rv.stdout)["revoked"] is True
    wait_until(lambda: cli("service", "list", env=denv).returncode == 9, timeout=15)
