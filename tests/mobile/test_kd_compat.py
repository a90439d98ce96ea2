"""The KD-Cloudlet compatible API against requests sent exactly as SEI's Java client sends them,
on a real server with real VMs: shapes, types, Content-Length, plain-text errors, the
encrypted mode (checked with our own AES), users of a shared instance, messages, apps."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloudlet.client.kd import KDClient, KDCredentialsError
from cloudlet.client.mobile import Endpoint, follow
from cloudlet.config import Paths
from helpers import cli, qemu_pids_mentioning, wait_until
from mobile.conftest import aes_decrypt, aes_encrypt, java_command, java_get, loopback
from serverlib import MARKER, Server, register, upload

pytestmark = pytest.mark.vm

SID = "org.example.web"


def _get(server: Server, target: str, device: str = "") -> Any:
    return java_get(loopback(server.port), "127.0.0.1", server.port, target, device)


def _ok(reply: Any) -> Any:
    assert reply.status == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    return reply.json()


def _page(ip: str, port: int) -> str:
    return httpx.get(f"http://{ip}:{port}/marker.html", timeout=10).text


def _instances(c: httpx.Client) -> list[dict[str, Any]]:
    r = c.get("/v1/instances", params={"all": True})
    assert r.status_code == 200
    out: list[dict[str, Any]] = r.json()
    return out


def _setup(server: Server, sample_overlay: Path, *args: str) -> httpx.Client:
    server.start("--no-bootstrap", *args)
    c = server.client()
    o = upload(c, sample_overlay)
    register(c, o["id"], sid=SID, max_users=5, description="web", tags=["web", "test"])
    return c


def test_open_mode_as_the_java_client_sees_it(
    server: Server, sample_overlay: Path, srv_home: Paths, tmp_path: Path
) -> None:
    c = _setup(server, sample_overlay)  # --kd-api open is the default
    apk = os.urandom(70_000)
    meta = {"name": "Web client", "service_id": SID, "tags": "web", "min_os_version": "4.0"}
    meta["file_name"] = "../../../evil/web.apk"  # a path in the name: stored safely
    r = c.post("/v1/apps", content=apk, params=meta)
    assert r.status_code == 201, r.text
    app_id = r.json()["id"]
    # The CLI gives the same through the server (--server) as on the data dir.
    env = dict(os.environ, CLOUDLET_HOME=str(srv_home.home))
    remote = cli("app", "list", "--json", "--server", server.url, env=env)
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(cli("app", "list", "--json", env=env).stdout)
    made = cli("device", "create", "ph-9", "--minutes", "5", "--json", "--server", server.url,
               env=env)  # fmt: skip
    assert made.returncode == 0 and json.loads(made.stdout)["password"]

    # Services: the list and one, with exactly pycloud's keys and types.
    d = _ok(_get(server, "/api/services", "phone-a"))
    (svc,) = d["services"]
    assert svc == {"_id": SID, "service_id": SID, "description": "web", "version": "1.0",
                   "tags": ["web", "test"]}  # fmt: skip
    assert _ok(_get(server, f"/api/services/get?serviceId={SID}")) == svc
    r = _get(server, "/api/services/get?serviceId=org.example.nothing")
    assert r.status == 404 and r.headers["content-type"].startswith("text/plain")

    # Metadata: memory and CPU as the Java client parses them (long, long; int, double x2, int).
    d = _ok(_get(server, "/api/system", "phone-a"))
    assert set(d) == {"memory_info", "cpu_info"}
    m, cpu = d["memory_info"], d["cpu_info"]
    assert isinstance(m["max_memory"], int) and 0 < m["free_memory"] <= m["max_memory"]
    assert isinstance(cpu["max_cores"], int) and cpu["max_cores"] >= 1
    assert isinstance(cpu["usage"], float) and 0.0 <= cpu["usage"] <= 100.0
    assert isinstance(cpu["speed"], float) and isinstance(cpu["cache"], int)
    d = _ok(_get(server, "/api/system?services=true&apps=true"))
    assert d["services"] == [svc] and [a["_id"] for a in d["apps"]] == [app_id]

    # Start with join: a real VM; ip_address is the address the client reached.
    vm1 = _ok(_get(server, f"/api/servicevm/start?join=true&serviceId={SID}", "phone-a"))
    assert set(vm1) == {"_id", "service_id", "running", "port", "ip_address", "fqdn",
                        "ssh_port", "vnc_address"}  # fmt: skip
    assert vm1["service_id"] == SID and vm1["running"] is True and vm1["fqdn"] is None
    assert vm1["ip_address"] == "127.0.0.1" and isinstance(vm1["port"], int)
    assert MARKER in _page(vm1["ip_address"], vm1["port"])
    # Another device joins the same instance; without join a device gets its own VM.
    vm2 = _ok(_get(server, f"/api/servicevm/start?join=true&serviceId={SID}", "phone-b"))
    assert vm2["_id"] == vm1["_id"] and vm2["port"] == vm1["port"]
    own = _ok(_get(server, f"/api/servicevm/start?join=false&serviceId={SID}", "phone-c"))
    assert own["_id"] != vm1["_id"] and MARKER in _page(own["ip_address"], own["port"])
    inst = c.get(f"/v1/instances/{vm1['_id']}").json()
    assert sorted(inst["user_ids"]) == ["phone-a", "phone-b"]

    # Stop: a user leaves a shared instance; the last one stops it.
    assert _ok(_get(server, f"/api/servicevm/stop?instanceId={vm1['_id']}", "phone-b")) == {}
    inst = c.get(f"/v1/instances/{vm1['_id']}").json()
    assert inst["state"] == "running" and inst["user_ids"] == ["phone-a"]
    assert _ok(_get(server, f"/api/servicevm/stop?instanceId={own['_id']}", "phone-c")) == {}
    assert c.get(f"/v1/instances/{own['_id']}").json()["state"] == "stopped"
    r = _get(server, f"/api/servicevm/stop?instanceId={own['_id']}")
    assert r.status == 404 and r.text.startswith("Service vm for")

    # Bad input: plain-text 400/404, nothing started.
    before = len(_instances(c))
    for target, status, text in (
        ("/api/servicevm/start?join=true", 400, "Must provide service id"),
        ("/api/servicevm/start?join=true&serviceId=", 400, "Must provide service id"),
        ("/api/servicevm/start?join=true&serviceId=org.example.nope", 404, "404 Not Found"),
        ("/api/servicevm/start?join=true&serviceId=../../etc", 404, "404 Not Found"),
        ("/api/servicevm/stop", 400, "Must provide instance id"),
        ("/api/servicevm/stop?instanceId=0123456789ab", 404, "Service vm for"),
        ("/api/servicevm/stop?instanceId=../x", 404, "Service vm for"),
        ("/api/apps/get", 400, "400 Bad Request"),
        ("/api/apps/get?appId=nope", 404, "404 Not Found"),
        ("/api/command", 404, "404 Not Found"),
        ("/api/nothing/here", 404, "404 Not Found"),
    ):
        r = _get(server, target, "phone-a")
        assert (r.status, r.headers["content-type"].split(";")[0]) == (status, "text/plain")
        assert r.text.startswith(text), (target, r.text)
    assert len(_instances(c)) == before

    # Messages: queued for every device that used the service, each handed out once.
    r = c.post("/v1/messages", json={"service_id": SID, "text": "moved",
                                     "message": "move-to-new-cloudlet-network",
                                     "params": {"cloudlet_name": "self",
                                                "cloudlet_ip": "127.0.0.1",
                                                "cloudlet_port": str(server.port),
                                                "cloudlet_encryption_enabled": "false",
                                                "ssid": ""}})  # fmt: skip
    assert r.status_code == 201 and r.json()["queued"] == 3  # phone-a, -b, -c
    d = _ok(_get(server, f"/api/system/get_messages?serviceId={SID}", "phone-b"))
    (msg,) = d["messages"]
    assert msg["message"] == "move-to-new-cloudlet-network" and msg["device_id"] == "phone-b"
    assert all(isinstance(v, str) for v in msg["params"].values())
    assert _ok(_get(server, f"/api/system/get_messages?serviceId={SID}", "phone-b")) == {
        "messages": []
    }
    # Our client follows such a message: it joins the service on the named cloudlet.
    ep = Endpoint("old", "127.0.0.1", server.port, SID, "x", "127.0.0.1", 1)
    moved = follow(ep, timeout=5, device_id="phone-a")
    assert moved is not None and moved.instance_id == vm1["_id"] and moved.port == vm1["port"]

    # Apps: the list as the Java client filters it, and the file with its real md5sum.
    d = _ok(_get(server, "/api/apps?osName=android&osVersion=4.4&tags=web,other"))
    (app,) = d["apps"]
    assert set(app) == {"_id", "name", "service_id", "description", "package_name",
                        "min_android_version", "md5sum", "app_version", "tags"}  # fmt: skip
    assert app["md5sum"] == hashlib.md5(apk).hexdigest()
    assert _ok(_get(server, "/api/apps?osName=android&osVersion=2.3")) == {"apps": []}
    r = _get(server, f"/api/apps/get?appId={app_id}")
    assert r.status == 200 and r.body == apk and int(r.headers["content-length"]) == len(apk)
    assert hashlib.md5(r.body).hexdigest() == app["md5sum"]
    assert 'filename="web.apk"' in r.headers["content-disposition"]
    assert sorted(p.name for p in (srv_home.home / "apps").iterdir()) == [app_id]
    assert not (tmp_path / "evil").exists()

    # The last user leaves: the instance stops and its QEMU is gone.
    assert _ok(_get(server, f"/api/servicevm/stop?instanceId={vm1['_id']}", "phone-a")) == {}
    assert c.get(f"/v1/instances/{vm1['_id']}").json()["state"] == "stopped"
    wait_until(lambda: not any(i["state"] == "running" for i in _instances(c)), timeout=20)
    c.close()


def test_encrypted_mode_with_an_independent_aes(
    server: Server, sample_overlay: Path, srv_home: Paths
) -> None:
    c = _setup(server, sample_overlay, "--kd-api", "encrypted")
    pw = "s3cret-device-password"
    r = c.post("/v1/devices", json={"device_id": "a1b2c3d4e5f60718", "password": pw})
    assert r.status_code == 201, r.text
    dev = r.json()["device_id"]
    port, conn = server.port, loopback(server.port)

    def cmd(plain: str, device: str = dev, password: str = pw) -> Any:
        return java_command(conn, "127.0.0.1", port, device, aes_encrypt(plain.encode(), password))

    # The plain routes are closed; the reason starts with '#' (what the Java client shows).
    r = _get(server, "/api/services", dev)
    assert r.status == 403 and r.text.startswith("#")
    # Commands and replies are encrypted; Content-Length on every reply.
    r = cmd("/services")
    assert r.status == 200
    assert json.loads(aes_decrypt(r.body, pw))["services"][0]["service_id"] == SID
    d = json.loads(aes_decrypt(cmd("/system&services=true").body, pw))
    assert d["memory_info"]["max_memory"] > 0 and d["services"][0]["_id"] == SID
    apk = os.urandom(3000)
    app_id = c.post("/v1/apps", content=apk, params={"name": "w", "service_id": SID}).json()["id"]
    assert aes_decrypt(cmd(f"/apps/get&appId={app_id}").body, pw) == apk

    # Refusals: nothing starts, and nothing is told but why.
    start = f"/servicevm/start&join=true&serviceId={SID}"
    good = aes_encrypt(start.encode(), pw)
    raw = bytearray(__import__("base64").b64decode(good))
    raw[-17] ^= 0x55  # flips the last padding byte: the last block no longer unpads
    bad_pad = __import__("base64").b64encode(bytes(raw))
    for reply, status in (
        (java_command(conn, "127.0.0.1", port, dev, "%%%not base64%%%"), 400),
        (java_command(conn, "127.0.0.1", port, dev, good[:-4]), 400),  # truncated
        (java_command(conn, "127.0.0.1", port, dev, bad_pad), 401),
        (cmd(start, password="the-wrong-password"), 401),
        (cmd(start, device="unknown-device"), 401),
        (java_command(conn, "127.0.0.1", port, "", good), 401),
        (cmd("/servicevm/nothing"), 404),
    ):
        assert reply.status == status, (status, reply.text)
        assert reply.headers["content-type"].startswith("text/plain")
        assert reply.text.startswith("#"), reply.text
    assert _instances(c) == []
    assert qemu_pids_mentioning(str(srv_home.home)) == []

    # A start through the encrypted API: a real VM, its reply decrypted with our own AES.
    r = cmd(start)
    assert r.status == 200, r.text
    vm = json.loads(aes_decrypt(r.body, pw))
    assert vm["running"] is True and vm["ip_address"] == "127.0.0.1"
    assert MARKER in _page(vm["ip_address"], vm["port"])
    # Our own client speaks it too (the same device and password), and joins that instance.
    kd = KDClient("127.0.0.1", port, device_id=dev, password=pw)
    assert kd.start(SID, join=True).instance_id == vm["_id"]
    assert [s["service_id"] for s in kd.services()] == [SID]
    # Revoked: 403 with the reason; re-authorised: it works again.
    assert c.post(f"/v1/devices/{dev}/revoke").status_code == 200
    r = cmd("/services")
    assert r.status == 403 and r.text.startswith("#Authorization has been revoked")
    with pytest.raises(KDCredentialsError):
        kd.services()
    assert c.post(f"/v1/devices/{dev}/authorize").status_code == 200
    r = cmd(f"/servicevm/stop&instanceId={vm['_id']}")
    assert r.status == 200 and json.loads(aes_decrypt(r.body, pw)) == {}
    assert c.get(f"/v1/instances/{vm['_id']}").json()["state"] == "stopped"
    c.close()
