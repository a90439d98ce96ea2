"""Base VMs: an image booted once and snapshotted, kept read-only so only differences travel.

``<home>/bases/<name>/``::

    base.json      the record below (format version 1)
    disk.raw       the guest disk, flattened to a sparse raw file (read-only)
    memory.ram     guest RAM at the snapshot (read-only, sparse)
    devstate       device state (QEMU migration stream, x-ignore-shared)
    vmlinuz, initrd.img   the boot files, copied so the base stands alone
    memory.idx.npy, disk.idx.npy   xxh3-64 of every 4 KiB page, for deduplication

The base id is the BLAKE3 of the hardware description, RAM, disk and device state: two
cloudlets holding the same id hold the same bytes, so an overlay made against one applies to
the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3
import zstandard

from cloudlet.config import Paths
from cloudlet.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError
from cloudlet.hypervisor.hardware import Hardware
from cloudlet.hypervisor.ports import PortForward
from cloudlet.hypervisor.qemu import find_tool
from cloudlet.hypervisor.vm import VM, BootSource, VMManager
from cloudlet.images.model import Image
from cloudlet.overlay import BaseRef
from cloudlet.overlay.index import page_index, save_index
from cloudlet.util.fs import atomic_write_json, read_json, sparse_copy, staging_dir
from cloudlet.util.names import check_name

BASE_RECORD = "base.json"
BASE_FORMAT_VERSION = 1
DATA_FILES = ("disk.raw", "memory.ram", "devstate")
BOOT_FILES = ("vmlinuz", "initrd.img")
INDEX_FILES = ("memory.idx.npy", "disk.idx.npy")
EXPORT_MAGIC = "cloudlet-base-export"
MAX_MEMBER_BYTES = 64 << 30


@dataclass
class BaseVM:
    name: str
    base_id: str
    hardware: Hardware
    image: str  # image name it was made from
    image_id: str
    guest_ports: list[int]
    agent: bool
    ready_marker: str | None
    created: float
    sizes: dict[str, int] = field(default_factory=dict)
    dir: Path = field(default=Path("."), compare=False)
    format_version: int = BASE_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hardware"] = self.hardware.to_dict()
        d.pop("dir")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], directory: Path) -> BaseVM:
        if d.get("format_version") != BASE_FORMAT_VERSION:
            raise IntegrityError(f"base record in {directory} has unknown format version")
        b = cls(
            name=check_name(str(d["name"]), "base name"),
            base_id=str(d["base_id"]),
            hardware=Hardware.from_dict(d["hardware"]),
            image=str(d["image"]),
            image_id=str(d["image_id"]),
            guest_ports=[int(p) for p in d.get("guest_ports", [])],
            agent=bool(d.get("agent")),
            ready_marker=d.get("ready_marker"),
            created=float(d["created"]),
            sizes={str(k): int(v) for k, v in (d.get("sizes") or {}).items()},
            dir=directory,
        )
        if len(b.base_id) != 64 or not all(c in "0123456789abcdef" for c in b.base_id):
            raise IntegrityError(f"base record in {directory} has a malformed base id")
        return b

    def path(self, name: str) -> Path:
        return self.dir / name

    def boot_source(self) -> BootSource:
        return BootSource(
            kind="base",
            name=self.name,
            content_id=self.base_id,
            disk=self.path("disk.raw"),
            disk_format="raw",
            kernel=self.path("vmlinuz") if self.hardware.boot == "kernel" else None,
            initrd=self.path("initrd.img") if self.path("initrd.img").exists() else None,
            cmdline=self.hardware.cmdline,
            guest_ports=list(self.guest_ports),
            agent=self.agent,
            ready_marker=self.ready_marker,
        )

    def ref(self) -> BaseRef:
        """What the overlay engine needs to diff against (or rebuild from) this base."""
        return BaseRef(
            base_id=self.base_id,
            ram=self.path("memory.ram"),
            disk=self.path("disk.raw"),
            ram_index=self.path("memory.idx.npy"),
            disk_index=self.path("disk.idx.npy"),
        )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_id": self.base_id,
            "image": self.image,
            "memory_mib": self.hardware.memory_mib,
            "cpus": self.hardware.cpus,
            "accel": self.hardware.accel,
            "guest_ports": self.guest_ports,
            "sizes": self.sizes,
            "created": self.created,
        }


def compute_base_id(directory: Path, hardware: Hardware) -> str:
    """BLAKE3 over the hardware description and the data files, in a fixed order."""
    import json

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update(json.dumps(hardware.to_dict(), sort_keys=True).encode())
    for name in DATA_FILES:
        p = directory / name
        h.update(f"\0{name}\0{p.stat().st_size}\0".encode())
        h.update_mmap(p)
    return h.hexdigest()


async def _run(*cmd: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise IntegrityError(f"{Path(cmd[0]).name} failed: {err.decode().strip()}")


class BaseStore:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.vms = VMManager(paths)

    def dir(self, name: str) -> Path:
        return self.paths.bases / check_name(name, "base name")

    def get(self, name: str) -> BaseVM:
        d = self.dir(name)
        try:
            return BaseVM.from_dict(read_json(d / BASE_RECORD), d)
        except FileNotFoundError:
            raise NotFoundError(
                f"no base VM {name!r}",
                hint="see `cloudlet base list`, or make one with "
                "`cloudlet base create IMAGE --name NAME`",
            ) from None

    def by_id(self, base_id: str) -> BaseVM:
        for b in self.list():
            if b.base_id == base_id:
                return b
        raise NotFoundError(f"no base VM with id {base_id}")

    def list(self) -> list[BaseVM]:
        out = []
        for d in sorted(self.paths.bases.iterdir()) if self.paths.bases.exists() else []:
            if (d / BASE_RECORD).exists():
                with contextlib.suppress(IntegrityError, InvalidInputError, KeyError, ValueError):
                    out.append(BaseVM.from_dict(read_json(d / BASE_RECORD), d))
        return out

    # -- create --------------------------------------------------------------------------
    async def create(
        self,
        image: Image,
        name: str,
        *,
        memory_mib: int = 256,
        cpus: int = 1,
        ports: list[int] | None = None,
        settle_s: float = 1.0,
        ready_timeout: float = 120.0,
    ) -> BaseVM:
        """Boot ``image``, wait until ready, snapshot it and store the result as a base VM."""
        check_name(name, "base name")
        if self.dir(name).exists():
            raise ConflictError(f"base VM {name!r} already exists", hint="pick another --name")
        src = BootSource.from_image(image)
        if ports is not None:
            src.guest_ports = list(ports)
        vm = await self.vms.start(
            src, memory_mib=memory_mib, cpus=cpus, name=f"base-{name}", ready_timeout=ready_timeout
        )
        try:
            await asyncio.sleep(settle_s)  # let boot-time writeback and timers go quiet
            vm = await self.vms.suspend(vm.id)
            with staging_dir(self.dir(name), self.paths.tmp) as work:
                base = await self._store(vm, image, name, src, work)
        finally:
            await self.vms.delete(vm.id, force=True)
        base.dir = self.dir(name)
        return base

    async def _store(self, vm: VM, image: Image, name: str, src: BootSource, work: Path) -> BaseVM:
        await _run(find_tool("qemu-img"), "convert", "-O", "raw", "-S", "4k",
                   str(vm.disk_path), str(work / "disk.raw"))  # fmt: skip
        os.rename(vm.ram_path, work / "memory.ram")
        os.rename(vm.devstate_path, work / "devstate")
        if image.kernel_path:
            shutil.copyfile(image.kernel_path, work / "vmlinuz")
        if image.initrd_path:
            shutil.copyfile(image.initrd_path, work / "initrd.img")
        for data, idx in (("memory.ram", "memory.idx.npy"), ("disk.raw", "disk.idx.npy")):
            save_index(await asyncio.to_thread(page_index, work / data), work / idx)
        base_id = await asyncio.to_thread(compute_base_id, work, vm.hardware)
        base = BaseVM(
            name=name,
            base_id=base_id,
            hardware=vm.hardware,
            image=image.name,
            image_id=image.content_id,
            guest_ports=list(src.guest_ports),
            agent=src.agent,
            ready_marker=src.ready_marker,
            created=time.time(),
            sizes={n: (work / n).stat().st_size for n in DATA_FILES},
            dir=work,
        )
        for n in (*DATA_FILES, *BOOT_FILES, *INDEX_FILES):
            if (work / n).exists():
                os.chmod(work / n, 0o444)
        atomic_write_json(work / BASE_RECORD, base.to_dict())
        return base

    # -- use -----------------------------------------------------------------------------
    def users(self, name: str) -> list[str]:
        return self.vms.users_of("base", name)

    def delete(self, name: str) -> None:
        self.get(name)
        users = self.users(name)
        if users:
            raise ConflictError(
                f"base VM {name!r} is used by VM(s) {', '.join(users)}",
                hint="remove those VMs first (`cloudlet vm rm ID --force`)",
            )
        d = self.dir(name)
        trash = self.paths.tmp / f"deleting-{name}-{os.getpid()}-{time.time_ns()}"
        os.rename(d, trash)
        shutil.rmtree(trash, ignore_errors=True)

    async def start_vm(
        self, name: str, *, forwards: list[PortForward] | None = None, vm_name: str | None = None
    ) -> VM:
        """Resume a new VM from the base's snapshot (the customization session starts here)."""
        base = self.get(name)
        src = base.boot_source()
        fwd = self.forwards_for(src, forwards)
        vm = await self.vms.create_vm(src, hardware=base.hardware, forwards=fwd, name=vm_name)
        try:
            await asyncio.to_thread(sparse_copy, base.path("memory.ram"), vm.ram_path)
            os.chmod(vm.ram_path, 0o600)
            shutil.copyfile(base.path("devstate"), vm.devstate_path)
            self.vms.mark_suspended(vm)
        except BaseException:
            await self.vms.discard(vm)
            raise
        try:
            return await self.vms.resume(vm.id)
        except BaseException:
            await self.vms.discard(vm)
            raise

    @staticmethod
    def forwards_for(src: BootSource, forwards: list[PortForward] | None) -> list[PortForward]:
        given = list(forwards or [])
        covered = {f.guest for f in given}
        return given + [PortForward(p, 0, auto=True) for p in src.guest_ports if p not in covered]

    # -- export / import -----------------------------------------------------------------
    def export(self, name: str, out: Path) -> dict[str, Any]:
        """Write the base as one file: a zstd-compressed tar of its directory."""
        base = self.get(name)
        out = out.resolve()
        part = out.with_name(out.name + ".part")
        try:
            with open(part, "wb") as f:
                cctx = zstandard.ZstdCompressor(level=3, threads=2)
                with (
                    cctx.stream_writer(f, closefd=False) as zf,
                    tarfile.open(fileobj=zf, mode="w|", format=tarfile.PAX_FORMAT) as tar,
                ):
                    info = tarfile.TarInfo(EXPORT_MAGIC)
                    payload = base.base_id.encode()
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                    for n in (BASE_RECORD, *DATA_FILES, *BOOT_FILES, *INDEX_FILES):
                        if base.path(n).exists():
                            tar.add(base.path(n), arcname=n, recursive=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise
        return {
            "name": name,
            "base_id": base.base_id,
            "file": str(out),
            "bytes": out.stat().st_size,
        }

    def import_(self, file: Path, name: str | None = None) -> BaseVM:
        """Import an exported base; verified (content id recomputed) before it is accepted."""
        if not file.is_file():
            raise NotFoundError(f"no such file {file}")
        self.paths.tmp.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="import-base.", dir=self.paths.tmp))
        try:
            base = self._unpack_and_verify(file, work, name)
            final = self.dir(base.name)
            if final.exists():
                raise ConflictError(
                    f"base VM {base.name!r} already exists", hint="import with --name OTHER"
                )
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        base.dir = final
        return base

    def _unpack_and_verify(self, file: Path, work: Path, name: str | None) -> BaseVM:
        allowed = {EXPORT_MAGIC, BASE_RECORD, *DATA_FILES, *BOOT_FILES, *INDEX_FILES}
        try:
            with open(file, "rb") as f:
                dctx = zstandard.ZstdDecompressor()
                with dctx.stream_reader(f) as zf, tarfile.open(fileobj=zf, mode="r|") as tar:
                    for m in tar:
                        # Only known bare file names: nothing from the file reaches a path.
                        if m.name not in allowed or not m.isfile() or m.size > MAX_MEMBER_BYTES:
                            raise IntegrityError(
                                f"{file} is not a cloudlet base export "
                                f"(unexpected member {m.name!r})"
                            )
                        src = tar.extractfile(m)
                        assert src is not None
                        with open(work / m.name, "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
            raise IntegrityError(
                f"{file} is not a readable cloudlet base export: {e}",
                hint="export it again with `cloudlet base export NAME -o FILE`",
            ) from e
        missing = [n for n in (EXPORT_MAGIC, BASE_RECORD, *DATA_FILES) if not (work / n).exists()]
        if missing:
            raise IntegrityError(f"{file} is incomplete: missing {', '.join(missing)}")
        base = BaseVM.from_dict(read_json(work / BASE_RECORD), work)
        actual = compute_base_id(work, base.hardware)
        if actual != base.base_id or (work / EXPORT_MAGIC).read_text() != base.base_id:
            raise IntegrityError(
                f"{file} failed verification: content id {actual} != recorded {base.base_id}",
                hint="the file is corrupt; export it again",
            )
        if base.hardware.boot == "kernel" and not (work / "vmlinuz").exists():
            raise IntegrityError(f"{file} has no kernel")
        (work / EXPORT_MAGIC).unlink()
        # Indexes are derived data: recompute rather than trust them.
        save_index(page_index(work / "memory.ram"), work / "memory.idx.npy")
        save_index(page_index(work / "disk.raw"), work / "disk.idx.npy")
        base.name = check_name(name or base.name, "base name")
        atomic_write_json(work / BASE_RECORD, base.to_dict())
        for n in (*DATA_FILES, *BOOT_FILES, *INDEX_FILES):
            if (work / n).exists():
                os.chmod(work / n, 0o444)
        return base
