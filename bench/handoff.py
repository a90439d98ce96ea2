#!/usr/bin/env python3
"""VM handoff between two cloudlets against QEMU's own live migration, on the same shaped path.

The path (``handoff_bed.py``): namespaces A and B, a veth pair shaped with ``tc tbf`` both ways
(5, 25, 100 Mbit/s), and a user-space relay in B adding 25 ms each way (the kernel has no
netem). Every byte from A to B crosses the veth and the relay, for both contenders; the relay
counts them. At the start of each run the path's RTT and rate are measured through it.

Contenders, each moving a VM of the same service from A to B, in the same run, alternately:

- **handoff**: two real cloudlet servers (``cloudlet serve``, one per namespace, each with its
  own data dir holding the same base VM and the same service); an instance started on A is
  moved by ``POST /v1/instances/{id}/handoff`` to B's URL (through the relay) with B's token.
- **native**: what ``virsh migrate --live --copy-storage-inc`` does with stock QEMU, on an
  instance started the same way on A (the same QEMU process the server made): on B a QEMU with
  the same command line and ``-incoming defer``, a fresh qcow2 top layer over the same base
  disk, exported writable over NBD; on A ``drive-mirror`` (sync=top, mode=existing) of the top
  layer into that export until it is in sync, then ``migrate`` over TCP with QEMU's default
  capabilities, ``max-bandwidth`` 0 (the link is the limit) and ``pause-before-switchover``,
  the mirror completed while the source is paused, ``migrate-continue``, and ``cont`` on B.
  Bounded by a timeout; a run that hits it is reported as "> timeout", not dropped.

Guests: ``tiny`` (the tiny image, 256 MiB, the sample-like service whose counter CGI keeps its
count in memory) and ``debian`` (the 1 GiB Debian guest of ``bench/synthesis.py``'s workload:
python3 + numpy, its numpy service on 8080), in which a dirtying process keeps rewriting a
buffer at a steady rate for the whole move.

Figures, per run: total time (handoff: the engine's ``total_s``, start to destination resumed;
native: ``drive-mirror`` to destination ``cont``), downtime (from outside: a client polling the
service every 10 ms, from inside each namespace; the last answer from the source to the first
from the destination), bytes on the wire (payload counted by the relay, both directions; veth
bytes too). Medians over the runs. One more handoff of the Debian guest runs with the link
changed 5 -> 25 -> 5 Mbit/s while it moves, to see the compression choice follow.

    .venv/bin/python bench/handoff.py [--guests tiny,debian] [--bandwidths 5,25,100]
        [--tiny-runs 3] [--debian-runs 1] [--native-timeout-tiny 120]
        [--native-timeout-debian 5:300,25:900,600] [--poll-interval 0.01] [--no-follow]

Native timeouts are per guest and bandwidth (Mbit/s:seconds). At 25 Mbit/s the Debian guest's
native run gets 900 s, more than 10x the handoff, so that the "1/10 of QEMU's time" target is
decided either way. About 55 minutes with the defaults (root needed: namespaces and tc). Progress
goes to stderr (and a markdown table of the medians at the end); the last line of stdout is a
JSON summary; every run's details, with the client's requests around the switch, are in
``<home>/run/runs.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fcntl
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cloudlet.config import Paths, paths
from cloudlet.errors import NotFoundError
from cloudlet.hypervisor.ports import PortForward
from cloudlet.hypervisor.qemu import find_tool, qemu_version
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.hypervisor.vm import VM, VMManager, VMState, build_command
from cloudlet.images.store import ImageStore
from cloudlet.images.tiny import build_tiny, recipe_id
from cloudlet.synthesis.base import BaseStore, BaseVM
from cloudlet.synthesis.capture import capture_overlay
from cloudlet.util.fs import atomic_write_json, read_json
from cloudlet.util.procs import qemu_pids_mentioning, terminate
from handoff_bed import (  # bench/ is on sys.path when this file runs
    B_ADDR,
    LOCAL,
    VM_ADDR,
    NetPath,
    Poller,
    ProxyProcess,
    bytes_between,
    downtime,
    netns,
    probe_path,
)

MiB = 1 << 20
T0 = time.monotonic()
SERVER_PORT = 9999
MIGRATION_PORT = 4444
NBD_PORT = 10809
NATIVE_PORT_BASE = 20000  # the native destination's host port for guest port P: 20000 + P
WORKLOAD_VERSION = 1


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- guests ----------------------------------------------------------------------------------

TINY_MARKER = "served-by-the-handoff-bench"

DIRTY_MARK = b"cloudlet dirty page"  # in the text half of every page the dirtier writes

# The dirtying process of the Debian guest: a buffer of SIZE bytes rewritten at RATE bytes/s,
# one page after the other. Each page is half fresh random bytes, half a fixed text, so it
# compresses about 2x, like the real guest RAM in the facts file (zstd-1: 2.09x). Its progress
# (bytes written, seconds of guest time) goes to /run/dirty.json every second.
DIRTY_PY = b"""\
import json, os, sys, time
import numpy as np
size, rate = int(sys.argv[1]), float(sys.argv[2])
pages = size // 4096
buf = np.zeros((pages, 4096), dtype=np.uint8)
buf[:, 2048:] = np.frombuffer((b"cloudlet dirty page, text half. " * 64)[:2048], np.uint8)
step, pos, written = 32, 0, 0
t0 = last = time.monotonic()
while True:
    now = time.monotonic()
    while written < (now - t0) * rate:
        n = min(step, pages - pos)
        buf[pos:pos + n, :2048] = np.frombuffer(os.urandom(n * 2048), np.uint8).reshape(n, 2048)
        pos = (pos + n) % pages
        written += n * 4096
    if now - last >= 1.0:
        with open("/run/dirty.json.tmp", "w") as f:
            json.dump({"bytes": written, "seconds": now - t0}, f)
        os.rename("/run/dirty.json.tmp", "/run/dirty.json")
        last = now
    time.sleep(0.01)
