"""The throttle's own bookkeeping. Its effect on real VMs is in test_handoff.py; here a
monitor that only records the commands stands in, since what is checked is the arithmetic."""

from __future__ import annotations

import asyncio
from typing import Any

from cloudlet.handoff.converge import Throttle, next_fraction


class RecordingMonitor:
    def __init__(self) -> None:
        self.commands: list[str] = []

    async def execute(self, cmd: str, args: Any = None) -> dict[str, Any]:
        self.commands.append(cmd)
        return {}


def test_held_fraction_never_exceeds_the_span_it_is_measured_over() -> None:
    """Spans shorter than a hold (rounds of a few tenths of a second at 97% held) used to
    count a hold that straddled the span's start in full: fractions above 1 were reported."""

    async def main() -> tuple[list[float], list[str]]:
        mon = RecordingMonitor()
        th = Throttle(mon, period=0.1)  # type: ignore[arg-type]
        th.measured()
        th.set(0.97)
        seen = []
        for gap in (0.013, 0.05, 0.021, 0.13, 0.007, 0.2, 0.04, 0.09, 0.3, 0.011) * 2:
            await asyncio.sleep(gap)
            seen.append(th.measured())
        await th.close()
        return seen, mon.commands

    seen, commands = asyncio.run(main())
    assert all(0.0 <= f <= 1.0 for f in seen), seen
    assert max(seen) > 0.5  # it really held the VM over most spans
    assert commands[0] == "stop" and commands[-1] == "cont"  # and left it running


def test_each_step_leaves_forty_percent_of_the_run_time_up_to_the_maximum() -> None:
    steps = [0.0]
    for _ in range(5):
        steps.append(next_fraction(steps[-1], first=0.8, maximum=0.97))
    assert [round(s, 3) for s in steps] == [0.0, 0.8, 0.92, 0.968, 0.97, 0.97]
