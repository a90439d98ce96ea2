"""Process helpers: clean-up at idle priority."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from cloudlet.util.procs import IDLE_NICE, renice, run_idle


def _own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)  # Linux: the calling thread's


def test_run_idle_runs_at_idle_priority_and_hands_back_result_and_errors() -> None:
    before = _own_nice()

    async def go() -> tuple[int, int]:
        seen = await run_idle(_own_nice)
        return seen, await run_idle(lambda a, b: a + b, 2, 3)

    seen, total = asyncio.run(go())
    assert seen == IDLE_NICE and total == 5
    assert _own_nice() == before  # the caller's thread keeps its priority

    async def boom() -> None:
        await run_idle(lambda: 1 / 0)

    with pytest.raises(ZeroDivisionError):
        asyncio.run(boom())


def test_renice_sets_every_thread_of_a_process() -> None:
    code = (
        "import threading, time; "
        "threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"
    )
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        tids: list[str] = []
        for _ in range(200):
            tids = os.listdir(f"/proc/{p.pid}/task")
            if len(tids) >= 2:
                break
            time.sleep(0.01)
        assert len(tids) >= 2
        renice(p.pid)
        assert {os.getpriority(os.PRIO_PROCESS, int(t)) for t in tids} == {IDLE_NICE}
    finally:
        p.kill()
        p.wait()
    renice(p.pid)  # a process that is gone: nothing to do, no error
