"""The qcow2 writer is checked by qemu-img itself (check, compare, convert); the reader against
qemu-img convert of layers that qemu-io wrote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cloudlet.overlay.qcow2 import CLUSTER, Qcow2Writer, TopLayer, top_layer_extents, write_qcow2
from overlay.overlay_testlib import run

MiB = 1 << 20


def qemu_check(path: Path) -> dict[str, object]:
    r = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    assert out.get("check-errors") == 0
    assert not out.get("leaks") and not out.get("corruptions")
    return out


class GuestView:
    """The guest-visible content of an image, via ``qemu-img convert -O raw`` (sparse)."""

    def __init__(self, path: Path, tmp: Path) -> None:
        self.raw = tmp / (path.name + ".view.raw")
        run("qemu-img", "convert", "-O", "raw", str(path), str(self.raw))
        self.size = self.raw.stat().st_size

    def __getitem__(self, s: slice) -> bytes:
        start, stop, _ = s.indices(self.size)
        with open(self.raw, "rb") as f:
            f.seek(start)
            return f.read(stop - start)


def guest_view(path: Path, tmp: Path) -> GuestView:
    return GuestView(path, tmp)


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    """A 600 MiB sparse raw backing file (two L2 tables of a 64 KiB-cluster qcow2)."""
    b = tmp_path / "base.raw"
    rng = np.random.default_rng(3)
    with open(b, "wb") as f:
        f.truncate(600 * MiB)
        f.write(rng.integers(0, 256, 2 * MiB, dtype=np.uint8).tobytes())
        f.seek(599 * MiB)
        f.write(rng.integers(0, 256, MiB, dtype=np.uint8).tobytes())
    return b


def test_writer_many_l2_tables_end_clusters_and_zero_clusters(
    tmp_path: Path, backing: Path
) -> None:
    size = backing.stat().st_size
    last = size // CLUSTER - 1
    rng = np.random.default_rng(4)

    def rnd() -> bytes:
        return rng.integers(0, 256, CLUSTER, dtype=np.uint8).tobytes()

    data = {0: rnd(), 1: b"\x5a" * 1000, 8191: rnd(), 8192: rnd(), 9000: rnd(), last: rnd()}
    zero = [2, 3, 8193, last - 1]  # over base data (2, 3, last-1) and over a hole (8193)
    top = tmp_path / "top.qcow2"
    write_qcow2(top, size, backing=str(backing), data=data, zero=zero)
    qemu_check(top)
    info = json.loads(run("qemu-img", "info", "--output=json", str(top)).stdout)
    assert info["virtual-size"] == size and info["backing-filename"] == str(backing)
    assert info["backing-filename-format"] == "raw"

    exp_file = tmp_path / "expect.raw"  # the backing with the clusters patched in
    run("cp", "--sparse=always", str(backing), str(exp_file))
    with open(exp_file, "r+b") as f:
        for c, d in [*data.items(), *((c, b"") for c in zero)]:
            f.seek(c * CLUSTER)
            f.write(d + bytes(CLUSTER - len(d)))
    r = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(top), str(exp_file)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    view = guest_view(top, tmp_path)
    assert view[last * CLUSTER :] == data[last]
    assert view[8191 * CLUSTER : 8193 * CLUSTER] == data[8191] + data[8192]


def test_writer_rewrites_in_place_and_zero_after_data(tmp_path: Path, backing: Path) -> None:
    """Overwrites reuse the host cluster; zeroing an allocated cluster keeps it referenced
    (zero-allocated) so qemu-img check finds no leak."""
    size = 100 * MiB + 512  # not a multiple of the cluster size
    top = tmp_path / "t.qcow2"
    w = Qcow2Writer(top, size, backing=str(backing))
    last = -(-size // CLUSTER) - 1
    w.write_cluster(5, b"\x01" * CLUSTER)
    w.write_cluster(5, b"\x02" * 100)  # shorter rewrite: the rest must read as zeros
    w.write_cluster(6, b"\x03" * CLUSTER)
    w.zero_clusters(6, 8)  # 6 was data: zero-allocated; 7 plain zero
    w.zero_clusters(9, 10)
    w.write_cluster(9, b"\x04" * CLUSTER)  # data after zero
    w.write_cluster(last, b"\x05" * 512)  # the partial last cluster
    assert w.state(5) == "data" and w.state(6) == "zero" and w.state(7) == "zero"
    assert w.state(10) == "unallocated" and w.read_cluster(10) is None
    assert w.read_cluster(6) == bytes(CLUSTER)
    assert w.data_clusters == 4
    w.finish()
    qemu_check(top)
    view = guest_view(top, tmp_path)
    assert view.size == size
    assert view[5 * CLUSTER : 6 * CLUSTER] == b"\x02" * 100 + bytes(CLUSTER - 100)
    assert view[6 * CLUSTER : 8 * CLUSTER] == bytes(2 * CLUSTER)
    assert view[9 * CLUSTER : 10 * CLUSTER] == b"\x04" * CLUSTER
    assert view[last * CLUSTER :] == b"\x05" * 512
    with open(backing, "rb") as f:
        assert view[: 5 * CLUSTER] == f.read(5 * CLUSTER)


def test_openable_writer_is_a_valid_empty_image_from_the_start(
    tmp_path: Path, backing: Path
) -> None:
    """``openable``: QEMU can open the layer before any data arrives (a handoff's destination
    starts its QEMU early); once finished, its first tables are free space, not leaks."""
    top = tmp_path / "early.qcow2"
    w = Qcow2Writer(top, 600 * MiB, backing=str(backing), openable=True)
    out = qemu_check(top)
    assert out.get("allocated-clusters", 0) == 0
    with open(backing, "rb") as f:
        assert guest_view(top, tmp_path)[: 3 * CLUSTER] == f.read(3 * CLUSTER)
    w.write_cluster(1, b"\x09" * CLUSTER)
    w.write_cluster(8200, b"\x0a" * CLUSTER)  # the second L2 table
    w.zero_clusters(2, 3)
    w.finish()
    out = qemu_check(top)
    assert out.get("allocated-clusters") == 2
    view = guest_view(top, tmp_path)
    assert view[CLUSTER : 2 * CLUSTER] == b"\x09" * CLUSTER
    assert view[2 * CLUSTER : 3 * CLUSTER] == bytes(CLUSTER)
    assert view[8200 * CLUSTER : 8201 * CLUSTER] == b"\x0a" * CLUSTER
    with open(backing, "rb") as f:
        assert view[:CLUSTER] == f.read(CLUSTER)


def test_writer_without_backing_and_abort(tmp_path: Path) -> None:
    top = tmp_path / "solo.qcow2"
    write_qcow2(top, 4 * MiB, backing=None, data={3: b"\x07" * CLUSTER})
    qemu_check(top)
    assert guest_view(top, tmp_path)[3 * CLUSTER : 4 * CLUSTER] == b"\x07" * CLUSTER

    half = tmp_path / "half.qcow2"
    w = Qcow2Writer(half, 4 * MiB, backing=None)
    w.write_cluster(0, b"\x01" * CLUSTER)
    w.abort()  # as after a crash: no header was ever written
    assert half.read_bytes()[:4] != b"QFI\xfb"
    with pytest.raises(ValueError):
        Qcow2Writer(tmp_path / "x", 1000, backing=None)  # not a multiple of 512
    w = Qcow2Writer(tmp_path / "y", 4 * MiB, backing=None)
    with pytest.raises(ValueError):
        w.write_cluster(64, b"")  # beyond the disk
    w.abort()


def test_reader_extents_and_data_match_qemu(tmp_path: Path, backing: Path) -> None:
    top = tmp_path / "vm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(top))
    (tmp_path / "src.bin").write_bytes(np.random.default_rng(9).bytes(3 * CLUSTER))
    run(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        f"write -s {tmp_path}/src.bin 300M 192k",
        "-c",
        "write -z 10M 128k",
        "-c",
        "write -c -P 0x44 20M 64k",  # compressed: read through the raw-copy fallback
        "-c",
        f"write -P 0x99 {600 * MiB - CLUSTER} 64k",
        str(top),
    )
    ext = top_layer_extents(top)
    kinds = [(e.start, e.length, e.kind, e.compressed) for e in ext]
    assert (10 * MiB, 128 * 1024, "zero", False) in kinds
    assert (20 * MiB, CLUSTER, "data", True) in kinds
    view = guest_view(top, tmp_path)
    with TopLayer(top) as t:
        assert t.virtual_size == 600 * MiB and t.backing == str(backing)
        pieces = list(t.pieces())
        covered = 0
        for p in pieces:
            assert p.kind in ("data", "zero")
            got = t.read_piece(p, 0, p.count) if p.kind == "data" else bytes(p.count * 4096)
            assert got == view[p.first * 4096 : (p.first + p.count) * 4096]
            covered += p.count
        assert covered * 4096 == sum(e.length for e in ext)


def test_reader_partial_pages(tmp_path: Path, backing: Path) -> None:
    """A layer with 512-byte-granular subclusters reports ranges that split pages."""
    top = tmp_path / "sub.qcow2"
    run(
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on",
        "-b", str(backing), "-F", "raw", str(top),
    )  # fmt: skip
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1024 1024", str(top))
    view = guest_view(top, tmp_path)
    with TopLayer(top) as t:
        pieces = list(t.pieces())
        assert [p.kind for p in pieces] == ["partial"]
        (p,) = pieces
        with open(backing, "rb") as f:
            page = bytearray(f.read(4096))
        for off, length, e in p.parts:
            page[off : off + length] = t.read(e, p.first * 4096 + off - e.start, length)
        assert bytes(page) == view[:4096]
