#!/usr/bin/env python3
"""The handoff test bed: two hosts in network namespaces, a shaped link, 25 ms each way.

Why each piece:

- Two namespaces (``A`` holds the source, ``B`` the destination) joined by a veth pair are two
  hosts on one machine whose traffic never leaves it; ``tc tbf`` on both veth ends gives the
  link its rate (both directions), and ``tc qdisc change`` changes it mid-run.
- This kernel has no ``sch_netem``, so delay comes from :class:`DelayProxy`, a user-space TCP
  relay in namespace B: it listens on B's veth address and forwards to the real listeners on
  B's loopback, holding every chunk for ``delay`` seconds in each direction. Anything A sends
  to B (cloudlet's HTTP handoff, QEMU's migration stream, the NBD disk mirror, the path
  probes) crosses the same shaped veth and the same relay, and the relay counts the payload
  bytes per port: the "bytes on the wire" of each contender, counted the same way for both.
- The bench process itself stays in the root namespace; :func:`netns` moves only the calling
  *thread* into a namespace (``setns(2)``), so the API clients, the pollers and the path
  probe each run where they must without extra processes or links.
- :class:`Poller` is the client that measures downtime from outside the VM: a thread in one
  namespace that keeps asking the service for an answer and records when answers came.

Nothing here is left behind: :class:`NetPath` removes its namespaces (and with them the veth
pair) on exit, exception, Ctrl-C or SIGTERM; namespaces of a run killed with SIGKILL carry the
dead owner's pid in their name and are removed by the next run.

The relay also runs as its own process (``python bench/handoff_bed.py proxy ...``), so that it
has a core and a GIL of its own rather than sharing the bench's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nettools  # bench/ is on sys.path, also when this file runs as the proxy process

PREFIX = "clho"  # namespaces "clho-<pid>-a" / "-b"; veths "clho<pid>a" / "...b"
A_ADDR = "10.204.0.1"
B_ADDR = "10.204.0.2"
PREFIX_LEN = 30
VM_ADDR = "127.0.0.2"  # where VM host ports bind inside each namespace (only VMs listen there)
LOCAL = "127.0.0.1"  # where the real listeners of each namespace are
PROBE_PORT = 5201
CLONE_NEWNET = 0x40000000
CHUNK = 64 * 1024

# -- namespaces ------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def netns(name: str | None) -> Iterator[None]:
    """Run the block with the calling thread in network namespace ``name`` (None: stay).

    Sockets keep the namespace they were made in, so a connection opened inside the block
    (an HTTP client's pooled connection, say) stays in ``name`` after it.
    """
    if name is None:
        yield
        return
    with open("/proc/thread-self/ns/net") as orig, open(f"/run/netns/{name}") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(orig.fileno())


def remove_stale() -> list[str]:
    """Delete our namespaces whose owning process is gone (a run killed with SIGKILL)."""
    return nettools.remove_stale(rf"^({PREFIX}-(\d+)-[ab])\b")


class NetPath(nettools.Bed):
    """Namespaces A and B, a veth pair between them, ``tbf`` on both ends. A context manager."""

    def __init__(self, rate_mbit: float) -> None:
        pid = os.getpid()
        self.ns_a, self.ns_b = f"{PREFIX}-{pid}-a", f"{PREFIX}-{pid}-b"
        self.veth_a, self.veth_b = f"{PREFIX}{pid}a"[:15], f"{PREFIX}{pid}b"[:15]
        self.rate_mbit = rate_mbit
        self._made: list[str] = []
        self._old_handlers = {}

    def open(self) -> None:
        remove_stale()
        for ns in (self.ns_a, self.ns_b):
            nettools.ip("netns", "add", ns)
            self._made.append(ns)
        nettools.ip("link", "add", self.veth_a, "netns", self.ns_a,
                    "type", "veth", "peer", "name", self.veth_b, "netns", self.ns_b)  # fmt: skip
        for ns, dev, addr in ((self.ns_a, self.veth_a, A_ADDR), (self.ns_b, self.veth_b, B_ADDR)):
            nettools.ip("addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev, ns=ns)
            nettools.ip("link", "set", dev, "up", ns=ns)
            nettools.ip("link", "set", "lo", "up", ns=ns)
            nettools.shape(dev, self.rate_mbit, ns=ns)
        # The clients of A and B take their ports from disjoint ranges. Through QEMU's user
        # network every client on a host reaches the guest from one address (10.0.2.2), and
        # the guest holds each connection it closed in TIME_WAIT. A new connection through the
        # destination's new QEMU on a 4-tuple a source-side connection used is then not
        # accepted until the user network resends its SYN (~6 s; bench/first_request.py). A
        # user's device reaches the next cloudlet from another address, so this is the
        # harness's collision, not the handoff's.
        for ns, ports in ((self.ns_a, "32768 46999"), (self.ns_b, "47000 60999")):
            nettools.run(["ip", "netns", "exec", ns,
                          "sysctl", "-qw", f"net.ipv4.ip_local_port_range={ports}"])  # fmt: skip

    def close(self) -> None:
        """Delete the namespaces (which deletes both veth ends). Processes in them must be gone."""
        for ns in reversed(self._made):
            nettools.delete_netns(ns)
        self._made.clear()
        self.restore_signals()

    def set_rate(self, rate_mbit: float) -> None:
        """Change the rate of both directions now (``tc qdisc change``)."""
        for ns, dev in ((self.ns_a, self.veth_a), (self.ns_b, self.veth_b)):
            nettools.shape(dev, rate_mbit, ns=ns, change=True)
        self.rate_mbit = rate_mbit

    def veth_bytes(self) -> dict[str, int]:
        """Bytes sent by each veth end (IP packets: headers, ACKs and retransmits included)."""
        out = {}
        for ns, dev, key in (
            (self.ns_a, self.veth_a, "a_to_b"),
            (self.ns_b, self.veth_b, "b_to_a"),
        ):
            d = json.loads(nettools.ip("-s", "-j", "link", "show", "dev", dev, ns=ns))
            out[key] = int(d[0]["stats64"]["tx"]["bytes"])
        return out

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


# -- the delaying relay ----------------------------------------------------------------------


@dataclass
class PortCount:
    up: int = 0  # client -> target (A -> B)
    down: int = 0  # target -> client (B -> A)
    conns: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"up": self.up, "down": self.down, "conns": self.conns}


class _Pipe:
    """One direction of one relayed connection: read, hold ``delay`` seconds, write.

    Reading stops while ``max_queue`` bytes wait, so a slow reader on the far side pushes back
    on the sender through TCP, as it would on a real path.
    """

    def __init__(
        self,
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
        delay: float,
        max_queue: int,
        abort: Callable[[], None],
    ) -> None:
        self.r, self.w, self.delay, self.max_queue = r, w, delay, max_queue
        self.abort = abort  # a failed write ends both directions (closes both sockets)
        self.q: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.have = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def run(self, count: Callable[[int], None]) -> None:
        await asyncio.gather(self._read(count), self._write())

    async def _read(self, count: Callable[[int], None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                data = await self.r.read(CHUNK)
                count(len(data))
                self.q.append((loop.time() + self.delay, data or None))
                self.have.set()
                if not data:
                    return
                self.queued += len(data)
                if self.queued >= self.max_queue:
                    self.room.clear()
        except (ConnectionError, OSError):
            self.q.append((loop.time(), None))
            self.have.set()

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.q:
                self.have.clear()
                await self.have.wait()
            due = self.q[0][0]
            now = loop.time()
            if due > now:
                await asyncio.sleep(due - now)
            # Everything due by now goes in one write (fewer wakeups at 100 Mbit/s).
            now = loop.time()
            parts: list[bytes] = []
            end = False
            while self.q and self.q[0][0] <= now:
                data = self.q.popleft()[1]
                if data is None:
                    end = True
                    break
                parts.append(data)
            if parts:
                blob = b"".join(parts)
                try:
                    self.w.write(blob)
                    await self.w.drain()
                except (ConnectionError, OSError):
                    self.abort()
                    return
                self.queued -= len(blob)
                if self.queued < self.max_queue:
                    self.room.set()
            if end:
                with contextlib.suppress(OSError, RuntimeError):
                    if self.w.can_write_eof():
                        self.w.write_eof()
                return


def _nodelay(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DelayProxy:
    """TCP relay ``listen_host:port -> target`` per route, ``delay`` seconds each way, counting."""

    def __init__(
        self,
        listen_host: str,
        routes: dict[int, tuple[str, int]],
        delay: float = 0.025,
        max_queue: int = 2 << 20,
    ) -> None:
        self.listen_host = listen_host
        self.routes = routes
        self.delay = delay
        self.max_queue = max_queue
        self.counts: dict[int, PortCount] = {p: PortCount() for p in routes}
        self.servers: list[asyncio.Server] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for port in self.routes:

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port):
                with contextlib.suppress(asyncio.CancelledError):  # cancelled at close: quietly
                    await self._relay(port, r, w)

            self.servers.append(
                await asyncio.start_server(handle, self.listen_host, port, reuse_address=True)
            )

    async def _relay(self, port: int, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        c = self.counts[port]
        c.conns += 1
        tw: asyncio.StreamWriter | None = None
        try:
            host, tport = self.routes[port]
            try:
                tr, tw = await asyncio.open_connection(host, tport)
            except OSError:
                return  # refused at the target: close the client's side too
            _nodelay(cw)
            _nodelay(tw)

            def up(n: int) -> None:
                c.up += n

            def down(n: int) -> None:
                c.down += n

            def abort() -> None:
                cw.close()
                if tw is not None:
                    tw.close()

            await asyncio.gather(
                _Pipe(cr, tw, self.delay, self.max_queue, abort).run(up),
                _Pipe(tr, cw, self.delay, self.max_queue, abort).run(down),
            )
        finally:
            for w in (cw, tw):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
            self.tasks.discard(task)

    def stats(self) -> dict[str, Any]:
        return {str(p): c.to_dict() for p, c in self.counts.items()}

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for t in list(self.tasks):
            t.cancel()
        for s in self.servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()


async def _probe_handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """The far end of :func:`probe_path`: ``E`` is echoed; ``S`` + length is sunk, then ``K``."""
    _nodelay(w)
    try:
        while True:
            op = await r.read(1)
            if op == b"E":
                w.write(b"e")
                await w.drain()
            elif op == b"S":
                (n,) = struct.unpack("!Q", await r.readexactly(8))
                while n > 0:
                    data = await r.read(min(n, CHUNK))
                    if not data:
                        return
                    n -= len(data)
                w.write(b"K")
                await w.drain()
            else:
                return
    except (ConnectionError, asyncio.IncompleteReadError, OSError, asyncio.CancelledError):
        pass
    finally:
        w.close()


async def serve_proxy(
    listen_host: str, routes: dict[int, tuple[str, int]], delay: float, control: Path
) -> None:
    """The relay process: the relay, the probe's far end and a control socket (``stats``)."""
    proxy = DelayProxy(listen_host, routes, delay)
    probe = await asyncio.start_server(_probe_handler, LOCAL, PROBE_PORT, reuse_address=True)
    await proxy.start()

    async def ctl(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while line := await r.readline():
                if line.strip() == b"stats":
                    w.write(json.dumps(proxy.stats()).encode() + b"\n")
                    await w.drain()
        w.close()

    with contextlib.suppress(FileNotFoundError):
        control.unlink()
    server = await asyncio.start_unix_server(ctl, str(control))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    server.close()
    probe.close()
    await proxy.close()
    with contextlib.suppress(FileNotFoundError):
        control.unlink()


class ProxyProcess:
    """The relay as a child process in namespace ``ns`` (started, queried, stopped)."""

    def __init__(self, ns: str, ports: list[int], control: Path, delay: float = 0.025) -> None:
        self.ns, self.ports, self.control, self.delay = ns, ports, control, delay
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, log: Path) -> ProxyProcess:
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, str(Path(__file__).resolve()),
               "proxy", "--listen", B_ADDR, "--delay", str(self.delay),
               "--control", str(self.control)]  # fmt: skip
        for p in [*self.ports, PROBE_PORT]:  # the probe's far end is behind the relay too
            cmd += ["--route", f"{p}={LOCAL}:{p}"]
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while not self.control.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the delay proxy did not start (see {log})")
            time.sleep(0.02)
        return self

    def stats(self) -> dict[str, dict[str, int]]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.control))
            s.sendall(b"stats\n")
            buf = b""
            while not buf.endswith(b"\n"):
                part = s.recv(65536)
                if not part:
                    break
                buf += part
        d: dict[str, dict[str, int]] = json.loads(buf)
        return d

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


