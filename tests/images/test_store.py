"""The image store: import (and refusals that leave nothing behind), list, get, verify, delete."""

from __future__ import annotations

import json
import random
import struct
import subprocess
from pathlib import Path

import pytest

from cloudlet.config import Paths
from cloudlet.errors import (
    CloudletError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
)
from cloudlet.images.model import IMAGE_MANIFEST, Image
from cloudlet.images.store import ImageStore


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small sample inputs, good and bad."""
    d = tmp_path_factory.mktemp("disks")
    boot = d / "boot.raw"  # a "bootable" raw disk: MBR signature
    with open(boot, "wb") as f:
        f.truncate(4 << 20)
        f.seek(446)
        f.write(bytes([0x80, 0, 2, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 1, 8191))
        f.seek(510)
        f.write(b"\x55\xaa")
    ext4 = d / "root.raw"  # a bare file system: needs a kernel to boot
    run("mke2fs", "-q", "-F", "-t", "ext4", str(ext4), "8M")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(boot), str(d / "boot.qcow2"))
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        str(d / "boot.qcow2"),
        "-F",
        "qcow2",
        str(d / "overlay.qcow2"),
    )
    corrupt = d / "corrupt.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(corrupt), "16M")
    run("qemu-io", "-c", "write -P 0xab 0 1M", str(corrupt))
    with open(corrupt, "r+b") as f:  # point the first L1 entry far past the end of the file
        f.seek(40)
        (l1,) = struct.unpack(">Q", f.read(8))
        f.seek(l1)
        f.write(struct.pack(">Q", (1 << 63) | 0x7FFF0000))
    (d / "garbage.qcow2").write_bytes(b"QFI\xfb" + b"garbage" * 100)
    (d / "text.img").write_text("this is not a disk\n")
    (d / "random.img").write_bytes(random.Random(7).randbytes(1 << 20))
    run("qemu-img", "create", "-q", "-f", "vmdk", str(d / "disk.vmdk"), "1M")
    # qcow2's own AES encryption: LUKS would time its key derivation with the thread's CPU
    # clock, which some hosts do not advance ("Unable to get accurate CPU usage").
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=abc",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0",
        str(d / "enc.qcow2"),
        "1M",
    )
    return {p.stem if p.suffix != ".qcow2" else p.name: p for p in d.iterdir()}


def leftovers(home: Paths) -> list[str]:
    return sorted(p.name for p in home.images.iterdir()) if home.images.exists() else []


def test_import_raw_bios_disk(empty_home: Paths, disks: dict[str, Path]) -> None:
    store = ImageStore(empty_home)
    img = store.import_image(disks["boot"], "bios", ports=[8080, 22], ready_marker="login:")
    assert (img.disk, img.disk_format, img.kernel, img.initrd) == ("disk.raw", "raw", None, None)
    assert img.ports == [22, 8080] and img.ready_marker == "login:" and img.source == "import"
    assert img.disk_size == 4 << 20
    copy = img.disk_path
    assert copy.read_bytes() == disks["boot"].read_bytes()
    assert copy.stat().st_ino != disks["boot"].stat().st_ino and copy.stat().st_nlink == 1
    assert not copy.is_symlink()
    assert store.get("bios") == img
    assert store.verify("bios") == img


def test_import_qcow2_same_content_id_as_raw(empty_home: Paths, disks: dict[str, Path]) -> None:
    store = ImageStore(empty_home)
    raw = store.import_image(disks["boot"], "raw")
    q = store.import_image(disks["boot.qcow2"], "q")
    assert q.disk == "disk.qcow2" and q.disk_format == "qcow2"
    assert q.content_id == raw.content_id
    assert q.disk_size == raw.disk_size
    store.verify("q")
    assert leftovers(empty_home) == ["q", "raw"]


def test_import_triple_matches_tiny(
    empty_home: Paths, fresh_tiny: Image, disks: dict[str, Path]
) -> None:
    """Importing the tiny image's own files reproduces its content id."""
    store = ImageStore(empty_home)
    assert fresh_tiny.kernel_path and fresh_tiny.initrd_path
    img = store.import_image(
        (fresh_tiny.kernel_path, fresh_tiny.initrd_path, fresh_tiny.disk_path),
        "again",
        ports=[80],
        cmdline="console=ttyS0",
        ready_marker="CLOUDLET-READY",
    )
    assert img.content_id == fresh_tiny.content_id
    assert (img.kernel, img.initrd, img.cmdline) == ("vmlinuz", "initrd.img", "console=ttyS0")
    # a bare ext4 file system is accepted with a kernel (not as a BIOS disk)
    img2 = store.import_image((fresh_tiny.kernel_path, None, disks["root"]), "fs")
    assert img2.initrd is None and img2.disk_format == "raw"
    store.verify("fs")


