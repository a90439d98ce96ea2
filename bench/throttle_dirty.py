#!/usr/bin/env python3
"""How many pages a throttled guest still changes: why a harder throttle cannot shrink the final
round of a handoff much.

The handoff's auto-converge (``cloudlet.handoff.converge.Throttle``) holds a VM's vCPUs a
fraction of every period. This measures, on the Debian workload of ``bench/handoff.py`` (the
numpy service, the 5 MB/s dirtier, and optionally a client polling the service), the pages of
the guest's RAM file that differ between two copies, ``--window`` seconds apart plus the time
the second copy takes to read (1 GiB; the measured span is reported), for each throttle
setting, against the two baselines in the same run: the VM unthrottled and the VM paused.

First, how far the guest's clock moves across a 3 s ``stop`` (a paced writer such as the
dirtier slows with the throttle only if it stops). Then, with the client, what a final round
holds: the VM held 97% of the time, a copy, 0.45 s more held, then paused either at once or
after running unthrottled for the handoff's ``final_burst_s`` (50 ms), alternately. The pages
changed between the copy and the pause are split into the dirtier's (its mark in the text
half) and the rest, and each part is encoded as the engine encodes pages (XOR with the old
page when that halves its non-zero bytes, 128 KiB frames, zstd level 9) to give its size on
the wire.

    .venv/bin/python bench/throttle_dirty.py [--window 2] [--final-reps 5]
        [--home .cache/handoff-home]

About 4 minutes (the workload is built and cached by bench/handoff.py's code on first use).
The last line of stdout is a JSON summary: pages/s per setting, with and without the client,
and the final round's parts with and without the burst (medians, and every repetition).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import zstandard

import handoff as hb  # bench/handoff.py (bench/ is on sys.path): its workload and dirtier
from cloudlet.config import paths
from cloudlet.handoff.converge import Throttle
from cloudlet.handoff.source import HandoffOptions, xor_record
from cloudlet.handoff.wire import FRAME
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.hypervisor.vm import VMManager
from cloudlet.overlay.format import Payload, pack_record
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


def _wire_kb(pages: list[tuple[int, bytes, bytes]]) -> float:
    """KB on the wire for (page, new, old) pages, in the engine's records and frame sizes."""
    zc = zstandard.ZstdCompressor(level=9)
    total, buf = 0, bytearray()
    for p, new, old in pages:
        buf += xor_record(p, new, old) or pack_record(Payload.LITERAL, p, 0, new)
        if len(buf) >= HandoffOptions().final_frame_raw_bytes:
            total, buf = total + FRAME.size + len(zc.compress(bytes(buf))), bytearray()
    if buf:
        total += FRAME.size + len(zc.compress(bytes(buf)))
    return round(total / 1e3, 1)


async def final_mix(mon: Monitor, ram: Path, reps: int) -> list[dict[str, Any]]:
    """The final round's parts, paused at once or after the burst (alternately)."""
    burst = HandoffOptions().final_burst_s
    rows = []
    for rep in range(reps):
        for b in (0.0, burst):
            th = Throttle(mon, period=0.1)
            th.set(0.97)
            await asyncio.sleep(2.0)  # settle
            a = await asyncio.to_thread(_pages, ram)
            await asyncio.sleep(0.45)
            await th.close()
            if b:
                await asyncio.sleep(b)
            await mon.execute("stop")
            z = await asyncio.to_thread(_pages, ram)
            await mon.execute("cont")
            mine, rest = [], []
            for p in np.flatnonzero((a != z).any(axis=1)).tolist():
                new, old = z[p].tobytes(), a[p].tobytes()
                (mine if new.find(hb.DIRTY_MARK) >= 0 else rest).append((p, new, old))
            row = {
                "rep": rep,
                "burst_s": b,
                "dirtier_pages": len(mine),
                "dirtier_kb": _wire_kb(mine),
                "other_pages": len(rest),
                "other_kb": _wire_kb(rest),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


async def clock_across_stop(lib: Any, vm_id: str, mon: Monitor, hold: float) -> float:
    """Seconds the guest's clock advanced across a ``hold``-second ``stop`` (and two execs)."""

    async def uptime() -> float:
        return float((await hb.guest_exec(lib, vm_id, "cat /proc/uptime")).split()[0])

    before = await uptime()
    await mon.execute("stop")
    await asyncio.sleep(hold)
    await mon.execute("cont")
    return round(await uptime() - before, 3)


async def measure(
    lib: Any, overlay: Path, base: str, window: float, reps: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    mgr = VMManager(lib)
    vm = (await synthesize(lib, base, str(overlay))).vm
    out: list[dict[str, Any]] = []
    mix: list[dict[str, Any]] = []
    try:
        await asyncio.to_thread(hb.start_dirtier, lib, vm.id, 16 << 20, 5e6)
        await asyncio.sleep(5)
        ram = vm.dir / "memory.ram"
        async with await Monitor.connect(vm.qmp_path) as mon:
            # A paced writer slows with the throttle only if the guest's clock stops with it.
            clock = await clock_across_stop(lib, vm.id, mon, 3.0)
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
                if polling:
                    mix = await final_mix(mon, ram, reps)
                stop.set()
                if client is not None:
                    await client
    finally:
        await mgr.delete(vm.id, force=True)
    return out, mix, clock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=os.environ.get("CLOUDLET_BENCH_HOME", ".cache/handoff-home"))
    ap.add_argument("--window", type=float, default=2.0, help="seconds between the two copies")
    ap.add_argument("--final-reps", type=int, default=5, help="final-round samples of each kind")
    a = ap.parse_args()
    lib = paths(a.home)
    if not hb.lock_home(lib):  # bench/handoff.py ends every VM of its home when it starts
        ap.error(f"a handoff bench runs on {lib.home}")
    base, overlay = hb.ensure_debian(lib)
    rows, mix, clock = asyncio.run(measure(lib, overlay, base.name, a.window, a.final_reps))
    final = []
    for b in sorted({m["burst_s"] for m in mix}):
        ms = [m for m in mix if m["burst_s"] == b]
        keys = ("dirtier_pages", "dirtier_kb", "other_pages", "other_kb")
        final.append({"burst_s": b, "runs": len(ms)}
                     | {k: statistics.median(m[k] for m in ms) for k in keys})  # fmt: skip
    print(json.dumps({"bench": "throttle_dirty", "guest": "debian",
                      "guest_clock_across_3s_stop_s": clock, "rows": rows,
                      "final_round": final, "final_round_runs": mix}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
