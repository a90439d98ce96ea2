"""The image store: ``<home>/images/<name>/`` directories with an ``image.json`` manifest.

An image directory appears under its name only once complete (built or imported in a staging
directory, then renamed), and disappears at once on delete (renamed away, then removed), so a
reader never sees half an image. Imported disks are copied in, never linked: the store owns its
files and an image cannot change behind a base VM's back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cloudlet.config import Paths
from cloudlet.errors import (
    CloudletError,
    ConflictError,
    EnvironmentProblem,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
)
from cloudlet.hypervisor.qemu import find_tool
from cloudlet.images.digest import content_id
from cloudlet.images.model import IMAGE_MANIFEST, Image
from cloudlet.util.fs import atomic_write_json, read_json, staging_dir
from cloudlet.util.names import check_name

_NOT_FOUND_HINT = (
    "see `cloudlet image list`, or make one with `cloudlet image build-tiny` "
    "or `cloudlet image import`"
)
_CONVERT_HINT = "convert it first: qemu-img convert -O qcow2 SOURCE disk.qcow2"

# Magic numbers that make a raw file believable as a disk: (offset, bytes, what).
_RAW_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (510, b"\x55\xaa", "MBR/GPT boot sector"),
    (1080, b"\x53\xef", "ext2/3/4 file system"),
    (0, b"XFSB", "XFS file system"),
    (0x10040, b"_BHRfS_M", "btrfs file system"),
    (0, b"hsqs", "squashfs"),
    (0x8001, b"CD001", "ISO 9660"),
)
_BZIMAGE_MAGIC = (0x202, b"HdrS")
_INITRD_MAGIC = (
    b"070701",  # cpio newc
    b"070702",  # cpio crc
    b"\x1f\x8b",  # gzip
    b"\xfd7zXZ\x00",  # xz
    b"\x28\xb5\x2f\xfd",  # zstd
    b"\x02\x21\x4c\x18",  # lz4 legacy
    b"BZh",  # bzip2
    b"\x5d\x00\x00",  # lzma
    b"\x89LZO",  # lzo
)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img``; a missing binary is an environment problem, not a crash."""
    return subprocess.run(
        [find_tool("qemu-img"), *args], capture_output=True, text=True, check=False
    )


def disk_info(path: Path) -> dict[str, Any]:
    """``qemu-img info --output=json`` (format probed, shared lock so running VMs don't block)."""
    r = qemu_img("info", "-U", "--output=json", str(path))
    if r.returncode != 0:
        raise InvalidInputError(
            f"{path} is not a readable disk image: {r.stderr.strip()}",
            hint="give a qcow2 or raw disk image",
        )
    info: dict[str, Any] = json.loads(r.stdout)
    return info


def check_qcow2(
    path: Path, hint: str = "the disk is corrupt; rebuild or re-import the image"
) -> None:
    """``qemu-img check``; leaked clusters (exit 3) waste space but are not corruption."""
    r = qemu_img("check", "-U", "-f", "qcow2", str(path))
    if r.returncode not in (0, 3):
        summary = [ln for ln in r.stdout.splitlines() if "error" in ln.lower()]
        summary += r.stderr.strip().splitlines()[-1:]
        raise IntegrityError(
            f"{path.name}: qcow2 check failed: {summary[0] if summary else r.returncode}",
            hint=hint,
        )


def _read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def sniff_raw(path: Path) -> str | None:
    """What a raw disk looks like (boot sector, file system), or None if nothing we know."""
    for off, magic, what in _RAW_MAGIC:
        if _read_at(path, off, len(magic)) == magic:
            return what
    return None


def _check_kernel(path: Path) -> None:
    off, magic = _BZIMAGE_MAGIC
    if _read_at(path, off, len(magic)) != magic:
        raise InvalidInputError(
            f"{path} is not a Linux kernel (bzImage)", hint="give the vmlinuz file of a kernel"
        )


