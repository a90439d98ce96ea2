"""Keep a file's pages in memory by mapping them.

Page cache that no process maps is what the kernel reclaims first; some hosts page it out on
purpose after a minute idle (a DAMON ``pageout`` scheme for unmapped file pages, as on the
project's own machine). A VM's RAM file that waits (a handoff's destination during its rounds, a
standby VM paused for the next start) would then start by reading its working set back from
disk, which is exactly the latency it was prepared to avoid.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

import numpy as np

from cloudlet.util.sparse import data_extents

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14, Python >= 3.12
_PAGE = mmap.PAGESIZE


def populate(mm: mmap.mmap, extents: list[tuple[int, int]] | None = None) -> None:
    """Fault the pages of ``mm`` in now (those of ``extents``, byte ranges, if given); they
    stay mapped while ``mm`` is."""
    for start, end in [(0, len(mm))] if extents is None else extents:
        start = start // _PAGE * _PAGE
        end = min(-(-end // _PAGE) * _PAGE, len(mm))
        if end <= start:
            continue
        try:
            mm.madvise(_MADV_POPULATE_READ, start, end - start)
        except OSError:  # a kernel before 5.14: read one byte of each page instead
            int(np.frombuffer(mm, np.uint8)[start:end:_PAGE].sum())


class ResidentFile:
    """The data of ``path`` mapped read-only and faulted in, until :meth:`close`.

    Only the file's data extents: a hole costs no disk read when the VM touches it, and a
    paused VM's RAM is mostly holes (memory its guest never used).
    """

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size // _PAGE * _PAGE
            self._mm: mmap.mmap | None = (
                mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else None
            )
            extents = data_extents(fd, size)
        finally:
            os.close(fd)
        if self._mm is not None:
            populate(self._mm, extents)

    def close(self) -> None:
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None


def drop_page_cache(path: Path) -> None:
    """Drop what the kernel may drop of ``path``'s page cache (written back first): what memory
    pressure, or such a ``pageout`` scheme, does to a file nobody maps. Benchmarks and tests
    use it to show what keeping a file resident is worth."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
