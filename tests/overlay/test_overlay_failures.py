"""Every way apply can fail leaves no file of ours behind and names what went wrong:
truncation, bit flips, versions, another base, a failing download, a full disk, and crafted
files whose hashes are valid but whose numbers are hostile."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudlet.cli.overlay_cmd import app as overlay_app
from cloudlet.errors import IntegrityError, InvalidInputError
from cloudlet.overlay import (
    BaseRef,
    OverlayBaseMismatch,
    OverlayCorrupt,
    OverlayIOError,
    OverlayOutputExists,
    OverlayStreamError,
    OverlayTruncated,
    OverlayVersionError,
    apply_overlay,
    create_overlay,
    overlay_info,
)
from cloudlet.overlay.format import FILE_HEADER, OverlayReader, Payload
from cloudlet.overlay.format import Kind as K
from cloudlet.overlay.qcow2 import top_layer_extents
from overlay.conftest import Built
from overlay.overlay_testlib import MiB, craft_overlay, make_vm, our_files, rec


def layout(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """(start of the segment area, [(offset, length)] of each segment) of an overlay."""
    r = OverlayReader([data])
    m = r.read_head()
    assert r.header is not None
    start = FILE_HEADER.size + r.header.manifest_length
    return start, [(start + s.offset, s.length) for s in m.segments]


def apply_bytes(data: bytes, base: BaseRef, out: Path, chunk: int = 65536) -> None:
    chunks = (data[i : i + chunk] for i in range(0, len(data), chunk))
    apply_overlay(chunks, base, out, backing=str(base.disk))


def assert_clean(out: Path) -> None:
    assert our_files(out) == [], our_files(out)


@pytest.fixture
def data(built: Built) -> bytes:
    return built.overlay.read_bytes()


@pytest.mark.parametrize("where", ["header", "manifest", "segment", "before-trailer", "last-byte"])
def test_truncated(built: Built, data: bytes, tmp_path: Path, where: str) -> None:
    _, segs = layout(data)
    cut = {
        "header": 30,
        "manifest": FILE_HEADER.size + 10,
        "segment": segs[3][0] + 1000,
        "before-trailer": len(data) - 40,
        "last-byte": len(data) - 1,
    }[where]
    out = tmp_path / "out"
    with pytest.raises(OverlayTruncated) as e:
        apply_bytes(data[:cut], built.base, out)
    assert_clean(out)
    if where == "segment":
        assert e.value.segment == 3 and "segment 3" in str(e.value)


@pytest.mark.parametrize("which", [0, 2, -1])
def test_bit_flip_in_a_segment_names_it(
    built: Built, data: bytes, tmp_path: Path, which: int
) -> None:
    _, segs = layout(data)
    seq = which % len(segs)
    off, length = segs[seq]
    bad = bytearray(data)
    bad[off + length // 2] ^= 0x10
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OverlayCorrupt) as e:
        apply_bytes(bytes(bad), built.base, out)
    assert e.value.segment == seq
    assert f"segment {seq}" in str(e.value) and "blake3" in str(e.value)
    assert_clean(out)
    assert out.is_dir()  # a directory we did not create stays
    path = tmp_path / "bad.ovl"
    path.write_bytes(bad)
    with pytest.raises(OverlayCorrupt, match=f"segment {seq}"):
        overlay_info(path, verify=True)
    r = CliRunner().invoke(overlay_app, ["info", str(path), "--verify"])
    assert r.exit_code == IntegrityError.exit_code


def test_bit_flip_in_manifest_and_trailer(built: Built, data: bytes, tmp_path: Path) -> None:
    bad = bytearray(data)
    bad[FILE_HEADER.size + 20] ^= 0x01
    out = tmp_path / "out"
    with pytest.raises(OverlayCorrupt, match="manifest") as e:
        apply_bytes(bytes(bad), built.base, out)
    assert e.value.part == "manifest" and e.value.segment is None
    assert not out.exists()  # refused before anything was written
    bad = bytearray(data)
    bad[-5] ^= 0x01  # only noticed after every segment was applied
    with pytest.raises(OverlayCorrupt, match="trailer"):
        apply_bytes(bytes(bad), built.base, out)
    assert not out.exists()
    bad = bytearray(data)
    bad[16] ^= 0x01  # the manifest length in the header
    with pytest.raises(IntegrityError):
        apply_bytes(bytes(bad), built.base, out)
    assert not out.exists()
    with pytest.raises(OverlayCorrupt, match="after the trailer"):
        apply_bytes(data + b"junk", built.base, out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("major", "minor", "words"),
    [(2, 0, ["2.0", "1.0", "major"]), (0, 9, ["0.9", "1.0"]), (1, 1, ["1.1", "newer", "1.0"])],
)
def test_version_refused(
    built: Built, data: bytes, tmp_path: Path, major: int, minor: int, words: list[str]
) -> None:
    bad = data[:8] + struct.pack("<HH", major, minor) + data[12:]
    out = tmp_path / "out"
    with pytest.raises(OverlayVersionError) as e:
        apply_bytes(bad, built.base, out)
    for w in words:
        assert w in str(e.value)
    assert e.value.found == (major, minor) and e.value.supported == (1, 0)
    assert not out.exists()


def test_other_base_refused_before_writing(built: Built, data: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = dataclasses.replace(built.base, base_id="base-other-9")
    with pytest.raises(OverlayBaseMismatch) as e:
        apply_bytes(data, other, out)
    assert "base-synth-1" in str(e.value) and "base-other-9" in str(e.value)
    assert not out.exists()
    with pytest.raises(OverlayBaseMismatch, match="expected"):
        apply_overlay(
            [data],
            built.base,
            out,
            backing=str(built.base.disk),
            expected_base_id="base-other-9",
        )
    assert not out.exists()
    # same id, but a base RAM of another size: not the base the overlay was made for
    small = tmp_path / "small.ram"
    with open(small, "wb") as f:
        f.truncate(32 * MiB)
    with pytest.raises(OverlayBaseMismatch, match="base RAM is 33554432 bytes"):
        apply_bytes(data, dataclasses.replace(built.base, ram=small), out)
    assert not out.exists()


def test_existing_outputs_are_not_overwritten(built: Built, data: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "disk.qcow2").write_bytes(b"precious")
    with pytest.raises(OverlayOutputExists):
        apply_bytes(data, built.base, out)
    assert (out / "disk.qcow2").read_bytes() == b"precious"
    assert our_files(out) == ["disk.qcow2"]


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [ConnectionResetError("reset by peer"), Boom("http 502")])
def test_source_failing_mid_stream(
    built: Built, data: bytes, tmp_path: Path, exc: Exception
) -> None:
    def download() -> Iterator[bytes]:
        for i in range(0, len(data) // 2, 100_000):
            yield data[i : i + 100_000]
        raise exc

    out = tmp_path / "out"
    with pytest.raises(OverlayStreamError) as e:
        apply_overlay(download(), built.base, out, backing=str(built.base.disk))
    assert e.value.__cause__ is exc and str(exc) in str(e.value)
    assert not out.exists()


def test_interrupt_mid_stream_cleans_up(built: Built, data: bytes, tmp_path: Path) -> None:
    def download() -> Iterator[bytes]:
        yield data[: len(data) // 2]
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        apply_overlay(download(), built.base, out, backing=str(built.base.disk))
    assert not out.exists()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real, nearly full ext4 filesystem (loop mount; the tests run as root)."""
    img, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(96 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


def test_disk_full_cleans_up(built: Built, data: bytes, small_fs: Path) -> None:
    # room for the sparse copy of the base RAM (24 MiB of data) plus 2 MiB: the overlay's
    # memory pages and disk clusters (several MiB) cannot fit
    st = os.statvfs(small_fs)
    room = 24 * MiB + 2 * MiB
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - room)
    finally:
        os.close(fd)
    free_before = os.statvfs(small_fs).f_bavail
    out = small_fs / "vm"
    with pytest.raises(OverlayIOError) as e:
        apply_bytes(data, built.base, out)
    assert e.value.errno == errno.ENOSPC
    assert "while writing" in str(e.value) and e.value.hint and "free space" in e.value.hint
    assert not out.exists()
    assert our_files(small_fs) == ["filler", "lost+found"]
    assert os.statvfs(small_fs).f_bavail >= free_before - 16  # the space came back
    # with the filler gone, the same apply succeeds on the same filesystem
    (small_fs / "filler").unlink()
    apply_bytes(data, built.base, out)
    assert sorted(our_files(out)) == ["devstate", "disk.qcow2", "memory.ram"]
    shutil.rmtree(out)


