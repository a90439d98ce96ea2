#!/usr/bin/env python3
"""Cold boot vs resume from a memory snapshot, each to the first HTTP response.

For each guest size, in the same run: boot the tiny image N times (QEMU start -> first answer of
the counter CGI through the host port forward), and resume one suspended VM N times (resume call
-> first answer). The guest dirties part of its memory first (random data in a tmpfs), so resume
has real RAM to map, not an empty file. Medians are reported; the last line is one JSON list with
an object per size: ``{"memory_mib", "cold_boot_ms", "resume_ms", "speedup", ...}``.

    .venv/bin/python bench/restore.py [--runs 5] [--sizes 256,1024] [--dirty-fraction 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

from cloudlet.config import paths
from cloudlet.errors import NotFoundError
from cloudlet.hypervisor.vm import BootSource, VMManager
from cloudlet.images.store import ImageStore
from cloudlet.images.tiny import build_tiny


async def first_response(port: int, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1.0) as c:
        while time.monotonic() < deadline:
            try:
                r = await c.get(f"http://127.0.0.1:{port}/cgi-bin/counter")
                if r.status_code == 200:
                    return time.monotonic()
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.002)
    raise RuntimeError(f"no HTTP answer on port {port} within {timeout} s")


async def bench_size(mgr: VMManager, src: BootSource, mib: int, runs: int, dirty: float) -> dict:
    cold = []
    for _ in range(runs):
        t0 = time.monotonic()
        vm = await mgr.start(src, memory_mib=mib)
        t1 = await first_response(vm.host_port(80))
        cold.append((t1 - t0) * 1000)
        await mgr.delete(vm.id, force=True)

    vm = await mgr.start(src, memory_mib=mib)
    dirty_mib = int(mib * dirty)
    fill = f"head -c {dirty_mib * 1048576} /dev/urandom > /run/fill/data"
    r = await mgr.exec(vm.id, f"mkdir -p /run/fill && {fill} && echo ok", timeout=600)
    assert r.exit_code == 0, r.stderr
    resumes, counts = [], []
    ram_data = 0
    for _ in range(runs):
        await mgr.suspend(vm.id)
        ram_data = _allocated(vm.ram_path)
        t0 = time.monotonic()
        vm = await mgr.resume(vm.id)
        t1 = await first_response(vm.host_port(80))
        resumes.append((t1 - t0) * 1000)
        counts.append(httpx.get(f"http://127.0.0.1:{vm.host_port(80)}/cgi-bin/counter").text)
    await mgr.delete(vm.id, force=True)
    c, rsm = statistics.median(cold), statistics.median(resumes)
    return {
        "memory_mib": mib,
        "cold_boot_ms": round(c, 1),
        "resume_ms": round(rsm, 1),
        "speedup": round(c / rsm, 1),
        "cold_boot_runs_ms": [round(x, 1) for x in cold],
        "resume_runs_ms": [round(x, 1) for x in resumes],
        "guest_dirty_mib": dirty_mib,
        "ram_file_allocated_mib": round(ram_data / 2**20, 1),
        "counter_kept": counts[-1].strip(),
        "accel": vm.hardware.accel,
    }


def _allocated(p: Path) -> int:
    return os.stat(p).st_blocks * 512


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--dirty-fraction", type=float, default=0.25)
    ap.add_argument("--home", default=os.environ.get("CLOUDLET_HOME", ".cache/restore-home"))
    a = ap.parse_args()
    p = paths(a.home)
    store = ImageStore(p)
    try:
        img = store.get("tiny")
    except NotFoundError:
        img = build_tiny(p, "tiny")
    mgr = VMManager(p)
    src = BootSource.from_image(img)
    results = []
    for mib in (int(s) for s in a.sizes.split(",")):
        r = await bench_size(mgr, src, mib, a.runs, a.dirty_fraction)
        print(
            f"{mib} MiB: cold boot {r['cold_boot_ms']} ms, resume {r['resume_ms']} ms "
            f"({r['speedup']}x), runs {r['resume_runs_ms']}",
            file=sys.stderr,
        )
        results.append(r)
    machine = f"{platform.node()}, {os.cpu_count()} cores, python {platform.python_version()}"
    print(f"# machine: {machine}", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
