"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

# re-exported: the tests import it from here
from cloudlet.util.procs import qemu_pids_mentioning as qemu_pids_mentioning
from cloudlet.util.sparse import data_extents

REPO = Path(__file__).resolve().parent.parent
CLOUDLET = [sys.executable, "-m", "cloudlet"]


def counter(port: int, timeout: float = 10.0) -> dict[str, int]:
    """GET the tiny image's counter CGI and parse ``memory=N disk=M``."""
    r = httpx.get(f"http://127.0.0.1:{port}/cgi-bin/counter", timeout=timeout)
    r.raise_for_status()
    return {k: int(v) for k, v in (kv.split("=") for kv in r.text.split())}


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the cloudlet CLI in a subprocess (as a user would)."""
    return subprocess.run(
        [*CLOUDLET, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def wait_until(pred, timeout: float = 30.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


# -- the page cache (what the kernel may drop) ------------------------------------------------
PAGE = 4096


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (util-linux ``fincore``: ``mincore``, no reads)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(out.strip()) // PAGE


def uncached_data_pages(path: Path) -> int:
    """Pages of ``path``'s data (holes aside) not in the page cache, by reads that may not wait."""
    missing, buf = 0, bytearray(PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in data_extents(fd, os.fstat(fd).st_size):
            for off in range(start // PAGE * PAGE, end, PAGE):
                try:
                    os.preadv(fd, [buf], off, os.RWF_NOWAIT)
                except BlockingIOError:
                    missing += 1
    finally:
        os.close(fd)
    return missing
