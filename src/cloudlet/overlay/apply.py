"""Apply an overlay as it streams in (synthesis), and describe one (``overlay info``).

:func:`apply_overlay` reads the header and manifest first and refuses an overlay for another
base before it writes anything. It then makes a sparse copy of the base RAM, and applies each
segment as soon as it has arrived and its hash matched the manifest, so synthesis overlaps
with the download. Outputs are written under hidden ``.NAME.part`` names and renamed only
after the trailer (whole-file hash) matched; on any failure they are deleted. ``devstate`` is
renamed last, so its presence means the set is complete.

Pages are written with ``pwrite``, never through a shared mmap: a write into a hole of an
mmap on a full filesystem is a SIGBUS that kills the process, a ``pwrite`` is an ENOSPC we
can clean up after.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cloudlet.errors import InvalidInputError
from cloudlet.overlay.base import BaseRef
from cloudlet.overlay.errors import OverlayBaseMismatch, OverlayIOError, OverlayOutputExists
from cloudlet.overlay.format import (
    FILE_HEADER_SIZE,
    FORMAT_VERSION,
    PAGE,
    PAGES_PER_CLUSTER,
    TRAILER,
    Kind,
    OverlayReader,
    Payload,
    RecordLimits,
    file_chunks,
    iter_records,
)
from cloudlet.overlay.qcow2 import CLUSTER, Qcow2Writer
from cloudlet.util.sparse import copy_sparse, pwrite_all, zero_range

Progress = Callable[[str, int, int], None]
OUTPUT_FILES = ("memory.ram", "disk.qcow2", "devstate")  # rename order: devstate last
_ZERO_PAGE = bytes(PAGE)
_ZERO_CLUSTER = bytes(CLUSTER)


@dataclass
class ApplyStats:
    """What apply read and wrote; ``seconds``: copy_base, read_decode, apply, finish, total."""

    base_id: str = ""
    bytes_read: int = 0
    segments: int = 0
    records: dict[str, int] = field(default_factory=dict)
    base_ram_bytes_copied: int = 0
    disk_data_clusters: int = 0
    disk_zero_clusters: int = 0
    devstate_bytes: int = 0
    hardware: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decode_s"] = self.seconds.get("read_decode", 0.0)  # flat keys for synthesis timings
        d["apply_s"] = self.seconds.get("apply", 0.0) + self.seconds.get("copy_base", 0.0)
        return d


def _pad(data: bytes, n: int) -> bytes:
    return data if len(data) == n else data + bytes(n - len(data))


def _xor(a: bytes, b: bytes | memoryview) -> bytes:
    return np.bitwise_xor(np.frombuffer(a, np.uint64), np.frombuffer(b, np.uint64)).tobytes()


class DiskBuilder:
    """Page writes onto a qcow2 being written, one cluster buffered at a time.

    A guest cluster starts as whatever it reads now (the base disk if untouched), gets its
    pages patched, and is written whole when the next cluster is touched: overlays list pages
    in ascending order, so each cluster is written once. An all-zero cluster becomes a v3 zero
    cluster instead of data.
    """

    def __init__(self, writer: Qcow2Writer, base_fd: int, base_size: int) -> None:
        self.w = writer
        self.base_fd = base_fd
        self.base_size = base_size
        self.cur = -1
        self.buf = bytearray(CLUSTER)

    def base_page(self, page: int) -> bytes:
        off = page * PAGE
        return _pad(os.pread(self.base_fd, PAGE, off) if off < self.base_size else b"", PAGE)

    def _load(self, c: int) -> None:
        self.flush()
        content = self.w.read_cluster(c)
        if content is None:
            off = c * CLUSTER
            base = os.pread(self.base_fd, CLUSTER, off) if off < self.base_size else b""
            content = _pad(base, CLUSTER)
        self.buf[:] = content
        self.cur = c

    def flush(self) -> None:
        if self.cur < 0:
            return
        c, self.cur = self.cur, -1
        if self.buf == _ZERO_CLUSTER:
            self.w.zero_clusters(c, c + 1)
        else:
            self.w.write_cluster(c, self.buf)

    def write_page(self, page: int, data: bytes | memoryview) -> None:
        c, k = divmod(page, PAGES_PER_CLUSTER)
        if c != self.cur:
            self._load(c)
        self.buf[k * PAGE : (k + 1) * PAGE] = data

    def read_page(self, page: int) -> bytes:
        c, k = divmod(page, PAGES_PER_CLUSTER)
        if c == self.cur:
            return bytes(self.buf[k * PAGE : (k + 1) * PAGE])
        content = self.w.read_cluster(c)
        if content is None:
            return self.base_page(page)
        return content[k * PAGE : (k + 1) * PAGE]

    def zero_pages(self, first: int, count: int) -> None:
        end = first + count
        c0, c1 = -(-first // PAGES_PER_CLUSTER), end // PAGES_PER_CLUSTER
        if c0 < c1:
            if c0 <= self.cur < c1:
                self.cur = -1  # its content is about to be zero anyway
            self.w.zero_clusters(c0, c1)
            edges = [*range(first, c0 * PAGES_PER_CLUSTER), *range(c1 * PAGES_PER_CLUSTER, end)]
        else:
            edges = list(range(first, end))
        for p in edges:
            self.write_page(p, _ZERO_PAGE)


class Sizes(Protocol):
    """The sizes an applier needs (a :class:`Manifest` has them; so does a handoff session)."""

    memory_size: int
    disk_size: int
    devstate_size: int


class RecordApplier:
    """Holds the open files of one apply and turns records into writes.

    Shared by overlay apply and the handoff destination: both receive the same records.
    """

    def __init__(self, manifest: Sizes, base: BaseRef, parts: dict[str, Path], backing: str):
        self.m = manifest
        self.parts = parts
        self.fds: list[int] = []
        self.writer: Qcow2Writer | None = None
        self.backing = backing
        self.base = base
        self.step = "opening the base"
        self.base_ram_fd = self._open(base.ram, os.O_RDONLY)
        self.base_disk_fd = self._open(base.disk, os.O_RDONLY)
        self.base_disk_size = os.fstat(self.base_disk_fd).st_size
        self.mem_fd = -1
        self.dev_fd = -1
        self.disk: DiskBuilder | None = None
        self.counts: dict[tuple[Kind, Payload], int] = {}

    def _open(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags, 0o644)
        self.fds.append(fd)
        return fd

    def start(self) -> int:
        """Create the outputs; returns the number of base RAM bytes copied."""
        self.step = "copying the base RAM"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        self.mem_fd = self._open(self.parts["memory.ram"], flags)
        copied = copy_sparse(self.base_ram_fd, self.mem_fd, self.m.memory_size)
        self.step = "creating the device state file"
        self.dev_fd = self._open(self.parts["devstate"], flags)
        os.ftruncate(self.dev_fd, self.m.devstate_size)
        self.step = "creating the disk layer"
        self.writer = Qcow2Writer(self.parts["disk.qcow2"], self.m.disk_size, backing=self.backing)
        self.disk = DiskBuilder(self.writer, self.base_disk_fd, self.base_disk_size)
        return copied

    def apply(self, kind: Kind, records: Iterable[tuple[Payload, int, int, memoryview]]) -> None:
        counts = self.counts
        if kind is Kind.DEVSTATE:
            self.step = "writing the device state"
            for ptype, target, _arg, data in records:
                pwrite_all(self.dev_fd, data, target)
                counts[kind, ptype] = counts.get((kind, ptype), 0) + 1
            return
        disk = self.disk
        assert disk is not None
        mem_fd, base_ram_fd = self.mem_fd, self.base_ram_fd
        if kind is Kind.MEMORY:
            self.step = "writing memory pages"
        else:
            self.step = "writing disk clusters"
        for ptype, target, arg, data in records:
            counts[kind, ptype] = counts.get((kind, ptype), 0) + 1
            if ptype == Payload.ZERO:
                if kind is Kind.MEMORY:
                    zero_range(mem_fd, target * PAGE, arg * PAGE)
                else:
                    disk.zero_pages(target, arg)
                continue
            page: bytes | memoryview
            if ptype == Payload.LITERAL:
                page = data
            elif ptype == Payload.XOR:
                if kind is Kind.MEMORY:
                    page = _xor(os.pread(base_ram_fd, PAGE, target * PAGE), data)
                else:
                    page = _xor(disk.base_page(target), data)
            elif ptype == Payload.BASE_MEM:
                page = _pad(os.pread(base_ram_fd, PAGE, arg * PAGE), PAGE)
            elif ptype == Payload.BASE_DISK:
                page = disk.base_page(arg)
            elif ptype == Payload.SELF_MEM:
                page = _pad(os.pread(mem_fd, PAGE, arg * PAGE), PAGE)
            else:  # SELF_DISK (iter_records rejects unknown types)
                page = disk.read_page(arg)
            if kind is Kind.MEMORY:
                pwrite_all(mem_fd, page, target * PAGE)
            else:
                disk.write_page(target, page)

    def finish(self, fsync: bool) -> None:
        assert self.disk is not None and self.writer is not None
        self.step = "writing the disk layer metadata"
        self.disk.flush()
        self.writer.finish(fsync=fsync)
        if fsync:
            self.step = "syncing the outputs"
            os.fsync(self.mem_fd)
            os.fsync(self.dev_fd)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def record_counts(self) -> dict[str, int]:
        return {
            f"{k.label}.{p.name.lower()}": n
            for (k, p), n in sorted(self.counts.items(), key=lambda kv: (kv[0][0], kv[0][1]))
        }


def apply_overlay(
    chunks: Iterable[bytes | bytearray | memoryview],
    base: BaseRef,
    out_dir: Path,
    *,
    backing: str,
    expected_base_id: str | None = None,
    progress: Progress | None = None,
    fsync: bool = False,
) -> ApplyStats:
    """Apply an overlay streamed as ``chunks`` onto ``base``, writing the VM into ``out_dir``.

    Produces ``memory.ram``, ``disk.qcow2`` (backing file name ``backing``, format raw) and
    ``devstate``. Raises :class:`OverlayBaseMismatch` before writing anything if the overlay
    is for another base (or not ``expected_base_id``); on any failure (corruption,
    truncation, an exception from ``chunks``, ENOSPC) deletes what it wrote and raises.
    ``fsync`` makes the outputs durable before the rename (synthesis usually starts the VM
    right away and does not need it).
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    if not backing or "\0" in backing or len(backing.encode()) > 1023:
        raise InvalidInputError(f"invalid backing file name {backing!r} (1-1023 bytes, no NUL)")
    stats = ApplyStats()
    reader = OverlayReader(chunks)
    m = reader.read_head()
    stats.base_id, stats.hardware, stats.meta = m.base_id, m.hardware, m.meta
    if expected_base_id is not None and m.base_id != expected_base_id:
        raise OverlayBaseMismatch(m.base_id, expected_base_id, "the expected base id")
    if m.base_id != base.base_id:
        raise OverlayBaseMismatch(m.base_id, base.base_id)
    for path, want, what in (
        (base.ram, m.memory_size, "RAM"),
        (base.disk, m.base_disk_size, "disk"),
    ):
        have = path.stat().st_size
        if have != want:
            raise OverlayBaseMismatch(
                m.base_id, base.base_id, f"base {what} is {have} bytes, the overlay expects {want}"
            )
    finals = {name: out_dir / name for name in OUTPUT_FILES}
    existing = [str(p) for p in finals.values() if p.exists()]
    if existing:
        raise OverlayOutputExists(f"refusing to overwrite {', '.join(existing)}")
    made_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {name: out_dir / f".{name}.part" for name in OUTPUT_FILES}
    for p in parts.values():  # leftovers of a crashed earlier attempt
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    limits = RecordLimits(
        mem_pages=m.mem_pages,
        disk_pages=m.disk_pages,
        base_mem_pages=m.mem_pages,
        base_disk_pages=-(-m.base_disk_size // PAGE),
        devstate_size=m.devstate_size,
    )
    total = FILE_HEADER_SIZE + (reader.header.manifest_length if reader.header else 0)
    total += m.segments_length + TRAILER.size
    renamed: list[Path] = []
    app: RecordApplier | None = None
    try:
        app = RecordApplier(m, base, parts, backing)
        t0 = time.perf_counter()
        stats.base_ram_bytes_copied = app.start()
        stats.seconds["copy_base"] = time.perf_counter() - t0
        t_dec = t_app = 0.0
        segs = reader.segments()
        while True:
            t0 = time.perf_counter()
            seg = next(segs, None)
            t1 = time.perf_counter()
            t_dec += t1 - t0
            if seg is None:
                break
            recs = iter_records(seg.header.kind, seg.raw, seg.header.records, limits, seg.seq)
            app.apply(seg.header.kind, recs)
            t_app += time.perf_counter() - t1
            stats.segments += 1
            if progress:
                progress("apply", reader.stream.offset, total)
        stats.seconds["read_decode"] = t_dec
        stats.seconds["apply"] = t_app
        t0 = time.perf_counter()
        reader.finish()
        app.finish(fsync)
        assert app.writer is not None
        stats.disk_data_clusters = app.writer.data_clusters
        stats.disk_zero_clusters = app.writer.zero_flagged
        app.close()
        app.step = "renaming the outputs into place"
        for name in OUTPUT_FILES:
            os.replace(parts[name], finals[name])
            renamed.append(finals[name])
        if fsync:
            dfd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        stats.seconds["finish"] = time.perf_counter() - t0
    except BaseException as e:
        step = app.step if app is not None else "opening the base"
        if app is not None:
            app.close()
        for p in [*parts.values(), *renamed]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if made_dir:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        if isinstance(e, OSError):
            raise OverlayIOError(step, e) from e
        raise
    stats.records = app.record_counts()
    stats.devstate_bytes = m.devstate_size
    stats.bytes_read = reader.stream.offset
    stats.seconds["total"] = time.perf_counter() - t_start
    return stats


def overlay_info(path: Path | str, *, verify: bool = False) -> dict[str, Any]:
    """Header, manifest summary and per-kind counts of an overlay file.

    With ``verify``, also reads every segment (hash, header, decompression, every record's
    bounds) and the trailer, raising :class:`OverlayCorrupt` naming the first bad part.
    """
    path = Path(path)
    size = path.stat().st_size
    reader = OverlayReader(file_chunks(path))
    m = reader.read_head()
    assert reader.header is not None
    expected = FILE_HEADER_SIZE + reader.header.manifest_length + m.segments_length + TRAILER.size
    kinds: dict[str, dict[str, int]] = {}
    for s in m.segments:
        k = kinds.setdefault(
            s.kind, {"segments": 0, "records": 0, "raw_bytes": 0, "stored_bytes": 0}
        )
        k["segments"] += 1
        k["records"] += s.records
        k["raw_bytes"] += s.raw
        k["stored_bytes"] += s.length
    info: dict[str, Any] = {
        "path": str(path),
        "size": size,
        "expected_size": expected,
        "format": f"{m.format[0]}.{m.format[1]}",
        "reader_format": f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}",
        "base_id": m.base_id,
        "hardware": m.hardware,
        "meta": m.meta,
        "memory_size": m.memory_size,
        "disk_size": m.disk_size,
        "base_disk_size": m.base_disk_size,
        "devstate_size": m.devstate_size,
        "features": {"required": m.features_required, "optional": m.features_optional},
        "manifest_bytes": reader.header.manifest_length,
        "segments": len(m.segments),
        "kinds": kinds,
        "totals": m.totals,
        "records": m.totals.get("records", {}),
        "created": m.created,
        "creator": m.creator,
        "verified": False,
    }
    if verify:
        limits = RecordLimits(
            mem_pages=m.mem_pages,
            disk_pages=m.disk_pages,
            base_mem_pages=m.mem_pages,
            base_disk_pages=-(-m.base_disk_size // PAGE),
            devstate_size=m.devstate_size,
        )
        counts: dict[str, int] = {}
        for seg in reader.segments():
            kind = seg.header.kind
            for ptype, *_ in iter_records(kind, seg.raw, seg.header.records, limits, seg.seq):
                key = f"{kind.label}.{ptype.name.lower()}"
                counts[key] = counts.get(key, 0) + 1
        reader.finish()
        info["records"] = dict(sorted(counts.items()))
        info["verified"] = True
    return info