def bytes_between(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
                  ports: list[int]) -> dict[str, int]:  # fmt: skip
    """Relayed payload bytes on ``ports`` between two :meth:`ProxyProcess.stats` snapshots."""
    up = sum(after[str(p)]["up"] - before[str(p)]["up"] for p in ports)
    down = sum(after[str(p)]["down"] - before[str(p)]["down"] for p in ports)
    return {"up": up, "down": down, "total": up + down}


# -- measuring the path ----------------------------------------------------------------------


def probe_path(
    host: str, rate_mbit: float, seconds: float = 2.0, pings: int = 5
) -> dict[str, float]:
    """RTT (median of ``pings`` 1-byte echoes) and achieved rate (``seconds`` worth of bytes).

    Run it in the sending namespace; the far end is the relay process's probe server, reached
    through the relay like everything else. The rate is the bytes over the time from the first
    byte to the far end's acknowledgement, less one RTT.
    """
    with socket.create_connection((host, PROBE_PORT), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(pings):
            t = time.monotonic()
            s.sendall(b"E")
            if s.recv(1) != b"e":
                raise RuntimeError("path probe: bad echo")
            rtts.append(time.monotonic() - t)
        rtt = statistics.median(rtts)
        n = max(256 * 1024, int(rate_mbit * 1e6 / 8 * seconds))
        blob = os.urandom(1 << 20)
        t = time.monotonic()
        s.sendall(b"S" + struct.pack("!Q", n))
        left = n
        while left > 0:
            k = min(left, len(blob))
            s.sendall(blob[:k])
            left -= k
        if s.recv(1) != b"K":
            raise RuntimeError("path probe: no acknowledgement")
        dt = time.monotonic() - t - rtt
    return {"rtt_ms": round(rtt * 1000, 1), "rate_mbit": round(n * 8 / dt / 1e6, 2)}


# -- the polling client ----------------------------------------------------------------------


@dataclass
class Answer:
    t: float  # time.monotonic() when the answer arrived
    port: int
    value: int | None  # the service's counter, when the answer carries one
    body: bytes = b""  # the start of the answer's body when it carried no counter


_VALUE = re.compile(rb'(?:memory=|"requests":\s*)(\d+)')
_LENGTH = re.compile(rb"(?im)^content-length:\s*(\d+)\s*$")


def listening_ports(addr: str) -> set[int]:
    """TCP ports listening on ``addr`` in the calling thread's namespace (``/proc``, no tools)."""
    want = socket.inet_aton(addr)[::-1].hex().upper()  # /proc/net/tcp: little-endian hex
    ports = set()
    with open("/proc/thread-self/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, state = parts[1], parts[3]
            ip, port = local.split(":")
            if state == "0A" and ip == want:
                ports.add(int(port, 16))
    return ports


class _Response(asyncio.Protocol):
    """One HTTP/1.0 answer as it arrives, kept even when the connection is reset after it.

    asyncio's ``StreamReader`` raises a reset on the next ``read`` and drops what it had
    buffered; an answer whose last byte arrived before the reset was still given, and a client
    that knows the body's length (``Content-Length``) has it in full.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.error: BaseException | None = None
        self.eof = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def length(self) -> int | None:
        """The ``Content-Length`` the headers announce, once they are all here."""
        head, sep, _ = bytes(self.buf).partition(b"\r\n\r\n")
        m = _LENGTH.search(head) if sep else None
        return int(m.group(1)) if m else None

    def complete(self) -> bool:
        """Headers and a ``Content-Length`` body all here (no need to wait for the close)."""
        n = self.length()
        return n is not None and len(self.buf) - self.buf.index(b"\r\n\r\n") - 4 >= n

    def ending(self) -> str:
        """How the connection ended (or did not)."""
        if self.error is not None:
            return type(self.error).__name__
        return "eof" if self.eof else "timeout"

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.complete():
            self._finish()

    def eof_received(self) -> bool:
        self.eof = True
        self._finish()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.error = exc
        self._finish()


async def http_get(
    host: str, port: int, path: str, timeout: float
) -> tuple[bool, int | None, bytes, str]:
    """One ``GET`` over a fresh connection: (answered 200 whole, counter value if any, body, note).

    An answer counts when it is whole: its ``Content-Length`` body arrived, or (without one)
    the connection closed cleanly. The note says what happened when it was not ("200, body
    cut by ConnectionResetError after 0 of 57 bytes"), so the downtime figure can be read.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):  # (wait_for can leak a socket made as it ends)
            tr, proto = await loop.create_connection(_Response, host, port)
    except (OSError, TimeoutError) as e:
        return False, None, b"", f"connect: {type(e).__name__}"
    try:
        tr.write(f"GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await proto.done
    finally:
        tr.close()
    data = bytes(proto.buf)
    _, _, body = data.partition(b"\r\n\r\n")
    if not data.startswith(b"HTTP/") or b" 200 " not in data.split(b"\r\n", 1)[0]:
        return False, None, b"", f"no 200 ({len(data)} bytes, then {proto.ending()})"
    n = proto.length()
    whole = proto.complete() or (n is None and proto.eof and proto.error is None)
    if not whole:
        want = f" of {n}" if n is not None else ""
        return False, None, b"", f"200, body cut by {proto.ending()} after {len(body)}{want} bytes"
    m = _VALUE.search(body)
    return True, int(m.group(1)) if m else None, body[:200], ""


@dataclass
class Poller:
    """Keep asking a service for an answer, from inside namespace ``ns``; record the answers.

    A new request ``interval`` after the previous one was sent, each given up after
    ``timeout``. While requests hang (QEMU's user network accepts a connection even while the
    VM is paused and holds it until the guest runs), a fresh one is sent whenever the newest
    is ``fresh_after`` old, up to ``max_inflight`` at once.

    Three profiles, because the sides need different things:

    - the source (:meth:`source`): strictly one request at a time and a long timeout. A VM
      that is slow but running must not be flooded (TCG guests slow down a lot while QEMU
      tracks dirty pages; piling requests on one made it stop answering altogether in a
      trial run), and a slow answer is still an answer;
    - a destination QEMU that listens from its start (QEMU's own migration, :meth:`dest`):
      up to 5 at once, a fresh one every 0.1 s, 1 s timeout. Connections made to it before
      its device state is loaded are lost (the incoming state replaces its user network), so
      a recent request, at most ~0.2 s old, must be waiting when the guest starts; the few
      sent after the load are what the guest answers first;
    - a destination that listens only once the state is loaded (cloudlet's handoff,
      :meth:`dest_after_load`): as the source, one at a time.

    With ``port=None`` the poller discovers the service: the ports that start listening on
    ``host`` after the poller started (the destination's VM gets its ports when it is
    launched) are asked in turn, and the first that answers with a counter is the service
    (a VM may forward more guest ports than the service's: its base's web page, say). Once
    ``hint`` is set (from another thread: the port the destination planned for the service),
    only that port is asked and nothing is discovered: asking the other ports loads the guest
    just as it resumes (the Debian base's web page is a busybox ``httpd`` forking per request).
    """

    ns: str | None
    host: str
    path: str
    port: int | None = None
    interval: float = 0.01
    timeout: float = 1.0
    fresh_after: float = 0.25
    max_inflight: int = 3
    answers: list[Answer] = field(default_factory=list)
    # sent, done, answered, and a note when the answer was not whole (see ``http_get``)
    log: list[tuple[float, float, bool, str]] = field(default_factory=list)
    failures: int = 0
    requests: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    hint: int | None = None  # the service's port, when someone learns it (see above)

    @classmethod
    def source(
        cls, ns: str | None, host: str, path: str, port: int, interval: float = 0.01
    ) -> Poller:
        return cls(ns, host, path, port=port, interval=interval, timeout=3.0, max_inflight=1)

    @classmethod
    def dest(
        cls, ns: str | None, host: str, path: str, port: int | None, interval: float = 0.01
    ) -> Poller:
        return cls(
            ns, host, path, port=port, interval=interval, timeout=1.0, fresh_after=0.1,
            max_inflight=5,
        )  # fmt: skip

    @classmethod
    def dest_after_load(
        cls, ns: str | None, host: str, path: str, port: int | None, interval: float = 0.01
    ) -> Poller:
        """A destination that listens only once the VM's state is loaded (cloudlet's handoff
        since run 4): a connection it accepts is never lost, so one request at a time, as on
        the source; refused ones are asked again every ``interval``."""
        return cls(ns, host, path, port=port, interval=interval, timeout=3.0, max_inflight=1)

    def start(self) -> Poller:
        self._thread = threading.Thread(target=self._main, name=f"poller-{self.ns}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("poller did not start")
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> Poller:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)
        return self

    def _main(self) -> None:
        try:
            with netns(self.ns):
                asyncio.run(self._loop())
        except BaseException as e:
            self.error = e
            self._ready.set()

    async def _loop(self) -> None:
        ignore = listening_ports(self.host) if self.port is None else set()
        self._ready.set()
        inflight: dict[asyncio.Task[tuple[bool, int | None, bytes, str]], tuple[float, int]] = {}
        last_sent = 0.0
        port = self.port
        tried: list[int] = []  # discovery: new ports, asked in turn until one is the service
        plain: dict[int, int] = {}  # discovery: answers without a counter, per port
        while not self._stop.is_set():
            if self.port is None and self.hint is not None and port != self.hint:
                port = self.hint  # told where the service listens: ask only there
            if self.port is None and port is None:
                new = sorted(listening_ports(self.host) - ignore)
                tried += [q for q in new if q not in tried]
            now = time.monotonic()
            target = (
                port if port is not None else (tried[self.requests % len(tried)] if tried else None)
            )
            send = False
            if target is not None and len(inflight) < self.max_inflight:
                if not inflight:
                    send = now - last_sent >= self.interval
                else:
                    send = now - last_sent >= self.fresh_after
            if send:
                assert target is not None
                t = asyncio.ensure_future(http_get(self.host, target, self.path, self.timeout))
                inflight[t] = (now, target)
                last_sent = now
                self.requests += 1
            if inflight:
                done, _ = await asyncio.wait(
                    inflight, timeout=0.002, return_when=asyncio.FIRST_COMPLETED
                )
                t_done = time.monotonic()
                for t in done:
                    sent, p = inflight.pop(t)
                    ok, value, body, note = t.result()
                    self.log.append((sent, t_done, ok, note))
                    if ok and self.port is None and port is None and value is None:
                        # Another port of the same VM (its base forwards more guest ports than
                        # the service)? After 3 such answers, never ask it again.
                        plain[p] = plain.get(p, 0) + 1
                        if plain[p] >= 3 and p in tried:
                            ignore.add(p)
                            tried.remove(p)
                        self.failures += 1
                    elif ok and value is None and (port is not None or self.port is not None):
                        # The service's port, a 200 but no counter: the answer was cut short
                        # (its VM paused mid-answer, the connection closed when its QEMU
                        # ended). The guest did not answer that request: not an answer.
                        self.failures += 1
                    elif ok:
                        if port is None:
                            port = p  # found: ask only this one from now on
                        self.answers.append(Answer(t_done, p, value, b"" if value else body))
                    else:
                        self.failures += 1
            else:
                await asyncio.sleep(0.002)
        for t in inflight:
            t.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)


def downtime(source: Poller, dest: Poller) -> dict[str, Any]:
    """Last answer from the source before the destination's first answer, and that first one.

    Also says whether the service's in-memory counter went on (the state moved): the
    destination's first value must be above the source's last one.
    """
    if not dest.answers:
        return {"downtime_s": None, "reason": "the destination never answered"}
    first = dest.answers[0]
    before = [a for a in source.answers if a.t <= first.t]
    if not before:
        return {"downtime_s": None, "reason": "the source never answered before"}
    last = before[-1]
    moved = None
    if first.value is not None and last.value is not None:
        moved = first.value > last.value
    return {
        "downtime_s": round(first.t - last.t, 4),
        "source_last_t": last.t,
        "dest_first_t": first.t,
        "source_last_value": last.value,
        "dest_first_value": first.value,
        **({"dest_first_body": first.body.decode(errors="replace")} if first.body else {}),
        **({"source_last_body": last.body.decode(errors="replace")} if last.body else {}),
        "state_moved": moved,
        "source_answers": len(source.answers),
        "dest_answers": len(dest.answers),
        "source_after_dest": sum(1 for a in source.answers if a.t > first.t),
    }


# -- the relay process's command line --------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description="handoff test bed pieces")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("proxy", help="run the delaying relay (in the current namespace)")
    p.add_argument("--listen", required=True)
    p.add_argument("--route", action="append", default=[], help="PORT=HOST:PORT")
    p.add_argument("--delay", type=float, default=0.025)
    p.add_argument("--control", type=Path, required=True)
    a = ap.parse_args()
    routes = {}
    for r in a.route:
        port, target = r.split("=", 1)
        host, tport = target.rsplit(":", 1)
        routes[int(port)] = (host, int(tport))
    asyncio.run(serve_proxy(a.listen, routes, a.delay, a.control))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
