#!/usr/bin/env python3
"""How many pages a throttled guest still changes: why a harder throttle cannot shrink the final
round of a handoff much.

The handoff's auto-converge (``cloudlet.handoff.converge.Throttle``) holds a VM's vCPUs a
fraction of every period. This measures, on the Debian workload of ``bench/handoff.py`` (the
numpy service, the 5 MB/s dirtier, and optionally a client polling the service), the pages of
the guest's RAM file that differ between two copies, ``--window`` seconds apart plus the time
the second copy takes to read (1 GiB; the measured span is reported), for each throttle
setting, against the two baselines in the same run: the VM unthrottled and the VM paused.

    .venv/bin/python bench/throttle_dirty.py [--window 2] [--home .cache/handoff-home]

About 3 minutes (the workload is built and cached by bench/handoff.py's code on first use).
The last line of stdout is a JSON summary: pages/s per setting, with and without the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import handoff as hb  # bench/handoff.py (bench/ is on sys.path): its workload and dirtier
from cloudlet.config import paths
from cloudlet.handoff.converge import Throttle
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.hypervisor.vm import VMManager
from cloudlet.synthesis.synthesize import synthesize

# (held fraction, period s); None: paused for the whole window
SETTINGS: list[tuple[float | None, float]] = [
    (0.0, 0.1), (0.8, 0.1), (0.97, 0.1), (0.97, 0.5), (None, 0.1),
]  # fmt: skip


def _pages(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint64).reshape(-1, 512)


async def _poll(port: int, stop: asyncio.Event) -> None:
    """One request at a time, as the handoff bench's client does."""
    async with httpx.AsyncClient() as c:
        while not stop.is_set():
            try:
                await c.get(f"http://127.0.0.1:{port}/", timeout=5)
            except httpx.HTTPError:
                await asyncio.sleep(0.01)


async def measure(lib: Any, overlay: Path, base: str, window: float) -> list[dict[str, Any]]:
    mgr = VMManager(lib)
    vm = (await synthesize(lib, base, str(overlay))).vm
    out: list[dict[str, Any]] = []
    try:
        await asyncio.to_thread(hb.start_dirtier, lib, vm.id, 16 << 20, 5e6)
        await asyncio.sleep(5)
        ram = vm.dir / "memory.ram"
        async with await Monitor.connect(vm.qmp_path) as mon:
            for polling in (False, True):
                stop = asyncio.Event()
                client = asyncio.create_task(_poll(vm.host_port(8080), stop)) if polling else None
                for held, period in SETTINGS:
                    th = Throttle(mon, period=period)
                    if held is None:
                        await mon.execute("stop")
                    elif held:
                        th.set(held)
                    await asyncio.sleep(1.0)  # settle
                    a = await asyncio.to_thread(_pages, ram)
                    t = time.monotonic()
                    await asyncio.sleep(window)
                    b = await asyncio.to_thread(_pages, ram)
                    dt = time.monotonic() - t
                    await th.close()
                    if held is None:
                        await mon.execute("cont")
                    n = int(np.count_nonzero((a != b).any(axis=1)))
                    row = {
                        "client": polling,
                        "held": "paused" if held is None else held,
                        "period_s": period,
                        "window_s": round(dt, 2),
                        "changed_pages": n,
                        "pages_per_s": round(n / dt),
                    }
                    out.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                stop.set()
                if client is not None:
                    await client
    finally:
        await mgr.delete(vm.id, force=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=os.environ.get("CLOUDLET_BENCH_HOME", ".cache/handoff-home"))
    ap.add_argument("--window", type=float, default=2.0, help="seconds between the two copies")
    a = ap.parse_args()
    lib = paths(a.home)
    if not hb.lock_home(lib):  # bench/handoff.py ends every VM of its home when it starts
        ap.error(f"a handoff bench runs on {lib.home}")
    base, overlay = hb.ensure_debian(lib)
    rows = asyncio.run(measure(lib, overlay, base.name, a.window))
    print(json.dumps({"bench": "throttle_dirty", "guest": "debian", "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