"""


@dataclass
class Guest:
    name: str
    base: str
    memory_mib: int
    ports: list[int]
    poll_port: int  # the guest port the polling client asks
    poll_path: str
    service_id: str
    dirty: bool  # run the dirtying process during each move
    native_timeout: dict[float, float] = field(default_factory=dict)  # Mbit/s -> s; 0: any
    runs: int = 3

    def timeout_at(self, rate: float) -> float:
        return self.native_timeout.get(rate, self.native_timeout.get(0.0, 600.0))


def parse_timeouts(s: str) -> dict[float, float]:
    """``600`` (every bandwidth) or ``5:300,25:600`` (per bandwidth, Mbit/s:seconds)."""
    out = {}
    for part in s.split(","):
        if ":" in part:
            bw, t = part.split(":")
            out[float(bw)] = float(t)
        else:
            out[0.0] = float(part)
    return out


def ensure_tiny(lib: Paths) -> tuple[BaseVM, Path]:
    """Image ``tiny``, base ``tiny`` (256 MiB) and an overlay like the tests' sample service."""
    store = ImageStore(lib)
    try:
        img = store.get("tiny")
        if img.extra.get("recipe") != recipe_id():
            raise NotFoundError("stale")
    except NotFoundError:
        log("building the tiny image")
        img = build_tiny(lib, "tiny", force=True)
    base = asyncio.run(_ensure_base(lib, "tiny", img, 256, None))
    overlay = lib.home / "work" / "tiny.overlay"

    async def build() -> None:
        mgr = VMManager(lib)
        vm = await BaseStore(lib).start_vm("tiny", vm_name="handoff-bench-tiny")
        try:
            r = await mgr.exec(vm.id, f"echo {TINY_MARKER} > /www/marker.html && sync")
            if r.exit_code != 0:
                raise RuntimeError(f"customizing the tiny guest failed: {r.stderr!r}")
            await capture_overlay(lib, vm.id, overlay)
        finally:
            await mgr.delete(vm.id, force=True)

    _ensure_overlay(overlay, base, build)
    return base, overlay


def ensure_debian(lib: Paths) -> tuple[BaseVM, Path]:
    """The synthesis benchmark's Debian workload: its image, base and customization, captured."""
    import synthesis  # bench/synthesis.py: its builders make the workload

    wl = synthesis.WORKLOADS["debian"]
    img = synthesis.ensure_image(lib, wl)
    base = asyncio.run(synthesis.ensure_base(lib, wl, img))
    overlay = lib.home / "work" / "debian.overlay"

    async def build() -> None:
        mgr = VMManager(lib)
        vm = await BaseStore(lib).start_vm(wl.base, vm_name="handoff-bench-debian")
        try:
            info = await wl.customize(mgr, vm)
            log(f"debian: customized ({info.get('apt_s')} s of apt); capturing the overlay")
            await capture_overlay(lib, vm.id, overlay)
        finally:
            await mgr.delete(vm.id, force=True)

    _ensure_overlay(overlay, base, build)
    return base, overlay


async def _ensure_base(
    lib: Paths, name: str, img: Any, memory_mib: int, ports: list[int] | None
) -> BaseVM:
    store = BaseStore(lib)
    try:
        base = store.get(name)
        if base.image_id == img.content_id and base.hardware.memory_mib == memory_mib:
            return base
        store.delete(name)
    except NotFoundError:
        pass
    log(f"creating base VM {name} ({memory_mib} MiB)")
    return await store.create(img, name, memory_mib=memory_mib, ports=ports)


def _ensure_overlay(overlay: Path, base: BaseVM, build: Callable[[], Any]) -> None:
    """Build the overlay once per base (its record says which base it was made against)."""
    rec = overlay.with_suffix(".json")
    if overlay.exists() and rec.exists():
        d = read_json(rec)
        if d.get("base_id") == base.base_id and d.get("version") == WORKLOAD_VERSION:
            return
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.unlink(missing_ok=True)
    log(f"making the overlay {overlay.name} against base {base.name}")
    asyncio.run(build())
    atomic_write_json(rec, {"base_id": base.base_id, "version": WORKLOAD_VERSION})


# -- servers ---------------------------------------------------------------------------------


class NsClient:
    """An HTTP client whose connections are made inside network namespace ``ns``."""

    def __init__(self, ns: str, base_url: str, token: str, timeout: float = 120) -> None:
        self.ns = ns
        self.c = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        with netns(self.ns):
            return self.c.request(method, url, **kw)

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("POST", url, **kw)

    def close(self) -> None:
        self.c.close()


class Server:
    """``cloudlet serve`` in namespace ``ns`` on 127.0.0.1:9999, VM host ports on VM_ADDR."""

    def __init__(self, name: str, ns: str, home: Paths, logfile: Path) -> None:
        self.name, self.ns, self.paths, self.logfile = name, ns, home, logfile
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: NsClient | None = None

    def start(self) -> Server:
        env = dict(os.environ, CLOUDLET_HOME=str(self.paths.home))
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, "-m", "cloudlet", "serve",
               "--host", LOCAL, "--port", str(SERVER_PORT), "--no-bootstrap",
               "--vm-bind", VM_ADDR, "--no-advertise", "--kd-api", "off",
               "--idle-timeout", "86400", "--name", self.name]  # fmt: skip
        with open(self.logfile, "ab") as f:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited; see {self.logfile}")
            with contextlib.suppress(httpx.HTTPError, OSError), netns(self.ns):
                r = httpx.get(f"http://{LOCAL}:{SERVER_PORT}/healthz", timeout=1)
                if r.status_code == 200 and (self.paths.home / "admin-token").exists():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.name} did not come up; see {self.logfile}")
            time.sleep(0.1)
        self.client = NsClient(self.ns, f"http://{LOCAL}:{SERVER_PORT}", self.token)
        return self

    @property
    def token(self) -> str:
        return (self.paths.home / "admin-token").read_text().strip()

    @property
    def c(self) -> NsClient:
        assert self.client is not None
        return self.client

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None:
            terminate(self.proc)
        self.proc = None


