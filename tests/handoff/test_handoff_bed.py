"""The handoff bench's own pieces: the delaying relay, the polling client and the two namespaces.

The bench's figures are only as good as these: the relay must add its delay in each direction,
pass every byte intact (half-closes included) and count what it passed; the poller must see a
service that appears late and record the counter it answers with; the clients of the two
namespaces must not share ports (see ``NetPath.open``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import nettools
from handoff_bed import (
    Answer,
    DelayProxy,
    NetPath,
    Poller,
    downtime,
    http_get,
    listening_ports,
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Echo everything; on EOF answer with the SHA-256 of what came, then close."""
    h = hashlib.sha256()
    while data := await r.read(65536):
        h.update(data)
        if len(data) <= 16:
            w.write(data)
            await w.drain()
    w.write(h.hexdigest().encode())
    await w.drain()
    w.close()


def test_relay_delays_each_way_counts_and_keeps_bytes_intact() -> None:
    async def main() -> None:
        target = await asyncio.start_server(_echo, "127.0.0.1", 0)
        tport = target.sockets[0].getsockname()[1]
        lport = free_port()
        proxy = DelayProxy("127.0.0.1", {lport: ("127.0.0.1", tport)}, delay=0.05)
        await proxy.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", lport)
            rtts = []
            for _ in range(3):
                t = time.monotonic()
                w.write(b"x")
                await w.drain()
                assert await r.readexactly(1) == b"x"
                rtts.append(time.monotonic() - t)
            assert min(rtts) >= 0.1 and max(rtts) < 0.3, rtts  # 50 ms each way
            blob = os.urandom(3 << 20)
            w.write(blob)
            await w.drain()
            w.write_eof()  # a half-close goes through: the target answers after it
            digest = await asyncio.wait_for(r.read(), 10)
            assert digest == hashlib.sha256(b"xxx" + blob).hexdigest().encode()
            w.close()
            await asyncio.sleep(0.15)
            c = proxy.stats()[str(lport)]
            assert c == {"up": 3 + len(blob), "down": 3 + 64, "conns": 1}
        finally:
            await proxy.close()
            target.close()

    asyncio.run(main())


def test_relay_closes_the_client_when_the_target_refuses() -> None:
    async def main() -> None:
        lport, dead = free_port(), free_port()
        proxy = DelayProxy("127.0.0.1", {lport: ("127.0.0.1", dead)}, delay=0.01)
        await proxy.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", lport)
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
        finally:
            await proxy.close()

    asyncio.run(main())


async def _counter_server(host: str, port: int, *, cut_every_other: bool = False) -> asyncio.Server:
    """A stand-in for the tiny guest's counter CGI: ``memory=N disk=N``, N going up.

    ``cut_every_other``: every other answer is only the status line, as when the VM pauses
    mid-answer and the connection closes later.
    """
    n = 0

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal n
        try:
            await r.readuntil(b"\r\n\r\n")
            n += 1
            body = "" if cut_every_other and n % 2 == 0 else f"memory={n} disk={n}\n"
            w.write(f"HTTP/1.0 200 OK\r\n\r\n{body}".encode())
            await w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # a poller gave up on this request
        finally:
            w.close()

    return await asyncio.start_server(handle, host, port)


