from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xxhash

from cloudlet.overlay.index import (
    ZERO_PAGE_HASH,
    PageLookup,
    load_index,
    page_index,
    save_index,
)
from cloudlet.util.sparse import copy_sparse, data_extents, zero_range

PAGE = 4096


def _sparse_file(path: Path, size: int, writes: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)


def test_page_index_matches_hashing_every_page(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rnd = rng.integers(0, 256, 3 * PAGE, dtype=np.uint8).tobytes()
    size = 64 * PAGE + 100  # a short last page, zero-padded for hashing
    f = tmp_path / "f.raw"
    _sparse_file(
        f,
        size,
        {0: rnd, 10 * PAGE: bytes(2 * PAGE), 40 * PAGE + 7: b"x", 64 * PAGE: b"tail"},
    )
    idx = page_index(f)
    data = f.read_bytes() + bytes(PAGE - 100)
    expect = [xxhash.xxh3_64_intdigest(data[i : i + PAGE]) for i in range(0, len(data), PAGE)]
    assert idx.dtype == np.uint64 and idx.shape == (65,)
    assert idx.tolist() == expect
    assert idx[20] == ZERO_PAGE_HASH  # a hole
    assert idx[10] == ZERO_PAGE_HASH  # explicit zeros


def test_save_load_and_size_check(tmp_path: Path) -> None:
    arr = np.arange(10, dtype=np.uint64)
    save_index(arr, tmp_path / "i.npy")
    assert [p.name for p in tmp_path.iterdir()] == ["i.npy"]  # no temp file left
    back = load_index(tmp_path / "i.npy", pages=10)
    assert np.array_equal(back, arr)
    with pytest.raises(ValueError, match="10 pages"):
        load_index(tmp_path / "i.npy", pages=11)
    np.save(tmp_path / "bad.npy", np.zeros((2, 2), np.uint64))
    with pytest.raises(ValueError, match="not a page index"):
        load_index(tmp_path / "bad.npy")


def test_lookup_candidates_and_vectorized_first() -> None:
    idx = np.array([7, ZERO_PAGE_HASH, 3, 7, 9, ZERO_PAGE_HASH, 3], dtype=np.uint64)
    lk = PageLookup(idx)
    assert len(lk) == 5  # zero pages are left out
    assert lk.candidates(7).tolist() == [0, 3]
    assert lk.candidates(3).tolist() == [2, 6]
    assert lk.candidates(ZERO_PAGE_HASH).tolist() == []
    assert lk.candidates(12345).tolist() == []
    got = lk.first_candidates(np.array([9, 3, 8, 7, 2**64 - 1], dtype=np.uint64))
    assert got.tolist() == [4, 2, -1, 0, -1]
    assert PageLookup(np.zeros(0, np.uint64)).first_candidates(
        np.array([1], np.uint64)
    ).tolist() == [-1]


def test_sparse_copy_keeps_holes(tmp_path: Path) -> None:
    """A 256 MiB mostly-empty RAM file copies only its 16 MiB of data; holes stay holes.

    (Its speed, ~30-60 ms here, is a benchmark figure, not a test assertion.)"""
    src, dst = tmp_path / "src.ram", tmp_path / "dst.ram"
    rng = np.random.default_rng(1)
    chunk = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    _sparse_file(src, 256 << 20, {i * (16 << 20): chunk for i in range(16)})
    with open(src, "rb") as fs, open(dst, "wb") as fd:
        copied = copy_sparse(fs.fileno(), fd.fileno(), 256 << 20)
    assert copied == 16 << 20
    assert dst.stat().st_size == 256 << 20
    assert dst.stat().st_blocks * 512 <= 20 << 20
    assert src.read_bytes() == dst.read_bytes()
    with open(dst, "rb") as f:
        assert len(data_extents(f.fileno(), 256 << 20)) == 16


def test_zero_range_punches_a_hole(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"\xff" * (1 << 20))
    fd = os.open(f, os.O_RDWR)
    try:
        zero_range(fd, 4096, 65536)
    finally:
        os.close(fd)
    data = f.read_bytes()
    assert data[:4096] == b"\xff" * 4096
    assert data[4096 : 4096 + 65536] == bytes(65536)
    assert data[4096 + 65536 :] == b"\xff" * ((1 << 20) - 4096 - 65536)
    assert f.stat().st_blocks * 512 < 1 << 20
