"""Page hash indexes: one xxh3_64 per 4 KiB page of a raw file (base RAM, base disk).

An index is a plain ``uint64`` numpy array saved as ``.npy``: 2 MiB per GiB of guest data,
memory-mappable, and searchable without building a Python dict of millions of entries
(:class:`PageLookup` sorts it once and answers with ``searchsorted``). A hash match is only
a candidate: callers compare bytes before trusting it (xxh3_64 is not collision-resistant).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xxhash

from cloudlet.util.fs import atomic_writer
from cloudlet.util.sparse import page_extents

PAGE = 4096
_CHUNK = 16 << 20  # read granularity: large enough for numpy, small enough for the cache


def zero_page_hash(page: int = PAGE) -> int:
    """The hash of an all-zero page (what every hole gets)."""
    return xxhash.xxh3_64_intdigest(bytes(page))


ZERO_PAGE_HASH = zero_page_hash(PAGE)


def page_index(path: Path | str, page: int = PAGE) -> np.ndarray:
    """xxh3_64 of every ``page``-sized page of ``path`` (a short last page is zero-padded).

    Holes are not read (SEEK_DATA/SEEK_HOLE) and zero pages inside data are detected with
    numpy and not hashed, so a sparse guest RAM file costs only its data.
    """
    if page <= 0 or page % 8:
        raise ValueError(f"page size must be a positive multiple of 8, not {page}")
    zh = zero_page_hash(page)
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        n = -(-size // page)
        out = np.full(n, zh, dtype=np.uint64)
        per = max(1, _CHUNK // page)
        buf = np.zeros(per * page, dtype=np.uint8)
        mv = buf.data
        h = xxhash.xxh3_64_intdigest
        for first, end in page_extents(fd, size, page):
            for p0 in range(first, end, per):
                cnt = min(per, end - p0)
                want = cnt * page
                got = os.preadv(fd, [mv[:want]], p0 * page)
                if got < want:
                    buf[got:want] = 0
                words = buf[:want].view(np.uint64).reshape(cnt, page // 8)
                nz = np.flatnonzero(words.any(axis=1))
                if nz.size:
                    hashes = [h(mv[i * page : (i + 1) * page]) for i in nz.tolist()]
                    out[p0 + nz] = np.array(hashes, dtype=np.uint64)
    return out


def save_index(index: np.ndarray, path: Path | str) -> None:
    """Save as ``.npy`` via a temp file and rename, so a crash never leaves half an index."""
    path = Path(path)
    arr = np.ascontiguousarray(index, dtype=np.uint64)
    with atomic_writer(path) as f:
        np.save(f, arr, allow_pickle=False)


def load_index(path: Path | str, *, pages: int | None = None, mmap: bool = True) -> np.ndarray:
    """Load an index saved by :func:`save_index`; check it is 1-D uint64 (and ``pages`` long)."""
    arr: np.ndarray = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if arr.ndim != 1 or arr.dtype != np.dtype("<u8"):
        raise ValueError(f"{path}: not a page index (shape {arr.shape}, dtype {arr.dtype})")
    if pages is not None and arr.shape[0] != pages:
        raise ValueError(f"{path}: index has {arr.shape[0]} pages, the file has {pages}")
    return arr


class PageLookup:
    """Find pages of an indexed file by hash, with a sorted copy and ``searchsorted``.

    Zero pages are left out (callers handle zeros themselves), which also keeps a mostly
    empty RAM index small. Memory: 12 bytes per non-zero page (8 hash + 4 page number).
    """

    def __init__(self, index: np.ndarray, *, page: int = PAGE) -> None:
        idx = np.asarray(index, dtype=np.uint64)
        self.pages_total = int(idx.shape[0])
        keep = np.flatnonzero(idx != np.uint64(zero_page_hash(page)))
        ptype = np.uint32 if self.pages_total <= 0xFFFFFFFF else np.uint64
        hashes = idx[keep]
        order = np.argsort(hashes, kind="stable")
        self._hashes: np.ndarray = hashes[order]
        self._pages: np.ndarray = keep[order].astype(ptype)

    def __len__(self) -> int:
        return int(self._hashes.shape[0])

    def candidates(self, h: int) -> np.ndarray:
        """Page numbers whose hash is ``h`` (ascending page order), possibly empty."""
        key = np.uint64(h)
        lo = int(np.searchsorted(self._hashes, key, side="left"))
        hi = int(np.searchsorted(self._hashes, key, side="right"))
        return self._pages[lo:hi].astype(np.int64)

    def first_candidates(self, hashes: np.ndarray) -> np.ndarray:
        """For each hash, the lowest page number with that hash, or -1: one vectorized pass."""
        hs = np.asarray(hashes, dtype=np.uint64)
        if not len(self) or not hs.size:
            return np.full(hs.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self._hashes, hs, side="left")
        pos_c = np.minimum(pos, len(self) - 1)
        hit = self._hashes[pos_c] == hs
        return np.where(hit, self._pages[pos_c].astype(np.int64), np.int64(-1))
