"""Sparse-file helpers: find data extents, copy only data, punch holes.

Guest RAM files are mostly holes (a 2 GiB guest typically has a few hundred MiB of data), so
reading or copying them byte by byte would waste most of the time on zeros.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc: ctypes.CDLL | None = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` byte ranges that may hold data; holes read as zeros.

    Uses SEEK_DATA/SEEK_HOLE; a filesystem without them reports one extent for the whole file.
    """
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return [(0, size)] if size else []
        raise
    return out


def page_extents(
    fd: int, size: int, page: int = 4096, *, dense: float = 1.0
) -> list[tuple[int, int]]:
    """Data extents widened to whole pages and merged: ``[(first_page, end_page), ...]``.

    If at least ``dense`` of the file is allocated, returns the whole file as one extent:
    walking thousands of SEEK_DATA/SEEK_HOLE pairs then costs more than reading the holes.
    """
    if os.fstat(fd).st_blocks * 512 >= dense * size:
        return [(0, -(-size // page))] if size else []
    out: list[tuple[int, int]] = []
    for start, end in data_extents(fd, size):
        a, b = start // page, -(-end // page)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def union_extents(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge two sorted extent lists into one sorted list of disjoint extents."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(a + b):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def coalesce_extents(extents: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Merge sorted extents separated by at most ``gap`` units."""
    out: list[tuple[int, int]] = []
    for s, e in extents:
        if out and s - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def copy_sparse(src_fd: int, dst_fd: int, size: int) -> int:
    """Copy ``size`` bytes, data extents only, so holes stay holes; return bytes copied.

    ``dst_fd`` must be an empty file: it is extended with ftruncate (a hole) first.
    ``os.copy_file_range`` keeps the copy in the kernel (no user-space buffers).
    """
    os.ftruncate(dst_fd, size)
    copied = 0
    for start, end in data_extents(src_fd, size):
        off = start
        while off < end:
            try:
                n = os.copy_file_range(src_fd, dst_fd, end - off, off, off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                n = _copy_rw(src_fd, dst_fd, off, end - off)
            if n <= 0:  # source shrank under us
                return copied
            off += n
            copied += n
    return copied


def _copy_rw(src_fd: int, dst_fd: int, off: int, length: int) -> int:
    block = os.pread(src_fd, min(length, 8 << 20), off)
    pwrite_all(dst_fd, block, off)
    return len(block)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, off: int) -> None:
    """``os.pwrite`` until everything is written (it may write less, e.g. near ENOSPC)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, off)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        off += n


IOV_MAX = 1024  # Linux's limit on buffers per pwritev


def pwritev_all(fd: int, bufs: list[memoryview], off: int) -> None:
    """Write ``bufs`` back to back at ``off``: one ``pwritev`` per 1024 buffers, not one
    ``pwrite`` each (a short write finishes with :func:`pwrite_all`)."""
    for i in range(0, len(bufs), IOV_MAX):
        chunk = bufs[i : i + IOV_MAX]
        want = sum(len(b) for b in chunk)
        n = os.pwritev(fd, chunk, off)
        if n < want:
            pwrite_all(fd, b"".join(chunk)[n:], off + n)
        off += want


_ZEROS = bytes(1 << 20)


def zero_range(fd: int, off: int, length: int) -> None:
    """Make ``[off, off+length)`` read as zeros: punch a hole, or write zeros if we cannot."""
    if length <= 0:
        return
    if _libc is not None:
        r = _libc.fallocate(
            ctypes.c_int(fd),
            ctypes.c_int(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE),
            ctypes.c_longlong(off),
            ctypes.c_longlong(length),
        )
        if r == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
    end = off + length
    while off < end:
        n = min(end - off, len(_ZEROS))
        pwrite_all(fd, memoryview(_ZEROS)[:n], off)
        off += n
