"""Process helpers shared by the runtime and the benchmark harnesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

IDLE_NICE = 19


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (even if it is not ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 20.0) -> None:
    """SIGTERM, up to ``grace`` seconds for a clean exit (a server ends its VMs), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def qemu_pids_mentioning(text: str) -> list[int]:
    """Pids of QEMU processes whose command line contains ``text`` (e.g. a data dir).

    Reads /proc rather than tracking children, so it also finds VMs left
    behind by a killed run or started by another process.
    """
    needle = text.encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd.split(b"\0", 1)[0] and needle in cmd:
            out.append(int(d.name))
    return out


def renice(pid: int, nice: int = IDLE_NICE) -> None:
    """Give every thread of ``pid`` this nice value (Linux keeps one per thread); best effort."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)


async def run_idle(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a new thread at the lowest CPU priority and wait for it.

    For clean-up that must not compete with running guests: freeing a GiB RAM file's page
    cache, say, right when a handed-off VM on the same host starts answering. A thread of its
    own, because a pool thread would keep the priority for whatever it runs next.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def done(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def work() -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), IDLE_NICE)
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the awaiting task
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(done, result, error)

    threading.Thread(target=work, name="cloudlet-idle", daemon=True).start()
    return await fut
