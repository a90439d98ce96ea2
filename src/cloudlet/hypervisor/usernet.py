"""The user network's TCP connections to a VM's forwarded ports, as QEMU reports them.

QEMU's user network (libslirp) terminates every host connection to a ``hostfwd`` port itself
and opens its own to the guest. ``info usernet`` (HMP, through QMP's
``human-monitor-command``) lists those with their TCP state::

      Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
      TCP[HOST_FORWARD]  12       127.0.0.1 18080       10.0.2.15    80     0     0
      TCP[ESTABLISHED]   88       127.0.0.1 18080       10.0.2.15    80     0    27

A forwarded connection shows the forward's host address and port as its source. Its state is
that of the user network's side towards the guest: ``ESTABLISHED`` until the guest closes it
(``CLOSE_WAIT`` after), ``RecvQ`` what the guest sent that is not yet written to the host
socket. That is enough to tell, from outside and without a guest agent, whether the guest
still holds a request it has not answered: what a handoff needs to pick its moment to pause.
QMP has no structured form of this table, hence the parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cloudlet.hypervisor.ports import PortForward
from cloudlet.hypervisor.qmp import Monitor

_ROW = re.compile(
    r"^\s*(?P<proto>TCP|UDP)\[(?P<state>[^\]]*)\]\s+(?P<fd>-?\d+)\s+(?P<src>\S+)\s+"
    r"(?P<sport>\d+)\s+(?P<dst>\S+)\s+(?P<dport>\d+)\s+(?P<recvq>\d+)\s+(?P<sendq>\d+)\s*$"
)
# The guest has not closed its side: a request may still be unanswered.
_OPEN_STATES = frozenset({"SYN_SENT", "SYN_RCVD", "ESTABLISHED"})


@dataclass(frozen=True)
class Connection:
    proto: str
    state: str
    fd: int
    src: str
    sport: int
    dst: str
    dport: int
    recvq: int  # bytes from the guest not yet written to the host socket
    sendq: int  # bytes from the host not yet taken by the guest

    def forwarded(self, forwards: Iterable[PortForward]) -> bool:
        """A host connection accepted on one of ``forwards`` (not the forward's listener)."""
        return (
            self.proto == "TCP"
            and self.state != "HOST_FORWARD"
            and any(self.sport == f.host and self.dport == f.guest for f in forwards)
        )

    @property
    def unanswered(self) -> bool:
        """The guest may still owe this connection an answer, or its answer is not yet out."""
        return self.state in _OPEN_STATES or self.recvq > 0


def parse_usernet(text: str) -> list[Connection]:
    """The connection rows of ``info usernet`` (headers and unknown lines are skipped)."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            g = m.groupdict()
            ints = {k: int(g[k]) for k in ("fd", "sport", "dport", "recvq", "sendq")}
            rows.append(
                Connection(g["proto"], g["state"].strip(), src=g["src"], dst=g["dst"], **ints)
            )
    return rows


async def connections(mon: Monitor) -> list[Connection]:
    return parse_usernet(await mon.hmp("info usernet"))


async def unanswered(mon: Monitor, forwards: Iterable[PortForward]) -> set[int]:
    """The user network's fds of host connections on ``forwards`` the guest has not answered.

    "Answered" is "closed by the guest, and all it sent written to the host": exact for
    HTTP/1.0 and any protocol where the server closes, conservative for a kept-alive
    connection (open until the client closes it, so counted as unanswered).
    """
    fw = list(forwards)
    return {c.fd for c in await connections(mon) if c.forwarded(fw) and c.unanswered}


class AnswerWatch:
    """Follow a VM's forwarded connections and note when its guest last answered one.

    An answer is a connection seen unanswered that is not any more (the guest closed it, or
    its client gave up). :meth:`start` polls in the background every ``interval`` seconds,
    on the caller's QMP connection; :meth:`poll` can also be called directly.
    """

    def __init__(self, mon: Monitor, forwards: Iterable[PortForward], interval: float = 0.005):
        self.mon, self.forwards, self.interval = mon, list(forwards), interval
        self.last_answer: float | None = None  # time.monotonic() when one was last seen
        self._open: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    async def poll(self) -> set[int]:
        """The unanswered connections now (fds), noting any answered since the last poll."""
        now_open = await unanswered(self.mon, self.forwards)
        if self._open - now_open:
            self.last_answer = time.monotonic()
        self._open = now_open
        return now_open

    def since_answer(self) -> float | None:
        return None if self.last_answer is None else time.monotonic() - self.last_answer

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        """End the background polling (an error it met ends it too, silently: the watch is
        advice, and :meth:`poll` called directly raises it again)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
