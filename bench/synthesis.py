#!/usr/bin/env python3
"""VM synthesis against what a user would ship with stock tools, on real workloads.

Workloads (built once, cached under the bench home; ``--rebuild`` makes them again):

- ``tiny``: the tiny image (256 MiB), customized with a ~20 MiB application (10 MiB from
  /dev/urandom + ~10 MiB of generated text), a process holding 64 MiB of random data in its
  memory, and an 8 MiB random temporary file written, synced and deleted.
- ``debian``: a debootstrap minbase image (1 GiB), customized inside the guest with
  ``apt-get update && apt-get install -y python3 python3-numpy && apt-get clean && rm -rf
  /var/lib/apt/lists/*`` (as Debian's container images end an install) and a python3 HTTP
  service (port 8080) whose state (a numpy matrix and a power-iteration vector) lives only in
  memory.
- ``debian-cached``: the same without the cleaning (apt's lists, .debs and caches stay on the
  disk, live), on the same base VM.

For each, the customization VM is paused and the **baseline** taken: what stock tools give
for that state, the VM's qcow2 top layer plus QEMU's own migration stream of the full RAM (no
``x-ignore-shared``), each compressed with ``xz -9 -T2`` (and ``zstd -19 -T2``). The VM then
runs on and is captured with ``capture_overlay`` (kept paused), which first has the guest trim
and zero what it freed: a stock user would ship that garbage, so the baseline is taken before.
base + overlay is checked byte for byte against the captured VM's RAM file and with
``qemu-img compare`` against its disk.

Each bench run then measures, medians of ``--runs`` runs, both contenders in the same run:

- overlay creation on 2 threads (``create_overlay`` over the captured VM files, exactly what
  ``capture_overlay`` runs after pausing): memory examined per second, changed bytes hashed,
  deduplicated and compressed per second;
- synthesis from a local file (no link limit);
- over an emulated 38 Mbit/s link (``netbed.py``: namespace + veth + tc tbf both ways + HTTP
  server): cloudlet synthesis from the URL to the first HTTP response, and the baseline: the
  top layer downloaded through ``xz -dc``, then QEMU restored with ``-incoming`` from
  ``curl | xz -dc`` (download, decompression and restore overlap), resumed, to the first HTTP
  response. Every restored VM must answer with the application state it had when captured.

    .venv/bin/python bench/synthesis.py [--runs 3] [--workloads tiny,debian] [--rate 38]

Progress goes to stderr; the last line of stdout is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fcntl
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cloudlet.config import Paths, paths
from cloudlet.errors import NotFoundError
from cloudlet.hypervisor import ports as portlib
from cloudlet.hypervisor.qemu import qemu_version
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.hypervisor.vm import VM, VMManager, VMState, build_command
from cloudlet.images.debian import build_debian
from cloudlet.images.model import Image
from cloudlet.images.store import ImageStore
from cloudlet.images.tiny import build_tiny, recipe_id
from cloudlet.overlay import apply_overlay, create_overlay, file_chunks, overlay_info
from cloudlet.synthesis.base import BaseStore, BaseVM
from cloudlet.synthesis.capture import capture_overlay
from cloudlet.synthesis.synthesize import first_response, synthesize
from cloudlet.util.fs import atomic_write_json, read_json, sparse_copy
from netbed import NetBed  # bench/ is on sys.path when this file runs

MiB = 1 << 20
T0 = time.monotonic()

# tiny workload: what the customization writes (random bytes are counted from these).
TINY_APP_RANDOM = 10 * MiB
TINY_APP_TEXT_LINES = 150_000  # ~10 MiB of generated, compressible text
TINY_HOLD = 64 * MiB
TINY_TMP = 8 * MiB
COUNTER_HITS = 3

NUMPY_SERVICE = b'''\
"""A small numpy service: its state (a matrix and a power-iteration vector) is only in memory."""
import http.server
import json

import numpy as np

M = np.random.default_rng(20240501).standard_normal((1024, 1024))  # 8 MiB of state
x = np.ones(1024)
requests = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, advance):
        """GET advances the power iteration; HEAD (a readiness probe) only reads the state."""
        global requests, x
        if advance:
            requests += 1
            x = M @ x
            x /= np.linalg.norm(x)
        body = json.dumps({"requests": requests, "estimate": float(x @ (M @ x))}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return body

    def do_GET(self):
        self.wfile.write(self.answer(True))

    def do_HEAD(self):
        self.answer(False)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("", 8080), Handler).serve_forever()
'''


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


async def guest(mgr: VMManager, vm: VM, cmd: str, timeout: float = 600, stdin: bytes = b"") -> str:
    """Run ``cmd`` in the guest through the agent; a non-zero exit is an error."""
    r = await mgr.exec(vm.id, cmd, stdin=stdin, timeout=timeout)
    if r.exit_code != 0:
        out = (r.stdout + r.stderr).decode(errors="replace")[-2000:]
        raise RuntimeError(f"guest command failed ({r.exit_code}): {cmd[:200]}\n{out}")
    return r.stdout.decode(errors="replace")


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, **kw)


# -- workloads -------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    image: str
    memory_mib: int
    ports: list[int]  # the first is where "first response" is measured
    customize: Callable[[VMManager, VM], Awaitable[dict[str, Any]]]
    check: Callable[[VM, dict[str, Any]], Awaitable[dict[str, Any]]]
    version: int  # of the recipe: a cached workload of another version is made again
    base_of: str = ""  # another workload whose base VM this one shares

    @property
    def base(self) -> str:
        return f"bench-{self.base_of or self.name}"


async def customize_tiny(mgr: VMManager, vm: VM) -> dict[str, Any]:
    """App on disk (random + text), 64 MiB of random process memory, a deleted temp file."""
    log("tiny: writing the application (10 MiB random + ~10 MiB text)")
    awk = (
        f'BEGIN{{for(i=0;i<{TINY_APP_TEXT_LINES};i++) printf "config line %d: key_%d = value %d'
        ' of the compressible part\\n", i, i%97, i*7}'
    )
    await guest(
        mgr,
        vm,
        f"mkdir -p /opt/app && head -c {TINY_APP_RANDOM} /dev/urandom > /opt/app/model.bin"
        f" && awk '{awk}' > /opt/app/config.txt && sync && wc -c /opt/app/*",
    )
    log("tiny: a process holding 64 MiB of random data")
    # dd reads 64 MiB into one buffer, then blocks forever writing it to a FIFO nobody reads.
    await guest(
        mgr,
        vm,
        "mkfifo /run/hold.fifo && (sleep 2147483647 < /run/hold.fifo >/dev/null 2>&1 &)"
        f" && (dd if=/dev/urandom of=/run/hold.fifo bs={TINY_HOLD} count=1 iflag=fullblock"
        " </dev/null >/dev/null 2>&1 &) && echo ok",
    )
    for _ in range(300):  # done when dd has read all of it (then it blocks on the FIFO)
        out = await guest(mgr, vm, "grep rchar /proc/$(pidof dd)/io")
        if int(out.split()[1]) >= TINY_HOLD:
            break
        await asyncio.sleep(0.2)
    else:
        raise RuntimeError(f"the memory holder did not fill its buffer: {out}")
    log("tiny: an 8 MiB temporary file, written, synced and deleted")
    await guest(
        mgr,
        vm,
        f"head -c {TINY_TMP} /dev/urandom > /root/tmpfile && sync && rm /root/tmpfile && sync",
    )
    state = {}
    for _ in range(COUNTER_HITS):
        state = await counter(vm)
    return {
        "state": state,
        "random_bytes_written": TINY_APP_RANDOM + TINY_HOLD + TINY_TMP,
        "random_bytes_live": TINY_APP_RANDOM + TINY_HOLD,  # without the deleted temp file
    }


async def counter(vm: VM) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=20) as c:
        r = await c.get(f"http://127.0.0.1:{vm.host_port(80)}/cgi-bin/counter")
        r.raise_for_status()
    return {k: int(v) for k, v in (kv.split("=") for kv in r.text.split())}


async def check_tiny(vm: VM, info: dict[str, Any]) -> dict[str, Any]:
    """The counter's in-memory value went on from where it was (the probe is not counted)."""
    got = await counter(vm)
    want = {k: v + 1 for k, v in info["state"].items()}
    if got != want:
        raise RuntimeError(f"tiny: restored VM answered {got}, expected {want}")
    return got


