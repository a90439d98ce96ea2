"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

# re-exported: the tests import it from here
from cloudlet.util.procs import qemu_pids_mentioning as qemu_pids_mentioning

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
