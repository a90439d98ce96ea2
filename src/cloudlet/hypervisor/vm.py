"""The VM: one QEMU machine with its own directory, driven over QMP.

Layout of ``<home>/vms/<id>/`` (one directory holds everything about the VM)::

    vm.json        the record below (state, hardware description, ports, boot source)
    memory.ram     guest RAM (memory-backend-file, share=on): survives the QEMU process
    disk.qcow2     the VM's own disk layer; its backing file is the image or base disk
    devstate       device state saved by suspend (QEMU migration stream, x-ignore-shared)
    serial.log     serial console (appended across resumes)
    qemu.pid       QEMU's pidfile
    qmp.sock       QMP monitor; agent.sock: the guest agent's virtio-serial port

Lifecycle::

    creating --> running <--> suspended
                    |  \\
                    v   `--> crashed (QEMU died behind our back; directory kept)
                 stopped

Every operation that starts QEMU undoes itself on failure, Ctrl-C included: no orphaned QEMU
process, no half-made VM directory left looking valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudlet.config import Paths
from cloudlet.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError
from cloudlet.hypervisor import ports as portlib
from cloudlet.hypervisor.accel import choose_accel
from cloudlet.hypervisor.agent import Agent, ExecResult
from cloudlet.hypervisor.errors import (
    GuestNotReadyError,
    HardwareMismatchError,
    QemuStartError,
    SnapshotError,
)
from cloudlet.hypervisor.hardware import Hardware
from cloudlet.hypervisor.ports import PortForward
from cloudlet.hypervisor.probe import first_answer
from cloudlet.hypervisor.qemu import default_machine, find_tool, qemu_binary, qemu_version
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.util.fs import atomic_write_json, fsync_dir, read_json
from cloudlet.util.hashing import file_sha256
from cloudlet.util.names import check_name
from cloudlet.util.procs import pid_alive as _pid_alive
from cloudlet.util.procs import qemu_pids_mentioning, run_idle

log = logging.getLogger("cloudlet.hypervisor")

VM_RECORD = "vm.json"
RAM_FILE = "memory.ram"
DISK_FILE = "disk.qcow2"
DEVSTATE_FILE = "devstate"
SERIAL_LOG = "serial.log"
PIDFILE = "qemu.pid"
QMP_SOCK = "qmp.sock"
AGENT_SOCK = "agent.sock"
LOCK_FILE = ".lock"

VM_RECORD_VERSION = 1
DEFAULT_READY_TIMEOUT = 90.0
MAX_DEVSTATE_BYTES = 256 * 1024 * 1024  # device state is ~1 MB; anything huge is not ours


class VMState(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDED = "suspended"
    STOPPED = "stopped"
    CRASHED = "crashed"


@dataclass
class BootSource:
    """What a VM boots from: a kernel/initrd/disk triple or a BIOS-bootable disk."""

    kind: str  # "image" | "base"
    name: str
    content_id: str
    disk: Path  # backing file of the VM's disk layer
    disk_format: str  # "qcow2" | "raw"
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    guest_ports: list[int] = field(default_factory=list)
    agent: bool = False
    ready_marker: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "content_id": self.content_id,
            "disk": str(self.disk),
            "disk_format": self.disk_format,
            "kernel": str(self.kernel) if self.kernel else None,
            "initrd": str(self.initrd) if self.initrd else None,
            "cmdline": self.cmdline,
            "guest_ports": list(self.guest_ports),
            "agent": self.agent,
            "ready_marker": self.ready_marker,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BootSource:
        return cls(
            kind=str(d["kind"]),
            name=str(d["name"]),
            content_id=str(d["content_id"]),
            disk=Path(d["disk"]),
            disk_format=str(d["disk_format"]),
            kernel=Path(d["kernel"]) if d.get("kernel") else None,
            initrd=Path(d["initrd"]) if d.get("initrd") else None,
            cmdline=d.get("cmdline"),
            guest_ports=[int(p) for p in d.get("guest_ports", [])],
            agent=bool(d.get("agent", False)),
            ready_marker=d.get("ready_marker"),
        )

    @classmethod
    def from_image(cls, image: Any) -> BootSource:
        """From an :class:`cloudlet.images.model.Image`."""
        return cls(
            kind="image",
            name=image.name,
            content_id=image.content_id,
            disk=image.disk_path,
            disk_format=image.disk_format,
            kernel=image.kernel_path,
            initrd=image.initrd_path,
            cmdline=image.cmdline,
            guest_ports=list(image.ports),
            agent=image.agent,
            ready_marker=image.ready_marker,
        )


@dataclass
class VM:
    """A VM's record (``vm.json``) plus its directory."""

    id: str
    name: str
    dir: Path
    state: VMState
    hardware: Hardware
    source: BootSource
    forwards: list[PortForward]
    created: float
    pid: int | None = None
    snapshot: dict[str, Any] | None = None  # set while suspended: devstate size and hash
    meta: dict[str, Any] = field(default_factory=dict)

    # -- files -------------------------------------------------------------------------------
    @property
    def ram_path(self) -> Path:
        return self.dir / RAM_FILE

    @property
    def disk_path(self) -> Path:
        return self.dir / DISK_FILE

    @property
    def devstate_path(self) -> Path:
        return self.dir / DEVSTATE_FILE

    @property
    def serial_log(self) -> Path:
        return self.dir / SERIAL_LOG

    @property
    def qmp_path(self) -> Path:
        return self.dir / QMP_SOCK

    @property
    def agent_path(self) -> Path:
        return self.dir / AGENT_SOCK

    @property
    def process_tag(self) -> str:
        """A string in QEMU's command line that ties a pid to this VM (guards pid reuse)."""
        return f"cloudlet-vm-{self.id}"

    # -- record ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VM_RECORD_VERSION,
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "hardware": self.hardware.to_dict(),
            "source": self.source.to_dict(),
            "forwards": [f.to_dict() for f in self.forwards],
            "created": self.created,
            "pid": self.pid,
            "snapshot": self.snapshot,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], directory: Path) -> VM:
        if d.get("version") != VM_RECORD_VERSION:
            raise IntegrityError(f"VM record {directory / VM_RECORD} has unknown version")
        return cls(
            id=str(d["id"]),
            name=str(d["name"]),
            dir=directory,
            state=VMState(d["state"]),
            hardware=Hardware.from_dict(d["hardware"]),
            source=BootSource.from_dict(d["source"]),
            forwards=[PortForward.from_dict(f) for f in d.get("forwards", [])],
            created=float(d["created"]),
            pid=d.get("pid"),
            snapshot=d.get("snapshot"),
            meta=dict(d.get("meta") or {}),
        )

    def save(self) -> None:
        atomic_write_json(self.dir / VM_RECORD, self.to_dict())

    def summary(self) -> dict[str, Any]:
        """What ``vm list`` and ``vm start`` show."""
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "source": f"{self.source.kind}:{self.source.name}",
            "memory_mib": self.hardware.memory_mib,
            "cpus": self.hardware.cpus,
            "accel": self.hardware.accel,
            "pid": self.pid,
            "endpoints": self.endpoints(),
            "dir": str(self.dir),
        }

    def endpoints(self) -> dict[str, str]:
        return {str(f.guest): f.url for f in self.forwards if f.host}

    def host_port(self, guest_port: int) -> int:
        for f in self.forwards:
            if f.guest == guest_port and f.host:
                return f.host
        raise NotFoundError(f"VM {self.id} has no host port forwarded to guest port {guest_port}")

    # -- process -----------------------------------------------------------------------------
    def read_pid(self) -> int | None:
        try:
            return int((self.dir / PIDFILE).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def process_alive(self, pid: int | None = None) -> bool:
        """True if ``pid`` (default: our pid) is a live QEMU running *this* VM."""
        pid = pid or self.pid
        if not pid:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return False
        if self.process_tag.encode() not in cmdline:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"

    def console_tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.serial_log, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [ln.rstrip("\r") for ln in text.splitlines()][-lines:]


def _new_id() -> str:
    return secrets.token_hex(4)


async def _kill_all(vm: VM) -> None:
    """Kill every QEMU of ``vm``: the recorded pid, the pidfile's, and any process whose command
    line names the VM's directory (a process killed between QEMU's start and the record of its
    pid left it in neither)."""
    pids = {p for p in (vm.pid, vm.read_pid()) if p and vm.process_alive(p)}
    pids |= set(qemu_pids_mentioning(f"{vm.dir}/"))
    for pid in pids:
        await _kill_and_wait(pid)


async def _kill_and_wait(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    await _wait_gone(pid, timeout)


async def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A daemonized QEMU is reparented to init, which reaps it; a zombie counts as gone.
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[-1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        await asyncio.sleep(0.005)
    return False


def build_command(vm: VM, *, incoming: bool = False, hostfwd: bool = True) -> list[str]:
    """The QEMU command line, rebuilt from the hardware description and host-side settings.

    Only host-side things (paths, sockets, host ports) may differ between the command line that
    saved a snapshot and the one that restores it; everything guest-visible comes from ``hw``.
    Socket paths are relative: QEMU runs with the VM directory as its working directory, which
    keeps them under the 108-byte ``sun_path`` limit wherever the data dir is.
    """
    hw, src = vm.hardware, vm.source
    mem = f"{hw.memory_mib}M"
    netdev = "user,id=net0" + ("".join("," + f.hostfwd() for f in vm.forwards) if hostfwd else "")
    cmd = [
        qemu_binary(),
        "-name", f"{vm.process_tag},process={vm.process_tag}",
        "-machine", f"{hw.machine},accel={hw.accel},memory-backend=ram0",
        "-cpu", hw.cpu_model,
        "-smp", str(hw.cpus),
        "-m", mem,
        "-object", f"memory-backend-file,id=ram0,size={mem},mem-path={vm.ram_path},share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        # drop-cache=off: QEMU drops the page cache of its images when an incoming migration
        # completes (for storage shared between hosts). Every writer of ours is on this host,
        # so the cache is never stale; dropping it cost ~110 ms of handoff downtime (flushing
        # the layer just written) and left the guest reading its disk cold.
        "-drive", f"file={vm.disk_path},format=qcow2,if=none,id=disk0,cache=writeback,"
                  "file.drop-cache=off,backing.file.drop-cache=off,discard=unmap",
        "-device", "virtio-blk-pci,drive=disk0",
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent0,path={AGENT_SOCK},server=on,wait=off",
        "-device", "virtserialport,chardev=agent0,name=org.cloudlet.agent",
        "-chardev", f"file,id=console0,path={vm.serial_log},append=on",
        "-serial", "chardev:console0",
        "-qmp", f"unix:{QMP_SOCK},server=on,wait=off",
        "-pidfile", str(vm.dir / PIDFILE),
        "-daemonize",
    ]  # fmt: skip
    if hw.boot == "kernel":
        assert src.kernel is not None
        cmd += ["-kernel", str(src.kernel)]
        if src.initrd is not None:
            cmd += ["-initrd", str(src.initrd)]
        if hw.cmdline:
            cmd += ["-append", hw.cmdline]
    if incoming:
        cmd += ["-S", "-incoming", "defer"]
    return cmd


class _Stopwatch:
    """Seconds between laps, into ``out`` (if given)."""

    def __init__(self, out: dict[str, float] | None) -> None:
        self.out, self.t = out, time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        if self.out is not None:
            self.out[name] = round(now - self.t, 4)
        self.t = now


class VMManager:
    """All VMs under one data directory. Core API used by the CLI and the server alike."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    # -- lookup ------------------------------------------------------------------------------
    def _dir(self, vm_id: str) -> Path:
        if not vm_id or not all(c in "0123456789abcdef" for c in vm_id) or len(vm_id) > 32:
            raise InvalidInputError(f"invalid VM id {vm_id!r}", hint="see `cloudlet vm list`")
        return self.paths.vms / vm_id

    def _load(self, vm_id: str) -> VM:
        d = self._dir(vm_id)
        try:
            return VM.from_dict(read_json(d / VM_RECORD), d)
        except FileNotFoundError:
            raise NotFoundError(f"no VM {vm_id!r}", hint="see `cloudlet vm list`") from None

    def get(self, vm_id: str) -> VM:
        """The VM with its state refreshed (a vanished QEMU makes a running VM 'crashed')."""
        return self._refresh(self._load(vm_id))

    def list(self) -> list[VM]:
        out = []
        for d in sorted(self.paths.vms.iterdir()) if self.paths.vms.exists() else []:
            if (d / VM_RECORD).exists():
                try:
                    out.append(self.get(d.name))
                except (IntegrityError, InvalidInputError, ValueError, KeyError) as e:
                    log.warning("skipping unreadable VM directory %s: %s", d, e)
        return sorted(out, key=lambda v: v.created)

    def users_of(self, kind: str, name: str) -> list[str]:
        """Ids of VMs whose disk is backed by the image or base ``name``."""
        return [v.id for v in self.list() if v.source.kind == kind and v.source.name == name]

    def _refresh(self, vm: VM) -> VM:
        if vm.state is VMState.CREATING:
            creator = vm.meta.get("creator_pid")
            if creator and _pid_alive(int(creator)):
                return vm  # being made, in this process or another
            # Its maker died, so it will never be finished. A QEMU started early (synthesis, a
            # handoff's destination) would wait forever for its device state: end it.
            for pid in {vm.pid, vm.read_pid()}:
                if pid and vm.process_alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        elif vm.state not in (VMState.RUNNING, VMState.PAUSED) or vm.process_alive():
            return vm
        vm.state = VMState.CRASHED
        vm.meta["crashed_at"] = time.time()
        vm.meta["console_tail"] = vm.console_tail(10)
        with self.locked(vm):
            vm.save()
        return vm

    @contextlib.contextmanager
    def locked(self, vm: VM) -> Iterator[None]:
        """Serialise mutations of one VM between processes (CLI, server)."""
        fd = os.open(vm.dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConflictError(
                    f"VM {vm.id} is busy with another operation", hint="wait and retry"
                ) from None
            yield
        finally:
            os.close(fd)

    # -- hardware ----------------------------------------------------------------------------
    def hardware_for(self, src: BootSource, memory_mib: int, cpus: int) -> Hardware:
        if not 32 <= memory_mib <= 65536:
            raise InvalidInputError(f"memory {memory_mib} MiB out of range (32-65536)")
        if not 1 <= cpus <= 16:
            raise InvalidInputError(f"cpus {cpus} out of range (1-16)")
        accel = choose_accel(self.paths, src.kernel)
        return Hardware(
            machine=default_machine(),
            cpu_model="qemu64",
            accel=accel.accel,
            memory_mib=memory_mib,
            cpus=cpus,
            qemu_version=qemu_version(),
            boot="kernel" if src.kernel else "bios",
            cmdline=src.cmdline if src.kernel else None,
            kernel_sha256=file_sha256(src.kernel) if src.kernel else None,
            initrd_sha256=file_sha256(src.initrd) if src.initrd else None,
        )

    def host_hardware(self, recorded: Hardware, kernel: Path | None) -> Hardware:
        """What this host would run for ``recorded``: same shape, this host's QEMU and accel."""
        hw = recorded.to_dict()
        hw["qemu_version"] = qemu_version()
        hw["accel"] = choose_accel(self.paths, kernel).accel
        return Hardware.from_dict(hw)

    # -- creation ----------------------------------------------------------------------------
    def _new_vm_dir(self) -> tuple[str, Path]:
        for _ in range(10):
            vm_id = _new_id()
            d = self.paths.vms / vm_id
            try:
                d.mkdir(parents=True)
                return vm_id, d
            except FileExistsError:
                continue
        raise ConflictError("could not allocate a VM id")

    async def _discard(self, vm: VM) -> None:
        """Undo a failed creation: kill its QEMU (if any) and remove its directory."""
        await _kill_all(vm)
        shutil.rmtree(vm.dir, ignore_errors=True)

    def new_vm(
        self,
        src: BootSource,
        hardware: Hardware,
        *,
        forwards: list[PortForward] | None = None,
        name: str | None = None,
    ) -> VM:
        """Make a VM directory holding only its record (state ``creating``)."""
        if name is not None:
            check_name(name, "VM name")
        fwd = (
            forwards
            if forwards is not None
            else [PortForward(p, 0, auto=True) for p in src.guest_ports]
        )
        vm_id, d = self._new_vm_dir()
        vm = VM(
            id=vm_id,
            name=name or f"vm-{vm_id}",
            dir=d,
            state=VMState.CREATING,
            hardware=hardware,
            source=src,
            forwards=fwd,
            created=time.time(),
            meta={"creator_pid": os.getpid()},
        )
        try:
            vm.save()
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        return vm

    async def create_vm(
        self,
        src: BootSource,
        *,
        memory_mib: int = 256,
        cpus: int = 1,
        forwards: list[PortForward] | None = None,
        name: str | None = None,
        hardware: Hardware | None = None,
    ) -> VM:
        """Make a VM directory (record and a disk layer over ``src.disk``) without starting it."""
        if not src.disk.exists():
            raise NotFoundError(f"the disk {src.disk} of {src.kind} {src.name!r} is missing")
        if src.kernel is not None and not src.kernel.exists():
            raise NotFoundError(f"the kernel {src.kernel} of {src.kind} {src.name!r} is missing")
        hw = hardware or await asyncio.to_thread(self.hardware_for, src, memory_mib, cpus)
        vm = self.new_vm(src, hw, forwards=forwards, name=name)
        try:
            proc = await asyncio.create_subprocess_exec(
                find_tool("qemu-img"), "create", "-q", "-f", "qcow2",
                "-b", str(src.disk), "-F", src.disk_format, str(vm.disk_path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise QemuStartError(
                    f"cannot create the disk layer over {src.disk}: {err.decode().strip()}",
                    hint=f"check the {src.kind} with `cloudlet {src.kind} info {src.name}`",
                )
            return vm
        except BaseException:
            await self._discard(vm)
            raise

    def mark_suspended(self, vm: VM) -> VM:
        """Record that ``vm.dir`` now holds a complete snapshot (RAM file, devstate, disk)."""
        vm.snapshot = {
            "devstate_bytes": vm.devstate_path.stat().st_size,
            "devstate_sha256": file_sha256(vm.devstate_path),
            "saved_at": time.time(),
            "hardware": vm.hardware.to_dict(),
        }
        vm.state = VMState.SUSPENDED
        vm.meta.pop("creator_pid", None)
        vm.save()
        return vm

    async def discard(self, vm: VM) -> None:
        """Undo a VM whose creation failed (public for synthesis and base creation)."""
        await self._discard(vm)

    async def start(
        self,
        src: BootSource,
        *,
        memory_mib: int = 256,
        cpus: int = 1,
        forwards: list[PortForward] | None = None,
        name: str | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
    ) -> VM:
        """Cold-boot a new VM from ``src`` and wait until the guest says it is ready."""
        vm = await self.create_vm(
            src, memory_mib=memory_mib, cpus=cpus, forwards=forwards, name=name
        )
        try:
            with open(vm.ram_path, "wb") as f:
                f.truncate(vm.hardware.memory_bytes)  # sparse: untouched guest pages cost nothing
            await self._launch(vm, incoming=False)
            await self._wait_ready(vm, ready_timeout)
            vm.state = VMState.RUNNING
            vm.meta.pop("creator_pid", None)
            vm.save()
            return vm
        except BaseException:
            await self._discard(vm)
            raise

    async def _launch(self, vm: VM, *, incoming: bool) -> None:
        """Start QEMU (daemonized); retry with new ports if an auto-picked one was taken.

        ``incoming``: QEMU waits for a device state, and the host ports are picked (a
        requested one that is taken refused) but not listened on: :meth:`resume_paused` adds
        them once the state is loaded (or :meth:`cont`, after the vCPUs run)."""
        for attempt in range(3):
            vm.forwards = portlib.resolve(vm.forwards)  # saved with the pid below
            cmd = build_command(vm, incoming=incoming, hostfwd=not incoming)
            log.debug("launching %s", shlex.join(cmd))
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                cwd=vm.dir,
                stdin=subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            try:
                _, err_b = await asyncio.wait_for(proc.communicate(), 60)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise
            err = err_b.decode(errors="replace").strip()
            if proc.returncode == 0:
                vm.pid = vm.read_pid()
                if vm.pid is None:
                    raise QemuStartError("QEMU started but wrote no pidfile")
                vm.save()
                return
            if "host forwarding rule" in err and any(f.auto for f in vm.forwards) and attempt < 2:
                vm.forwards = [
                    PortForward(f.guest, 0, f.host_addr, auto=True) if f.auto else f
                    for f in vm.forwards
                ]
                continue  # lost a race for an auto-picked port: pick again
            if "host forwarding rule" in err:
                raise ConflictError(
                    f"QEMU could not listen on a requested host port: {err}",
                    hint="choose another host port with --forward HOST:GUEST",
                )
            raise QemuStartError(f"QEMU failed to start: {err or f'exit code {proc.returncode}'}")

    async def _wait_ready(self, vm: VM, timeout: float) -> None:
        """Wait for the readiness marker on the serial console (or, lacking one, a port)."""
        marker = vm.source.ready_marker
        deadline = time.monotonic() + timeout
        offset = 0
        buf = b""
        while True:
            if marker:
                try:
                    with open(vm.serial_log, "rb") as f:
                        f.seek(offset)
                        data = f.read()
                        offset += len(data)
                    buf = (buf + data)[-65536:]
                    if marker.encode() in buf:
                        return
                except FileNotFoundError:
                    pass
            elif not vm.forwards:
                return  # no marker and no port to wait for: running is ready
            elif await first_answer(
                vm.forwards[0].host_addr, vm.forwards[0].host, vm.forwards[0].guest, 0.5
            ):
                return
            if not vm.process_alive():
                raise GuestNotReadyError(
                    f"VM {vm.id}: QEMU exited before the guest became ready",
                    console_tail=vm.console_tail(),
                    hint="last console lines:\n    " + "\n    ".join(vm.console_tail()),
                )
            if time.monotonic() > deadline:
                tail = vm.console_tail()
                raise GuestNotReadyError(
                    f"VM {vm.id}: the guest was not ready within {timeout:g} s; it was killed",
                    console_tail=tail,
                    hint="last console lines:\n    " + ("\n    ".join(tail) or "(console empty)"),
                )
            await asyncio.sleep(0.02)

    # -- running VMs -------------------------------------------------------------------------
    def _require(self, vm: VM, *states: VMState) -> None:
        if vm.state not in states:
            want = " or ".join(s.value for s in states)
            raise ConflictError(
                f"VM {vm.id} is {vm.state.value}, this needs it {want}",
                hint=f"see `cloudlet vm list`; current state: {vm.state.value}",
            )

    async def exec(
        self, vm_id: str, command: str, stdin: bytes = b"", timeout: float = 60.0
    ) -> ExecResult:
        vm = self.get(vm_id)
        self._require(vm, VMState.RUNNING)
        if not vm.source.agent:
            raise ConflictError(f"VM {vm.id}'s {vm.source.kind} has no guest agent")
        async with Agent(vm.agent_path) as agent:
            return await agent.exec(command, stdin, timeout)

    async def stop(self, vm_id: str, timeout: float = 10.0) -> VM:
        """Graceful (ACPI power button), then ``quit``, then SIGKILL. Keeps the disk."""
        vm = self.get(vm_id)
        with self.locked(vm):
            if vm.state in (VMState.RUNNING, VMState.PAUSED) and vm.pid:
                pid = vm.pid
                try:
                    async with await Monitor.connect(vm.qmp_path, timeout=2) as mon:
                        if vm.state is VMState.RUNNING:
                            await mon.execute("system_powerdown")
                            if not await _wait_gone(pid, timeout):
                                log.info("VM %s ignored the power button; quitting QEMU", vm.id)
                        if vm.process_alive(pid):
                            with contextlib.suppress(Exception):
                                await mon.execute("quit")
                except Exception as e:  # the monitor is gone or wedged: kill below
                    log.info("VM %s: monitor unavailable during stop (%s)", vm.id, e)
                if not await _wait_gone(pid, 3.0):
                    await _kill_and_wait(pid)
            vm.state = VMState.STOPPED
            vm.pid = None
            vm.snapshot = None
            for f in (vm.ram_path, vm.devstate_path, vm.qmp_path, vm.agent_path, vm.dir / PIDFILE):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            vm.save()
        return vm

    async def delete(self, vm_id: str, force: bool = False) -> None:
        """Remove a VM and its directory (a running one only with ``force``: it is killed)."""
        vm = self.get(vm_id)
        if vm.state in (VMState.RUNNING, VMState.PAUSED) and not force:
            raise ConflictError(
                f"VM {vm.id} is {vm.state.value}",
                hint=f"stop it first (`cloudlet vm stop {vm.id}`) or use --force",
            )
        await _kill_all(vm)
        # Freeing a GiB-sized RAM file's page cache takes a good part of a second: not on the
        # server's event loop, and at idle priority, behind the guests that run on this host.
        await run_idle(shutil.rmtree, vm.dir)

    async def pause(self, vm: VM, mon: Monitor) -> None:
        """Pause the vCPUs and wait for QEMU's STOP event (no polling)."""
        status = await mon.execute("query-status")
        if status.get("running"):
            async with mon.events(["STOP"]) as ev:
                await mon.execute("stop")
                await asyncio.wait_for(ev.get(), 10)

    async def save_devstate(self, vm: VM, mon: Monitor, dest: Path) -> int:
        """Save device state of a paused VM to ``dest`` (RAM stays in its file). Returns bytes."""
        part = dest.with_name(dest.name + ".part")
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        caps = [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True},
        ]
        await mon.execute("migrate-set-capabilities", {"capabilities": caps})
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            await mon.pass_fd(fd, "devstate")
        finally:
            os.close(fd)  # QEMU holds its own copy now
        async with mon.events(["MIGRATION"]) as ev:
            await mon.execute("migrate", {"uri": "fd:devstate"})
            while True:
                e = await asyncio.wait_for(ev.get(), 120)
                status = e["data"]["status"]
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    info = await mon.execute("query-migrate")
                    raise SnapshotError(
                        f"saving device state of VM {vm.id} failed: "
                        f"{info.get('error-desc', status)}"
                    )
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
        fsync_dir(dest.parent)
        return dest.stat().st_size

    async def suspend(self, vm_id: str) -> VM:
        """Pause, save the device state (RAM stays in ``memory.ram``), end QEMU."""
        vm = self.get(vm_id)
        with self.locked(vm):
            self._require(vm, VMState.RUNNING, VMState.PAUSED)
            assert vm.pid is not None
            pid = vm.pid
            async with await Monitor.connect(vm.qmp_path) as mon:
                await self.pause(vm, mon)
                try:
                    size = await self.save_devstate(vm, mon, vm.devstate_path)
                except BaseException:
                    # The VM is intact and paused: let it run on rather than lose it.
                    with contextlib.suppress(Exception):
                        await mon.execute("cont")
                    raise
                log.debug("VM %s: device state %d bytes", vm.id, size)
                self.mark_suspended(vm)  # from here on the snapshot is complete and durable
                with contextlib.suppress(Exception):
                    await mon.execute("quit")
            if not await _wait_gone(pid, 10):
                await _kill_and_wait(pid)
            vm.pid = None
            vm.save()
        return vm

    async def resume(
        self, vm_id: str, *, forwards: list[PortForward] | None = None, wait_port: bool = False
    ) -> VM:
        """Restore a suspended VM from its RAM file and device state, and run it.

        The hardware description recorded with the snapshot must match what this host would
        run (QEMU version, accelerator); otherwise nothing is started and the VM stays
        suspended. Host ports are re-used when free (auto-picked ones are re-picked).
        A paused VM (left so by ``overlay create --keep-paused``) just runs on.
        """
        if self.get(vm_id).state is VMState.PAUSED:
            return await self.cont(vm_id)
        vm, mon = await self.resume_paused(vm_id, forwards=forwards)
        vm = await self.cont(vm.id, mon)
        if wait_port and vm.forwards:
            f = vm.forwards[0]
            if await first_answer(f.host_addr, f.host, f.guest, 10) is None:
                raise GuestNotReadyError(
                    f"VM {vm.id}: port {f.host} did not answer", console_tail=[]
                )
        return vm

    async def launch_incoming(self, vm_id: str) -> VM:
        """Start the QEMU of a VM whose RAM, disk and device state are still arriving.

        A handoff's destination starts it when the session is prepared, so that QEMU's start
        (50-250 ms under TCG) is not downtime. QEMU then waits (``-incoming defer``), its
        vCPUs never run. Until the device state is loaded it does not touch guest RAM (ROM
        contents are left to the incoming state), and it holds the disk *inactive* and reads
        it again when the state is loaded, as in a migration over shared storage; so the RAM
        file and the disk layer may still be written meanwhile. The disk layer must already
        be a valid qcow2 (``Qcow2Writer(openable=True)``). Later, :meth:`mark_suspended` and
        ``resume_paused(launched=True)`` load the state. On failure no QEMU is left running.
        """
        vm = self.get(vm_id)
        with self.locked(vm):
            self._require(vm, VMState.CREATING)
            await asyncio.to_thread(self._check_hardware, vm, vm.hardware)
            try:
                # No host ports yet (see resume_paused).
                await self._launch(vm, incoming=True)
            except BaseException:
                await _kill_all(vm)
                vm.pid = None
                vm.save()
                raise
        return vm

    async def _add_forwards(self, vm: VM, mon: Monitor, *, running: bool = False) -> None:
        """Listen on the VM's host ports now (QEMU's ``hostfwd_add``), re-picking an auto
        port that was taken since it was picked. Not ``running``: the state is loaded and the
        vCPUs stopped, and on failure :meth:`resume_paused` leaves the VM suspended."""
        fwds = list(vm.forwards)
        for i, f in enumerate(fwds):
            for attempt in range(3):
                rule = f"tcp:{f.host_addr}:{f.host}-:{f.guest}"
                out = await mon.hmp(f"hostfwd_add net0 {rule}")
                if not out.strip():
                    break
                if not f.auto or attempt == 2:
                    raise ConflictError(
                        f"QEMU could not listen on host port {f.host_addr}:{f.host}: {out.strip()}",
                        hint=(
                            "the VM runs without it: suspend it and resume it"
                            if running
                            else "the VM stays suspended: resume it once the port is free, or"
                        )
                        + f" with another host port (--forward OTHER:{f.guest})",
                    )
                taken = {g.host for g in fwds}
                f = PortForward(f.guest, portlib.pick_free(f.host_addr, taken), f.host_addr, True)
                fwds[i] = f
        vm.forwards = fwds

    async def resume_paused(
        self,
        vm_id: str,
        *,
        forwards: list[PortForward] | None = None,
        launched: bool = False,
        listen: bool = True,
        timings: dict[str, float] | None = None,
    ) -> tuple[VM, Monitor]:
        """Do all of a resume but the last step: QEMU runs, state loaded, vCPUs stopped.

        The VM is then ``paused`` and :meth:`cont` starts it in a few milliseconds (standby
        VMs for cached starts). Returns the open QMP session for :meth:`cont` to reuse. On any
        failure nothing is left running and the VM stays ``suspended`` (a host port taken
        since it was checked included). ``launched``: its QEMU was started by
        :meth:`launch_incoming` (and the hardware checked then). ``listen=False``: no host
        ports yet, ``cont(listen=True)`` adds them. ``timings`` gets the seconds of each step
        (check, launch, connect, state, listen).
        """
        t = _Stopwatch(timings)
        vm = self.get(vm_id)
        with self.locked(vm):
            self._require(vm, VMState.SUSPENDED)
            # may probe the accelerator
            await asyncio.to_thread(self._check_snapshot, vm, hardware=not launched)
            t.lap("check")
            if forwards is not None:
                vm.forwards = forwards
            mon: Monitor | None = None
            try:
                if launched:
                    if not vm.pid or not vm.process_alive(vm.pid):
                        raise QemuStartError(
                            f"VM {vm.id}: the QEMU started for it ended before its state came"
                        )
                else:
                    await self._launch(vm, incoming=True)
                    t.lap("launch")
                mon = await Monitor.connect(vm.qmp_path)
                t.lap("connect")
                await self.load_devstate(vm, mon, vm.devstate_path)
                t.lap("state")
                # The host ports listen only now. A connection the user network took before
                # the load is carried by the user network the load replaces, and its client
                # waits ~6 s; one taken now is answered once the vCPUs run.
                if listen:
                    await self._add_forwards(vm, mon)
                    t.lap("listen")
            except BaseException:
                if mon is not None:
                    await mon.close()
                await _kill_all(vm)
                vm.pid = None
                vm.state = VMState.SUSPENDED
                vm.save()
                raise
            vm.state = VMState.PAUSED
            vm.snapshot = None
            vm.save()
            # The snapshot no longer describes the VM (QEMU holds the state now): remove it
            # so it is never mistaken for a valid one.
            vm.devstate_path.unlink()
        return vm, mon

    async def cont(
        self,
        vm_id: str,
        mon: Monitor | None = None,
        *,
        listen: bool = False,
        timings: dict[str, float] | None = None,
    ) -> VM:
        """Run the vCPUs of a paused VM (through ``mon`` if given; it is closed after).

        ``listen``: then listen on its host ports (after ``resume_paused(listen=False)``). A
        handoff does that: a client retrying every few ms would otherwise connect while the
        vCPUs are stopped, and in the handoff bench such first answers had a longer tail (tiny
        guest, 40 handoffs each way: 7 over 0.4 s after the resume against none).
        An auto-picked port taken meanwhile is picked again; a requested one would leave the
        VM running without it (the error says so). ``timings`` gets the seconds of each step
        (cont, listen).
        """
        t = _Stopwatch(timings)
        vm = self.get(vm_id)
        try:
            with self.locked(vm):
                self._require(vm, VMState.PAUSED)
                if mon is None:
                    mon = await Monitor.connect(vm.qmp_path)
                await mon.execute("cont")
                vm.state = VMState.RUNNING
                t.lap("cont")
                try:
                    if listen:
                        await self._add_forwards(vm, mon, running=True)
                        t.lap("listen")
                finally:
                    vm.save()  # running, even if a host port could not be had
        finally:
            if mon is not None:
                await mon.close()
        return vm

    def _check_snapshot(self, vm: VM, *, hardware: bool = True) -> None:
        snap = vm.snapshot or {}
        if not vm.devstate_path.exists():
            raise SnapshotError(
                f"VM {vm.id} has no saved device state", hint="it cannot be resumed"
            )
        size = vm.devstate_path.stat().st_size
        if size > MAX_DEVSTATE_BYTES or size != snap.get("devstate_bytes"):
            raise IntegrityError(
                f"VM {vm.id}: device state is {size} bytes, "
                f"the record says {snap.get('devstate_bytes')}"
            )
        if hardware:
            self._check_hardware(
                vm, Hardware.from_dict(snap.get("hardware") or vm.hardware.to_dict())
            )

    def _check_hardware(self, vm: VM, recorded: Hardware) -> None:
        """``recorded`` is what this host runs, with the same kernel, and the RAM file fits."""
        here = self.host_hardware(recorded, vm.source.kernel)
        diff = recorded.differences(here)
        if vm.source.kernel is not None and recorded.kernel_sha256:
            if not vm.source.kernel.exists():
                raise NotFoundError(
                    f"the kernel {vm.source.kernel} needed to resume VM {vm.id} is missing"
                )
            actual = file_sha256(vm.source.kernel)
            if actual != recorded.kernel_sha256:
                diff["kernel_sha256"] = (recorded.kernel_sha256, actual)
        if diff:
            raise HardwareMismatchError(diff)
        if not vm.ram_path.exists() or vm.ram_path.stat().st_size != recorded.memory_bytes:
            raise IntegrityError(f"VM {vm.id}: RAM file missing or of the wrong size")

    async def load_devstate(self, vm: VM, mon: Monitor, src: Path) -> None:
        caps = [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True},
        ]
        await mon.execute("migrate-set-capabilities", {"capabilities": caps})
        fd = os.open(src, os.O_RDONLY)
        try:
            await mon.pass_fd(fd, "devstate")
        finally:
            os.close(fd)
        async with mon.events(["MIGRATION"]) as ev:
            await mon.execute("migrate-incoming", {"uri": "fd:devstate"})
            while True:
                e = await asyncio.wait_for(ev.get(), 120)
                status = e["data"]["status"]
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise SnapshotError(
                        f"restoring device state of VM {vm.id} failed ({status})",
                        hint="see the last console lines with `cloudlet vm logs`",
                    )