async def customize_debian(mgr: VMManager, vm: VM, *, clean: bool = True) -> dict[str, Any]:
    """apt-get install python3 + numpy in the guest; start a numpy HTTP service on 8080.

    ``clean``: then drop apt's caches (the downloaded .debs, the package lists), as Debian's own
    container images do after every install. Without it they stay on the disk, live.
    """
    cmd = (
        "export DEBIAN_FRONTEND=noninteractive && apt-get update -q"
        " && apt-get install -y -q python3 python3-numpy"
    )
    if clean:
        cmd += " && apt-get clean && rm -rf /var/lib/apt/lists/*"
    log(f"debian: {cmd.split('&& ', 1)[1]} (a few minutes)")
    t = time.monotonic()
    await guest(mgr, vm, cmd, timeout=3600)
    apt_s = time.monotonic() - t
    log(f"debian: packages installed in {apt_s:.0f} s; starting the numpy service")
    await guest(mgr, vm, "mkdir -p /opt/svc && cat > /opt/svc/app.py", stdin=NUMPY_SERVICE)
    await guest(
        mgr,
        vm,
        "setsid python3 /opt/svc/app.py > /var/log/numpy-svc.log 2>&1 < /dev/null & echo ok",
    )
    url = f"http://127.0.0.1:{vm.host_port(8080)}/"
    deadline = time.monotonic() + 300
    while True:
        try:
            async with httpx.AsyncClient(timeout=20) as c:
                state = (await c.get(url)).json()
            break
        except (httpx.HTTPError, ValueError):
            if time.monotonic() > deadline:
                raise RuntimeError("the numpy service did not answer") from None
            await asyncio.sleep(0.5)
    async with httpx.AsyncClient(timeout=20) as c:
        for _ in range(COUNTER_HITS - 1):
            state = (await c.get(url)).json()
    usage = await guest(mgr, vm, "free -m; df -h /; du -sh /var/cache/apt /var/lib/apt/lists")
    return {"state": state, "apt_s": round(apt_s, 1), "guest_usage": usage}


