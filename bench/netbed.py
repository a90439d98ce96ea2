"""A shaped link for benchmarks: an HTTP file server in a network namespace behind ``tc tbf``.

Why a namespace: benchmark traffic must stay on this machine, and ``tc`` only shapes traffic
that crosses an interface. A veth pair joins the host (10.203.0.1/30) and a namespace of ours
(10.203.0.2/30); a ``tbf`` qdisc on each end shapes both directions; a threaded
``http.server`` serves a directory on the namespace side. Everything is removed on exit,
exception, Ctrl-C or SIGTERM; namespaces left by a run that was killed with SIGKILL are removed
by the next run (their names carry the dead owner's pid).

The kernel here has no ``sch_netem``, so the link has a rate but no added delay (RTT ~0.1 ms).

    with NetBed(Path("served"), rate_mbit=38) as bed:
        url = bed.url("file.bin")
        print(bed.measure_rate())   # achieved goodput in Mbit/s
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

import nettools  # bench/ is on sys.path when a bench script runs

PREFIX = "clbench"  # namespace "clbench-<pid>", veths "clb<pid>h" / "clb<pid>n"
HOST_ADDR = "10.203.0.1"
NS_ADDR = "10.203.0.2"
PREFIX_LEN = 30
PORT = 8000
RATE_PROBE_FILE = ".rate-probe.bin"


def remove_stale() -> list[str]:
    """Delete our namespaces whose owning process is gone (a run killed with SIGKILL)."""
    return nettools.remove_stale(rf"^({PREFIX}-(\d+))\b")


class NetBed(nettools.Bed):
    """Namespace + veth + tbf both ways + HTTP server; a context manager that cleans up."""

    def __init__(self, served: Path, rate_mbit: float | None = 38.0, port: int = PORT) -> None:
        self.served = served.resolve()
        self.rate_mbit = rate_mbit
        self.port = port
        pid = os.getpid()
        self.ns = f"{PREFIX}-{pid}"
        self.veth_host = f"clb{pid}h"[:15]
        self.veth_ns = f"clb{pid}n"[:15]
        self.server: subprocess.Popen[bytes] | None = None
        self._created = False
        self._old_handlers = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        remove_stale()
        self.served.mkdir(parents=True, exist_ok=True)
        nettools.ip("netns", "add", self.ns)
        self._created = True
        nettools.ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        nettools.ip("link", "set", self.veth_ns, "netns", self.ns)
        nettools.ip("addr", "add", f"{HOST_ADDR}/{PREFIX_LEN}", "dev", self.veth_host)
        nettools.ip("link", "set", self.veth_host, "up")
        nettools.ip("addr", "add", f"{NS_ADDR}/{PREFIX_LEN}", "dev", self.veth_ns, ns=self.ns)
        nettools.ip("link", "set", self.veth_ns, "up", ns=self.ns)
        nettools.ip("link", "set", "lo", "up", ns=self.ns)
        if self.rate_mbit:
            nettools.shape(self.veth_host, self.rate_mbit)  # host -> namespace (requests, ACKs)
            nettools.shape(self.veth_ns, self.rate_mbit, ns=self.ns)  # namespace -> host (data)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "http.server",
             "--bind", NS_ADDR, "--directory", str(self.served), str(self.port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.head(self.url(""), timeout=1.0)
                return
            except httpx.HTTPError:
                if self.server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the HTTP server in the namespace did not start") from None
                time.sleep(0.05)

    def close(self) -> None:
        """Stop the server, delete the namespace (which deletes both veth ends)."""
        if self.server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
            self.server = None
        if self._created:
            nettools.delete_netns(self.ns)
            # The host end normally vanishes with its peer; make sure.
            subprocess.run(["ip", "link", "del", self.veth_host], capture_output=True, check=False)
            self._created = False
        self.restore_signals()

    # -- use ---------------------------------------------------------------------------------
    def url(self, rel: str) -> str:
        return f"http://{NS_ADDR}:{self.port}/{rel}"

    def publish(self, path: Path, name: str | None = None) -> str:
        """Make ``path`` downloadable (a hard link, or a copy across file systems)."""
        dest = self.served / (name or path.name)
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        try:
            os.link(path, dest)
        except OSError:
            subprocess.run(["cp", "--reflink=auto", str(path), str(dest)], check=True)
        return self.url(dest.name)

    def measure_rate(self, nbytes: int = 8 << 20) -> float:
        """Achieved goodput in Mbit/s: time an HTTP download of ``nbytes`` random bytes."""
        probe = self.served / RATE_PROBE_FILE
        if not probe.exists() or probe.stat().st_size != nbytes:
            probe.write_bytes(os.urandom(nbytes))
        t0 = time.monotonic()
        got = 0
        with httpx.stream("GET", self.url(RATE_PROBE_FILE), timeout=60.0) as r:
            r.raise_for_status()
            for chunk in r.iter_raw(256 * 1024):
                got += len(chunk)
        dt = time.monotonic() - t0
        if got != nbytes:
            raise RuntimeError(f"rate probe got {got} of {nbytes} bytes")
        return got * 8 / dt / 1e6


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d, NetBed(Path(d), rate_mbit=38.0) as bed:
        print(f"{bed.measure_rate():.1f} Mbit/s achieved at 38 Mbit/s", file=sys.stderr)