def server_home(root: Path, lib: Paths, bases: list[BaseVM]) -> Paths:
    """A fresh data dir sharing the library's images and holding the same base VMs (links)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "images").symlink_to(lib.images)
    p = paths(root)
    if (lib.cache / "accel.json").exists():
        shutil.copy(lib.cache / "accel.json", p.cache / "accel.json")
    for b in bases:
        (p.bases / b.name).symlink_to(b.dir)
    return p


def wait_op(c: NsClient, op: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        d: dict[str, Any] = c.get(f"/v1/operations/{op}").json()
        if d["state"] in ("succeeded", "failed", "cancelled"):
            return d
        if time.monotonic() > deadline:
            raise TimeoutError(f"operation {op} still {d['state']} after {timeout} s")
        time.sleep(0.2)


def register(srv: Server, guest: Guest, overlay: Path) -> None:
    with open(overlay, "rb") as f:
        r = srv.c.post(f"/v1/overlays/upload?name={guest.name}", content=f.read(), timeout=600)
    if r.status_code != 201:
        raise RuntimeError(f"overlay upload to {srv.name} failed: {r.status_code} {r.text}")
    spec = {
        "service_id": guest.service_id,
        "base": guest.base,
        "overlay": r.json()["id"],
        "guest_ports": guest.ports,
        "memory_min_mib": guest.memory_mib,
        "max_users": 100,
    }
    r = srv.c.post("/v1/services", json=spec)
    if r.status_code != 201:
        raise RuntimeError(f"registering {guest.service_id} on {srv.name}: {r.text}")


def start_instance(srv: Server, guest: Guest, user: str) -> dict[str, Any]:
    body = {"service_id": guest.service_id, "join": False, "user": user}
    r = srv.c.post("/v1/instances?wait=300", json=body, timeout=400)
    if r.status_code not in (200, 202):
        raise RuntimeError(f"starting {guest.service_id}: {r.status_code} {r.text}")
    d = r.json()
    if r.status_code == 202:
        op = wait_op(srv.c, d["operation"], 600)
        if op["state"] != "succeeded":
            raise RuntimeError(f"starting {guest.service_id} failed: {op.get('error')}")
    inst: dict[str, Any] = srv.c.get(f"/v1/instances/{d['instance']['id']}").json()
    if inst["state"] != "running":
        raise RuntimeError(f"instance {inst['id']} is {inst['state']}")
    return inst


def stop_instance(srv: Server, iid: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        srv.c.post(f"/v1/instances/{iid}/stop", timeout=60)


def wait_standby(srv: Server, guest: Guest, timeout: float = 180) -> None:
    """Wait until the server's background standby VM for the service is made (it costs CPU
    and disk while it is being made, which must not overlap a measured move)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vms = srv.c.get("/v1/vms").json()
        if any(
            v["name"].startswith("inst-spare") and v["state"] == "paused"
            and v["source"] == f"base:{guest.base}"
            for v in vms
        ):  # fmt: skip
            return
        time.sleep(0.5)
    log(f"warning: no standby VM for {guest.service_id} on {srv.name} after {timeout} s")


async def guest_exec(home: Paths, vm_id: str, cmd: str, stdin: bytes = b"") -> str:
    r = await VMManager(home).exec(vm_id, cmd, stdin=stdin, timeout=60)
    if r.exit_code != 0:
        raise RuntimeError(f"guest command failed ({r.exit_code}): {cmd}: {r.stderr!r}")
    return r.stdout.decode(errors="replace")


def start_dirtier(home: Paths, vm_id: str, size: int, rate: float) -> None:
    async def go() -> None:
        await guest_exec(home, vm_id, "cat > /run/dirty.py", stdin=DIRTY_PY)
        await guest_exec(
            home, vm_id,
            f"setsid python3 /run/dirty.py {size} {rate} > /run/dirty.log 2>&1 < /dev/null &"
            " echo started",
        )  # fmt: skip

    asyncio.run(go())


def dirtier_progress(home: Paths, vm_id: str) -> dict[str, float] | None:
    try:
        out = asyncio.run(guest_exec(home, vm_id, "cat /run/dirty.json"))
        d: dict[str, float] = json.loads(out)
        return d
    except Exception as e:
        log(f"could not read the dirtier's progress: {e}")
        return None