async def check_debian(vm: VM, info: dict[str, Any]) -> dict[str, Any]:
    """The service's in-memory request count went on from where it was."""
    async with httpx.AsyncClient(timeout=20) as c:
        got = (await c.get(f"http://127.0.0.1:{vm.host_port(8080)}/")).json()
    # +1 for this request, +1 more if the readiness probe used GET rather than HEAD
    if got["requests"] - info["state"]["requests"] not in (1, 2):
        raise RuntimeError(f"debian: restored service answered {got} after {info['state']}")
    return dict(got)


WORKLOADS = {
    "tiny": Workload("tiny", "tiny", 256, [80], customize_tiny, check_tiny, 3),
    "debian": Workload("debian", "debian", 1024, [8080, 80], customize_debian, check_debian, 4),
    "debian-cached": Workload(
        "debian-cached",
        "debian",
        1024,
        [8080, 80],
        functools.partial(customize_debian, clean=False),
        check_debian,
        4,
        base_of="debian",
    ),
}


def ensure_image(p: Paths, wl: Workload) -> Image:
    store = ImageStore(p)
    if wl.image == "tiny":
        try:
            img = store.get("tiny")
            if img.extra.get("recipe") == recipe_id():
                return img
        except NotFoundError:
            pass
        log("building the tiny image")
        return build_tiny(p, "tiny", force=True, progress=lambda m: log(f"tiny image: {m}"))
    t = time.monotonic()
    img = build_debian(p, "debian", progress=lambda m: log(f"debian image: {m}"))
    log(f"debian image ready in {time.monotonic() - t:.0f} s")
    return img


async def ensure_base(p: Paths, wl: Workload, img: Image) -> BaseVM:
    store = BaseStore(p)
    try:
        base = store.get(wl.base)
        if base.image_id == img.content_id and base.hardware.memory_mib == wl.memory_mib:
            return base
        log(f"base {wl.base} is stale; making it again")
        store.delete(wl.base)
    except NotFoundError:
        pass
    log(f"creating base VM {wl.base} ({wl.memory_mib} MiB)")
    return await store.create(img, wl.base, memory_mib=wl.memory_mib, ports=wl.ports)


