"""Host side of the guest agent: run commands in a guest over its virtio-serial port.

The wire protocol (one line each way, base64 fields, ``-`` for empty) is documented in
``docs/images.md``. QEMU exposes the port as a UNIX socket (``agent.sock``) in the VM directory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from dataclasses import dataclass
from pathlib import Path

from cloudlet.hypervisor.errors import AgentError
from cloudlet.hypervisor.qmp import connect_unix

MAX_LINE = 64 * 1024 * 1024


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes

    def to_dict(self) -> dict[str, object]:
        return {
            "exit_code": self.exit_code,
            "stdout": self.stdout.decode(errors="replace"),
            "stderr": self.stderr.decode(errors="replace"),
        }


class AgentTimeout(AgentError):
    """The guest agent did not answer in time (the connection itself is still up)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode() if data else "-"


def _unb64(field: str) -> bytes:
    return b"" if field == "-" else base64.b64decode(field, validate=True)


class Agent:
    """A connection to one guest's agent; use as ``async with Agent(path) as a``."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._synced = False  # a PING was answered on this connection

    async def __aenter__(self) -> Agent:
        try:
            sock = connect_unix(self.socket_path)
        except OSError as e:
            raise AgentError(f"cannot connect to the guest agent socket: {e}") from e
        self._reader, self._writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def _request(self, line: str, expect: str, token: str, timeout: float) -> list[str]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(line.encode() + b"\n")
        await self._writer.drain()

        async def read_reply() -> list[str]:
            assert self._reader is not None
            while True:
                raw = await self._reader.readline()
                if not raw:
                    raise AgentError("the guest agent closed the connection")
                parts = raw.decode(errors="replace").strip().split(" ")
                # Skip stale replies to earlier, timed-out requests.
                if len(parts) >= 2 and parts[0] == expect and parts[1] == token:
                    return parts

        try:
            return await asyncio.wait_for(read_reply(), timeout)
        except TimeoutError:
            raise AgentTimeout(
                f"the guest agent did not answer within {timeout:g} s",
                hint="is the guest up? see `cloudlet vm logs ID`",
            ) from None

    async def ping(self, timeout: float = 5.0) -> None:
        """PING until one is answered; afterwards the guest reads this connection.

        The guest agent closes and reopens its port after every host disconnect, and the guest
        kernel discards what arrived on the port when it is closed: a line sent just after
        connecting can reach the guest between its EOF (from the previous connection) and its
        close, and be lost. Losing a PING is harmless, so we resend it (new token; stale PONGs
        are skipped); once one is answered the guest holds the port open until we disconnect.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        wait = 0.25
        while True:
            token = secrets.token_hex(6)
            left = deadline - loop.time()
            try:
                await self._request(f"PING {token}", "PONG", token, max(0.01, min(wait, left)))
                self._synced = True
                return
            except AgentTimeout:
                if loop.time() >= deadline:
                    raise AgentTimeout(
                        f"the guest agent did not answer within {timeout:g} s",
                        hint="is the guest up? see `cloudlet vm logs ID`",
                    ) from None
            wait = min(wait * 2, 2.0)

    async def exec(self, command: str, stdin: bytes = b"", timeout: float = 60.0) -> ExecResult:
        if not self._synced:  # an EXEC must not be lost: it may not be safe to repeat
            await self.ping(timeout)
        token = secrets.token_hex(6)
        parts = await self._request(
            f"EXEC {token} {_b64(command.encode())} {_b64(stdin)}", "RESULT", token, timeout
        )
        if len(parts) != 5:
            raise AgentError(f"malformed reply from the guest agent: {parts[:3]}...")
        try:
            return ExecResult(int(parts[2]), _unb64(parts[3]), _unb64(parts[4]))
        except ValueError as e:
            raise AgentError(f"malformed reply from the guest agent: {e}") from e
