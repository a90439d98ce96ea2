"""How a handoff source talks to its destination.

:class:`HttpLink` speaks the destination's native API (``/v1/handoff/sessions``) with a bearer
token; round bodies are streamed frame by frame. The socket's send buffer is kept small, so the
time the transport takes to accept each frame tracks the real link rate: that is what the
adaptive compression controller is fed. :class:`LocalLink` calls a
:class:`~cloudlet.handoff.destination.HandoffDestination` in the same process (tests).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx

from cloudlet.handoff.adaptive import CompressionController
from cloudlet.handoff.destination import HandoffDestination
from cloudlet.handoff.errors import HandoffPrepareError, HandoffRestoreError, HandoffTransferError

SEND_BUFFER = 128 * 1024


class DestinationLink(Protocol):
    async def prepare(self, req: dict[str, Any]) -> dict[str, Any]: ...

    async def send(
        self, session: str, frames: AsyncIterator[bytes], *, final: bool
    ) -> dict[str, Any]: ...

    async def abort(self, session: str) -> None: ...

    async def close(self) -> None: ...


async def metered(
    frames: AsyncIterator[bytes], controller: CompressionController | None, counter: list[int]
) -> AsyncIterator[bytes]:
    """Pass frames through, timing how long the consumer takes to accept each one."""
    async for f in frames:
        t0 = time.monotonic()
        yield f
        if controller is not None:
            controller.observe_link(len(f), time.monotonic() - t0)
        counter[0] += len(f)


class LocalLink:
    """A destination in this process (tests, and same-host moves)."""

    def __init__(self, dest: HandoffDestination) -> None:
        self.dest = dest
        self.sent = [0]

    async def prepare(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.dest.prepare(req)

    async def send(
        self, session: str, frames: AsyncIterator[bytes], *, final: bool
    ) -> dict[str, Any]:
        body = metered(frames, None, self.sent)
        if final:
            return await self.dest.finish(session, body)
        return await self.dest.receive(session, body)

    async def abort(self, session: str) -> None:
        await self.dest.abort(session)

    async def close(self) -> None:
        pass


class HttpLink:
    """A destination cloudlet's native API over HTTP."""

    def __init__(
        self,
        url: str,
        token: str,
        controller: CompressionController | None = None,
        *,
        timeout: float = 60.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.controller = controller
        self.sent = [0]
        transport = httpx.AsyncHTTPTransport(
            socket_options=[(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)]
        )
        self.client = httpx.AsyncClient(
            transport=transport,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    async def prepare(self, req: dict[str, Any]) -> dict[str, Any]:
        step = "preparing the destination"
        try:
            r = await self.client.post(f"{self.url}/v1/handoff/sessions", json=req)
        except httpx.HTTPError as e:
            raise HandoffPrepareError(step, f"cannot reach {self.url}: {e}") from e
        if r.status_code == 401:
            raise HandoffPrepareError(step, "the destination refused the token (401)",
                                      hint="give a token the destination accepts")  # fmt: skip
        if r.status_code >= 400:
            raise HandoffPrepareError(step, f"the destination answered {r.status_code}: {_msg(r)}")
        return dict(r.json())

    async def send(
        self, session: str, frames: AsyncIterator[bytes], *, final: bool
    ) -> dict[str, Any]:
        what = "finish" if final else "rounds"
        step = "sending the last round" if final else "sending a pre-copy round"
        try:
            r = await self.client.post(
                f"{self.url}/v1/handoff/sessions/{session}/{what}",
                content=metered(frames, self.controller, self.sent),
                headers={"Content-Type": "application/x-cloudlet-handoff"},
            )
        except httpx.HTTPError as e:
            raise HandoffTransferError(step, f"{type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            cls = HandoffRestoreError if final else HandoffTransferError
            raise cls(step, f"the destination answered {r.status_code}: {_msg(r)}")
        return dict(r.json())

    async def abort(self, session: str) -> None:
        # Best effort: the destination also discards idle sessions by itself.
        with contextlib.suppress(httpx.HTTPError):
            await self.client.delete(f"{self.url}/v1/handoff/sessions/{session}", timeout=5.0)

    async def close(self) -> None:
        await self.client.aclose()


def _msg(r: httpx.Response) -> str:
    try:
        d = r.json()
        return str(d.get("message") or d.get("detail") or d)
    except ValueError:
        return r.text[:300]