async def launch_paused(vm: VM) -> None:
    """Start QEMU with ``-S -incoming defer`` for a VM record (our own restore paths)."""
    vm.forwards = portlib.resolve(vm.forwards)
    vm.save()
    proc = await asyncio.create_subprocess_exec(
        *build_command(vm, incoming=True),
        cwd=vm.dir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    _, err = await proc.communicate()
    vm.pid = vm.read_pid()
    vm.state = VMState.PAUSED
    vm.save()
    if proc.returncode != 0 or vm.pid is None:
        raise RuntimeError(f"QEMU did not start: {err.decode(errors='replace').strip()}")


async def migrate(mon: Monitor, uri: str, *, incoming: bool, ignore_shared: bool) -> None:
    caps = [
        {"capability": "x-ignore-shared", "state": ignore_shared},
        {"capability": "events", "state": True},
    ]
    await mon.execute("migrate-set-capabilities", {"capabilities": caps})
    async with mon.events(["MIGRATION"]) as ev:
        await mon.execute("migrate-incoming" if incoming else "migrate", {"uri": uri})
        while True:
            event: dict[str, Any] = dict(await asyncio.wait_for(ev.get(), 1800))
            status = event["data"]["status"]
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                info = await mon.execute("query-migrate")
                raise RuntimeError(f"migration {status}: {info.get('error-desc', '')}")


def files_equal(a: Path, b: Path) -> bool:
    """Byte comparison of two (large, sparse) files in 64 MiB numpy steps."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(64 * MiB), fb.read(64 * MiB)
            if x != y:
                return False
            if not x:
                return True


def compress(src: Path, tool: list[str], suffix: str) -> tuple[int, float]:
    """Compress ``src`` to ``src + suffix`` with a stock tool; (bytes, seconds)."""
    out = src.with_name(src.name + suffix)
    t = time.monotonic()
    with open(out, "wb") as f:
        run([*tool, "-c", str(src)], stdout=f)
    return out.stat().st_size, time.monotonic() - t


def wl_dir(p: Paths, wl: Workload) -> Path:
    return p.home / "bench" / wl.name


async def overlay_extras(p: Paths, wl: Workload) -> dict[str, Any]:
    """Where the overlay's bytes go, and its size at zstd level 19 (same format, size only)."""
    base = BaseStore(p).get(wl.base)
    d = wl_dir(p, wl)
    log(f"{wl.name}: the same overlay at zstd level 19 (size only)")
    t = time.monotonic()
    l19 = d / "level19.overlay"
    st19 = await asyncio.to_thread(
        create_overlay,
        base.ref(),
        d / "snapshot",
        l19,
        hardware=base.hardware.to_dict(),
        meta={"guest_ports": wl.ports, "base_name": base.name},
        level=19,
    )
    l19.unlink()
    return {
        "level19_bytes": st19.file_bytes,
        "level19_s": round(time.monotonic() - t, 1),
        "kinds": overlay_info(d / "build.overlay")["kinds"],
    }


async def build_workload(p: Paths, wl: Workload) -> dict[str, Any]:
    """Customize, capture, make the stock-tool baseline; keep the VM files for create runs."""
    t_build = time.monotonic()
    img = ensure_image(p, wl)
    base = await ensure_base(p, wl, img)
    d = wl_dir(p, wl)
    shutil.rmtree(d, ignore_errors=True)
    snap = d / "snapshot"
    snap.mkdir(parents=True)
    mgr = VMManager(p)
    store = BaseStore(p)
    log(f"{wl.name}: customization VM from base {wl.base}")
    vm = await store.start_vm(wl.base, vm_name=f"bench-{wl.name}-custom")
    stream, stock_disk = d / "stock-ram.mig", d / "stock-disk.qcow2"
    try:
        info = await wl.customize(mgr, vm)
        # The stock baseline is the VM as the customization left it: before capture_overlay has
        # the guest trim and zero what it freed (a stock user ships the garbage too). QEMU's
        # own migration of the paused VM, full RAM; then it runs on and is captured.
        log(f"{wl.name}: stock files of the paused VM: its top layer and a full-RAM migration")
        async with await Monitor.connect(vm.qmp_path) as mon:
            await mon.execute("stop")
            run(["cp", "--sparse=always", str(vm.disk_path), str(stock_disk)])
            await migrate(mon, f"exec:cat > {stream}", incoming=False, ignore_shared=False)
            await mon.execute("cont")
        log(f"{wl.name}: capture_overlay (kept paused)")
        t = time.monotonic()
        cap = await capture_overlay(p, vm.id, d / "build.overlay", keep_paused=True)
        cap["wall_s"] = time.monotonic() - t
        # The paused VM's files are exactly what capture diffed: keep them for the create runs.
        log(f"{wl.name}: overlay {cap['file_bytes'] / MiB:.1f} MiB; copying the VM's files")
        sparse_copy(vm.ram_path, snap / "memory.ram")
        run(["cp", "--sparse=always", str(vm.disk_path), str(snap / "disk.qcow2")])
    finally:
        await mgr.delete(vm.id, force=True)

    log(f"{wl.name}: base + overlay must give the captured VM's files exactly")
    src = base.boot_source()
    rvm = mgr.new_vm(src, base.hardware, forwards=[], name=f"bench-{wl.name}-check")
    try:
        await asyncio.to_thread(
            apply_overlay,
            file_chunks(d / "build.overlay"),
            base.ref(),
            rvm.dir,
            backing=str(base.path("disk.raw")),
            expected_base_id=base.base_id,
        )
        if not files_equal(rvm.ram_path, snap / "memory.ram"):
            raise RuntimeError("base + overlay RAM differs from the customization VM's RAM")
        run(["qemu-img", "compare", "-q", str(rvm.disk_path), str(snap / "disk.qcow2")])
        shutil.copyfile(rvm.devstate_path, snap / "devstate")
    finally:
        await mgr.delete(rvm.id, force=True)

    cap.update(await overlay_extras(p, wl))
    baseline: dict[str, Any] = {
        "disk_bytes": stock_disk.stat().st_size,
        "ram_stream_bytes": stream.stat().st_size,
    }
    for label, f in (("disk", stock_disk), ("ram", stream)):
        for tool, suffix in ((["xz", "-9", "-T2"], ".xz"), (["zstd", "-19", "-T2", "-q"], ".zst")):
            log(f"{wl.name}: {' '.join(tool)} {f.name} ({f.stat().st_size / MiB:.0f} MiB)")
            size, secs = compress(f, tool, suffix)
            baseline[f"{label}{suffix.replace('.', '_')}_bytes"] = size
            baseline[f"{label}{suffix.replace('.', '_')}_s"] = round(secs, 1)
    stream.unlink()
    stock_disk.unlink()
    baseline["xz_bytes"] = baseline["disk_xz_bytes"] + baseline["ram_xz_bytes"]
    baseline["zstd_bytes"] = baseline["disk_zst_bytes"] + baseline["ram_zst_bytes"]
    rec = {
        "version": wl.version,
        "workload": wl.name,
        "base": wl.base,
        "base_id": base.base_id,
        "image_id": img.content_id,
        "memory_mib": wl.memory_mib,
        "accel": base.hardware.accel,
        "info": info,
        "capture": cap,
        "baseline": baseline,
        "build_s": round(time.monotonic() - t_build, 1),
        "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(d / "workload.json", rec)
    log(f"{wl.name}: workload built in {rec['build_s']:.0f} s")
    return rec


async def load_workload(p: Paths, wl: Workload, rebuild: bool) -> dict[str, Any]:
    f = wl_dir(p, wl) / "workload.json"
    if not rebuild and f.exists():
        rec: dict[str, Any] = read_json(f)
        try:
            base = BaseStore(p).get(wl.base)
        except NotFoundError:
            base = None
        snap = wl_dir(p, wl) / "snapshot"
        complete = all((snap / n).exists() for n in ("memory.ram", "disk.qcow2", "devstate"))
        if (
            rec.get("version") == wl.version
            and complete
            and base is not None
            and base.base_id == rec["base_id"]
        ):
            log(f"{wl.name}: cached workload from {rec['built']}")
            if "level19_bytes" not in rec["capture"]:  # made before this was measured
                rec["capture"].update(await overlay_extras(p, wl))
                atomic_write_json(f, rec)
            return rec
    return await build_workload(p, wl)


# -- measurements ----------------------------------------------------------------------------


def create_runs(
    p: Paths, wl: Workload, runs: int, out_dir: Path
) -> tuple[Path, list[dict[str, Any]]]:
    """create_overlay over the captured VM files, ``runs`` times; returns the last overlay."""
    base = BaseStore(p).get(wl.base)
    snap = wl_dir(p, wl) / "snapshot"
    for f in (snap / "memory.ram", base.path("memory.ram")):  # as hot as a running VM's RAM
        with open(f, "rb") as fh:
            while fh.read(64 * MiB):
                pass
    results = []
    out = out_dir / f"{wl.name}.overlay"
    for i in range(runs):
        out.unlink(missing_ok=True)
        st = create_overlay(
            base.ref(),
            snap,
            out,
            hardware=base.hardware.to_dict(),
            meta={"guest_ports": wl.ports, "base_name": base.name},
        )
        s = st.seconds
        # Zero pages (trimmed clusters, zeroed free memory) are changed too, but cost nothing to
        # encode: counting them would inflate the rate of the work that matters.
        changed = (st.changed_pages + st.changed_disk_pages - st.zero_pages) * 4096
        enc_s = s["memory_encode"] + s["disk_encode"] + s["compress_drain"]
        r = {
            "examine_gb_per_s": st.memory_bytes_examined / s["memory_examine"] / 1e9,
            # per CPU-second of the examining thread: tells a busy host from a slow compare
            "examine_cpu_gb_per_s": st.memory_bytes_examined / s["memory_examine_cpu"] / 1e9,
            "create_mb_per_s": changed / enc_s / 1e6,
            "memory_examined_mib": st.memory_bytes_examined / MiB,
            "changed_mib": changed / MiB,
            "zero_mib": st.zero_pages * 4096 / MiB,
            "create_s": s["total"],
            "overlay_bytes": st.file_bytes,
            "records": st.records,
        }
        results.append(r)
        log(
            f"{wl.name}: create run {i + 1}: examine {r['examine_gb_per_s']:.2f} GB/s "
            f"({r['examine_cpu_gb_per_s']:.2f} per CPU-second) over "
            f"{r['memory_examined_mib']:.0f} MiB, changed data {r['create_mb_per_s']:.0f} MB/s "
            f"over {r['changed_mib']:.0f} MiB (+{r['zero_mib']:.0f} MiB of zeros), "
            f"{r['create_s']:.2f} s in all, "
            f"overlay {st.file_bytes / MiB:.1f} MiB"
        )
    return out, results


async def synth_run(
    p: Paths, wl: Workload, source: str, info: dict[str, Any]
) -> tuple[dict[str, float], dict[str, Any]]:
    mgr = VMManager(p)
    res = await synthesize(p, wl.base, source, first_response_timeout=60)
    try:
        if res.timings["first_response_s"] < 0:
            raise RuntimeError(f"{wl.name}: synthesized VM never answered")
        answer = await wl.check(res.vm, info)
    finally:
        await mgr.delete(res.vm.id, force=True)
    return res.timings, answer


def download_xz(url: str, dest: Path) -> None:
    """``curl URL | xz -dc > dest``, both exit codes checked."""
    with open(dest, "wb") as f:
        curl = subprocess.Popen(["curl", "-sSf", url], stdout=subprocess.PIPE)
        assert curl.stdout is not None
        xz = subprocess.Popen(["xz", "-dc"], stdin=curl.stdout, stdout=f)
        curl.stdout.close()
        xz.wait()
        curl.wait()
    if curl.returncode or xz.returncode:
        raise RuntimeError(f"download of {url} failed (curl {curl.returncode}, xz {xz.returncode})")


async def baseline_run(
    p: Paths, wl: Workload, disk_url: str, ram_url: str, info: dict[str, Any]
) -> tuple[dict[str, float], dict[str, Any]]:
    """Stock tools: top layer through xz -dc, then QEMU -incoming from curl | xz -dc."""
    mgr = VMManager(p)
    bases = BaseStore(p)
    base = bases.get(wl.base)
    src = base.boot_source()
    t0 = time.monotonic()
    vm = mgr.new_vm(src, base.hardware, forwards=bases.forwards_for(src, None), name="stock")
    try:
        await asyncio.to_thread(download_xz, disk_url, vm.disk_path)
        run(["qemu-img", "rebase", "-u", "-b", str(base.path("disk.raw")), "-F", "raw",
             str(vm.disk_path)])  # fmt: skip
        t_disk = time.monotonic()
        with open(vm.ram_path, "wb") as f:
            f.truncate(base.hardware.memory_bytes)
        await launch_paused(vm)
        async with await Monitor.connect(vm.qmp_path) as mon:
            await migrate(
                mon, f"exec:curl -sSf {ram_url} | xz -dc", incoming=True, ignore_shared=False
            )
            t_ram = time.monotonic()
            await mon.execute("cont")
        vm.state = VMState.RUNNING
        vm.save()
        t_resumed = time.monotonic()
        t_first = await first_response(vm, 60)
        if t_first is None:
            raise RuntimeError(f"{wl.name}: the stock restore never answered")
        answer = await wl.check(vm, info)
    finally:
        await mgr.delete(vm.id, force=True)
    timings = {
        "disk_s": t_disk - t0,
        "ram_stream_s": t_ram - t_disk,
        "resume_s": t_resumed - t_ram,
        "first_response_s": t_first - t_resumed,
        "total_s": t_first - t0,
    }
    return timings, answer


async def bench_workload(
    p: Paths, wl: Workload, rec: dict[str, Any], bed: NetBed, runs: int, rate: float
) -> dict[str, Any]:
    info = rec["info"]
    work = p.home / "bench" / "run"
    work.mkdir(parents=True, exist_ok=True)
    overlay, creates = await asyncio.to_thread(create_runs, p, wl, runs, work)
    ovl_bytes = overlay.stat().st_size

    answers: list[dict[str, Any]] = []
    local = []
    for i in range(runs):
        t, ans = await synth_run(p, wl, str(overlay), info)
        local.append(t)
        answers.append(ans)
        log(f"{wl.name}: local synthesis {i + 1}: {t['total_s']:.3f} s ({_fmt(t)})")

    url = bed.publish(overlay, f"{wl.name}.overlay")
    d = wl_dir(p, wl)
    disk_url = bed.publish(d / "stock-disk.qcow2.xz", f"{wl.name}-disk.qcow2.xz")
    ram_url = bed.publish(d / "stock-ram.mig.xz", f"{wl.name}-ram.mig.xz")
    linked, stock = [], []
    for i in range(runs):  # interleaved, so both see the same host conditions
        t, ans = await synth_run(p, wl, url, info)
        linked.append(t)
        answers.append(ans)
        log(f"{wl.name}: synthesis over the link {i + 1}: {t['total_s']:.2f} s ({_fmt(t)})")
        b, ans = await baseline_run(p, wl, disk_url, ram_url, info)
        stock.append(b)
        answers.append(ans)
        log(f"{wl.name}: stock restore over the link {i + 1}: {b['total_s']:.2f} s ({_fmt(b)})")

    if any(a != answers[0] for a in answers):
        raise RuntimeError(f"{wl.name}: restored VMs disagree about the app state: {answers}")
    bl = rec["baseline"]
    rand = info.get("random_bytes_written")
    network_bound = ovl_bytes * 8 / (rate * 1e6)
    med_create = {k: median([r[k] for r in creates]) for k in creates[0] if k != "records"}
    out: dict[str, Any] = {
        "workload": wl.name,
        "memory_mib": wl.memory_mib,
        "runs": runs,
        "overlay_bytes": ovl_bytes,
        "baseline_xz_bytes": bl["xz_bytes"],
        "baseline_zstd_bytes": bl["zstd_bytes"],
        "size_ratio": round(ovl_bytes / bl["xz_bytes"], 4),
        "size_ratio_zstd": round(ovl_bytes / bl["zstd_bytes"], 4),
        "baseline": bl,
        "synthesis_s_38mbps": round(median([t["total_s"] for t in linked]), 3),
        "baseline_s_38mbps": round(median([t["total_s"] for t in stock]), 3),
        "network_bound_s": round(network_bound, 3),
        "synthesis_target_s": round(1.15 * network_bound + 0.3, 3),
        "synthesis_s_local": round(median([t["total_s"] for t in local]), 3),
        "create_mb_per_s": round(med_create["create_mb_per_s"], 1),
        "examine_gb_per_s": round(med_create["examine_gb_per_s"], 2),
        "examine_cpu_gb_per_s": round(med_create["examine_cpu_gb_per_s"], 2),
        "create_s": round(med_create["create_s"], 3),
        "memory_examined_mib": round(med_create["memory_examined_mib"], 1),
        "changed_mib": round(med_create["changed_mib"], 1),
        "zero_mib": round(med_create["zero_mib"], 1),
        "records": creates[-1]["records"],
        "runs_s": {
            "synthesis_38mbps": [round(t["total_s"], 3) for t in linked],
            "baseline_38mbps": [round(t["total_s"], 3) for t in stock],
            "synthesis_local": [round(t["total_s"], 3) for t in local],
        },
        "synthesis_38mbps_parts": _median_parts(linked),
        "baseline_38mbps_parts": _median_parts(stock),
        "synthesis_local_parts": _median_parts(local),
        "capture_at_build": {
            k: rec["capture"][k]
            for k in (
                "file_bytes",
                "wall_s",
                "seconds",
                "kinds",
                "level19_bytes",
                "level19_s",
                "garbage",
            )
            if k in rec["capture"]
        },
        "build_s": rec["build_s"],
        "app_state_captured": info["state"],
        "app_answer_after_restore": answers[0],
    }
    targets: dict[str, bool] = {
        "synthesis_network_bound": out["synthesis_s_38mbps"] <= out["synthesis_target_s"],
        "examine_2gbps": out["examine_gb_per_s"] >= 2.0,
        "create_300mbps": out["create_mb_per_s"] >= 300.0,
    }
    if rand:
        out["incompressible_bytes"] = rand
        out["incompressible_live_bytes"] = info["random_bytes_live"]
        out["overlay_per_incompressible"] = round(ovl_bytes / rand, 4)
        out["overlay_per_incompressible_live"] = round(ovl_bytes / info["random_bytes_live"], 4)
        targets["overlay_le_1.15x_incompressible"] = ovl_bytes <= 1.15 * rand
        targets["local_synthesis_le_0.5s"] = out["synthesis_s_local"] <= 0.5
    else:
        out["apt_s"] = info.get("apt_s")
        targets["overlay_le_30pct_baseline"] = ovl_bytes <= 0.30 * bl["xz_bytes"]
    out["targets"] = targets
    return out


def _fmt(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in t.items() if k != "total_s")


def _median_parts(ts: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(median([t[k] for t in ts]), 3) for k in ts[0]}


def cleanup_vms(p: Paths) -> None:
    """VMs left in the bench home by a killed run: their QEMUs must not live on."""
    mgr = VMManager(p)
    for vm in mgr.list():
        log(f"removing VM {vm.id} ({vm.name}) left by an earlier run")
        asyncio.run(mgr.delete(vm.id, force=True))


async def amain(a: argparse.Namespace) -> dict[str, Any]:
    p = paths(a.home)
    names = [n.strip() for n in a.workloads.split(",") if n.strip()]
    recs = {}
    for n in names:
        recs[n] = await load_workload(p, WORKLOADS[n], a.rebuild)
    served = p.home / "bench" / "served"
    shutil.rmtree(served, ignore_errors=True)
    results: dict[str, Any] = {}
    load_start = [round(x, 2) for x in os.getloadavg()]
    with NetBed(served, rate_mbit=a.rate) as bed:
        before = bed.measure_rate()
        log(f"link: {before:.1f} Mbit/s achieved (tbf rate {a.rate} Mbit/s)")
        for n in names:
            results[n] = await bench_workload(p, WORKLOADS[n], recs[n], bed, a.runs, a.rate)
        after = bed.measure_rate()
        log(f"link: {after:.1f} Mbit/s achieved at the end")
    shutil.rmtree(p.home / "bench" / "run", ignore_errors=True)
    shutil.rmtree(served, ignore_errors=True)
    return {
        "bench": "synthesis",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "qemu": qemu_version(),
            "accel": sorted({r.get("accel", "?") for r in recs.values()}),
            "kernel": platform.release(),
            "loadavg_at_start": load_start,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "link": {
            "rate_mbit": a.rate,
            "achieved_mbit_before": round(before, 1),
            "achieved_mbit_after": round(after, 1),
        },
        "workloads": results,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workloads", default="tiny,debian")
    ap.add_argument("--rate", type=float, default=38.0, help="link rate in Mbit/s")
    ap.add_argument("--home", default=os.environ.get("CLOUDLET_BENCH_HOME", ".cache/bench-home"))
    ap.add_argument("--rebuild", action="store_true", help="make the workloads again")
    a = ap.parse_args()
    if a.runs < 1 or any(n.strip() not in WORKLOADS for n in a.workloads.split(",")):
        ap.error(f"--runs >= 1; workloads among {', '.join(WORKLOADS)}")

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    p = paths(a.home)
    # One run per bench home: the cleanup below removes every VM in it.
    lock = os.open(p.home / ".bench.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        ap.exit(1, f"another bench run is using {p.home}\n")
    cleanup_vms(p)
    try:
        summary = asyncio.run(amain(a))
    finally:
        cleanup_vms(p)
        os.close(lock)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
    raise SystemExit(130)
