"""File helpers that never leave a half-written file looking valid."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A file that replaces ``path`` (fsynced) only if the block succeeds; else it vanishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, then rename over ``path``."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@contextlib.contextmanager
def staging_dir(final: Path, tmp_root: Path) -> Iterator[Path]:
    """Yield a fresh work directory that becomes ``final`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the work directory is removed, so a
    reader never sees a half-built image, base VM or overlay under its final name.
    """
    tmp_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{final.name}.", dir=tmp_root))
    try:
        yield work
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(work, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def sparse_copy(src: Path, dst: Path) -> int:
    """Copy ``src`` to a new ``dst`` keeping holes as holes; returns the data bytes copied.

    Guest RAM and disk files are mostly holes: copying only the data extents (in the kernel,
    with ``copy_file_range``) makes a 256 MiB RAM file with 40 MB in use cost 40 MB, not 256.
    """
    from cloudlet.util.sparse import copy_sparse

    with open(src, "rb") as fi, open(dst, "wb") as fo:
        return copy_sparse(fi.fileno(), fo.fileno(), os.fstat(fi.fileno()).st_size)