def _check_initrd(path: Path) -> None:
    head = _read_at(path, 0, 8)
    if not any(head.startswith(m) for m in _INITRD_MAGIC):
        raise InvalidInputError(
            f"{path} is not an initrd (cpio, optionally compressed)",
            hint="give the initrd.img that belongs to the kernel",
        )


def _check_input_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise NotFoundError(f"{what} {path} does not exist", hint="check the path")
    if not path.is_file():
        raise InvalidInputError(f"{what} {path} is not a regular file")
    if path.stat().st_size == 0:
        raise InvalidInputError(f"{what} {path} is empty")
    return path


def _copy(src: Path, dst: Path) -> None:
    """A real copy that keeps holes (and may share extents via reflink, still a copy)."""
    r = subprocess.run(
        ["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise EnvironmentProblem(f"cannot copy {src}: {r.stderr.strip()}")


def check_ports(ports: Sequence[int]) -> list[int]:
    out = sorted(set(ports))
    for p in out:
        if not isinstance(p, int) or not 1 <= p <= 65535:
            raise InvalidInputError(f"invalid guest port {p!r}", hint="ports are 1-65535")
    return out


def check_marker(marker: str | None) -> str | None:
    if marker is not None and (not marker.strip() or any(c in marker for c in "\r\n\0")):
        raise InvalidInputError(
            f"invalid ready marker {marker!r}", hint="use a non-empty single line of text"
        )
    return marker


class ImageStore:
    """Images under ``paths.images``; every method validates names before touching paths."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def dir(self, name: str) -> Path:
        return self.paths.images / check_name(name, "image name")

    @property
    def work_root(self) -> Path:
        """Scratch space beside the images (same file system, so renames are atomic).

        Not ``paths.tmp``: ``images/`` may be a symlink to another file system. The leading dot
        keeps it out of the way of image names, which cannot start with one.
        """
        return self.paths.images / ".work"

    def exists(self, name: str) -> bool:
        return (self.dir(name) / IMAGE_MANIFEST).is_file()

    def list(self) -> list[Image]:
        """All readable images, by name. A directory with a broken manifest is skipped."""
        out: list[Image] = []
        if not self.paths.images.is_dir():
            return out
        for d in sorted(self.paths.images.iterdir()):
            if not (d / IMAGE_MANIFEST).is_file():
                continue
            with contextlib.suppress(CloudletError, ValueError, TypeError, OSError):
                out.append(self.get(d.name))
        return out

    def get(self, name: str) -> Image:
        d = self.dir(name)
        manifest = d / IMAGE_MANIFEST
        if not manifest.is_file():
            raise NotFoundError(f"no image named {name!r}", hint=_NOT_FOUND_HINT)
        try:
            data = read_json(manifest)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            img = Image.from_dict(data, d)
        except (ValueError, TypeError, InvalidInputError) as e:
            raise IntegrityError(
                f"image {name}: unreadable {IMAGE_MANIFEST}: {e}",
                hint=f"delete it with `cloudlet image delete {name}` and rebuild or re-import",
            ) from e
        if img.name != name:
            raise IntegrityError(f"image directory {name} holds a manifest for {img.name!r}")
        return img

    def delete(self, name: str) -> None:
        """Remove an image. The directory vanishes atomically, then its files are removed."""
        d = self.dir(name)
        if not d.is_dir():
            raise NotFoundError(f"no image named {name!r}", hint=_NOT_FOUND_HINT)
        from cloudlet.hypervisor.vm import VMManager  # VM disks are layered over the image

        users = VMManager(self.paths).users_of("image", name)
        if users:
            raise ConflictError(
                f"image {name!r} is used by VM(s) {', '.join(users)}",
                hint="remove those VMs first (`cloudlet vm rm ID --force`)",
            )
        self.work_root.mkdir(parents=True, exist_ok=True)
        trash = Path(tempfile.mkdtemp(prefix=f"deleted-{name}.", dir=self.work_root))
        os.rename(d, trash / name)
        shutil.rmtree(trash, ignore_errors=True)
        self._tidy()

    def verify(self, name: str) -> Image:
        """Cheap pre-boot check (no hashing): files exist and the disk is sound.

        Raises IntegrityError naming the file at fault.
        """
        img = self.get(name)
        for label, path in (
            ("kernel", img.kernel_path),
            ("initrd", img.initrd_path),
            ("disk", img.disk_path),
        ):
            if path is None:
                continue
            if not path.is_file():
                raise IntegrityError(
                    f"image {name}: {label} file {path.name} is missing",
                    hint="re-import or rebuild the image",
                )
            if path.stat().st_size == 0:
                raise IntegrityError(f"image {name}: {label} file {path.name} is empty")
        disk = img.disk_path
        if img.disk_format == "qcow2":
            info = disk_info(disk)
            if info.get("format") != "qcow2":
                raise IntegrityError(
                    f"image {name}: {disk.name} is {info.get('format')}, manifest says qcow2"
                )
            if info.get("backing-filename"):
                raise IntegrityError(f"image {name}: {disk.name} has a backing file")
            check_qcow2(disk)
        else:
            size = disk.stat().st_size
            if size % 512 or (img.disk_size and size != img.disk_size):
                raise IntegrityError(
                    f"image {name}: raw disk {disk.name} has size {size}, "
                    f"expected {img.disk_size or 'a multiple of 512'}",
                    hint="re-import the image",
                )
        return img

    @contextlib.contextmanager
    def staging(self, name: str, *, force: bool = False) -> Iterator[Path]:
        """A work directory that becomes image ``name`` when the block succeeds.

        An existing image is a ConflictError unless ``force``; then it is replaced only once
        the new one is complete.
        """
        final = self.dir(name)
        if final.exists() and not force:
            raise ConflictError(
                f"an image named {name!r} already exists",
                hint=f"choose another --name, or `cloudlet image delete {name}` first",
            )
        old: Path | None = None
        try:
            with staging_dir(final, self.work_root) as work:
                work.chmod(0o755)
                yield work
                if final.exists():
                    if not force:
                        raise ConflictError(f"an image named {name!r} appeared meanwhile")
                    old = Path(tempfile.mkdtemp(prefix=f"replaced-{name}.", dir=self.work_root))
                    os.rename(final, old / name)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            self._tidy()

    def _tidy(self) -> None:
        """Remove the scratch directory if empty (another build may still be using it)."""
        with contextlib.suppress(OSError):
            self.work_root.rmdir()

    def save(self, img: Image, directory: Path) -> None:
        atomic_write_json(directory / IMAGE_MANIFEST, img.to_dict())
        (directory / IMAGE_MANIFEST).chmod(0o644)

    def import_image(
        self,
        source: Path | str | tuple[Path | str, Path | str | None, Path | str],
        name: str,
        *,
        ports: Sequence[int] = (),
        ready_marker: str | None = None,
        cmdline: str | None = None,
        agent: bool = False,
    ) -> Image:
        """Copy a bootable disk, or a (kernel, initrd, disk) triple, into the store.

        A lone disk boots through the BIOS (kernel None). Only qcow2 without backing file or
        encryption, and raw disks that look like one, are accepted. Nothing is left behind on
        failure.
        """
        check_name(name, "image name")
        ports = check_ports(ports)
        check_marker(ready_marker)
        if isinstance(source, tuple):
            k, i, d = source
            kernel: Path | None = _check_input_file(Path(k), "kernel")
            initrd = _check_input_file(Path(i), "initrd") if i is not None else None
            disk = _check_input_file(Path(d), "disk")
        else:
            kernel = initrd = None
            disk = _check_input_file(Path(source), "disk")
            if cmdline is not None:
                raise InvalidInputError(
                    "a kernel command line needs a kernel", hint="add --kernel (and --initrd)"
                )
        if kernel is not None:
            _check_kernel(kernel)
        if initrd is not None:
            _check_initrd(initrd)
        fmt = self._check_disk(disk, bios_boot=kernel is None)
        if self.exists(name):
            raise ConflictError(
                f"an image named {name!r} already exists",
                hint=f"choose another --name, or `cloudlet image delete {name}` first",
            )

        with self.staging(name) as work:
            disk_name = f"disk.{fmt}"
            _copy(disk, work / disk_name)
            # Check the copy too: it is what we keep, and the source may have changed meanwhile.
            if self._check_disk(work / disk_name, bios_boot=kernel is None) != fmt:
                raise InvalidInputError(f"{disk} changed while it was being imported")
            kname = iname = None
            if kernel is not None:
                kname = "vmlinuz"
                shutil.copyfile(kernel, work / kname)
            if initrd is not None:
                iname = "initrd.img"
                shutil.copyfile(initrd, work / iname)
            size = int(disk_info(work / disk_name)["virtual-size"])
            raw = work / disk_name
            if fmt == "qcow2":
                raw = work / ".content.raw"
                r = qemu_img("convert", "-f", "qcow2", "-O", "raw", str(work / disk_name), str(raw))
                if r.returncode != 0:
                    raise IntegrityError(
                        f"cannot read the qcow2 disk {disk}: {r.stderr.strip()}",
                        hint="the disk is corrupt; check it with qemu-img check",
                    )
            cid = content_id(work / kname if kname else None, work / iname if iname else None, raw)
            if raw.name == ".content.raw":
                raw.unlink()
            img = Image(
                name=name,
                disk=disk_name,
                disk_format=fmt,
                content_id=cid,
                kernel=kname,
                initrd=iname,
                cmdline=cmdline,
                ports=ports,
                agent=agent,
                ready_marker=ready_marker,
                source="import",
                created=now_iso(),
                disk_size=size,
                extra={"imported_from": str(disk.resolve())},
                dir=self.dir(name),
            )
            self.save(img, work)
        return img

    def _check_disk(self, disk: Path, *, bios_boot: bool) -> str:
        """The disk's format if we accept it ("qcow2" or "raw"), else a clear error."""
        info = disk_info(disk)
        fmt = info.get("format")
        specific = info.get("format-specific", {}).get("data", {})
        if fmt == "qcow2":
            if info.get("backing-filename"):
                raise InvalidInputError(
                    f"{disk} is a qcow2 overlay with the backing file {info['backing-filename']}",
                    hint="flatten it first: qemu-img convert -O qcow2 OVERLAY flat.qcow2",
                )
            if info.get("encrypted") or specific.get("encrypt"):
                raise InvalidInputError(
                    f"{disk} is encrypted", hint="decrypt it with qemu-img convert first"
                )
            if specific.get("corrupt"):
                raise InvalidInputError(
                    f"{disk} is marked corrupt", hint="repair it with qemu-img check -r all"
                )
            check_qcow2(disk, hint="repair it with `qemu-img check -r all`, or give another disk")
            return "qcow2"
        if fmt == "raw":
            size = disk.stat().st_size
            if size % 512:
                raise InvalidInputError(
                    f"{disk} is not a disk image (size {size} is not a multiple of 512)",
                    hint="give a qcow2 or raw disk image",
                )
            what = sniff_raw(disk)
            if what is None or (bios_boot and what != "MBR/GPT boot sector"):
                raise InvalidInputError(
                    f"{disk} does not look like a "
                    + ("bootable disk (no boot sector)" if bios_boot else "disk image"),
                    hint="give a qcow2 or raw disk image"
                    + ("" if not bios_boot else ", or add --kernel/--initrd to boot it directly"),
                )
            return "raw"
        raise InvalidInputError(
            f"{disk} is a {fmt} image; only qcow2 and raw are supported", hint=_CONVERT_HINT
        )