def dirty_rate(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    if not before or not after or after["seconds"] <= before["seconds"]:
        return None
    return (after["bytes"] - before["bytes"]) / (after["seconds"] - before["seconds"])


# -- one move --------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    lib: Paths
    path: NetPath
    proxy: ProxyProcess
    a: Server
    b: Server
    native_home: Paths
    bases: dict[str, BaseVM] = field(default_factory=dict)
    counter: int = 0

    def next_user(self) -> str:
        self.counter += 1
        return f"bench-{self.counter}"


def measure_path(bench: Bench) -> dict[str, float]:
    with netns(bench.path.ns_a):
        return probe_path(B_ADDR, bench.path.rate_mbit)


@contextlib.contextmanager
def link_schedule(path: NetPath, steps: list[tuple[float, float]]) -> Iterator[list[dict]]:
    """Change the link rate at the given offsets (s) from now, in a thread; yields a log."""
    done: list[dict[str, float]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def run() -> None:
        for at, rate in steps:
            if stop.wait(max(0.0, t0 + at - time.monotonic())):
                return
            path.set_rate(rate)
            done.append({"t": round(time.monotonic() - t0, 2), "rate_mbit": rate})
            log(f"link set to {rate:g} Mbit/s")

    th = threading.Thread(target=run, name="link-schedule", daemon=True)
    th.start()
    try:
        yield done
    finally:
        stop.set()
        th.join(10)


def prepare_source(bench: Bench, guest: Guest) -> tuple[dict[str, Any], dict[str, float] | None]:
    """An instance on A (cached start), the standby refilled, the dirtier running."""
    inst = start_instance(bench.a, guest, bench.next_user())
    wait_standby(bench.a, guest)
    before = None
    if guest.dirty:
        start_dirtier(bench.a.paths, inst["vm_id"], bench.args.dirty_mib * MiB,
                      bench.args.dirty_mb_s * 1e6)  # fmt: skip
        time.sleep(bench.args.dirty_warmup)
        before = dirtier_progress(bench.a.paths, inst["vm_id"])
    return inst, before


def source_poller(bench: Bench, guest: Guest, inst: dict[str, Any]) -> Poller:
    port = int(inst["endpoints"][str(guest.poll_port)]["port"])
    return Poller.source(bench.path.ns_a, VM_ADDR, guest.poll_path, port, bench.args.poll_interval)


def tell_dest_port(bench: Bench, guest: Guest, dst: Poller, done: threading.Event) -> None:
    """Tell the destination's client the service's host port as soon as server B has planned
    it (at prepare; its session VM, ``inst-in-*``, in ``GET /v1/vms``), as a real client is
    told where its service went, so that it asks only the service. Until then it discovers.
    Kept up to date: B picks the port again if it was taken meanwhile."""
    while not done.is_set():
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            for v in bench.b.c.get("/v1/vms", timeout=5).json():
                url = v["endpoints"].get(str(guest.poll_port))
                if v["name"].startswith("inst-in-") and url:
                    dst.hint = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        done.wait(0.2)


def settle_pollers(src: Poller, dst: Poller, wait_s: float = 2.0, limit: float = 60) -> None:
    """Let the destination answer a few times (or give up after ``limit``), then stop both."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if dst.answers and time.monotonic() - dst.answers[0].t >= wait_s:
            break
        time.sleep(0.05)
    src.stop()
    dst.stop()


def handoff_run(
    bench: Bench, guest: Guest, rate: float, schedule: list[tuple[float, float]] | None = None
) -> dict[str, Any]:
    bench.path.set_rate(rate)
    inst, dirty0 = prepare_source(bench, guest)
    probe = measure_path(bench)
    src = source_poller(bench, guest, inst).start()
    dst = Poller.dest_after_load(
        bench.path.ns_b, VM_ADDR, guest.poll_path, None, bench.args.poll_interval
    ).start()
    told = threading.Event()
    watcher = threading.Thread(
        target=tell_dest_port, args=(bench, guest, dst, told), name="dest-port", daemon=True
    )
    watcher.start()
    time.sleep(0.5)
    px0, veth0 = bench.proxy.stats(), bench.path.veth_bytes()
    body = {
        "to": f"http://{B_ADDR}:{SERVER_PORT}",
        "token": bench.b.token,
        "downtime_target_s": bench.args.downtime_target,
        "max_rounds": bench.args.max_rounds,
    }
    t0 = time.monotonic()
    with link_schedule(bench.path, schedule or []) as changes:
        r = bench.a.c.post(f"/v1/instances/{inst['id']}/handoff", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"handoff refused: {r.status_code} {r.text}")
        op = wait_op(bench.a.c, r.json()["operation"], bench.args.handoff_timeout)
    wall = time.monotonic() - t0
    settle_pollers(src, dst)
    told.set()
    watcher.join(5)
    px1, veth1 = bench.proxy.stats(), bench.path.veth_bytes()
    out: dict[str, Any] = {
        "contender": "handoff",
        "guest": guest.name,
        "rate_mbit": rate,
        "path": probe,
        "completed": op["state"] == "succeeded",
        "wall_s": round(wall, 3),
        "bytes": bytes_between(px0, px1, [SERVER_PORT]),
        "veth_bytes": {k: veth1[k] - veth0[k] for k in veth1},
        **downtime(src, dst),
        "poll_requests": src.requests + dst.requests,
    }
    _timeline(out, t0)
    if schedule:
        out["link_changes"] = changes
    if op["state"] != "succeeded":
        out["error"] = op.get("error")
        stop_instance(bench.a, inst["id"])
        log(f"handoff {guest.name} @ {rate:g}: FAILED {op.get('error')}")
        return out
    rep = op["result"]["report"]
    # The engine's clock starts a few ms after the POST: its pause and resume, approximately.
    out["timeline"]["engine_pause"] = round(rep["total_s"] - rep["downtime_s"], 3)
    out["timeline"]["engine_resumed"] = round(rep["total_s"], 3)
    out["requests"] = _requests(src, dst, t0, list(out["timeline"].values()))
    out["total_s"] = rep["total_s"]
    out["engine_downtime_s"] = rep["downtime_s"]
    out["engine_bytes"] = rep["bytes_on_wire"]
    out["rounds"] = [
        {k: r_[k] for k in ("round", "final", "memory_pages", "disk_pages", "raw_bytes",
                            "wire_bytes", "devstate_wire_bytes", "throttle", "seconds")}
        for r_ in rep["rounds"]
    ]  # fmt: skip
    fin = rep["rounds"][-1]
    dest_ = rep["destination"]
    # the downtime, piece by piece (the engine's side): pause, device state saved, compare
    # and encode, last byte to the answer (link + destination), and the destination's restore
    out["final_round"] = {
        **fin.get("phases", {}),
        "compare_s": round(fin.get("compare_s", 0.0), 4),
        "encoded_s": round(fin.get("encoded_s", 0.0), 4),
        "round_s": round(fin["seconds"], 4),
        "restore": dest_.get("restore"),
        "restore_s": dest_.get("restore_s"),
    }
    out["compression"] = {
        k: rep["compression"][k] for k in ("current", "link_mbps", "changes", "estimates")
    }
    out["throttle"] = rep.get("throttle", [])
    out["final_burst_s"] = rep.get("final_burst_s")
    out["final_burst"] = rep.get("final_burst")
    dest = rep["destination"]
    if guest.dirty:
        after = dirtier_progress(bench.b.paths, dest["vm"])
        out["dirty_bytes_per_s"] = dirty_rate(dirty0, after)
    if dest.get("instance"):
        stop_instance(bench.b, dest["instance"])
    log(
        f"handoff {guest.name} @ {rate:g} Mbit/s: total {out['total_s']:.2f} s, downtime "
        f"{_s(out['downtime_s'])} (engine {rep['downtime_s']:.3f} s), "
        f"{out['bytes']['total'] / MiB:.1f} MiB on the wire, {len(out['rounds'])} rounds, "
        f"state moved: {out.get('state_moved')}"
    )
    return out


def _requests(src: Poller, dst: Poller, t0: float, around: list[float]) -> dict[str, Any]:
    """The client's requests within 5 s of the given moments (s from ``t0``): when each was
    sent, when it ended, whether it was answered. What the downtime figure is made of."""
    out: dict[str, Any] = {}
    for name, p in (("source", src), ("dest", dst)):
        out[name] = [
            [round(s - t0, 3), round(e - t0, 3), ok, *([note] if note else [])]
            for s, e, ok, note in p.log
            if any(m - 5 <= e - t0 <= m + 5 for m in around)
        ]
    return out


def _timeline(out: dict[str, Any], t0: float) -> None:
    """Seconds from the start of the move to the client's last and first answers."""
    tl = out.setdefault("timeline", {})
    for k in ("source_last_t", "dest_first_t"):
        if out.get(k) is not None:
            tl[k.removesuffix("_t")] = round(out.pop(k) - t0, 3)


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f} s"


# -- the native contender --------------------------------------------------------------------


def native_dest_vm(bench: Bench, src: VM) -> VM:
    """The destination's VM record and files: same hardware, fresh top layer over the base."""
    base = bench.bases[src.source.name]
    mgr = VMManager(bench.native_home)
    fwd = [PortForward(f.guest, NATIVE_PORT_BASE + f.guest, VM_ADDR) for f in src.forwards]
    vm = mgr.new_vm(base.boot_source(), src.hardware, forwards=fwd, name="native-dst")
    subprocess.run(
        [find_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-b", str(base.path("disk.raw")),
         "-F", "raw", str(vm.disk_path)],
        check=True,
    )  # fmt: skip
    with open(vm.ram_path, "wb") as f:
        f.truncate(src.hardware.memory_bytes)
    return vm


async def _until(listener: Any, pred: Callable[[dict[str, Any]], bool], deadline: float) -> Any:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ev = await asyncio.wait_for(listener.get(), left)
        if pred(ev):
            return ev


async def native_migrate(bench: Bench, src: VM, dst: VM, timeout: float) -> dict[str, Any]:
    """Stock live migration with a copy of the top disk layer, as libvirt drives it."""
    res: dict[str, Any] = {"completed": False}
    proc = await asyncio.create_subprocess_exec(
        *bench.path.exec_prefix(bench.path.ns_b), *build_command(dst, incoming=True),
        cwd=dst.dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    dst.pid = dst.read_pid()
    dst.state = VMState.PAUSED
    dst.save()
    if proc.returncode != 0 or dst.pid is None:
        raise RuntimeError(f"destination QEMU did not start: {err.decode(errors='replace')}")
    migration_started = False
    async with (
        await Monitor.connect(dst.qmp_path) as mb,
        await Monitor.connect(src.qmp_path) as ma,
        ma.events(["MIGRATION", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR",
                   "BLOCK_JOB_CANCELLED"]) as ev_a,
        mb.events(["MIGRATION"]) as ev_b,
    ):  # fmt: skip
        await mb.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "events", "state": True}]})  # fmt: skip
        await mb.execute("migrate-incoming", {"uri": f"tcp:{LOCAL}:{MIGRATION_PORT}"})
        await mb.execute("nbd-server-start", {"addr": {"type": "inet",
                         "data": {"host": LOCAL, "port": str(NBD_PORT)}}})  # fmt: skip
        await mb.execute("nbd-server-add", {"device": "disk0", "writable": True})
        caps = [
            {"capability": "x-ignore-shared", "state": False},  # set by our resume: undo it
            {"capability": "events", "state": True},
            {"capability": "pause-before-switchover", "state": True},
        ]
        await ma.execute("migrate-set-capabilities", {"capabilities": caps})
        await ma.execute("migrate-set-parameters", {"max-bandwidth": 0})
        t0 = time.monotonic()
        deadline = t0 + timeout
        res["t_start"] = t0
        try:
            await ma.execute("drive-mirror", {
                "device": "disk0", "job-id": "mirror0", "format": "raw", "sync": "top",
                "mode": "existing",
                "target": f"nbd:{B_ADDR}:{NBD_PORT}:exportname=disk0",
            })  # fmt: skip
            await _until(ev_a, lambda e: e["event"].startswith("BLOCK_JOB_"), deadline)
            jobs = await ma.execute("query-block-jobs")
            if not jobs or not jobs[0].get("ready"):
                raise RuntimeError(f"the disk mirror ended before it was ready: {jobs}")
            res["mirror_ready_s"] = round(time.monotonic() - t0, 3)
            log(f"native: disk mirror in sync after {res['mirror_ready_s']:.1f} s; migrating RAM")
            await ma.execute("migrate", {"uri": f"tcp:{B_ADDR}:{MIGRATION_PORT}"})
            migration_started = True
            last_report = time.monotonic()
            while True:
                try:
                    e = await _until(ev_a, lambda e: e["event"] == "MIGRATION",
                                     min(deadline, time.monotonic() + 30))  # fmt: skip
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise
                    if time.monotonic() - last_report >= 30:
                        info = await ma.execute("query-migrate")
                        ram = info.get("ram", {})
                        log(f"native: {info.get('status')}, {ram.get('transferred', 0) / MiB:.0f}"
                            f" MiB sent, {ram.get('remaining', 0) / MiB:.0f} MiB remaining, "
                            f"pass {ram.get('dirty-sync-count')}, dirtying "
                            f"{ram.get('dirty-pages-rate', 0) * 4096 / 1e6:.1f} MB/s")  # fmt: skip
                        last_report = time.monotonic()
                    continue
                status = e["data"]["status"]
                if status == "pre-switchover":
                    break
                if status in ("failed", "cancelled"):
                    info = await ma.execute("query-migrate")
                    raise RuntimeError(f"migration {status}: {info.get('error-desc')}")
            # The source is paused: complete the mirror (no pivot), then switch over.
            t_pause = time.monotonic()
            await ma.execute("block-job-cancel", {"device": "mirror0"})
            await _until(ev_a, lambda e: e["event"] in ("BLOCK_JOB_COMPLETED",
                         "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"), deadline)  # fmt: skip
            await ma.execute("migrate-continue", {"state": "pre-switchover"})
            await _until(ev_b, lambda e: e["data"]["status"] in ("completed", "failed"), deadline)
            info = await ma.execute("query-migrate")
            with contextlib.suppress(Exception):
                await _until(
                    ev_a,
                    lambda e: e["event"] == "MIGRATION" and e["data"]["status"] == "completed",
                    time.monotonic() + 10,
                )
                info = await ma.execute("query-migrate")
            await mb.execute("nbd-server-stop")
            await mb.execute("cont")
            t_end = time.monotonic()
            dst.state = VMState.RUNNING
            dst.save()
            ram = info.get("ram", {})
            res.update({
                "t_pause": t_pause,
                "completed": True,
                "total_s": round(t_end - t0, 3),
                "switchover_s": round(t_end - t_pause, 3),
                "qemu_downtime_ms": info.get("downtime"),
                "ram_transferred": ram.get("transferred"),
                "ram_passes": ram.get("dirty-sync-count"),
                "t_end": t_end,
            })  # fmt: skip
        except (TimeoutError, RuntimeError) as e:
            info = {}
            with contextlib.suppress(Exception):
                info = await ma.execute("query-migrate")
            jobs = []
            with contextlib.suppress(Exception):
                jobs = await ma.execute("query-block-jobs")
            ram = info.get("ram", {})
            res.update({
                "stuck_in": "ram" if migration_started else "disk mirror (never in sync)",
                "error": "timeout" if isinstance(e, TimeoutError) else str(e),
                "elapsed_s": round(time.monotonic() - t0, 3),
                "ram_transferred": ram.get("transferred"),
                "ram_remaining": ram.get("remaining"),
                "ram_passes": ram.get("dirty-sync-count"),
                "dirty_pages_rate": ram.get("dirty-pages-rate"),
                "mirror": jobs,
            })  # fmt: skip
            if migration_started:
                with contextlib.suppress(Exception):
                    await ma.execute("migrate_cancel")
            with contextlib.suppress(Exception):
                await ma.execute("block-job-cancel", {"device": "mirror0", "force": True})
            st = {}
            with contextlib.suppress(Exception):
                st = await ma.execute("query-status")
            if st and not st.get("running"):
                with contextlib.suppress(Exception):
                    await ma.execute("cont")
    return res