def test_http_get_reads_the_counter() -> None:
    async def main() -> None:
        srv = await _counter_server("127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            assert (await http_get("127.0.0.1", port, "/cgi-bin/counter", 2))[:2] == (True, 1)
            assert (await http_get("127.0.0.1", port, "/cgi-bin/counter", 2))[:2] == (True, 2)
            refused = await http_get("127.0.0.1", free_port(), "/", 1)
            assert refused == (False, None, b"", "connect: ConnectionRefusedError")
        finally:
            srv.close()

    asyncio.run(main())


def _reset_after(head: bytes, body: bytes) -> tuple[socket.socket, threading.Thread]:
    """A server that answers one client with ``head``, then ``body`` and at once a reset, as
    the Debian guest's answers came right after a handoff (its Python server writes the
    headers and the body apart)."""
    ls = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        c, _ = ls.accept()
        c.recv(4096)
        c.sendall(head)
        time.sleep(0.1)
        c.sendall(body)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # linger 0: RST, not FIN
        ls.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return ls, t


@pytest.mark.parametrize("whole", [True, False])
def test_http_get_keeps_a_whole_answer_that_a_reset_followed(whole: bool) -> None:
    """A ``Content-Length`` body that arrived in full is an answer, reset or not (asyncio's
    stream reader would drop it); one cut short is not, and the note says how."""
    body = b'{"requests": 41, "estimate": 0.5}'
    head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    ls, t = _reset_after(head, body if whole else body[:10])
    port = ls.getsockname()[1]
    got = asyncio.run(http_get("127.0.0.1", port, "/", 2))
    t.join(5)
    if whole:
        assert got == (True, 41, body, "")
    else:
        assert got[:3] == (False, None, b"")
        assert got[3] == f"200, body cut by ConnectionResetError after 10 of {len(body)} bytes"


def test_pollers_find_a_late_service_and_record_every_answer() -> None:
    host = "127.0.0.9"  # only this test listens here: what appears is the service
    port = free_port(host)
    poller = Poller(None, host, "/cgi-bin/counter", port=None, timeout=1).start()
    fixed: Poller | None = None
    loop = asyncio.new_event_loop()
    try:
        time.sleep(0.1)
        assert poller.answers == []
        srv = loop.run_until_complete(_counter_server(host, port))
        assert port in listening_ports(host)
        fixed = Poller(None, host, "/cgi-bin/counter", port=port, timeout=1).start()
        deadline = time.monotonic() + 5
        while len(poller.answers) < 3 or len(fixed.answers) < 3:
            loop.run_until_complete(asyncio.sleep(0.01))  # the server runs on this loop
            assert time.monotonic() < deadline, (poller.answers, fixed.answers)
        poller.stop()
        fixed.stop()
        srv.close()
        loop.run_until_complete(srv.wait_closed())
        values = sorted(a.value for a in poller.answers + fixed.answers if a.value)
        assert values == list(range(1, len(values) + 1))  # every answer counted, none lost
    finally:
        poller.stop()
        if fixed is not None:
            fixed.stop()
        loop.close()


def test_discovery_skips_a_port_that_answers_without_a_counter() -> None:
    """The moved VM may forward more guest ports than the service's (its base's web page on
    80, say): the poller must end up on the one that answers with the counter."""
    host = "127.0.0.10"
    page_port, counter_port = sorted(free_port(host) for _ in range(2))

    async def page(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.0 200 OK\r\n\r\n<html>a page</html>\n")
            await w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    poller = Poller.dest(None, host, "/cgi-bin/counter", None).start()
    loop = asyncio.new_event_loop()
    try:
        s1 = loop.run_until_complete(asyncio.start_server(page, host, page_port))
        s2 = loop.run_until_complete(_counter_server(host, counter_port))
        deadline = time.monotonic() + 5
        while len(poller.answers) < 3:
            loop.run_until_complete(asyncio.sleep(0.01))
            assert time.monotonic() < deadline, poller.log
        poller.stop()
        assert {a.port for a in poller.answers} == {counter_port}
        assert all(a.value for a in poller.answers)
        for srv in (s1, s2):
            srv.close()
            loop.run_until_complete(srv.wait_closed())
    finally:
        poller.stop()
        loop.close()


def test_downtime_pairs_the_last_source_answer_before_the_first_destination_answer() -> None:
    src = Poller(None, "127.0.0.1", "/")
    dst = Poller(None, "127.0.0.1", "/")
    src.answers += [Answer(1.0, 1, 10), Answer(2.0, 1, 11), Answer(9.0, 1, 12)]
    dst.answers += [Answer(2.5, 2, 13), Answer(3.0, 2, 14)]
    d = downtime(src, dst)
    assert d["downtime_s"] == 0.5 and d["state_moved"] is True
    assert (d["source_last_value"], d["dest_first_value"]) == (11, 13)
    assert d["source_after_dest"] == 1  # a source that answered again is reported, not hidden
    dst.answers[0] = Answer(2.5, 2, 3)  # a counter that went back: the state did not move
    assert downtime(src, dst)["state_moved"] is False


@pytest.mark.parametrize("who", ["source", "dest"])
def test_downtime_says_when_a_side_never_answered(who: str) -> None:
    a = Poller(None, "127.0.0.1", "/")
    b = Poller(None, "127.0.0.1", "/")
    (b if who == "source" else a).answers.append(Answer(1.0, 1, 5))
    d = downtime(a, b)
    assert d["downtime_s"] is None and "never answered" in d["reason"]


def test_an_answer_cut_short_on_the_services_port_is_not_an_answer() -> None:
    """A request sent just before the source pauses gets its status line, then nothing until
    the source's QEMU ends and the connection closes: that is no answer from the guest, or the
    downtime would be measured from the end of the handoff (bench run of 2026-11-21 06:20)."""
    host = "127.0.0.11"
    port = free_port(host)
    poller = Poller(None, host, "/cgi-bin/counter", port=port, timeout=1).start()
    loop = asyncio.new_event_loop()
    try:
        srv = loop.run_until_complete(_counter_server(host, port, cut_every_other=True))
        deadline = time.monotonic() + 5
        while len(poller.answers) < 4:
            loop.run_until_complete(asyncio.sleep(0.01))
            assert time.monotonic() < deadline, poller.log
        poller.stop()
        assert all(a.value for a in poller.answers)
        assert poller.failures >= 3
        srv.close()
        loop.run_until_complete(srv.wait_closed())
    finally:
        poller.stop()
        loop.close()


def test_a_poller_told_the_port_asks_only_there_one_request_at_a_time() -> None:
    """Told the service's port (the bench reads it from the destination's API), the
    destination's client never asks the VM's other ports, and never has two requests out."""
    host = "127.0.0.11"
    page_port, counter_port = sorted(free_port(host) for _ in range(2))
    asked: list[int] = []
    inflight, most = 0, 0

    def counting(port: int, answer: bytes) -> Any:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal inflight, most
            inflight += 1
            most = max(most, inflight)
            asked.append(port)
            try:
                await r.readuntil(b"\r\n\r\n")
                await asyncio.sleep(0.05)  # a slow guest: a second request would overlap
                w.write(answer % len(asked))
                await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                inflight -= 1
                w.close()

        return handle

    poller = Poller.dest_after_load(None, host, "/", None)
    poller.hint = counter_port  # told before any port listens: nothing to discover
    poller.start()
    loop = asyncio.new_event_loop()
    try:
        page = loop.run_until_complete(
            asyncio.start_server(counting(page_port, b"HTTP/1.0 200 OK\r\n\r\npage %d\n"),
                                 host, page_port)
        )  # fmt: skip
        svc = loop.run_until_complete(
            asyncio.start_server(counting(counter_port, b"HTTP/1.0 200 OK\r\n\r\nmemory=%d\n"),
                                 host, counter_port)
        )  # fmt: skip
        deadline = time.monotonic() + 5
        while len(poller.answers) < 4:
            loop.run_until_complete(asyncio.sleep(0.01))
            assert time.monotonic() < deadline, poller.log
        poller.stop()
        assert set(asked) == {counter_port}
        assert most == 1
        assert {a.port for a in poller.answers} == {counter_port}
        loop.run_until_complete(asyncio.sleep(0.1))  # the last handler ends
        for srv in (page, svc):
            srv.close()
            loop.run_until_complete(srv.wait_closed())
    finally:
        poller.stop()
        loop.close()


def test_the_two_namespaces_give_their_clients_disjoint_ports() -> None:
    """A guest sees every host-side client as 10.0.2.2: a destination-side client must never
    reuse a source-side client's port (the guest may hold that connection in TIME_WAIT)."""
    with NetPath(100) as path:
        ranges = []
        for ns in (path.ns_a, path.ns_b):
            lo, hi = map(int, nettools.run(
                ["ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/ip_local_port_range"]
            ).split())  # fmt: skip
            # a client's port in this namespace comes from its range
            out = nettools.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                                "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0));"
                                " print(s.getsockname()[1])"])  # fmt: skip
            assert lo <= int(out) <= hi
            ranges.append((lo, hi))
        (a_lo, a_hi), (b_lo, b_hi) = ranges
        assert a_hi < b_lo or b_hi < a_lo, ranges
