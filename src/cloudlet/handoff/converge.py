"""Auto-converge for stock QEMU: slow a VM that dirties memory faster than the link drains it.

Pre-copy converges only if each round's changes can be sent faster than the guest makes new
ones. A guest rewriting a 16 MiB buffer at 5 MB/s never converges on a 5 Mbit/s link: every
round resends the whole buffer, and the final round (sent while the VM is paused) is that
buffer too, tens of seconds of downtime. QEMU's own answer (migration capability
``auto-converge``) sleeps the vCPU threads a growing fraction of the time; it exists only inside
QEMU's migration code. This does the same from outside through QMP: ``stop`` for ``fraction`` of
each period, ``cont`` for the rest. With the vCPUs held, the guest dirties proportionally less
(its clock is held too, so a paced writer slows with it), and it keeps serving, only slower.

The duty cycle runs on the event loop of the handoff, over the one QMP connection the
handoff holds (QEMU's monitor socket takes one client at a time). :meth:`Throttle.close`
always leaves the VM running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from cloudlet.hypervisor.qmp import Monitor

log = logging.getLogger("cloudlet.handoff")


class Throttle:
    """Hold a VM's vCPUs paused ``fraction`` of every ``period`` seconds."""

    def __init__(self, mon: Monitor, *, period: float = 0.1) -> None:
        self.mon = mon
        self.period = period
        self.fraction = 0.0
        self.paused_s = 0.0  # time the vCPUs were actually held
        self._since = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._held = False
        self._hold_start = 0.0

    def set(self, fraction: float) -> None:
        """Hold the VM ``fraction`` (0 <= f < 1) of the time from now on."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"throttle fraction must be in [0, 1), not {fraction}")
        self.fraction = fraction
        if fraction > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def measured(self) -> float:
        """Fraction of the time since the last call that the VM was held (then reset).

        Only the held time inside that span counts: a hold that straddles a call is split
        between the spans on either side of it.
        """
        now = time.monotonic()
        held = self.paused_s
        if self._held:
            held += now - max(self._hold_start, self._since)
        span = now - self._since
        self._since, self.paused_s = now, 0.0
        return held / span if span > 0 else 0.0

    async def _run(self) -> None:
        while True:
            f = self.fraction
            if f <= 0:
                await asyncio.sleep(self.period)
                continue
            self._hold_start = time.monotonic()
            self._held = True
            await self.mon.execute("stop")
            await asyncio.sleep(f * self.period)
            await self.mon.execute("cont")
            self._held = False
            self.paused_s += time.monotonic() - max(self._hold_start, self._since)
            await asyncio.sleep((1 - f) * self.period)

    async def close(self) -> None:
        """End the duty cycle and leave the VM running (it was running before)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self._held:
            self._held = False
            await self.mon.execute("cont")


def next_fraction(current: float, *, first: float, maximum: float) -> float:
    """The next, stronger throttle: ``first``, then each step leaves 40% of the running time."""
    if current <= 0:
        return min(first, maximum)
    return min(maximum, 1 - (1 - current) * 0.4)
