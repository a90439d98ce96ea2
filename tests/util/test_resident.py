"""Holding a file's pages in memory by mapping them (``cloudlet.util.resident``).

What the kernel drops first is page cache that no process maps; ``POSIX_FADV_DONTNEED`` drops
exactly that, so it stands in for memory pressure (or this host's DAMON ``pageout`` scheme).
"""

from __future__ import annotations

import os
from pathlib import Path

from cloudlet.util.resident import ResidentFile, drop_page_cache
from helpers import PAGE, resident_pages, uncached_data_pages


def test_resident_file_holds_the_data_and_not_the_holes_until_closed(tmp_path: Path) -> None:
    f = tmp_path / "memory.ram"
    with f.open("wb") as w:  # 16 MiB, data in 20 pages, the rest holes
        w.truncate(4096 * PAGE)
        for first in (0, 2000):
            w.seek(first * PAGE)
            w.write(os.urandom(10 * PAGE))
    drop_page_cache(f)
    assert resident_pages(f) == 0
    r = ResidentFile(f)
    try:
        drop_page_cache(f)
        assert uncached_data_pages(f) == 0  # the data stays...
        assert resident_pages(f) < 1024  # ...and the holes were not read in (but read-around)
    finally:
        r.close()
    drop_page_cache(f)
    assert resident_pages(f) == 0  # released


def test_resident_file_of_an_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "empty"
    f.touch()
    r = ResidentFile(f)  # mmap refuses an empty file ("cannot mmap an empty file")
    assert r._mm is None  # nothing mapped, nothing to hold
    r.close()
    r.close()  # twice is harmless
