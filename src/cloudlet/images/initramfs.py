"""A byte-for-byte reproducible initramfs: cpio "newc" + gzip, written in pure Python.

Why hand-written: an image's content id covers its initrd, so the same inputs must give the same
bytes on every host. GNU ``cpio`` records the host's inode numbers, owners and mtimes and
follows the order of ``find``; taming it needs a GNU-only flag set plus ``touch``/``sort``
pipelines, while the newc format is a 110-byte ASCII header per entry (~50 lines here). We also
need a ``/dev/console`` device node without being root, which only a writer of our own can do.
Entries are sorted, owned by 0:0, have a fixed mtime and inode numbers given in order; gzip is
written with ``mtime=0``.
"""

from __future__ import annotations

import gzip
import lzma
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloudlet.errors import EnvironmentProblem

# Fixed timestamp for every entry: 2023-11-14T22:13:20Z (any constant would do).
FIXED_MTIME = 1_700_000_000

# The guest's driver load order. virtio is modular in Debian's cloud kernel; button + evdev let
# busybox acpid see the ACPI power button (QMP system_powerdown).
VIRTIO_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
)
POWER_BUTTON_MODULES: tuple[str, ...] = ("button", "evdev")
MODULES: tuple[str, ...] = VIRTIO_MODULES + POWER_BUTTON_MODULES

# Applets /init uses; each becomes a symlink to /bin/busybox.
INITRAMFS_APPLETS: tuple[str, ...] = (
    "cat",
    "insmod",
    "mount",
    "poweroff",
    "sh",
    "sleep",
    "switch_root",
    "usleep",
)


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``path`` is relative ("bin/sh"); a symlink's ``data`` is its target."""

    path: str
    mode: int  # full st_mode: type bits | permissions
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes

    @staticmethod
    def dir(path: str, perm: int = 0o755) -> CpioEntry:
        return CpioEntry(path, stat.S_IFDIR | perm)

    @staticmethod
    def file(path: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return CpioEntry(path, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(path: str, target: str) -> CpioEntry:
        return CpioEntry(path, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return CpioEntry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _member(
    ino: int, mode: int, nlink: int, name: str, data: bytes, rdev: tuple[int, int]
) -> bytes:
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, FIXED_MTIME, len(data), 0, 0, *rdev, len(raw_name), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    return header + raw_name + _pad4(len(header) + len(raw_name)) + data + _pad4(len(data))


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise ``entries`` as a newc archive: sorted by path, missing parent dirs added."""
    by_path: dict[str, CpioEntry] = {}
    for e in entries:
        path = e.path.strip("/")
        if not path or ".." in path.split("/"):
            raise ValueError(f"bad cpio path {e.path!r}")
        if path in by_path:
            raise ValueError(f"duplicate cpio path {path!r}")
        by_path[path] = CpioEntry(path, e.mode, e.data, e.rdev)
    for path in list(by_path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            by_path.setdefault("/".join(parts[:i]), CpioEntry.dir("/".join(parts[:i])))
    out = bytearray()
    for ino, path in enumerate(sorted(by_path), start=1):
        e = by_path[path]
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        out += _member(ino, e.mode, nlink, path, e.data, e.rdev)
    out += _member(0, 0, 1, "TRAILER!!!", b"", (0, 0))
    return bytes(out)


def gzip_deterministic(data: bytes) -> bytes:
    """gzip with mtime 0 and no file name, so equal input gives equal output."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def module_dir(kernel_root: Path) -> Path:
    """``lib/modules/<version>`` inside an unpacked linux-image .deb (usr-merged or not)."""
    for base in (kernel_root / "lib" / "modules", kernel_root / "usr" / "lib" / "modules"):
        if base.is_dir():
            versions = sorted(p for p in base.iterdir() if (p / "kernel").is_dir())
            if len(versions) == 1:
                return versions[0]
    raise EnvironmentProblem(
        f"no single lib/modules/<version>/kernel directory in {kernel_root}",
        hint="delete the unpacked kernel under <home>/cache/debs and build again",
    )


def read_module(kernel_root: Path, name: str) -> bytes:
    """The uncompressed bytes of module ``name`` (.ko, or .ko.xz/.ko.zst decompressed here)."""
    mdir = module_dir(kernel_root)
    names = (f"{name}.ko", f"{name}.ko.xz", f"{name}.ko.zst")
    found = sorted(p for p in (mdir / "kernel").rglob(f"{name}.ko*") if p.name in names)
    if not found:
        raise EnvironmentProblem(
            f"kernel module {name} not found under {mdir}",
            hint="the tiny image needs a Debian cloud kernel with modular virtio drivers",
        )
    path = found[0]
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def initramfs_entries(
    kernel_root: Path, busybox: bytes, init_script: bytes, modules: Sequence[str] = MODULES
) -> list[CpioEntry]:
    """Everything the tiny initramfs holds: busybox, a few applet links, modules, ``/init``."""
    entries = [
        CpioEntry.dir(d) for d in ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys")
    ]
    # The kernel opens /dev/console for /init before devtmpfs is mounted.
    entries.append(CpioEntry.chardev("dev/console", 5, 1))
    entries.append(CpioEntry.file("bin/busybox", busybox, 0o755))
    entries += [CpioEntry.symlink(f"bin/{a}", "busybox") for a in INITRAMFS_APPLETS]
    for m in modules:
        entries.append(CpioEntry.file(f"lib/modules/{m}.ko", read_module(kernel_root, m)))
    entries.append(CpioEntry.file("lib/modules/order", ("\n".join(modules) + "\n").encode()))
    entries.append(CpioEntry.file("init", init_script, 0o755))
    return entries


def build_initramfs(
    kernel_root: Path, busybox: bytes, init_script: bytes, modules: Sequence[str] = MODULES
) -> bytes:
    """The gzipped newc initramfs for an unpacked kernel package."""
    return gzip_deterministic(
        write_cpio(initramfs_entries(kernel_root, busybox, init_script, modules))
    )
