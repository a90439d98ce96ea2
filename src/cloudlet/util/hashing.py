"""File digests, memoised by (path, size, mtime) so a resume does not re-hash a kernel."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, ino: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file; recomputed whenever the file's size, mtime or inode changes."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns, st.st_ino)