@pytest.mark.parametrize(
    ("disk", "error", "words"),
    [
        ("text", InvalidInputError, "not a disk image"),
        ("random", InvalidInputError, "does not look like"),
        ("root", InvalidInputError, "no boot sector"),
        ("corrupt.qcow2", IntegrityError, "check failed"),
        ("garbage.qcow2", InvalidInputError, "not a readable disk image"),
        ("overlay.qcow2", InvalidInputError, "backing file"),
        ("enc.qcow2", InvalidInputError, "encrypted"),
        ("disk", InvalidInputError, "only qcow2 and raw"),
        ("missing", NotFoundError, "does not exist"),
    ],
)
def test_import_refusals_leave_nothing(
    empty_home: Paths,
    disks: dict[str, Path],
    disk: str,
    error: type[CloudletError],
    words: str,
) -> None:
    path = disks.get(disk, disks["boot"].parent / "no-such-file.qcow2")
    with pytest.raises(error) as e:
        ImageStore(empty_home).import_image(path, "x")
    assert words in e.value.message
    assert e.value.hint  # says what to do
    assert leftovers(empty_home) == []


def test_import_refuses_bad_kernel_and_initrd(empty_home: Paths, disks: dict[str, Path]) -> None:
    store = ImageStore(empty_home)
    with pytest.raises(InvalidInputError, match="not a Linux kernel"):
        store.import_image((disks["text"], None, disks["root"]), "x")
    with pytest.raises(InvalidInputError, match="needs a kernel"):
        store.import_image(disks["boot"], "x", cmdline="quiet")
    with pytest.raises(InvalidInputError, match="port"):
        store.import_image(disks["boot"], "x", ports=[0])
    with pytest.raises(InvalidInputError, match="marker"):
        store.import_image(disks["boot"], "x", ready_marker="two\nlines")
    assert leftovers(empty_home) == []


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", ".hidden", "/abs", ""])
def test_names_cannot_escape(empty_home: Paths, disks: dict[str, Path], bad: str) -> None:
    store = ImageStore(empty_home)
    for call in (
        lambda: store.import_image(disks["boot"], bad),
        lambda: store.get(bad),
        lambda: store.delete(bad),
        lambda: store.verify(bad),
    ):
        with pytest.raises(InvalidInputError):
            call()
    assert leftovers(empty_home) == []
    assert not (empty_home.home / "escape").exists()


def test_list_get_delete(empty_home: Paths, disks: dict[str, Path]) -> None:
    store = ImageStore(empty_home)
    assert store.list() == []
    store.import_image(disks["boot"], "b")
    store.import_image(disks["boot.qcow2"], "a")
    with pytest.raises(ConflictError):
        store.import_image(disks["boot"], "a")
    # a directory with a broken manifest does not break listing
    (empty_home.images / "broken").mkdir()
    (empty_home.images / "broken" / IMAGE_MANIFEST).write_text("{not json")
    assert [i.name for i in store.list()] == ["a", "b"]
    with pytest.raises(IntegrityError):
        store.get("broken")
    with pytest.raises(NotFoundError) as e:
        store.get("nope")
    assert "cloudlet image list" in (e.value.hint or "")
    assert "cloudlet image build-tiny" in (e.value.hint or "")
    store.delete("a")
    assert [i.name for i in store.list()] == ["b"]
    with pytest.raises(NotFoundError):
        store.delete("a")
    assert leftovers(empty_home) == ["b", "broken"]


def test_manifest_cannot_point_outside(empty_home: Paths, disks: dict[str, Path]) -> None:
    store = ImageStore(empty_home)
    img = store.import_image(disks["boot"], "m")
    manifest = img.dir / IMAGE_MANIFEST
    d = json.loads(manifest.read_text())
    d["disk"] = "../../etc/passwd"
    manifest.write_text(json.dumps(d))
    with pytest.raises(IntegrityError):
        store.get("m")


def test_verify_names_the_bad_file(
    empty_home: Paths, fresh_tiny: Image, disks: dict[str, Path]
) -> None:
    store = ImageStore(empty_home)
    assert fresh_tiny.kernel_path and fresh_tiny.initrd_path
    store.import_image((fresh_tiny.kernel_path, fresh_tiny.initrd_path, disks["boot.qcow2"]), "v")
    store.verify("v")
    (store.dir("v") / "vmlinuz").unlink()
    with pytest.raises(IntegrityError, match="vmlinuz"):
        store.verify("v")

    store.import_image(disks["boot.qcow2"], "c")
    disk = store.dir("c") / "disk.qcow2"
    disk.write_bytes(disks["corrupt.qcow2"].read_bytes())
    with pytest.raises(IntegrityError, match=r"disk\.qcow2"):
        store.verify("c")

    store.import_image(disks["boot"], "r")
    with open(store.dir("r") / "disk.raw", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(IntegrityError, match=r"disk\.raw"):
        store.verify("r")
