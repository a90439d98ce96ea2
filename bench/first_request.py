#!/usr/bin/env python3
"""What a restored VM's first request costs under TCG: why a handoff's "resume to first
answer" has a floor of about 0.3 s on the Debian guest however small the final round is.

A handoff's destination (and a synthesis, and ``vm resume``) runs the guest in a new QEMU
process. Its RAM is the source's, page for page, but TCG's cache of translated code is empty:
every guest block the first request runs (the kernel's network path, the service's
interpreter and libraries) is translated again. This measures that cost on the workloads of
``bench/handoff.py``, each with its dirtier running as in a handoff, and beside it, in the same
run, the baseline: the same request to the same VM after the same pause in the *same* QEMU
process (``stop``, 0.6 s, ``cont``: warm translations).

For each sample: the time to the response's headers from a fresh TCP connection through the
host port forward; when the user network's connection to the guest became established (from
``info usernet``: the ARP and TCP handshake with the guest); and how many translation blocks
TCG made while the request ran (``info jit``). A second request right after shows what is left.
And once more with the RAM file's page cache dropped before the resume: the kernel reclaims
page cache that no process maps (this host's DAMON scheme after ~60 s idle), which is what a
handoff's destination met after minutes of rounds until it kept the RAM it received mapped.

Then a property of QEMU's user network that a handoff inherits: the guest closes each HTTP/1.0
connection first, so it keeps them in TIME_WAIT (60 s of guest time), and every client on the
host reaches it from one address (10.0.2.2). A new QEMU's user network starts its TCP sequence
numbers afresh; a SYN for a 4-tuple the guest holds in TIME_WAIT with a lower sequence number
is not accepted, and the user network sends it again only after its 3 s retransmission
timeout. So before each suspend, ``--reconnects`` requests from fixed client ports, and after
the resume the same ports again, beside as many fresh ones (the baseline).

    .venv/bin/python bench/first_request.py [--reps 5] [--reconnects 4] [--guests tiny,debian]
        [--home .cache/handoff-home]

About 6 minutes with the workloads cached (``bench/handoff.py`` builds them on first use). The
last line of stdout is a JSON summary: medians per guest and case, how many reconnects took
over 1 s, and every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import handoff as hb  # bench/handoff.py (bench/ is on sys.path): its workloads and dirtier
from cloudlet.config import Paths, paths
from cloudlet.hypervisor.ports import PortForward
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.hypervisor.usernet import connections
from cloudlet.hypervisor.vm import VM, VMManager
from cloudlet.synthesis.synthesize import synthesize
from cloudlet.util.resident import drop_page_cache

# guest -> (service port, request path, run the dirtier)
GUESTS: dict[str, tuple[int, str, bool]] = {
    "tiny": (80, "/cgi-bin/counter", False),
    "debian": (8080, "/", True),
}
PAUSE_S = 0.6  # about a handoff's engine time at 5 Mbit/s


async def _tb_count(mon: Monitor) -> int:
    for line in (await mon.hmp("info jit")).splitlines():
        if line.strip().startswith("TB count"):
            return int(line.split()[2])
    raise RuntimeError("QEMU's 'info jit' has no TB count")


async def request(
    vm: VM, guest_port: int, path: str, *, client_port: int = 0, timeout: float = 15.0
) -> dict[str, Any]:
    """One GET on a new connection (from ``client_port`` if given): seconds to the response
    headers, to the user network's connection to the guest being established, and translation
    blocks made meanwhile."""
    async with await Monitor.connect(vm.qmp_path) as mon:
        tb0 = await _tb_count(mon)
        t0 = time.monotonic()
        s = socket.socket()
        try:
            # SO_REUSEADDR: the host's side of an earlier connection from this port may be in
            # TIME_WAIT too; only the guest's memory of it is measured.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", client_port))
            s.settimeout(timeout)
            s.connect(("127.0.0.1", vm.host_port(guest_port)))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n".encode())
            s.setblocking(False)
            buf, established, answered = b"", None, None
            while answered is None and time.monotonic() - t0 < timeout:
                if established is None:
                    conns = [c for c in await connections(mon) if c.proto == "TCP"]
                    if any(c.state in ("ESTABLISHED", "CLOSE_WAIT") for c in conns):
                        established = time.monotonic() - t0
                with contextlib.suppress(BlockingIOError):
                    buf += s.recv(65536)
                if b"\r\n\r\n" in buf:
                    answered = time.monotonic() - t0
                    break
                await asyncio.sleep(0.002)
        finally:
            s.close()
        if answered is None or not buf.startswith(b"HTTP/1.") or b" 200 " not in buf[:16]:
            raise RuntimeError(f"VM {vm.id}: no 200 within {timeout} s: {buf[:80]!r}")
        tbs = await _tb_count(mon) - tb0
    return {
        "answer_s": round(answered, 4),
        "established_s": None if established is None else round(established, 4),
        "blocks": tbs,
    }


async def measure(
    lib: Paths, name: str, overlay: Path, base: str, reps: int, reconnects: int
) -> list[dict]:
    port, path, dirty = GUESTS[name]
    mgr = VMManager(lib)
    vm = (await synthesize(lib, base, str(overlay), forwards=[PortForward(port)])).vm
    rows: list[dict[str, Any]] = []
    try:
        if dirty:
            await asyncio.to_thread(hb.start_dirtier, lib, vm.id, 16 << 20, 5e6)
        await asyncio.sleep(5)
        for _ in range(3):  # the VM's own first requests after its synthesis: not measured
            await request(vm, port, path)
        for rep in range(reps):
            # baseline: the same QEMU process, paused as long, translations warm
            async with await Monitor.connect(vm.qmp_path) as mon:
                await mon.execute("stop")
                await asyncio.sleep(PAUSE_S)
                await mon.execute("cont")
            warm = await request(vm, port, path)
            await asyncio.sleep(2)
            # client ports the guest will hold in TIME_WAIT (distinct for every rep)
            used = [42000 + 100 * rep + i for i in range(reconnects)]
            fresh = [47000 + 100 * rep + i for i in range(reconnects)]
            for cp in used:
                await request(vm, port, path, client_port=cp)
            # a new QEMU process with the same RAM and device state, as a handoff's destination
            await mgr.suspend(vm.id)
            await asyncio.sleep(PAUSE_S)
            vm = await mgr.resume(vm.id)
            first = await request(vm, port, path)
            second = await request(vm, port, path)
            for case, r in (("same_process", warm), ("new_process", first),
                            ("new_process_second", second)):  # fmt: skip
                row = {"guest": name, "rep": rep, "case": case, **r}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            for case, ports in (("reconnect_same_port", used), ("reconnect_new_port", fresh)):
                for cp in ports:
                    r = await request(vm, port, path, client_port=cp)
                    row = {"guest": name, "rep": rep, "case": case, "client_port": cp, **r}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            # again, with the RAM file's page cache dropped in between: what the VM met when
            # the kernel had reclaimed the RAM a handoff's destination received minutes before
            await asyncio.sleep(2)
            await mgr.suspend(vm.id)
            await asyncio.to_thread(drop_page_cache, vm.ram_path)
            await asyncio.sleep(PAUSE_S)
            vm = await mgr.resume(vm.id)
            row = {"guest": name, "rep": rep, "case": "new_process_cold_ram",
                   **await request(vm, port, path)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            await asyncio.sleep(2)
    finally:
        await mgr.delete(vm.id, force=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for g in dict.fromkeys(r["guest"] for r in rows):
        for case in ("same_process", "new_process", "new_process_second", "new_process_cold_ram"):
            rs = [r for r in rows if r["guest"] == g and r["case"] == case]
            est = [r["established_s"] for r in rs if r["established_s"] is not None]
            out.append({
                "guest": g,
                "case": case,
                "samples": len(rs),
                "answer_s": statistics.median(r["answer_s"] for r in rs),
                "answer_s_range": [min(r["answer_s"] for r in rs), max(r["answer_s"] for r in rs)],
                "established_s": statistics.median(est) if est else None,
                "blocks": statistics.median(r["blocks"] for r in rs),
            })  # fmt: skip
        for case in ("reconnect_same_port", "reconnect_new_port"):
            ts = [r["answer_s"] for r in rows if r["guest"] == g and r["case"] == case]
            if ts:
                out.append({
                    "guest": g,
                    "case": case,
                    "samples": len(ts),
                    "answer_s": statistics.median(ts),
                    "over_1s": sum(t > 1.0 for t in ts),
                    "over_1s_times": sorted(t for t in ts if t > 1.0),
                })  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=os.environ.get("CLOUDLET_BENCH_HOME", ".cache/handoff-home"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reconnects", type=int, default=4, help="client ports reused per rep")
    ap.add_argument("--guests", default="tiny,debian")
    a = ap.parse_args()
    names = [g for g in a.guests.split(",") if g]
    if unknown := [g for g in names if g not in GUESTS]:
        ap.error(f"unknown guest(s) {unknown}; choose from {sorted(GUESTS)}")
    lib = paths(a.home)
    if not hb.lock_home(lib):  # bench/handoff.py ends every VM of its home when it starts
        ap.error(f"a handoff bench runs on {lib.home}")
    rows: list[dict[str, Any]] = []
    for name in names:
        base, overlay = hb.ensure_tiny(lib) if name == "tiny" else hb.ensure_debian(lib)
        rows += asyncio.run(measure(lib, name, overlay, base.name, a.reps, a.reconnects))
    print(json.dumps({"bench": "first_request", "pause_s": PAUSE_S,
                      "summary": summarize(rows), "samples": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