def test_create_on_a_full_disk_leaves_nothing(built: Built, small_fs: Path, tmp_path: Path) -> None:
    # no compressed clusters: those would make qemu-img fail first (a Qcow2Error)
    vm = make_vm(built.base, tmp_path / "vm", compressed=False)
    st = os.statvfs(small_fs)
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - MiB)  # 1 MiB left
    finally:
        os.close(fd)
    with pytest.raises(OverlayIOError) as e:
        create_overlay(built.base, vm.vm_dir, small_fs / "vm.ovl", hardware={})
    assert e.value.errno == errno.ENOSPC
    assert our_files(small_fs) == ["filler", "lost+found"]


def test_bad_backing_name_refused(built: Built, data: bytes, tmp_path: Path) -> None:
    for bad in ("", "a\0b", "x" * 1024):
        with pytest.raises(InvalidInputError, match="backing"):
            apply_overlay([data], built.base, tmp_path / "out", backing=bad)
    assert not (tmp_path / "out").exists()


# -- crafted files: valid hashes, hostile numbers --------------------------------------------

PAGE_DATA = b"\x42" * 4096


@pytest.mark.parametrize(
    ("segments", "kw", "match"),
    [
        ([(K.MEMORY, rec(Payload.LITERAL, 16384, 0, PAGE_DATA), 1)], {}, "page 16384 beyond"),
        ([(K.MEMORY, rec(Payload.LITERAL, 2**63, 0, PAGE_DATA), 1)], {}, "beyond the memory"),
        ([(K.MEMORY, rec(Payload.LITERAL, 1, 0, b"x" * 100), 1)], {}, "page data of 100"),
        ([(K.MEMORY, rec(Payload.ZERO, 16000, 1000), 1)], {}, "zero run of 1000"),
        ([(K.MEMORY, rec(Payload.ZERO, 10, 0), 1)], {}, "zero run of 0"),
        ([(K.MEMORY, rec(Payload.BASE_MEM, 1, 16384), 1)], {}, "base memory page 16384"),
        ([(K.MEMORY, rec(Payload.BASE_DISK, 1, 153600), 1)], {}, "base disk page"),
        ([(K.MEMORY, rec(Payload.SELF_DISK, 1, 10**12), 1)], {}, "disk page"),
        ([(K.MEMORY, rec(9, 1), 1)], {}, "unknown payload type 9"),
        ([(K.MEMORY, rec(Payload.LITERAL, 1, 0, PAGE_DATA) + b"zz", 1)], {}, "after the last"),
        ([(K.DISK, rec(Payload.LITERAL, 153600, 0, PAGE_DATA), 1)], {}, "beyond the disk"),
        ([(K.DISK, rec(Payload.ZERO, 153599, 2), 1)], {}, "zero run of 2"),
        (
            [(K.DEVSTATE, rec(Payload.LITERAL, 100, 0, b"x" * 100), 1)],
            {"devstate_size": 150},
            "beyond device state size 150",
        ),
        ([(K.DEVSTATE, rec(Payload.XOR, 0, 0, PAGE_DATA), 1)], {"devstate_size": 4096}, "payload"),
        (
            [(K.MEMORY, rec(Payload.LITERAL, 1, 0, PAGE_DATA), 1)],
            {"header_records": {0: 3}, "segment_patch": {0: {"records": 1}}},
            "record count",
        ),
        (
            [(K.MEMORY, rec(Payload.LITERAL, 1, 0, PAGE_DATA), 1)],
            {"header_records": {0: 10**9}},
            "records=1000000000",
        ),
        ([], {"manifest_patch": {"memory_size": 1 << 60}}, "memory_size"),
        ([], {"manifest_patch": {"disk_size": 1 << 50}}, "disk_size"),
    ],
)
def test_hostile_numbers_refused(
    built: Built, tmp_path: Path, segments: list, kw: dict, match: str
) -> None:
    blob = craft_overlay(segments, **kw)
    out = tmp_path / "out"
    with pytest.raises(OverlayCorrupt, match=match):
        apply_bytes(blob, built.base, out)
    assert not out.exists()
    path = tmp_path / "crafted.ovl"
    path.write_bytes(blob)
    with pytest.raises(OverlayCorrupt, match=match):
        overlay_info(path, verify=True)


def test_crafted_valid_file_applies(built: Built, tmp_path: Path) -> None:
    """The crafting helper itself makes files apply accepts (so the refusals above are
    about the numbers, not the envelope)."""
    blob = craft_overlay(
        [
            (K.DEVSTATE, rec(Payload.LITERAL, 0, 0, b"dev"), 1),
            (K.MEMORY, rec(Payload.LITERAL, 16383, 0, PAGE_DATA), 1),
            (K.DISK, rec(Payload.ZERO, 0, 153600), 1),
        ],
        devstate_size=3,
    )
    out = tmp_path / "out"
    apply_bytes(blob, built.base, out)
    with open(out / "memory.ram", "rb") as f:
        f.seek(16383 * 4096)
        assert f.read() == PAGE_DATA
    assert (out / "devstate").read_bytes() == b"dev"
    ext = top_layer_extents(out / "disk.qcow2")
    assert [(e.start, e.length, e.kind) for e in ext] == [(0, 600 * MiB, "zero")]
