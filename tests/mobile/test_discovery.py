"""Discovery across network namespaces: two cloudlet servers and a client on one bridge.

The client (in its own namespace) finds both servers over zeroconf, reads and ranks them,
connects to the best (a real VM, reached across namespaces at the address and port the
compatible API gave), sees the ranking change once the service runs there, and sees a stopped
server withdraw. Avahi's ``avahi-browse``, run in the client's namespace, is an independent
peer that must see the same advertisements (exactly one TXT pair).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cloudlet.client.mobile_admin import LocalMobileAdmin
from cloudlet.config import Paths
from cloudlet.services.local import LocalCloudlet
from helpers import qemu_pids_mentioning
from mobile.conftest import (
    Avahi,
    Lan,
    aes_decrypt,
    aes_encrypt,
    extra_home,
    java_command,
    java_get,
    serve_cmd,
    wait_log,
)
from serverlib import MARKER

pytestmark = pytest.mark.vm

SID = "org.example.web"
PW = "tablet-password-1"
DEVICE = "tab-1"
PORT = 9999


def _register(p: Paths, overlay: Path) -> None:
    spec = {"service_id": SID, "base": "tiny", "guest_ports": [80], "description": "web"}
    LocalCloudlet(p).create_service(spec, overlay)


def _client(net: Lan, *args: str) -> Any:
    """``cloudlet ARGS --json`` run in the client's namespace, as this device."""
    cmd = [sys.executable, "-m", "cloudlet", *args, "--json", "--device-id", DEVICE,
           "--password", f"cloudlet-b={PW}"]  # fmt: skip
    r = net.run("c", cmd, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _discover(net: Lan, expect: set[str]) -> list[dict[str, Any]]:
    """Browse until exactly ``expect`` answer (mDNS can miss a first window; bounded)."""
    rows: list[dict[str, Any]] = []
    for _ in range(4):
        rows = _client(net, "discover", "--timeout", "2", "--service", SID)
        if {r["name"] for r in rows} == expect:
            return rows
    raise AssertionError(f"discovered {[r['name'] for r in rows]}, expected {sorted(expect)}")


def _browse(avahi: Avahi, expect: set[str]) -> list[list[str]]:
    lines: list[list[str]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = avahi.browse()
        if {x[3] for x in lines} == expect:
            return lines
        time.sleep(0.5)
    raise AssertionError(f"avahi-browse saw {lines}, expected {sorted(expect)}")


def _get_page(net: Lan, host: str, port: int) -> str:
    """GET /marker.html from inside the client's namespace."""
    c = net.hosts["c"].connect(port, host)
    with contextlib.closing(c()) as s:
        s.sendall(f"GET /marker.html HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode("latin-1")


def _stop(proc: Any, log: Path) -> None:
    """SIGTERM: a graceful shutdown (uvicorn then re-raises the signal: -15 is normal)."""
    proc.terminate()
    assert proc.wait(30) in (0, -15)
    assert "Application shutdown complete" in log.read_text()


def test_two_cloudlets_found_ranked_used_and_withdrawn_across_namespaces(
    srv_home: Paths,
    session_home: Paths,
    tiny_base: Any,
    sample_overlay: Path,
    tmp_path: Path,
    lan: Lan,
) -> None:
    homes = {"a": srv_home, "b": extra_home(tmp_path, session_home, tiny_base, "home-b")}
    for h in homes.values():
        _register(h, sample_overlay)
    LocalMobileAdmin(homes["b"]).create_device(device_id=DEVICE, password=PW)
    net = lan.up(["a", "b", "c"])
    ip = {k: h.ip for k, h in net.hosts.items()}
    procs = {}
    for name, extra in (("a", []), ("b", ["--kd-api", "encrypted"])):
        log = tmp_path / f"server-{name}.log"
        env = dict(os.environ, CLOUDLET_HOME=str(homes[name].home))
        cmd = serve_cmd("--host", ip[name], "--port", str(PORT), "--name", f"cloudlet-{name}",
                        *extra)  # fmt: skip
        procs[name] = net.spawn(name, cmd, log, env=env)
    for name in procs:
        wait_log(tmp_path / f"server-{name}.log", "advertising", procs[name])
    avahi = Avahi(net, "c", tmp_path / "avahi").start()

    # The client finds both, with their addresses, ports and encryption, and ranks both.
    rows = _discover(net, {"cloudlet-a", "cloudlet-b"})
    by = {r["name"]: r for r in rows}
    for name, enc in (("a", False), ("b", True)):
        r = by[f"cloudlet-{name}"]
        assert (r["host"], r["port"], r["encryption"]) == (ip[name], PORT, enc)
        assert r["txt"] == {"encryption": "enabled" if enc else "disabled"}
        assert r["error"] is None and r["services"] == [SID]
        assert r["memory_info"]["free_memory"] > 0 and r["rtt_ms"] > 0
    assert sorted(r["rank"] for r in rows) == [1, 2]

    # Avahi, an independent mDNS stack, sees the same: one TXT pair, the right address.
    lines = _browse(avahi, {"cloudlet-a", "cloudlet-b"})
    for x in lines:
        name = x[3].removeprefix("cloudlet-")
        assert x[2] == "IPv4" and x[4] == "_cloudlet._tcp" and x[5] == "local"
        assert (x[7], x[8]) == (ip[name], str(PORT))
        enc = "enabled" if name == "b" else "disabled"
        assert x[9] == f'"encryption={enc}"'

    # Connect: discover, rank, start on the best; the endpoint is reachable from the client.
    ep = _client(net, "connect", SID, "--timeout", "2")
    best = ep["cloudlet"].removeprefix("cloudlet-")
    other = "b" if best == "a" else "a"
    assert ep["host"] == ip[best] and ep["cloudlet_url"] == f"http://{ip[best]}:{PORT}"
    assert MARKER in _get_page(net, ep["host"], ep["port"])
    # Now the service runs there: that cloudlet ranks first ("warm": a join, not a start).
    rows = _discover(net, {"cloudlet-a", "cloudlet-b"})
    ranked = {r["name"]: r for r in rows}
    assert ranked[f"cloudlet-{best}"]["rank"] == 1 and ranked[f"cloudlet-{best}"]["scores"][0] == 2
    assert (
        ranked[f"cloudlet-{other}"]["rank"] == 2 and ranked[f"cloudlet-{other}"]["scores"][0] == 0
    )
    assert ranked[f"cloudlet-{best}"]["cloudlet"]["services"][SID]["users"] == 1

    # Stop it through the compatible API (encrypted on b), from the client's namespace.
    conn = net.hosts["c"].connect(PORT, ip[best])
    if best == "a":
        r = java_get(conn, ip[best], PORT, f"/api/servicevm/stop?instanceId={ep['instance_id']}",
                     DEVICE)  # fmt: skip
        assert r.status == 200 and r.json() == {}
    else:
        cmd = f"/servicevm/stop&instanceId={ep['instance_id']}".encode()
        r = java_command(conn, ip[best], PORT, DEVICE, aes_encrypt(cmd, PW))
        assert r.status == 200 and json.loads(aes_decrypt(r.body, PW)) == {}

    # A server that stops withdraws its advertisement (goodbye packets), for both peers.
    _stop(procs["b"], tmp_path / "server-b.log")
    assert [r["name"] for r in _discover(net, {"cloudlet-a"})] == ["cloudlet-a"]
    _browse(avahi, {"cloudlet-a"})
    _stop(procs["a"], tmp_path / "server-a.log")
    for h in homes.values():  # no VM outlives its server: standby VMs go with it
        assert qemu_pids_mentioning(str(h.home)) == []
