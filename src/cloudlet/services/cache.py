"""The post-synthesis snapshot cache: what makes a service's second start a plain resume.

After the first synthesis of a service, and before that VM is resumed (resuming changes its RAM
file), its rebuilt ``memory.ram``, ``disk.qcow2`` and ``devstate`` are copied (sparse) to::

    <home>/cache/services/<service_id>/<key>/
        memory.ram  disk.qcow2  devstate
        snapshot.json      written last: an entry without it is incomplete and ignored

``key`` names the overlay (its SHA-256) and the base id, so a changed overlay or base never
hits a stale entry. An entry is made in a staging directory and renamed into place; a server
killed while copying leaves only a staging directory, which is removed at the next start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cloudlet.config import Paths
from cloudlet.services.models import check_service_id
from cloudlet.util.fs import atomic_write_json, fsync_dir, read_json, sparse_copy

SNAPSHOT_FILES = ("memory.ram", "disk.qcow2", "devstate")
ENTRY_RECORD = "snapshot.json"


_generation = [0]  # bumped on every change made here (views that show "cached" depend on it)


def generation() -> int:
    return _generation[0]


def bump() -> None:
    _generation[0] += 1


def cache_key(overlay_sha256: str, base_id: str) -> str:
    return f"{overlay_sha256[:20]}-{base_id[:20]}"


class SnapshotCache:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.root = paths.cache / "services"

    def entry(self, sid: str, key: str) -> Path:
        if not key.replace("-", "").isalnum():
            raise ValueError(f"bad cache key {key!r}")
        return self.root / check_service_id(sid) / key

    def lookup(self, sid: str, key: str) -> dict[str, Any] | None:
        """The entry's record if it is complete, else None."""
        d = self.entry(sid, key)
        try:
            rec = read_json(d / ENTRY_RECORD)
        except (FileNotFoundError, ValueError):
            return None
        if not all((d / n).is_file() for n in SNAPSHOT_FILES):
            return None
        return dict(rec) | {"dir": str(d)}

    def store(self, sid: str, key: str, vm_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Copy a suspended VM's snapshot files into the cache (atomically, as one entry)."""
        final = self.entry(sid, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            copied = 0
            for n in SNAPSHOT_FILES:
                copied += sparse_copy(vm_dir / n, work / n)
            atomic_write_json(work / ENTRY_RECORD, record | {"bytes": copied})
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(final)
            os.rename(work, final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        bump()
        return record | {"bytes": copied}

    def restore(self, sid: str, key: str, vm_dir: Path) -> int:
        """Copy an entry's files into a new VM directory; returns the bytes copied."""
        d = self.entry(sid, key)
        n = 0
        for name in SNAPSHOT_FILES:
            n += sparse_copy(d / name, vm_dir / name)
        os.chmod(vm_dir / "memory.ram", 0o600)
        return n

    def drop(self, sid: str, key: str | None = None) -> None:
        d = self.entry(sid, key) if key else self.root / check_service_id(sid)
        shutil.rmtree(d, ignore_errors=True)
        bump()

    def clean_staging(self) -> None:
        """Remove half-made entries (a server killed while filling the cache)."""
        if not self.root.is_dir():
            return
        for svc in self.root.iterdir():
            if svc.is_dir():
                for d in svc.iterdir():
                    if d.name.startswith("."):
                        shutil.rmtree(d, ignore_errors=True)
