"""The ``ip``/``tc`` plumbing both shaped-link harnesses share (``netbed``, ``handoff_bed``).

Why one module: the two beds build the same things (network namespaces named after the owning
pid, veth pairs, ``tbf`` on each end) and must clean up the same way, so the commands, the
shaping settings and the stale-namespace sweep live here once. Imported as a sibling module:
``bench/`` is on ``sys.path`` whenever a bench script runs (also as a subprocess).
"""

from __future__ import annotations

import re
import signal
import subprocess
from types import TracebackType
from typing import Any, Self

from cloudlet.util.procs import pid_alive


def run(cmd: list[str]) -> str:
    """Run ``cmd`` and return its stdout; raise with its stderr if it fails."""
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout


def ip(*args: str, ns: str | None = None) -> str:
    """``ip ARGS`` in the root namespace, or in namespace ``ns`` (``ip -n``)."""
    return run(["ip", *(["-n", ns] if ns else []), *args])


def tc(*args: str, ns: str | None = None) -> str:
    """``tc ARGS`` in the root namespace, or in namespace ``ns`` (``tc -n``)."""
    return run(["tc", *(["-n", ns] if ns else []), *args])


def tbf_args(rate_mbit: float) -> list[str]:
    """The qdisc spec that shapes a link to ``rate_mbit``."""
    # burst 32kbit, latency 400ms: the settings whose accuracy the facts file measured.
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", "32kbit", "latency", "400ms"]


def shape(dev: str, rate_mbit: float, ns: str | None = None, change: bool = False) -> None:
    """Put (or with ``change``, retune) ``tbf`` at ``rate_mbit`` on the egress of ``dev``."""
    tc("qdisc", "change" if change else "add", "dev", dev, "root", *tbf_args(rate_mbit), ns=ns)


def delete_netns(name: str) -> None:
    """Delete namespace ``name`` (and so the veth ends in it); quiet if it is already gone."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def remove_stale(pattern: str) -> list[str]:
    """Delete namespaces matching ``pattern`` whose owner has died (a run killed with SIGKILL).

    ``pattern`` is matched at the start of each ``ip netns list`` line; its group 1 is the
    namespace name, group 2 the owning pid.
    """
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    removed = []
    for line in out.stdout.splitlines():
        m = re.match(pattern, line.strip())
        if m and not pid_alive(int(m.group(2))):
            delete_netns(m.group(1))
            removed.append(m.group(1))
    return removed


def trap_exit_signals() -> dict[int, Any]:
    """Make SIGTERM/SIGHUP raise SystemExit, so ``with`` blocks (and our cleanup) run.

    Returns the old handlers, for :func:`restore_signals`.
    """

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}


def restore_signals(old: dict[int, Any]) -> None:
    """Put back the handlers :func:`trap_exit_signals` replaced."""
    for s, h in old.items():
        signal.signal(s, h)
    old.clear()


class Bed:
    """Base of a test bed that is a context manager: ``open`` on entry, ``close`` always.

    SIGTERM/SIGHUP are turned into SystemExit while it is open, so a killed bench still runs
    ``close`` and leaves no namespaces behind; ``close`` must undo a partial ``open`` and
    call :meth:`restore_signals`.
    """

    _old_handlers: dict[int, Any]

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def restore_signals(self) -> None:
        """Put back the signal handlers replaced on entry."""
        restore_signals(self._old_handlers)

    def __enter__(self) -> Self:
        self._old_handlers = trap_exit_signals()
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
