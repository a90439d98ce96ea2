"""Fixtures and helpers for the mobile side: a KD-Cloudlet client's exact requests, an AES
implementation of our own, network namespaces on one bridge, and an Avahi peer.

- :func:`java_get` / :func:`java_command` send byte for byte what SEI's KD-Cloudlet Java client
  (Apache HttpClient) sends: its header order, no Accept header, the query in its order; and
  read the reply the way it does: exactly ``Content-Length`` bytes (a chunked reply fails).
- :func:`aes_encrypt` / :func:`aes_decrypt` are written here from the ``cryptography``
  primitives (PKCS#7 by hand), independent of ``cloudlet.services.devices``.
- :class:`Lan` makes namespaces ``<prefix>-sw`` (the bridge) and one per host, and removes
  them (killing what still runs in them, by pid) at the end.
- :class:`Avahi` runs a private dbus-daemon and an avahi-daemon inside one namespace (its
  own ``/run`` in a private mount namespace), so ``avahi-browse`` is an independent mDNS peer.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cloudlet.config import Paths, paths
from server.conftest import (  # noqa: F401  (fixtures, re-exported for these tests)
    bare_home,
    make_api,
    server,
    srv_home,
)

JAVA_UA = "Apache-HttpClient/UNAVAILABLE (java 1.4)"
FORM_TYPE = "application/x-www-form-urlencoded; charset=ISO-8859-1"


# -- the Java client's requests ------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_head: bytes = b""

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        import json

        return json.loads(self.body)


Connect = Callable[[], socket.socket]


def loopback(port: int, host: str = "127.0.0.1") -> Connect:
    return lambda: socket.create_connection((host, port), timeout=330)


def read_reply(sock: socket.socket) -> Reply:
    """Read one reply as the Java client does: status, headers, exactly Content-Length bytes."""
    f = sock.makefile("rb")
    head = f.readline()
    status = int(head.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = f.readline()
        head += line
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    assert "transfer-encoding" not in headers, "a chunked reply reads as null in the Java client"
    assert "content-length" in headers, f"no Content-Length in {head!r}"
    n = int(headers["content-length"])
    body = f.read(n)
    assert len(body) == n
    return Reply(status, headers, body, head)


def _exchange(connect: Connect, request: bytes) -> Reply:
    with contextlib.closing(connect()) as sock:
        sock.sendall(request)
        return read_reply(sock)


def java_get(connect: Connect, host: str, port: int, target: str, device_id: str = "") -> Reply:
    """``GET /api...`` as CloudletCommandExecutorImpl.compileOpenRequest + DefaultHttpClient."""
    req = (
        f"GET {target} HTTP/1.1\r\n"
        f"X-Device-ID: {device_id}\r\n"
        f"Host: {host}:{port}\r\n"
        "Connection: Keep-Alive\r\n"
        f"User-Agent: {JAVA_UA}\r\n"
        "\r\n"
    )
    return _exchange(connect, req.encode("latin-1"))


def java_command(
    connect: Connect, host: str, port: int, device_id: str, token: str | bytes
) -> Reply:
    """``POST /api/command`` with the form field ``command`` (compileEncryptedRequest)."""
    tok = token.decode() if isinstance(token, bytes) else token
    body = f"command={quote_plus(tok)}".encode("latin-1")
    req = (
        "POST /api/command HTTP/1.1\r\n"
        f"X-Device-ID: {device_id}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Content-Type: {FORM_TYPE}\r\n"
        f"Host: {host}:{port}\r\n"
        "Connection: Keep-Alive\r\n"
        f"User-Agent: {JAVA_UA}\r\n"
        "\r\n"
    ).encode("latin-1")
    return _exchange(connect, req + body)


# -- AES-256-CBC, written independently of cloudlet's ----------------------------------------
def aes_encrypt(data: bytes, password: str, iv: bytes | None = None) -> bytes:
    import base64

    key = hashlib.sha256(password.encode("utf-8")).digest()
    iv = iv or os.urandom(16)
    n = 16 - len(data) % 16
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + enc.update(data + bytes([n]) * n) + enc.finalize())


def aes_decrypt(token: bytes, password: str) -> bytes:
    import base64

    raw = base64.b64decode(token)
    key = hashlib.sha256(password.encode("utf-8")).digest()
    dec = Cipher(algorithms.AES(key), modes.CBC(raw[:16])).decryptor()
    padded = dec.update(raw[16:]) + dec.finalize()
    n = padded[-1]
    assert 1 <= n <= 16 and padded[-n:] == bytes([n]) * n, "bad padding"
    return padded[:-n]


# -- network namespaces --------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def ns_connect(ns: str, host: str, port: int, timeout: float = 330) -> socket.socket:
    """A TCP connection made inside namespace ``ns`` (from a thread that enters it and ends)."""
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            out["sock"] = socket.create_connection((host, port), timeout=timeout)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    sock: socket.socket = out["sock"]
    return sock


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    ns: str
    ip: str
    dev: str

    def exec(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def connect(self, port: int, host: str | None = None) -> Connect:
        return lambda: ns_connect(self.ns, host or self.ip, port)


@dataclass
class Lan:
    """Namespaces on one bridge (inside a namespace of its own: no traffic leaves them)."""

    prefix: str
    subnet: str  # "10.231.N"
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def up(self, names: list[str]) -> Lan:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for n, name in enumerate(names, 1):
            ns, dev = f"{self.prefix}-{name}", f"eth{n}"
            _ip("netns", "add", ns)
            _ip("link", "add", dev, "netns", ns, "type", "veth", "peer", "name", f"p{n}",
                "netns", self.switch)  # fmt: skip
            _ip("-n", self.switch, "link", "set", f"p{n}", "master", "br0", "up")
            ip = f"{self.subnet}.{n}"
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.hosts[name] = Host(ns, ip, dev)
        return self

    def spawn(self, host: str, cmd: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        with open(log, "ab") as f:
            p = subprocess.Popen(
                self.hosts[host].exec(*cmd), stdout=f, stderr=subprocess.STDOUT, **kw
            )
        self.procs.append(p)
        return p

    def run(self, host: str, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("timeout", 120)
        return subprocess.run(self.hosts[host].exec(*cmd), capture_output=True, text=True, **kw)

    def down(self) -> list[int]:
        """Stop what we started, then whatever still runs in the namespaces (each by its pid),
        then remove the namespaces. Returns the pids that had to be killed."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(20)
        leftover: list[int] = []
        for ns in [*(h.ns for h in self.hosts.values()), self.switch]:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in (int(x) for x in r.stdout.split()):
                leftover.append(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        for ns in [*(h.ns for h in self.hosts.values()), self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        return leftover


@pytest.fixture
def lan() -> Iterator[Lan]:
    n = os.getpid() % 200 + 20
    net = Lan(prefix=f"cl{os.getpid()}", subnet=f"10.231.{n}")
    try:
        yield net
    finally:
        net.down()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert net.prefix not in left


# -- an Avahi peer -------------------------------------------------------------------------
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""
AVAHI_CONF = """[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces={dev}
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
disable-publishing=yes
[reflector]
[rlimits]
"""


class Avahi:
    """dbus-daemon + avahi-daemon inside a namespace; ``browse()`` runs avahi-browse there.

    avahi-daemon keeps its pid file and socket in ``/run/avahi-daemon``: it gets a tmpfs
    ``/run`` in a private mount namespace (``unshare -m``), so it never meets a host daemon.
    The bus is a private one (a unix socket in ``work``), named by DBUS_SYSTEM_BUS_ADDRESS.
    """

    def __init__(self, lan: Lan, host: str, work: Path) -> None:
        for tool in ("avahi-daemon", "avahi-browse", "dbus-daemon"):
            assert shutil.which(tool), f"{tool} is missing: bin/setup installs it"
        self.lan, self.host, self.work = lan, host, work
        work.mkdir(parents=True, exist_ok=True)
        self.sock = work / "bus"
        self.env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={self.sock}")

    def start(self) -> Avahi:
        (self.work / "bus.conf").write_text(BUS_CONF.format(sock=self.sock))
        (self.work / "avahi.conf").write_text(AVAHI_CONF.format(dev=self.lan.hosts[self.host].dev))
        self.lan.spawn(
            self.host,
            ["dbus-daemon", f"--config-file={self.work / 'bus.conf'}", "--nofork", "--nopidfile"],
            self.work / "dbus.log",
        )
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            assert time.monotonic() < deadline, (self.work / "dbus.log").read_text()
            time.sleep(0.05)
        script = (
            "mount -t tmpfs tmpfs /run && exec avahi-daemon "
            f"-f {self.work / 'avahi.conf'} --no-drop-root --no-chroot --no-rlimits"
        )
        self.daemon = self.lan.spawn(
            self.host, ["unshare", "-m", "sh", "-c", script], self.work / "avahi.log", env=self.env
        )
        deadline = time.monotonic() + 15
        while "Server startup complete" not in (self.work / "avahi.log").read_text():
            assert self.daemon.poll() is None, (self.work / "avahi.log").read_text()
            assert time.monotonic() < deadline, (self.work / "avahi.log").read_text()
            time.sleep(0.05)
        return self

    def browse(self, service_type: str = "_cloudlet._tcp") -> list[list[str]]:
        """``avahi-browse -rpt``: the resolved (``=``) lines, split on ``;``."""
        r = self.lan.run(
            self.host, ["avahi-browse", "-rpt", service_type], env=self.env, timeout=30
        )
        assert r.returncode == 0, r.stderr
        return [line.split(";") for line in r.stdout.splitlines() if line.startswith("=")]


# -- data dirs -----------------------------------------------------------------------------
def extra_home(tmp_path: Path, session_home: Paths, tiny_base: Any, name: str) -> Paths:
    """A second data dir like ``srv_home``: the session's images and base VM, its own cache."""
    h = tmp_path / name
    h.mkdir()
    (h / "images").symlink_to(session_home.images)
    (h / "cache").mkdir()
    for entry in session_home.cache.iterdir():
        if entry.name != "services":
            (h / "cache" / entry.name).symlink_to(entry)
    p = paths(h)
    (p.bases / "tiny").symlink_to(tiny_base.dir)
    return p


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cloudlet", "serve", "--no-bootstrap", *args]


def wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None:
            raise AssertionError(f"exited: {log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
