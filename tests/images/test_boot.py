"""Boot the freshly built tiny image with a plain QEMU command line (TCG, no cloudlet code).

Checks the contract other packages rely on: the ready marker on the serial console, the counter
CGI through a user-mode ``hostfwd``, the guest agent (PING, EXEC, reconnect) on the
virtio-serial port, and a clean power-off on QMP ``system_powerdown`` that leaves the disk
counter written.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cloudlet.images.model import READY_MARKER, Image

pytestmark = pytest.mark.vm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    port: int
    agent_sock: Path
    qmp_sock: Path
    serial: Path
    overlay: Path
    boot_seconds: float


class Agent:
    """Minimal host side of the agent protocol (docs/images.md), independent of hypervisor/."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(str(path))
        self.f = self.sock.makefile("rwb")

    def request(self, line: str) -> list[str]:
        self.f.write(line.encode() + b"\n")
        self.f.flush()
        return self.f.readline().decode().rstrip("\n").split(" ")

    def exec(self, token: str, cmd: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        b64_in = base64.b64encode(stdin).decode() if stdin else "-"
        reply = self.request(f"EXEC {token} {base64.b64encode(cmd.encode()).decode()} {b64_in}")
        assert reply[:2] == ["RESULT", token] and len(reply) == 5, reply
        dec = [b"" if f == "-" else base64.b64decode(f, validate=True) for f in reply[3:]]
        return int(reply[2]), dec[0], dec[1]

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def qmp(path: Path, *commands: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rwb")
        f.readline()  # greeting
        for c in ("qmp_capabilities", *commands):
            f.write(json.dumps({"execute": c}).encode() + b"\n")
            f.flush()
            while True:  # skip events until the command's answer
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg:
                    assert "return" in msg, msg
                    break


def qemu_argv(img: Image, overlay: Path, cmdline: str) -> list[str]:
    assert img.kernel_path and img.initrd_path
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
         str(img.disk_path), str(overlay)],
        check=True,
    )  # fmt: skip
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none",
        "-machine", "pc", "-no-reboot",
        "-kernel", str(img.kernel_path), "-initrd", str(img.initrd_path), "-append", cmdline,
        "-drive", f"file={overlay},if=virtio,format=qcow2",
    ]  # fmt: skip


@pytest.fixture
def guest(fresh_tiny: Image, tmp_path: Path) -> Iterator[Guest]:
    assert fresh_tiny.cmdline
    overlay = tmp_path / "overlay.qcow2"
    port = free_port()
    agent_sock, qmp_sock, serial = tmp_path / "agent.sock", tmp_path / "qmp.sock", tmp_path / "s"
    argv = [
        *qemu_argv(fresh_tiny, overlay, fresh_tiny.cmdline),
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80",
        "-device", "virtio-net-pci,netdev=n0",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={agent_sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=org.cloudlet.agent",
        "-qmp", f"unix:{qmp_sock},server=on,wait=off",
        "-serial", f"file:{serial}",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while READY_MARKER + "\n" not in (
            serial.read_text(errors="replace") if serial.exists() else ""
        ):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() - t0 < 60, serial.read_text(errors="replace")
            time.sleep(0.02)
        yield Guest(proc, port, agent_sock, qmp_sock, serial, overlay, time.monotonic() - t0)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_tiny_boots_serves_and_powers_off(guest: Guest, tmp_path: Path) -> None:
    print(f"ready marker {guest.boot_seconds:.2f} s after QEMU started")
    assert guest.boot_seconds < 30
    lines = guest.serial.read_text(errors="replace").splitlines()
    assert READY_MARKER in lines  # a line of its own

    # counter: in memory and on disk, counting from 1; concurrent requests get distinct numbers
    url = f"http://127.0.0.1:{guest.port}/cgi-bin/counter"
    r = httpx.get(url, timeout=20)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == "memory=1 disk=1\n"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda _: httpx.get(url, timeout=30).text, range(6)))
    assert sorted(bodies) == [f"memory={n} disk={n}\n" for n in range(2, 8)]
    assert "cloudlet tiny image" in httpx.get(f"http://127.0.0.1:{guest.port}/", timeout=20).text

    # agent: PING, EXEC with stdin/stdout/stderr/exit code, and a reconnect
    agent = Agent(guest.agent_sock)
    assert agent.request("PING p1") == ["PONG", "p1"]
    code, out, err = agent.exec("e1", "tr a-z A-Z; echo oops >&2; exit 3", b"hello\nworld\n")
    assert (code, out, err) == (3, b"HELLO\nWORLD\n", b"oops\n")
    code, out, err = agent.exec("e2", "cat /var/lib/cloudlet/counter; test -t 0 || echo notty")
    assert (code, out, err) == (0, b"7\nnotty\n", b"")
    code, out, _ = agent.exec("e3", "head -c 100000 /dev/zero | wc -c")
    assert (code, out) == (0, b"100000\n")
    assert agent.request("EXEC e4 ZWNobw -")[:4] == ["RESULT", "e4", "127", "-"]  # truncated
    # a bad id gets no reply: the next answer is for the next request
    assert agent.request("PING bad-id\nPING p3") == ["PONG", "p3"]
    agent.close()
    time.sleep(0.5)  # the guest sees EOF and reopens the port
    agent = Agent(guest.agent_sock)
    assert agent.request("PING p2") == ["PONG", "p2"]
    agent.close()

    # graceful stop: ACPI power button -> acpid -> poweroff -> cloudlet-init unmounts and powers off
    t0 = time.monotonic()
    qmp(guest.qmp_sock, "system_powerdown")
    assert guest.proc.wait(timeout=30) == 0
    print(f"powered off {time.monotonic() - t0:.2f} s after system_powerdown")
    assert "cloudlet-init: poweroff" in guest.serial.read_text(errors="replace")
    raw = tmp_path / "after.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest.overlay), str(raw)], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout  # unmounted cleanly
    cat = subprocess.run(
        ["debugfs", "-R", "cat /var/lib/cloudlet/counter", str(raw)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert cat.stdout == "7\n"


def test_initramfs_failure_powers_off(fresh_tiny: Image, tmp_path: Path) -> None:
    """A bad ``cloudlet.init=`` prints one clear line and powers off instead of hanging."""
    assert fresh_tiny.cmdline
    serial = tmp_path / "serial"
    argv = qemu_argv(
        fresh_tiny, tmp_path / "o.qcow2", fresh_tiny.cmdline + " cloudlet.init=/sbin/nope"
    )
    proc = subprocess.Popen([*argv, "-serial", f"file:{serial}"], stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = serial.read_text(errors="replace")
    assert "cloudlet-initramfs: FATAL: /sbin/nope is missing or not executable" in text
    assert READY_MARKER not in text
