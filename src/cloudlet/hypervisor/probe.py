"""How an instance's start is timed and declared ready: its first application-level answer.

A raw asyncio connection, not an HTTP client library: building an ``httpx.AsyncClient`` alone
costs ~45 ms here (an SSL context), a fifth of the cached-start budget. Through QEMU's user-mode
network a host-side connect always succeeds at once, so "connected" means nothing: an HTTP port
must answer a request; any other port must keep the connection open (a refused guest port gets
it closed right away).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

HTTP_PORTS = (80, 8000, 8080)


async def _try_once(host: str, port: int, guest_port: int) -> bool:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        if guest_port in HTTP_PORTS:
            w.write(b"HEAD / HTTP/1.0\r\nHost: cloudlet\r\n\r\n")
            await w.drain()
            data = await asyncio.wait_for(r.read(5), 2.0)
            return data.startswith(b"HTTP/")
        try:
            data = await asyncio.wait_for(r.read(1), 0.05)
        except TimeoutError:
            return True  # held open: something listens behind the forward
        return bool(data)
    except (OSError, TimeoutError):
        return False
    finally:
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()


async def first_answer(host: str, port: int, guest_port: int, timeout: float) -> float | None:
    """``time.monotonic()`` of the first answer on ``host:port``, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if await _try_once(host, port, guest_port):
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.003)
