"""End-to-end tests of the VM runtime with real QEMU VMs booted from the tiny image."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from typing import Any

import pytest

from cloudlet.config import Paths
from cloudlet.errors import ConflictError, NotFoundError
from cloudlet.hypervisor.errors import GuestNotReadyError, HardwareMismatchError
from cloudlet.hypervisor.ports import PortForward
from cloudlet.hypervisor.vm import VM, VM_RECORD, BootSource, VMManager, VMState
from cloudlet.util.fs import atomic_write_json, read_json
from helpers import CLOUDLET, cli, counter, qemu_pids_mentioning, wait_until

pytestmark = pytest.mark.vm


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture
def src(tiny_image) -> BootSource:  # type: ignore[no-untyped-def]
    return BootSource.from_image(tiny_image)


def test_boot_exec_and_port_forward(home: Paths, src: BootSource) -> None:
    mgr = VMManager(home)
    vm = run(mgr.start(src))
    assert vm.state is VMState.RUNNING
    assert vm.process_alive()
    port = vm.host_port(80)
    assert counter(port) == {"memory": 1, "disk": 1}
    assert counter(port) == {"memory": 2, "disk": 2}

    res = run(mgr.exec(vm.id, "echo hello; echo oops >&2; exit 3"))
    assert (res.exit_code, res.stdout, res.stderr) == (3, b"hello\n", b"oops\n")
    res = run(mgr.exec(vm.id, "cat > /tmp/x && wc -c < /tmp/x", stdin=b"\x00\x01binary\xff" * 1000))
    assert res.exit_code == 0 and res.stdout.strip() == b"9000"
    # Everything about the VM lives in its directory.
    for f in ("vm.json", "memory.ram", "disk.qcow2", "serial.log", "qemu.pid"):
        assert (vm.dir / f).exists(), f
    assert "CLOUDLET-READY" in "\n".join(vm.console_tail(100))


def test_suspend_resume_keeps_memory_disk_and_ports(home: Paths, src: BootSource) -> None:
    mgr = VMManager(home)
    vm = run(mgr.start(src))
    port = vm.host_port(80)
    counter(port)
    assert counter(port) == {"memory": 2, "disk": 2}
    assert run(mgr.exec(vm.id, "echo kept > /root/note && sync")).exit_code == 0
    pid = vm.pid

    vm = run(mgr.suspend(vm.id))
    assert vm.state is VMState.SUSPENDED
    assert vm.pid is None and not VMManager(home).get(vm.id).process_alive(pid)
    assert (vm.dir / "devstate").stat().st_size > 0
    assert vm.snapshot and vm.snapshot["hardware"]["qemu_version"]

    vm = run(mgr.resume(vm.id))
    assert vm.state is VMState.RUNNING
    assert vm.host_port(80) == port  # the same host port answers again
    assert counter(port) == {"memory": 3, "disk": 3}  # in-memory counter went on
    assert run(mgr.exec(vm.id, "cat /root/note")).stdout == b"kept\n"
    assert not (vm.dir / "devstate").exists()  # a stale snapshot is never left behind

    # A second cycle works the same way.
    run(mgr.suspend(vm.id))
    vm = run(mgr.resume(vm.id))
    assert counter(port) == {"memory": 4, "disk": 4}


def test_resume_listens_once_the_state_is_loaded(home: Paths, src: BootSource) -> None:
    """A connection the user network took before the device state was loaded would wait ~6 s
    (the load replaces that user network); one taken after it, while paused, is answered."""
    mgr = VMManager(home)
    vm = run(mgr.start(src))
    port = vm.host_port(80)
    assert counter(port) == {"memory": 1, "disk": 1}
    run(mgr.suspend(vm.id))
    listening_at_load = []
    load = mgr.load_devstate

    async def checked_load(vm_: VM, *args: Any) -> None:
        with socket.socket() as s:
            listening_at_load.append(s.connect_ex(("127.0.0.1", port)) == 0)
        await load(vm_, *args)

    mgr.load_devstate = checked_load  # type: ignore[method-assign]

    async def resume_with_a_client_waiting() -> bytes:
        vm_, mon = await mgr.resume_paused(vm.id)
        assert listening_at_load == [False]
        assert vm_.state is VMState.PAUSED and vm_.host_port(80) == port
        # Paused, it already listens: a client may connect now and is answered once it runs.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /cgi-bin/counter HTTP/1.0\r\n\r\n")
            await mgr.cont(vm.id, mon)
            c.settimeout(30)
            answer = b""
            while chunk := await asyncio.to_thread(c.recv, 4096):
                answer += chunk
        return answer

    answer = run(resume_with_a_client_waiting())
    assert answer.startswith(b"HTTP/1.") and answer.endswith(b"memory=2 disk=2\n"), answer


def test_resume_whose_port_is_taken_meanwhile_stays_suspended(home: Paths, src: BootSource) -> None:
    """A requested host port taken between the check and the listen: nothing runs, nothing is
    lost, and the same snapshot resumes once the port is free."""
    mgr = VMManager(home)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        wanted = s.getsockname()[1]
    vm = run(mgr.start(src, forwards=[PortForward(80, wanted)]))
    assert counter(wanted) == {"memory": 1, "disk": 1}
    run(mgr.suspend(vm.id))
    thief = socket.socket()
    thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
    load = mgr.load_devstate

    async def load_then_take_the_port(vm_: VM, *args: Any) -> None:
        await load(vm_, *args)
        thief.bind(("127.0.0.1", wanted))
        thief.listen()

    mgr.load_devstate = load_then_take_the_port  # type: ignore[method-assign]
    with thief, pytest.raises(ConflictError, match=f"{wanted}") as ei:
        run(mgr.resume(vm.id))
    assert "stays suspended" in (ei.value.hint or "") and "--forward" in (ei.value.hint or "")
    vm = mgr.get(vm.id)
    assert vm.state is VMState.SUSPENDED and vm.pid is None
    assert (vm.dir / "devstate").stat().st_size > 0
    assert qemu_pids_mentioning(str(home.home)) == []
    mgr.load_devstate = load  # type: ignore[method-assign]
    vm = run(mgr.resume(vm.id))
    assert vm.host_port(80) == wanted
    assert counter(wanted) == {"memory": 2, "disk": 2}


def test_two_vms_at_once(home: Paths, src: BootSource) -> None:
    mgr = VMManager(home)
    a = run(mgr.start(src, name="a"))
    b = run(mgr.start(src, name="b"))
    assert a.host_port(80) != b.host_port(80)
    counter(a.host_port(80))
    assert counter(a.host_port(80))["memory"] == 2
    assert counter(b.host_port(80))["memory"] == 1  # separate guests, separate state
    assert {v.id for v in mgr.list() if v.state is VMState.RUNNING} == {a.id, b.id}


def test_stop_and_rm_leave_nothing(home: Paths, src: BootSource) -> None:
    mgr = VMManager(home)
    vm = run(mgr.start(src))
    pid = vm.pid
    vm = run(mgr.stop(vm.id))
    assert vm.state is VMState.STOPPED
    assert pid is not None and not qemu_pids_mentioning(str(home.home))
    assert not (vm.dir / "memory.ram").exists() and (vm.dir / "disk.qcow2").exists()
    with pytest.raises(ConflictError):
        run(mgr.resume(vm.id))
    run(mgr.delete(vm.id))
    assert not vm.dir.exists()
    with pytest.raises(NotFoundError):
        mgr.get(vm.id)


def test_cli_start_list_exec_logs_stop_json(home: Paths, tiny_image) -> None:  # type: ignore[no-untyped-def]
    r = cli("vm", "start", "tiny", "--memory", "256M", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["state"] == "running" and d["endpoints"]["80"].startswith("http://127.0.0.1:")
    vm_id = d["id"]
    listed = json.loads(cli("vm", "list", "--json").stdout)
    assert [v["id"] for v in listed] == [vm_id]
    r = cli("vm", "exec", vm_id, "--", "sh", "-c", "echo out; exit 7")
    assert r.returncode == 7 and r.stdout == "out\n"
    r = cli("vm", "exec", "--json", vm_id, "--", "uname", "-r")
    assert r.returncode == 0 and "cloud-amd64" in json.loads(r.stdout)["stdout"]
    logs = json.loads(cli("vm", "logs", vm_id, "--json", "-n", "200").stdout)
    assert any("CLOUDLET-READY" in ln for ln in logs["lines"])
    r = cli("vm", "suspend", vm_id, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "suspended"
    r = cli("vm", "resume", vm_id, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "running"
    r = cli("vm", "stop", vm_id, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "stopped"
    assert cli("vm", "rm", vm_id, "--json").returncode == 0
    assert json.loads(cli("vm", "list", "--json").stdout) == []


# -- accelerator -------------------------------------------------------------------------------


def test_kvm_probe_falls_back_to_tcg_and_choice_boots(
    home: Paths, src: BootSource, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from cloudlet.hypervisor import accel

    assert src.kernel is not None
    # A probe that cannot succeed in time must fall back to TCG and say why.
    quick = accel.probe_kvm(src.kernel, timeout=0.05)
    assert quick.accel == "tcg" and quick.reason
    # The real probe's answer is cached and is what VMs use; whatever it says must boot.
    monkeypatch.delenv("CLOUDLET_ACCEL", raising=False)
    choice = accel.choose_accel(home, src.kernel, refresh=True)
    assert choice.probed or "/dev/kvm" in choice.reason
    assert (home.cache / "accel.json").exists()
    again = accel.choose_accel(home, src.kernel)
    assert again.accel == choice.accel and "cached" in again.reason
    vm = run(VMManager(home).start(src))
    assert vm.hardware.accel == choice.accel
    assert counter(vm.host_port(80))["memory"] == 1


def test_accel_override_and_bad_value(home: Paths, src: BootSource, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from cloudlet.errors import InvalidInputError
    from cloudlet.hypervisor import accel

    monkeypatch.setenv("CLOUDLET_ACCEL", "tcg")
    assert accel.choose_accel(home, src.kernel).reason == "set by CLOUDLET_ACCEL"
    monkeypatch.setenv("CLOUDLET_ACCEL", "xen")
    with pytest.raises(InvalidInputError, match="CLOUDLET_ACCEL"):
        accel.choose_accel(home, src.kernel)


# -- faults ------------------------------------------------------------------------------------


def test_qemu_not_installed_says_how_to_install(home: Paths, tiny_image) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ, PATH="/nonexistent", CLOUDLET_ACCEL="tcg")
    r = cli("vm", "start", "tiny", env=env)
    assert r.returncode == 5, r.stderr
    assert "not installed" in r.stderr and "sudo apt-get install qemu-" in r.stderr
    assert list(home.vms.iterdir()) == []


def test_missing_image(home: Paths) -> None:
    r = cli("vm", "start", "no-such-image", "--json")
    assert r.returncode == 3
    assert json.loads(r.stdout.splitlines()[0])["error"] == "NotFoundError"
    assert list(home.vms.iterdir()) == []


def test_corrupt_image_refused_before_boot(home: Paths, tiny_image) -> None:  # type: ignore[no-untyped-def]
    from cloudlet.errors import IntegrityError
    from cloudlet.images.store import ImageStore

    store = ImageStore(home)
    img = store.import_image(
        (tiny_image.kernel_path, tiny_image.initrd_path, tiny_image.disk_path),
        "corrupt-test",
        agent=True,
        ports=[80],
        ready_marker="CLOUDLET-READY",
        cmdline=tiny_image.cmdline,
    )
    try:
        disk = img.disk_path
        raw = bytearray(disk.read_bytes())
        raw[0:4] = b"XXXX"  # destroy the qcow2 magic
        disk.write_bytes(bytes(raw))
        with pytest.raises(IntegrityError):
            store.verify("corrupt-test")
        r = cli("vm", "start", "corrupt-test")
        assert r.returncode != 0 and "corrupt-test" in r.stderr
        assert list(home.vms.iterdir()) == []
    finally:
        store.delete("corrupt-test")


def test_guest_never_ready_shows_console_and_kills(home: Paths, src: BootSource) -> None:
    never = BootSource.from_dict(src.to_dict() | {"ready_marker": "THIS-IS-NEVER-PRINTED"})
    with pytest.raises(GuestNotReadyError) as ei:
        run(VMManager(home).start(never, ready_timeout=8))
    assert "CLOUDLET-READY" in "\n".join(ei.value.console_tail)  # the tail is shown
    assert "last console lines" in (ei.value.hint or "")
    assert list(home.vms.iterdir()) == []
    assert qemu_pids_mentioning(str(home.home)) == []


def test_requested_host_port_taken(home: Paths, src: BootSource) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(ConflictError, match=f"{taken}.*already in use"):
            run(VMManager(home).start(src, forwards=[PortForward(80, taken)]))
        r = cli("vm", "start", "tiny", "--forward", f"{taken}:80")
        assert r.returncode == 4 and "--forward" in r.stderr
    assert list(home.vms.iterdir()) == []


def test_resume_refuses_mismatched_hardware(home: Paths, src: BootSource) -> None:
    mgr = VMManager(home)
    vm = run(mgr.start(src))
    run(mgr.suspend(vm.id))
    rec = read_json(vm.dir / VM_RECORD)
    rec["snapshot"]["hardware"]["qemu_version"] = "6.0.0"
    atomic_write_json(vm.dir / VM_RECORD, rec)
    with pytest.raises(HardwareMismatchError, match=r"qemu_version.*6\.0\.0"):
        run(mgr.resume(vm.id))
    assert mgr.get(vm.id).state is VMState.SUSPENDED
    assert qemu_pids_mentioning(str(home.home)) == []
    # Put it back and the same snapshot resumes fine: nothing was lost.
    rec["snapshot"]["hardware"]["qemu_version"] = vm.hardware.qemu_version
    atomic_write_json(vm.dir / VM_RECORD, rec)
    vm = run(mgr.resume(vm.id))
    assert counter(vm.host_port(80))["memory"] == 1


def test_delete_kills_a_qemu_whose_pid_was_never_recorded(home: Paths, src: BootSource) -> None:
    """A process killed between QEMU's start and the record of its pid leaves neither pid nor
    pidfile: deleting the VM still finds its QEMU (by its directory) and kills it."""
    mgr = VMManager(home)
    vm = run(mgr.start(src))
    pid = vm.pid
    assert pid
    d = read_json(vm.dir / VM_RECORD)
    d["pid"] = None
    atomic_write_json(vm.dir / VM_RECORD, d)
    (vm.dir / "qemu.pid").unlink()
    assert qemu_pids_mentioning(str(home.home)) == [pid]
    run(mgr.delete(vm.id, force=True))
    assert qemu_pids_mentioning(str(home.home)) == []
    assert not vm.dir.exists()


def test_qemu_killed_behind_our_back_is_crashed(home: Paths, src: BootSource) -> None:
    mgr = VMManager(home)
    vm = run(mgr.start(src))
    assert vm.pid
    os.kill(vm.pid, signal.SIGKILL)
    wait_until(lambda: not vm.process_alive())
    listed = json.loads(cli("vm", "list", "--json").stdout)
    assert listed[0]["state"] == "crashed"
    assert vm.dir.exists() and (vm.dir / "serial.log").exists()  # kept for inspection
    with pytest.raises(ConflictError):
        run(mgr.suspend(vm.id))


def test_ctrl_c_during_start_leaves_nothing(home: Paths, tiny_image) -> None:  # type: ignore[no-untyped-def]
    def as_from_a_terminal() -> None:
        # A shell's child gets Ctrl-C with the default action, unblocked; a child of this test
        # process inherits whatever ignored or blocked signals earlier tests left behind.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    parent_sigint = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    proc = subprocess.Popen(
        [*CLOUDLET, "vm", "start", "tiny"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_terminal,
    )
    try:
        # Wait until QEMU is really up (its pidfile exists), then press Ctrl-C while the guest
        # boots. (0.2 s later, once in a CI run, the start had already finished.)
        wait_until(lambda: list(home.vms.glob("*/qemu.pid")), timeout=60, interval=0.01)
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (err, parent_sigint)
    assert qemu_pids_mentioning(str(home.home)) == []
    assert list(home.vms.iterdir()) == []


def test_back_to_back_execs_are_never_lost(home: Paths, src: BootSource) -> None:
    """Each exec is a new agent connection; the guest reopens its port after every one.

    A request sent right after connecting used to be lost once in 20 or so when it reached the
    guest between its EOF and its close (the guest kernel discards a closed port's data): the
    host now PINGs (retrying) before an EXEC.
    """
    mgr = VMManager(home)
    vm = run(mgr.start(src))

    async def many() -> list[bytes]:
        return [(await mgr.exec(vm.id, f"echo {i}", timeout=20)).stdout for i in range(100)]

    assert run(many()) == [f"{i}\n".encode() for i in range(100)]