def native_run(bench: Bench, guest: Guest, rate: float) -> dict[str, Any]:
    bench.path.set_rate(rate)
    inst, dirty0 = prepare_source(bench, guest)
    src_vm = VMManager(bench.a.paths).get(inst["vm_id"])
    dst_vm = native_dest_vm(bench, src_vm)
    probe = measure_path(bench)
    src = source_poller(bench, guest, inst).start()
    port = NATIVE_PORT_BASE + guest.poll_port
    dst = Poller.dest(bench.path.ns_b, VM_ADDR, guest.poll_path, port, bench.args.poll_interval)
    dst.start()
    time.sleep(0.5)
    px0, veth0 = bench.proxy.stats(), bench.path.veth_bytes()
    try:
        res = asyncio.run(native_migrate(bench, src_vm, dst_vm, guest.timeout_at(rate)))
        if res["completed"]:
            settle_pollers(src, dst)
        else:
            src.stop()
            dst.stop()
        px1, veth1 = bench.proxy.stats(), bench.path.veth_bytes()
        out: dict[str, Any] = {
            "contender": "native",
            "guest": guest.name,
            "rate_mbit": rate,
            "path": probe,
            "timeout_s": guest.timeout_at(rate),
            **{k: v for k, v in res.items() if not k.startswith("t_")},
            "bytes": bytes_between(px0, px1, [MIGRATION_PORT, NBD_PORT]),
            "bytes_nbd": bytes_between(px0, px1, [NBD_PORT]),
            "veth_bytes": {k: veth1[k] - veth0[k] for k in veth1},
            "poll_requests": src.requests + dst.requests,
        }
        if res["completed"]:
            out.update(downtime(src, dst))
            _timeline(out, res["t_start"])
            out["timeline"]["pause"] = round(res["t_pause"] - res["t_start"], 3)
            out["timeline"]["cont"] = round(res["t_end"] - res["t_start"], 3)
            out["requests"] = _requests(src, dst, res["t_start"], list(out["timeline"].values()))
            if guest.dirty:
                out["dirty_bytes_per_s"] = dirty_rate(
                    dirty0, dirtier_progress(bench.native_home, dst_vm.id)
                )
            log(f"native {guest.name} @ {rate:g} Mbit/s: total {out['total_s']:.2f} s, "
                f"downtime {_s(out.get('downtime_s'))}, {out['bytes']['total'] / MiB:.1f} MiB "
                f"on the wire, state moved: {out.get('state_moved')}")  # fmt: skip
        else:
            out["downtime_s"] = None
            log(f"native {guest.name} @ {rate:g} Mbit/s: NOT DONE after {out['elapsed_s']:.0f} s "
                f"({out['error']} in the {out['stuck_in']} phase); "
                f"{out['bytes']['total'] / MiB:.1f} MiB on the wire")  # fmt: skip
        return out
    finally:
        src.stop()
        dst.stop()
        stop_instance(bench.a, inst["id"])
        asyncio.run(VMManager(bench.native_home).delete(dst_vm.id, force=True))


