"""The cpio writer against the host's GNU cpio, and what the tiny initramfs holds."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
from pathlib import Path

import pytest

from cloudlet.images.initramfs import (
    FIXED_MTIME,
    MODULES,
    VIRTIO_MODULES,
    CpioEntry,
    gzip_deterministic,
    write_cpio,
)
from cloudlet.images.model import Image

ENTRIES = [
    CpioEntry.file("etc/motd", b"hello\n"),
    CpioEntry.dir("bin"),
    CpioEntry.file("bin/tool", b"\x7fELF" + bytes(range(256)) * 3, 0o755),
    CpioEntry.symlink("bin/sh", "tool"),
    CpioEntry.chardev("dev/console", 5, 1),
    CpioEntry.file("empty", b""),
]


def cpio_list(archive: bytes, verbose: bool = False) -> list[str]:
    """Parse ``archive`` with the host's GNU cpio."""
    argv = ["cpio", "-t", "--quiet"] + (["-v"] if verbose else [])
    r = subprocess.run(argv, input=archive, capture_output=True, check=True)
    return r.stdout.decode().splitlines()


def test_cpio_is_deterministic_and_sorted() -> None:
    a = write_cpio(ENTRIES)
    b = write_cpio(list(reversed(ENTRIES)))
    assert a == b
    names = cpio_list(a)
    assert names == sorted(names)
    assert names == ["bin", "bin/sh", "bin/tool", "dev", "dev/console", "empty", "etc", "etc/motd"]
    assert len(a) % 4 == 0


def test_cpio_header_fields() -> None:
    a = write_cpio(ENTRIES)
    assert a.startswith(b"070701")
    inos, pos = [], 0
    while True:
        hdr = a[pos : pos + 110]
        fields = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, _nlink, mtime, size = fields[:7]
        namesize = fields[11]
        name = a[pos + 110 : pos + 110 + namesize - 1].decode()
        if name == "TRAILER!!!":
            break
        assert (uid, gid, mtime) == (0, 0, FIXED_MTIME)
        if name == "dev/console":
            assert stat.S_ISCHR(mode) and (fields[9], fields[10]) == (5, 1)
        inos.append(ino)
        pos += 110 + namesize
        pos += -pos % 4
        pos += size + (-size % 4)
    assert inos == list(range(1, len(inos) + 1))


def test_cpio_extracts_with_gnu_cpio(tmp_path: Path) -> None:
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames"],
        input=write_cpio([e for e in ENTRIES if e.path != "dev/console"]),
        cwd=tmp_path,
        check=True,
    )
    assert (tmp_path / "etc/motd").read_bytes() == b"hello\n"
    assert (tmp_path / "bin/tool").read_bytes() == ENTRIES[2].data
    assert os.readlink(tmp_path / "bin/sh") == "tool"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "empty").stat().st_size == 0


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/", ""])
def test_cpio_refuses_escaping_paths(bad: str) -> None:
    with pytest.raises(ValueError):
        write_cpio([CpioEntry.file(bad, b"x")])


def test_cpio_refuses_duplicates() -> None:
    with pytest.raises(ValueError):
        write_cpio([CpioEntry.file("a", b"1"), CpioEntry.file("/a", b"2")])


def test_gzip_is_deterministic() -> None:
    data = write_cpio(ENTRIES)
    g = gzip_deterministic(data)
    assert g == gzip_deterministic(data)
    assert g[4:8] == b"\0\0\0\0"  # mtime
    assert gzip.decompress(g) == data


def test_tiny_initramfs_contents(fresh_tiny: Image) -> None:
    assert fresh_tiny.initrd_path is not None
    archive = gzip.decompress(fresh_tiny.initrd_path.read_bytes())
    names = set(cpio_list(archive))
    for m in MODULES:
        assert f"lib/modules/{m}.ko" in names
    assert {"init", "bin/busybox", "bin/sh", "bin/switch_root", "dev/console"} <= names
    console = next(ln for ln in cpio_list(archive, verbose=True) if ln.endswith(" dev/console"))
    assert console.startswith("crw")
    assert VIRTIO_MODULES[:2] == ("virtio_ring", "virtio")


def test_tiny_initramfs_unpacks(fresh_tiny: Image, tmp_path: Path) -> None:
    assert fresh_tiny.initrd_path is not None
    archive = gzip.decompress(fresh_tiny.initrd_path.read_bytes())
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "--nonmatching", "dev/*"],
        input=archive,
        cwd=tmp_path,
        check=True,
    )
    order = (tmp_path / "lib/modules/order").read_text().split()
    assert order == list(MODULES)
    for m in order:
        ko = (tmp_path / f"lib/modules/{m}.ko").read_bytes()
        assert ko.startswith(b"\x7fELF"), m  # uncompressed, loadable by busybox insmod
    init = (tmp_path / "init").read_text()
    assert init.startswith("#!/bin/sh") and "switch_root" in init and "poweroff -f" in init
    assert (tmp_path / "init").stat().st_mode & 0o111
    bb = (tmp_path / "bin/busybox").read_bytes()
    assert bb.startswith(b"\x7fELF")
