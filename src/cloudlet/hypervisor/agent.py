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
            raise AgentError(
                f"the guest agent did not answer within {timeout:g} s",
                hint="is the guest up? see `cloudlet vm logs ID`",
            ) from None

    async def ping(self, timeout: float = 5.0) -> None:
        token = secrets.token_hex(6)
        await self._request(f"PING {token}", "PONG", token, timeout)

    async def exec(self, command: str, stdin: bytes = b"", timeout: float = 60.0) -> ExecResult:
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