# -- summary ---------------------------------------------------------------------------------


def med(xs: list[float | None]) -> float | None:
    """Median where a missing value (a timeout, a failure) counts as +infinity."""
    if not xs:
        return None
    m = statistics.median([math.inf if x is None else x for x in xs])
    return None if math.isinf(m) else round(float(m), 3)


def summarize(runs: list[dict[str, Any]], guest: str, rate: float) -> dict[str, Any]:
    h = [r for r in runs if r["contender"] == "handoff" and r["guest"] == guest
         and r["rate_mbit"] == rate and "link_changes" not in r]  # fmt: skip
    n = [r for r in runs if r["contender"] == "native" and r["guest"] == guest
         and r["rate_mbit"] == rate]  # fmt: skip
    out: dict[str, Any] = {
        "guest": guest,
        "bandwidth_mbps": rate,
        "runs": {"handoff": len(h), "native": len(n)},
        "handoff_total_s": med([r.get("total_s") if r["completed"] else None for r in h]),
        "handoff_downtime_s": med([r.get("downtime_s") for r in h]),
        "handoff_bytes": med([r["bytes"]["total"] for r in h]),
        "native_total_s": med([r.get("total_s") if r["completed"] else None for r in n]),
        "native_downtime_s": med([r.get("downtime_s") for r in n]),
        "native_bytes": med([r["bytes"]["total"] if r["completed"] else None for r in n]),
        "native_timeouts": sum(1 for r in n if not r["completed"]),
        "path_rtt_ms": med([r["path"]["rtt_ms"] for r in h + n]),
        "path_rate_mbit": med([r["path"]["rate_mbit"] for r in h + n]),
        "handoff_engine_downtime_s": med([r.get("engine_downtime_s") for r in h]),
        "handoff_state_moved": all(r.get("state_moved") for r in h),
        "native_state_moved": all(r.get("state_moved") for r in n if r["completed"]),
    }
    if out["native_total_s"] is None and n:
        # A timed-out run is a lower bound: the median is at least the smallest timeout.
        out["native_total_s_gt"] = min(r["timeout_s"] for r in n if not r["completed"])
        out["native_bytes_sent_before_timeout"] = med([r["bytes"]["total"] for r in n])
    rates = [float(r["dirty_bytes_per_s"]) for r in h + n if r.get("dirty_bytes_per_s")]
    if rates:
        out["dirty_mb_s"] = round(statistics.median(rates) / 1e6, 2)
    if h and n:
        out["handoff_over_native_total"] = (
            round(out["handoff_total_s"] / out["native_total_s"], 4)
            if out["handoff_total_s"] and out["native_total_s"]
            else None
        )
    return out


