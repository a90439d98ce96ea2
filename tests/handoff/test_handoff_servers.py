"""Handoff between two real cloudlet servers (processes) through the native API."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloudlet.config import Paths, paths
from helpers import counter, qemu_pids_mentioning
from serverlib import Server, register, start, upload, wait_op

pytestmark = pytest.mark.vm
SID = "org.example.move"


def _home(root: Path, session_home: Paths, tiny_base: Any, with_base: bool) -> Paths:
    root.mkdir()
    (root / "images").symlink_to(session_home.images)
    p = paths(root)
    shutil.copy(session_home.cache / "accel.json", p.cache / "accel.json")
    if with_base:
        (p.bases / "tiny").symlink_to(tiny_base.dir)
    return p


@pytest.fixture
def make_server(
    tmp_path: Path, session_home: Paths, tiny_base: Any, sample_overlay: Path
) -> Iterator[Any]:
    made: list[Server] = []

    def make(name: str, *, with_base: bool = True, service: bool = True) -> Server:
        s = Server(
            _home(tmp_path / name, session_home, tiny_base, with_base), tmp_path / f"{name}.log"
        )
        s.start("--no-bootstrap")
        made.append(s)
        if service:
            with s.client() as c:
                register(c, upload(c, sample_overlay)["id"], sid=SID)
        return s

    yield make
    for s in made:
        s.stop()
    for s in made:
        # The servers leave instances running on purpose (a restart re-adopts them): end them.
        from cloudlet.cli.common import run_async
        from cloudlet.hypervisor.vm import VMManager

        mgr = VMManager(s.paths)
        for vm in mgr.list():
            run_async(mgr.delete(vm.id, force=True))
        assert qemu_pids_mentioning(str(s.paths.home)) == []


def _hit(inst: dict[str, Any]) -> dict[str, int]:
    return counter(inst["endpoints"]["80"]["port"])


def test_instance_moves_between_servers(make_server: Any) -> None:
    src, dst = make_server("src"), make_server("dst")
    with src.client() as c:
        d = start(c, SID, user="alice")
        inst = d["instance"]
        for _ in range(2):
            _hit(inst)
        # A KD-Cloudlet client (device) joins the same instance through the compatible API.
        kd = httpx.get(
            f"{src.url}/api/servicevm/start?join=true&serviceId={SID}",
            headers={"X-Device-ID": "dev-1"},
        )
        assert kd.status_code == 200 and kd.json()["_id"] == inst["id"], kd.text
        r = c.post(f"/v1/instances/{inst['id']}/handoff", json={"to": dst.url, "token": dst.token})
        assert r.status_code == 202, r.text
        op = wait_op(c, r.json()["operation"])
        assert op["state"] == "succeeded", op
        rep = op["result"]["report"]
        assert rep["downtime_s"] < rep["total_s"] and rep["bytes_on_wire"] > 0
        moved = c.get(f"/v1/instances/{inst['id']}").json()
        assert moved["state"] == "moved" and moved["endpoints"]["moved_to"]["cloudlet"] == dst.url
        # The source holds nothing of it any more (a paused standby for new starts may remain).
        assert inst["vm_id"] not in [v["id"] for v in c.get("/v1/vms").json()]
    with dst.client() as c:
        (there,) = c.get("/v1/instances").json()
        assert there["state"] == "running" and there["user_ids"] == ["alice", "dev-1"]
        assert there["start_kind"] == "handoff"
    # The guest's state went with it: the in-memory counter goes on.
    assert _hit(there)["memory"] == 3
    # The source's KD-compatible API tells the device where the service went, once.
    url = f"{src.url}/api/system/get_messages?serviceId={SID}"
    msgs = httpx.get(url, headers={"X-Device-ID": "dev-1"}).json()["messages"]
    assert len(msgs) == 1 and msgs[0]["message"] == "move-to-new-cloudlet-network"
    assert int(msgs[0]["params"]["cloudlet_port"]) == dst.port
    assert int(msgs[0]["params"]["service_port"]) == there["endpoints"]["80"]["port"]
    assert httpx.get(url, headers={"X-Device-ID": "dev-1"}).json()["messages"] == []
    assert moved["endpoints"]["80"]["port"] == there["endpoints"]["80"]["port"]


def test_refusals_leave_the_instance_running(make_server: Any) -> None:
    src = make_server("src")
    nobase = make_server("nobase", with_base=False, service=False)
    with src.client() as c:
        inst = start(c, SID)["instance"]
        _hit(inst)
        # A destination without the base VM: refused before anything is paused.
        r = c.post(
            f"/v1/instances/{inst['id']}/handoff", json={"to": nobase.url, "token": nobase.token}
        )
        op = wait_op(c, r.json()["operation"])
        assert op["state"] == "failed" and "does not hold base VM" in op["error"]["message"]
        # A wrong token: the destination says 401, the operation fails with that reason.
        r = c.post(f"/v1/instances/{inst['id']}/handoff", json={"to": nobase.url, "token": "nope"})
        op = wait_op(c, r.json()["operation"])
        assert op["state"] == "failed" and "401" in op["error"]["message"]
        # A device token may not move instances.
        dev = c.post("/v1/tokens", json={"role": "device"}).json()["token"]
        with httpx.Client(base_url=src.url, headers={"Authorization": f"Bearer {dev}"}) as d:
            r = d.post(f"/v1/instances/{inst['id']}/handoff", json={"to": nobase.url, "token": "x"})
            assert r.status_code == 403
        # No token at all: 401 and nothing done.
        assert (
            httpx.post(f"{src.url}/v1/instances/{inst['id']}/handoff", json={}).status_code == 401
        )
        assert c.get(f"/v1/instances/{inst['id']}").json()["state"] == "running"
    assert _hit(inst)["memory"] == 2


def test_second_handoff_while_one_runs_is_409(make_server: Any) -> None:
    src, dst = make_server("src"), make_server("dst")
    with src.client() as c:
        inst = start(c, SID)["instance"]
        body = {"to": dst.url, "token": dst.token}
        first = c.post(f"/v1/instances/{inst['id']}/handoff", json=body)
        assert first.status_code == 202
        second = c.post(f"/v1/instances/{inst['id']}/handoff", json=body)
        assert second.status_code == 409
        assert wait_op(c, first.json()["operation"])["state"] == "succeeded"


def test_destination_killed_mid_handoff(make_server: Any) -> None:
    src, dst = make_server("src"), make_server("dst")
    with src.client() as c:
        inst = start(c, SID)["instance"]
        _hit(inst)
        dst.kill9()  # the destination is gone before (or while) the handoff talks to it
        r = c.post(f"/v1/instances/{inst['id']}/handoff", json={"to": dst.url, "token": dst.token})
        op = wait_op(c, r.json()["operation"])
        assert op["state"] == "failed"
        assert c.get(f"/v1/instances/{inst['id']}").json()["state"] == "running"
    assert _hit(inst)["memory"] == 2
