"""A thin typed session over ``qemu.qmp.QMPClient``.

It adds what cloudlet needs on top of the library: connecting to a UNIX socket whose path may be
longer than ``sun_path`` allows (VM directories live wherever ``CLOUDLET_HOME`` is), mapping
``ExecuteError`` to :class:`QmpCommandError` with the command and QEMU's error class, and waiting
for events inside scoped listeners rather than polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient

from cloudlet.errors import VMError
from cloudlet.hypervisor.errors import QmpCommandError

# sun_path is 108 bytes on Linux, including the terminating NUL.
_SUN_PATH_MAX = 107


def connect_unix(path: Path) -> socket.socket:
    """Connect a UNIX stream socket, going through ``/proc/self/fd`` if the path is too long."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(str(path))) <= _SUN_PATH_MAX:
            sock.connect(str(path))
        else:
            dfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
            try:
                sock.connect(f"/proc/self/fd/{dfd}/{path.name}")
            finally:
                os.close(dfd)
    except BaseException:
        sock.close()
        raise
    return sock


class Monitor:
    """One QMP session with one QEMU process."""

    def __init__(self, name: str) -> None:
        self._client = QMPClient(name)

    @classmethod
    async def connect(cls, path: Path, name: str = "cloudlet", timeout: float = 10.0) -> Monitor:
        """Connect to QEMU's QMP socket, retrying while QEMU is still creating it."""
        mon = cls(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                sock = connect_unix(path)
                try:
                    await mon._client.connect(sock)
                except BaseException:
                    sock.close()
                    raise
                return mon
            except (FileNotFoundError, ConnectionRefusedError, ConnectError) as e:
                if loop.time() > deadline:
                    raise VMError(
                        f"cannot connect to QEMU's monitor at {path}: {e}",
                        hint="is the VM's QEMU process still running? see `cloudlet vm list`",
                    ) from e
                await asyncio.sleep(0.01)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as e:
            raise QmpCommandError(command, e.error_class, e.error.error.desc, e.received) from e

    async def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (QMP's ``human-monitor-command``): for what QMP has no
        structured form of, such as ``hostfwd_add`` or ``info usernet``."""
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        return "" if out is None else str(out)

    async def pass_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor under ``name`` (SCM_RIGHTS + ``getfd``).

        Migrating to or from ``fd:NAME`` avoids spawning ``sh -c cat`` for every snapshot.
        """
        with contextlib.suppress(QmpCommandError):
            await self.execute("closefd", {"fdname": name})  # a stale one from an earlier try
        self._client.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name})

    @contextlib.asynccontextmanager
    async def events(self, names: Iterable[str]) -> AsyncIterator[EventListener]:
        """Listen for the named events for the duration of the block (no polling)."""
        listener = EventListener(tuple(names))
        with self._client.listen(listener):
            yield listener

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    async def __aenter__(self) -> Monitor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