def targets(summary: list[dict[str, Any]], follow: dict[str, Any] | None) -> dict[str, Any]:
    t: dict[str, Any] = {}
    for s in summary:
        key = f"{s['guest']}@{s['bandwidth_mbps']:g}"
        d = s["handoff_downtime_s"]
        t[f"downtime_le_1s_{key}"] = d is not None and d <= 1.0
        if s["guest"] == "debian" and s["bandwidth_mbps"] == 25:
            h = s["handoff_total_s"]
            nt = s["native_total_s"] or s.get("native_total_s_gt")
            met = h is not None and nt is not None and h <= nt / 10
            t["debian_total_le_tenth_native_at_25"] = met
    if follow is not None:
        t["compression_follows_link"] = bool(follow.get("followed"))
    return t


def follow_verdict(run: dict[str, Any]) -> dict[str, Any]:
    """Did the compression choice change when the link did, and back?

    From the controller's change log: the choice in force over time in each window of the
    link (slow, fast, slow again), the one that held longest in each, how many changes each
    window saw (a measure of flapping), and how soon after each link change the choice moved.
    Both clocks start at the request, within a few hundred ms of each other.
    """
    changes = run.get("compression", {}).get("changes", [])
    link = run.get("link_changes", [])
    out: dict[str, Any] = {"link_changes": link, "compression_changes": changes}
    if not run.get("completed") or len(link) < 2:
        out["followed"] = False
        out["why"] = "the handoff failed" if not run.get("completed") else (
            "the handoff ended before the link changed back")  # fmt: skip
        return out
    up, down, end = link[0]["t"], link[1]["t"], float(run["total_s"])
    initial = changes[0]["from"] if changes else run["compression"]["current"]

    def held(t0: float, t1: float) -> dict[str, float]:
        """Seconds each option was the choice within [t0, t1)."""
        spans: dict[str, float] = {}
        cur, at = initial, 0.0
        for c in [*changes, {"t": math.inf, "to": None}]:
            lo, hi = max(at, t0), min(c["t"], t1)
            if hi > lo:
                spans[cur] = spans.get(cur, 0.0) + hi - lo
            cur, at = c["to"], c["t"]
        return {k: round(v, 1) for k, v in sorted(spans.items(), key=lambda kv: -kv[1])}

    windows = {"slow": (0.0, up), "fast": (up, down), "slow_again": (down, end)}
    for name, (t0, t1) in windows.items():
        h = held(t0, t1)
        out[name] = {
            "seconds": round(t1 - t0, 1),
            "held_s": h,
            "mostly": next(iter(h), None),
            "changes": sum(1 for c in changes if t0 <= c["t"] < t1),
        }
    for name, t in (("after_up_s", up), ("after_down_s", down)):
        nxt = [c["t"] - t for c in changes if c["t"] >= t]
        out[name] = round(nxt[0], 2) if nxt else None
    m = [out[w]["mostly"] for w in windows]
    out["followed"] = m[0] != m[1] and m[1] != m[2]
    return out


# -- main ------------------------------------------------------------------------------------


def markdown(summary: list[dict[str, Any]]) -> str:
    """The per-bandwidth medians as the table BENCHMARKS.md shows."""

    def t(s: dict[str, Any], who: str) -> str:
        v = s[f"{who}_total_s"]
        if v is None and s.get(f"{who}_total_s_gt"):
            return f"> {s[f'{who}_total_s_gt']:.0f} s (timeout)"
        return "n/a" if v is None else f"{v:.1f} s"

    def d(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f} s"

    def b(v: float | None) -> str:
        return "n/a" if v is None else f"{v / MiB:.1f} MiB"

    rows = [
        "| guest | Mbit/s | runs | handoff total | native total | handoff downtime | "
        "native downtime | handoff bytes | native bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        nb = s["native_bytes"]
        native_b = b(nb) if nb is not None else (
            f"> {b(s.get('native_bytes_sent_before_timeout'))}"
            if s.get("native_bytes_sent_before_timeout") else "n/a"
        )  # fmt: skip
        rows.append(
            f"| {s['guest']} | {s['bandwidth_mbps']:g} | {s['runs']['handoff']}+"
            f"{s['runs']['native']} | {t(s, 'handoff')} | {t(s, 'native')} | "
            f"{d(s['handoff_downtime_s'])} | {d(s['native_downtime_s'])} | "
            f"{b(s['handoff_bytes'])} | {native_b} |"
        )
    return "\n".join(rows)


def kill_leftovers(root: Path) -> list[int]:
    """QEMU processes whose command line mentions our data dirs (a run killed with SIGKILL)."""
    killed = qemu_pids_mentioning(str(root))
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed


def end_vms(home: Paths) -> None:
    mgr = VMManager(home)
    for vm in mgr.list():
        with contextlib.suppress(Exception):
            asyncio.run(mgr.delete(vm.id, force=True))


def parse_schedule(s: str) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in (x.split(":") for x in s.split(","))]


def run_all(a: argparse.Namespace, lib: Paths, work: Path) -> dict[str, Any]:
    guests: dict[str, Guest] = {}
    overlays: dict[str, Path] = {}
    bases: dict[str, BaseVM] = {}
    for name in a.guests:
        if name == "tiny":
            base, ovl = ensure_tiny(lib)
            g = Guest("tiny", base.name, 256, [80], 80, "/cgi-bin/counter",
                      "org.cloudlet.bench.tiny", False, parse_timeouts(a.native_timeout_tiny),
                      a.tiny_runs)  # fmt: skip
        else:
            base, ovl = ensure_debian(lib)
            # Only the application's port is forwarded: it is what the client polls.
            g = Guest("debian", base.name, 1024, [8080], 8080, "/",
                      "org.cloudlet.bench.debian", True, parse_timeouts(a.native_timeout_debian),
                      a.debian_runs)  # fmt: skip
        guests[name], overlays[name], bases[base.name] = g, ovl, base
    runs: list[dict[str, Any]] = []
    follow = None
    with NetPath(a.bandwidths[0]) as path:
        proxy = ProxyProcess(path.ns_b, [SERVER_PORT, MIGRATION_PORT, NBD_PORT],
                             work / "proxy.sock", delay=a.delay_ms / 1000)  # fmt: skip
        homes = {n: server_home(work / f"srv-{n}", lib, list(bases.values())) for n in "ab"}
        native_home = server_home(work / "native-b", lib, list(bases.values()))
        srv_a = Server("A", path.ns_a, homes["a"], work / "server-a.log")
        srv_b = Server("B", path.ns_b, homes["b"], work / "server-b.log")
        try:
            proxy.start(work / "proxy.log")
            srv_a.start()
            srv_b.start()
            bench = Bench(a, lib, path, proxy, srv_a, srv_b, native_home, bases)
            for name, g in guests.items():
                for srv in (srv_a, srv_b):
                    register(srv, g, overlays[name])
                log(f"{name}: service registered on both; first start on A (synthesis)")
                inst = start_instance(srv_a, g, "warmup")
                wait_standby(srv_a, g)
                if g.dirty:  # check the dirtier runs before measuring anything
                    start_dirtier(srv_a.paths, inst["vm_id"], a.dirty_mib * MiB, a.dirty_mb_s * 1e6)
                    time.sleep(1.5)  # it writes its progress file every second
                    p0 = dirtier_progress(srv_a.paths, inst["vm_id"]) or {"bytes": 0, "seconds": 0}
                    time.sleep(5)
                    p1 = dirtier_progress(srv_a.paths, inst["vm_id"])
                    log(f"{name}: dirtier check: {(dirty_rate(p0, p1) or 0) / 1e6:.2f} MB/s")
                stop_instance(srv_a, inst["id"])
            for rate in a.bandwidths:
                for name, g in guests.items():
                    for i in range(g.runs):
                        log(f"== {name} @ {rate:g} Mbit/s, run {i + 1}/{g.runs}")
                        order = ("handoff", "native") if i % 2 == 0 else ("native", "handoff")
                        for who in order:
                            if who == "native" and a.no_native:
                                continue
                            runs.append((handoff_run if who == "handoff" else native_run)(
                                bench, g, rate))  # fmt: skip
                            atomic_write_json(work / "runs.json", runs)
            if a.follow and "debian" in guests:
                sched = parse_schedule(a.follow_schedule)
                log(f"== debian handoff with the link changing: {sched}")
                run = handoff_run(bench, guests["debian"], sched[0][1], schedule=sched[1:])
                runs.append(run)
                follow = follow_verdict(run)
                atomic_write_json(work / "runs.json", runs)
        finally:
            srv_a.stop()
            srv_b.stop()
            for h in (*homes.values(), native_home):
                end_vms(h)
            kill_leftovers(work)
            proxy.stop()
    summary = [summarize(runs, g, r) for r in a.bandwidths for g in guests]
    return {
        "bench": "handoff",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "qemu": qemu_version(),
            "kernel": platform.release(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "delay_ms_each_way": a.delay_ms,
            "dirty_mib": a.dirty_mib,
            "dirty_mb_s": a.dirty_mb_s,
            "poll_interval_s": a.poll_interval,
            "downtime_target_s": a.downtime_target,
            "max_rounds": a.max_rounds,
            "native_timeout_s": {
                g.name: {str(r): g.timeout_at(r) for r in a.bandwidths} for g in guests.values()
            },
        },
        "per_bandwidth": summary,
        "follow": follow,
        "targets": targets(summary, follow),
        # Each run's client requests around the switch are in run/runs.json, not here.
        "runs": [{k: v for k, v in r.items() if k != "requests"} for r in runs],
    }


def lock_home(lib: Paths) -> bool:
    """Take the bench home for this process (False: another bench holds it). Held until exit."""
    fd = os.open(lib.home / "handoff-bench.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", default="tiny,debian")
    ap.add_argument("--bandwidths", default="5,25,100", help="Mbit/s, comma-separated")
    ap.add_argument("--tiny-runs", type=int, default=3)
    ap.add_argument("--debian-runs", type=int, default=1)
    ap.add_argument("--native-timeout-tiny", default="120", help="S, or MBIT:S,MBIT:S")
    ap.add_argument("--native-timeout-debian", default="5:300,25:900,600", help="S, or MBIT:S,...")
    ap.add_argument("--no-native", action="store_true", help="handoff only")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="added each way by the relay")
    ap.add_argument("--poll-interval", type=float, default=0.01, help="the client's, seconds")
    ap.add_argument("--dirty-mib", type=int, default=16, help="the dirtier's buffer")
    ap.add_argument("--dirty-mb-s", type=float, default=5.0, help="the dirtier's rate")
    ap.add_argument("--dirty-warmup", type=float, default=5.0)
    ap.add_argument("--downtime-target", type=float, default=1.0)
    ap.add_argument("--max-rounds", type=int, default=20)
    ap.add_argument("--handoff-timeout", type=float, default=1800)
    ap.add_argument("--no-follow", dest="follow", action="store_false")
    ap.add_argument("--follow-schedule", default="0:5,20:25,50:5",
                    help="seconds:Mbit/s steps from the handoff's start")  # fmt: skip
    ap.add_argument("--home", default=os.environ.get("CLOUDLET_BENCH_HOME", ".cache/handoff-home"))
    a = ap.parse_args()
    a.guests = [g.strip() for g in a.guests.split(",") if g.strip()]
    a.bandwidths = [float(x) for x in a.bandwidths.split(",")]
    if any(g not in ("tiny", "debian") for g in a.guests) or not a.guests:
        ap.error("--guests among tiny, debian")
    if os.geteuid() != 0:
        ap.error("network namespaces and tc need root")

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    lib = paths(a.home)
    work = lib.home / "run"
    # One bench per home: with the lock held, any VM or QEMU found there is a leftover.
    if not lock_home(lib):
        ap.error(f"another handoff bench runs on {lib.home}")
    killed = kill_leftovers(work)
    if killed:
        log(f"killed {len(killed)} QEMU process(es) left by an earlier run")
    end_vms(lib)
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_all(a, lib, work)
    finally:
        kill_leftovers(work)
        end_vms(lib)
    log("medians:\n" + markdown(summary["per_bandwidth"]))
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
    raise SystemExit(130)
