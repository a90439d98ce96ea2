"""Apply an overlay as it streams in (synthesis), and describe one (``overlay info``).

:func:`apply_overlay` reads the header and manifest first and refuses an overlay for another
base before it writes anything. It then makes a sparse copy of the base RAM, and applies each
segment as soon as it has arrived and its hash matched the manifest, so synthesis overlaps
with the download. Outputs are written under hidden ``.NAME.part`` names and renamed only
after the trailer (whole-file hash) matched; on any failure they are deleted. ``devstate`` is
renamed last, so its presence means the set is complete. (Synthesis has them written in place
instead, into a VM directory whose record says it is still being made: see ``on_outputs``.)

Pages are written with ``pwrite``/``pwritev``, never through a shared mmap: a write into a
hole of an mmap on a full filesystem is a SIGBUS that kills the process, a ``pwrite`` is an
ENOSPC we can clean up after. Pages are only *read* through (read-only) mappings, which
allocate nothing. Records are applied in numpy batches (see :class:`RecordApplier`), not
one Python step per page: that per-page cost was most of synthesis time.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable
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
    RecordArrays,
    RecordLimits,
    Segment,
    file_chunks,
    iter_records,
    record_arrays,
)
from cloudlet.overlay.qcow2 import CLUSTER, Qcow2Writer
from cloudlet.util.resident import populate
from cloudlet.util.sparse import copy_sparse, pwrite_all, pwritev_all, zero_range

Progress = Callable[[str, int, int], None]
OUTPUT_FILES = ("memory.ram", "disk.qcow2", "devstate")  # rename order: devstate last
_ZERO_PAGE = bytes(PAGE)


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


class _PageFile:
    """Page or cluster gathers (numpy fancy indexing) from a file mapped read-only.

    Reading through a mapping allocates nothing, so writes still all go through ``pwrite``;
    it could only fault if the file shrank under us, and ours are never truncated (bases are
    read-only). Units past the end of the file read as zeros; a partial last one is padded.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        mapped = size // PAGE * PAGE
        self._mm = mmap.mmap(fd, mapped, mmap.MAP_SHARED, mmap.PROT_READ) if mapped else None
        self._u8 = (
            np.frombuffer(self._mm, np.uint8) if self._mm is not None else np.zeros(0, np.uint8)
        )

    def gather(
        self, idx: np.ndarray, unit: int = PAGE, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Unit ``idx[i]`` of the file in row ``i`` of ``out`` (or of a new array)."""
        full = len(self._u8) // unit
        view = self._u8[: full * unit].reshape(full, unit)
        if out is None:
            out = np.empty((len(idx), unit), np.uint8)
        if len(idx) == 0:
            return out
        if int(idx.max()) < full:  # ("clip": a checked index needs no buffered copy)
            return np.take(view, idx, axis=0, out=out, mode="clip")
        out[:] = 0
        inside = idx < full
        out[inside] = view[idx[inside]]
        for n in np.flatnonzero(~inside).tolist():
            off = int(idx[n]) * unit
            if off < self.size:
                data = os.pread(self.fd, unit, off)
                out[n, : len(data)] = np.frombuffer(data, np.uint8)
        return out

    def populate(self) -> None:
        """Map every page of the file now; they stay mapped until :meth:`close`."""
        if self._mm is not None:
            populate(self._mm)

    def close(self) -> None:
        self._u8 = np.zeros(0, np.uint8)
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None


_MEM_BATCH = 4096  # records per batch: at most 16 MiB of computed pages at a time
_DISK_BATCH = 1024  # disk: also at most 64 MiB of cluster buffers
_PPC = PAGES_PER_CLUSTER
_ZERO_PAGES = np.zeros((1, PAGE), np.uint8)

# One set of work arrays outlives its applier, for the next one: fresh memory costs a page
# fault per 4 KiB, about 10 us on this nested-VM host when the host has taken it back.
_SPARE_SCRATCH: list[dict[str, np.ndarray]] = []
_SPARE_LOCK = threading.Lock()
_SPARE_MAX_BYTES = 96 << 20


def _arrays_from(records: Iterable[tuple[Payload, int, int, memoryview]]) -> RecordArrays:
    """Records as :func:`iter_records` yields them, as arrays (their pages copied once)."""
    ptypes: list[int] = []
    targets: list[int] = []
    args: list[int] = []
    rows: list[int] = []
    datas: list[bytes | memoryview] = []
    for ptype, target, arg, data in records:
        ptypes.append(ptype)
        targets.append(target)
        args.append(arg)
        if len(data):
            if len(data) != PAGE:
                raise ValueError(f"page data of {len(data)} bytes")
            rows.append(len(datas))
            datas.append(data)
        else:
            rows.append(-1)
    blob = b"".join(datas)
    return RecordArrays(
        ptype=np.array(ptypes, np.uint8),
        target=np.array(targets, np.int64),
        arg=np.array(args, np.int64),
        data=np.array(rows, np.int64),
        pages=np.frombuffer(blob, np.uint8).reshape(-1, PAGE),
        buf=memoryview(blob),
        scale=PAGE,
    )


class Sizes(Protocol):
    """The sizes an applier needs (a :class:`Manifest` has them; so does a handoff session)."""

    memory_size: int
    disk_size: int
    devstate_size: int


class RecordApplier:
    """Holds the open files of one apply and turns records into writes.

    Shared by overlay apply and the handoff destination: both receive the same records.
    Records are applied in batches of up to a few thousand, with numpy rather than one
    Python step per page: a batch reads what its references need (base files and the new
    RAM through read-only mappings, in-batch references resolved to the record they point
    at), then writes each page's final content once: memory as one ``pwritev`` per run of
    consecutive pages, disk as whole clusters (a cluster starts as what it reads now: the
    base, or the layer's own data) appended in the order they were first touched. The result
    is what applying the records one by one gives, byte for byte.
    """

    def __init__(
        self,
        manifest: Sizes,
        base: BaseRef,
        parts: dict[str, Path],
        backing: str,
        *,
        disk_openable: bool = False,
    ):
        self.m = manifest
        self.disk_openable = disk_openable  # a valid qcow2 from the start (Qcow2Writer)
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
        self.maps: list[_PageFile] = []
        with _SPARE_LOCK:
            self._scratch_bufs: dict[str, np.ndarray] = (
                _SPARE_SCRATCH.pop() if _SPARE_SCRATCH else {}
            )
        self.base_ram: _PageFile  # mapped by start()
        self.base_disk: _PageFile
        self.new_ram: _PageFile
        self.counts: dict[tuple[Kind, Payload], int] = {}

    def _open(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags, 0o600)  # guest memory, device state: the user's own
        self.fds.append(fd)
        return fd

    def _scratch(self, name: str, rows: int, unit: int) -> np.ndarray:
        """A ``(rows, unit)`` work array reused from batch to batch: a new one per batch
        would cost a page fault per 4 KiB each time (expensive on this nested-VM host)."""
        buf = self._scratch_bufs.get(name)
        if buf is None or len(buf) < rows * unit:
            buf = np.empty(max(rows * unit, 1 << 20), np.uint8)
            self._scratch_bufs[name] = buf
        return buf[: rows * unit].reshape(rows, unit)

    def _map(self, fd: int, size: int) -> _PageFile:
        pf = _PageFile(fd, size)
        self.maps.append(pf)
        return pf

    def start(self) -> int:
        """Create the outputs; returns the number of base RAM bytes copied."""
        self.step = "copying the base RAM"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        self.mem_fd = self._open(self.parts["memory.ram"], flags)
        copied = copy_sparse(self.base_ram_fd, self.mem_fd, self.m.memory_size)
        self.step = "mapping the base and the new RAM"
        self.base_ram = self._map(self.base_ram_fd, os.fstat(self.base_ram_fd).st_size)
        self.base_disk = self._map(self.base_disk_fd, self.base_disk_size)
        self.new_ram = self._map(self.mem_fd, self.m.memory_size)
        self.step = "creating the device state file"
        self.dev_fd = self._open(self.parts["devstate"], flags)
        os.ftruncate(self.dev_fd, self.m.devstate_size)
        self.step = "creating the disk layer"
        self.writer = Qcow2Writer(
            self.parts["disk.qcow2"],
            self.m.disk_size,
            backing=self.backing,
            openable=self.disk_openable,
        )
        return copied

    def apply(self, kind: Kind, records: Iterable[tuple[Payload, int, int, memoryview]]) -> None:
        """Apply records as :func:`iter_records` yields them (checked), in order."""
        if kind is Kind.DEVSTATE:
            self.step = "writing the device state"
            counts = self.counts
            for ptype, target, _arg, data in records:
                pwrite_all(self.dev_fd, data, target)
                counts[kind, ptype] = counts.get((kind, ptype), 0) + 1
            return
        self.apply_arrays(kind, _arrays_from(records))

    def apply_segment(
        self, kind: Kind, raw: bytes | memoryview, count: int, limits: RecordLimits, seq: int
    ) -> None:
        """Check and apply one decoded segment; its records are parsed as arrays."""
        if kind is Kind.DEVSTATE:
            self.apply(kind, iter_records(kind, raw, count, limits, seq))
        else:
            self.apply_arrays(kind, record_arrays(kind, raw, count, limits, seq))

    def apply_arrays(self, kind: Kind, r: RecordArrays) -> None:
        """Apply checked memory or disk records, in batches cut at zero runs."""
        self.step = "writing memory pages" if kind is Kind.MEMORY else "writing disk clusters"
        n = len(r)
        for p, c in enumerate(np.bincount(r.ptype, minlength=len(Payload)).tolist()):
            if c:
                key = (kind, Payload(p))
                self.counts[key] = self.counts.get(key, 0) + c
        limit = _MEM_BATCH if kind is Kind.MEMORY else _DISK_BATCH
        a = 0
        for z in [*np.flatnonzero(r.ptype == Payload.ZERO).tolist(), n]:
            while a < z:
                b = min(a + limit, z)
                if kind is Kind.DISK:  # end on a cluster boundary (targets usually ascend)
                    cl = r.target[b - 1] // _PPC
                    stop = min(b + limit, z)
                    while b < stop and r.target[b] // _PPC == cl:
                        b += 1
                self._batch(kind, r, a, b)
                a = b
            if z < n:
                self._zero(kind, int(r.target[z]), int(r.arg[z]))
            a = z + 1

    def _zero(self, kind: Kind, first: int, count: int) -> None:
        if kind is Kind.MEMORY:
            zero_range(self.mem_fd, first * PAGE, count * PAGE)
            return
        assert self.writer is not None
        end = first + count
        c0, c1 = -(-first // _PPC), end // _PPC
        if c0 < c1:
            self.writer.zero_clusters(c0, c1)
            edges = [*range(first, c0 * _PPC), *range(c1 * _PPC, end)]
        else:
            edges = list(range(first, end))
        if edges:  # zero pages of partly covered clusters: literal writes of a zero page
            k = len(edges)
            zr = RecordArrays(
                ptype=np.full(k, Payload.LITERAL, np.uint8),
                target=np.array(edges, np.int64),
                arg=np.zeros(k, np.int64),
                data=np.zeros(k, np.int64),
                pages=_ZERO_PAGES,
                buf=memoryview(_ZERO_PAGE),
                scale=0,
            )
            self._batch(Kind.DISK, zr, 0, k)

    def _disk_page(self, page: int) -> np.ndarray:
        """The disk's current content of one page (the layer's own, or the base's)."""
        assert self.writer is not None
        c, k = divmod(page, _PPC)
        content = self.writer.read_cluster(c)
        if content is None:
            return self.base_disk.gather(np.array([page], np.int64))[0]
        return np.frombuffer(content, np.uint8, PAGE, k * PAGE)

    def _compute(
        self, kind: Kind, ptype: int, r: RecordArrays, rows: np.ndarray, out: np.ndarray
    ) -> None:
        """Into ``out``: the pages that records ``rows`` (all of type ``ptype``) write."""
        if ptype == Payload.XOR:
            base = self.base_ram if kind is Kind.MEMORY else self.base_disk
            base.gather(r.target[rows], out=out)
            np.bitwise_xor(out, r.pages[r.data[rows]], out=out)
        elif ptype == Payload.XOR_CURRENT:  # no earlier record of the batch wrote the page
            if kind is Kind.MEMORY:
                self.new_ram.gather(r.target[rows], out=out)
            else:
                for i, p in enumerate(r.target[rows].tolist()):
                    out[i] = self._disk_page(p)
            np.bitwise_xor(out, r.pages[r.data[rows]], out=out)
        elif ptype == Payload.BASE_MEM:
            self.base_ram.gather(r.arg[rows], out=out)
        elif ptype == Payload.BASE_DISK:
            self.base_disk.gather(r.arg[rows], out=out)
        elif ptype == Payload.SELF_MEM:
            self.new_ram.gather(r.arg[rows], out=out)
        else:
            assert ptype == Payload.SELF_DISK
            for i, p in enumerate(r.arg[rows].tolist()):
                out[i] = self._disk_page(p)

    def _batch(self, kind: Kind, r: RecordArrays, a: int, b: int) -> None:
        """Apply records ``a .. b-1`` (no zero runs), as if one by one.

        An xor-current record reads its page as the batch found it, so the range is cut
        before any such record whose page an earlier record of the range writes (a sender
        sends a page once per round: the cut is for hostile or odd input, not the usual case).
        """
        for s, e in itertools.pairwise([a, *self._xor_current_cuts(r, a, b), b]):
            self._batch_part(kind, r, s, e)

    @staticmethod
    def _xor_current_cuts(r: RecordArrays, a: int, b: int) -> list[int]:
        """Where to cut ``a .. b-1`` so that no part holds an xor-current record together
        with an earlier record writing the same page."""
        pt = r.ptype[a:b]
        if not np.any(pt == Payload.XOR_CURRENT):
            return []
        tg = r.target[a:b]
        order = np.lexsort((np.arange(b - a), tg))  # by page, then by position
        prev = np.full(b - a, -1, np.int64)  # the position of the previous record on the page
        same = tg[order[1:]] == tg[order[:-1]]
        prev[order[1:][same]] = order[:-1][same]
        cuts: list[int] = []
        start = 0
        for j in np.flatnonzero((pt == Payload.XOR_CURRENT) & (prev >= 0)).tolist():
            if prev[j] >= start:
                cuts.append(a + j)
                start = j
        return cuts

    def _batch_part(self, kind: Kind, r: RecordArrays, a: int, b: int) -> None:
        n = b - a
        rows = np.arange(a, b)
        pt, tg = r.ptype[a:b], r.target[a:b]
        # A reference to this batch's own space reads the latest earlier record that wrote
        # the page, if any (chains collapse); otherwise what the file holds now.
        root = np.arange(n)
        own_ref = Payload.SELF_MEM if kind is Kind.MEMORY else Payload.SELF_DISK
        refs = np.flatnonzero(pt == own_ref)
        if len(refs):
            keys = np.sort(tg * n + root)
            want = r.arg[a + refs]
            at = np.searchsorted(keys, want * n + refs) - 1
            found = keys[np.maximum(at, 0)]
            hit = (at >= 0) & (found // n == want)
            root[refs[hit]] = found[hit] % n
            while True:
                nxt = root[root]
                if np.array_equal(nxt, root):
                    break
                root = nxt
        comp = np.flatnonzero((root == np.arange(n)) & (pt != Payload.LITERAL))
        comp = comp[np.argsort(pt[comp], kind="stable")]  # one slice of tmp per type
        tmp = self._scratch("pages", len(comp), PAGE)
        tmp_row = np.full(n, -1, np.int64)
        tmp_row[comp] = np.arange(len(comp))
        cpt = pt[comp]
        cuts = [0, *(np.flatnonzero(np.diff(cpt)) + 1).tolist(), len(comp)] if len(comp) else []
        for s, e in itertools.pairwise(cuts):
            self._compute(kind, int(cpt[s]), r, rows[comp[s:e]], tmp[s:e])
        # the last record writing each page decides its content
        uniq, first_rev = np.unique(tg[::-1], return_index=True)
        src = root[n - 1 - first_rev]
        is_raw = pt[src] == Payload.LITERAL
        data_row = r.data[a + src]
        if kind is Kind.MEMORY:
            self._write_memory(uniq, is_raw, data_row, tmp_row[src], r, tmp)
        else:
            self._write_disk(tg, uniq, is_raw, data_row, tmp_row[src], r, tmp)

    def _write_memory(
        self,
        pages: np.ndarray,
        is_raw: np.ndarray,
        data_row: np.ndarray,
        tmp_row: np.ndarray,
        r: RecordArrays,
        tmp: np.ndarray,
    ) -> None:
        """Write sorted distinct ``pages``: one ``pwritev`` per run of consecutive pages."""
        buf, sc = r.buf, r.scale
        tmv = tmp.data.cast("B") if len(tmp) else memoryview(b"")
        views = [
            buf[d * sc : d * sc + PAGE] if raw else tmv[t * PAGE : (t + 1) * PAGE]
            for raw, d, t in zip(is_raw.tolist(), data_row.tolist(), tmp_row.tolist(), strict=True)
        ]
        cuts = [0, *(np.flatnonzero(np.diff(pages) != 1) + 1).tolist(), len(pages)]
        starts = pages.tolist()
        for s, e in itertools.pairwise(cuts):
            pwritev_all(self.mem_fd, views[s:e], starts[s] * PAGE)

    def _write_disk(
        self,
        targets: np.ndarray,
        pages: np.ndarray,
        is_raw: np.ndarray,
        data_row: np.ndarray,
        tmp_row: np.ndarray,
        r: RecordArrays,
        tmp: np.ndarray,
    ) -> None:
        """Patch the touched clusters with the final ``pages`` and write each whole, once."""
        assert self.writer is not None
        cu, first = np.unique(targets // _PPC, return_index=True)
        order = np.argsort(first, kind="stable")
        clusters = cu[order]  # in the order they were first touched, as one by one would
        rank = np.empty(len(cu), np.int64)
        rank[order] = np.arange(len(cu))
        crow = rank[np.searchsorted(cu, pages // _PPC)]
        buf = self._scratch("clusters", len(clusters), CLUSTER)
        partial = np.flatnonzero(np.bincount(crow, minlength=len(clusters)) < _PPC)
        if len(partial):
            buf[partial] = self._clusters_now(clusters[partial])
        dest = crow * _PPC + pages % _PPC
        flat = buf.reshape(-1, PAGE)
        if is_raw.any():
            flat[dest[is_raw]] = r.pages[data_row[is_raw]]
        if not is_raw.all():
            used = tmp_row[~is_raw]
            if len(used) == len(tmp) and len(np.unique(used)) == len(used):
                at = np.empty(len(tmp), np.int64)  # each computed page used once:
                at[used] = dest[~is_raw]  # scatter tmp as it is, no gathered copy
                flat[at] = tmp
            else:
                flat[dest[~is_raw]] = tmp[used]
        words = buf.view(np.uint64)
        maybe_zero = np.flatnonzero(~words[:, :: PAGE // 8].any(axis=1))
        zero = np.zeros(len(clusters), bool)
        if len(maybe_zero):
            zero[maybe_zero] = ~words[maybe_zero].any(axis=1)
        for c in clusters[zero].tolist():
            self.writer.zero_clusters(c, c + 1)
        if zero.any():
            self.writer.write_clusters(clusters[~zero], buf[~zero])
        else:
            self.writer.write_clusters(clusters, buf)

    def _clusters_now(self, cs: np.ndarray) -> np.ndarray:
        """What guest clusters ``cs`` read now: the layer's own data, zeros, or the base."""
        assert self.writer is not None
        out = np.empty((len(cs), CLUSTER), np.uint8)
        unallocated = self.writer.entries(cs) == 0
        if unallocated.any():
            out[unallocated] = self.base_disk.gather(cs[unallocated], CLUSTER)
        for i in np.flatnonzero(~unallocated).tolist():
            content = self.writer.read_cluster(int(cs[i]))
            assert content is not None
            out[i] = np.frombuffer(content, np.uint8)
        return out

    def keep_resident(self) -> None:
        """Map every page of the new RAM now, and keep them mapped until :meth:`close`.

        A handoff's destination writes the RAM over seconds to minutes and resumes the VM only
        then; unmapped, the RAM could leave memory meanwhile (see ``cloudlet.util.resident``)
        and the VM would start by reading it back from disk, inside the downtime. Every page,
        the holes too: the rounds write into them, and a page written there would be unmapped.
        """
        self.step = "mapping the new RAM"
        self.new_ram.populate()

    def finish(self, fsync: bool) -> None:
        assert self.writer is not None
        self.step = "writing the disk layer metadata"
        self.writer.finish(fsync=fsync)
        if fsync:
            self.step = "syncing the outputs"
            os.fsync(self.mem_fd)
            os.fsync(self.dev_fd)

    def close(self) -> None:
        for pf in self.maps:
            pf.close()
        self.maps = []
        bufs, self._scratch_bufs = self._scratch_bufs, {}
        if bufs and sum(b.nbytes for b in bufs.values()) <= _SPARE_MAX_BYTES:
            with _SPARE_LOCK:
                if not _SPARE_SCRATCH:
                    _SPARE_SCRATCH.append(bufs)
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
    on_outputs: Callable[[], None] | None = None,
) -> ApplyStats:
    """Apply an overlay streamed as ``chunks`` onto ``base``, writing the VM into ``out_dir``.

    Produces ``memory.ram``, ``disk.qcow2`` (backing file name ``backing``, format raw) and
    ``devstate``. Raises :class:`OverlayBaseMismatch` before writing anything if the overlay
    is for another base (or not ``expected_base_id``); on any failure (corruption,
    truncation, an exception from ``chunks``, ENOSPC) deletes what it wrote and raises.
    ``fsync`` makes the outputs durable before the rename (synthesis usually starts the VM
    right away and does not need it).

    ``on_outputs``: the outputs are written in place, under their final names, the disk layer
    a valid empty qcow2 from the start, and this is called (from the calling thread) as soon
    as they exist and the RAM holds the base's: synthesis starts the VM's QEMU then, waiting
    for the device state, so that its start overlaps the download. For a VM directory that is
    still ``creating`` (whose record says it holds no snapshot); on failure they are deleted
    all the same.
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
    in_place = on_outputs is not None
    parts = finals if in_place else {name: out_dir / f".{name}.part" for name in OUTPUT_FILES}
    if not in_place:  # (in place: the check above found none)
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
    segs: Generator[Segment, None, None] | None = None
    try:
        app = RecordApplier(m, base, parts, backing, disk_openable=in_place)
        t0 = time.perf_counter()
        stats.base_ram_bytes_copied = app.start()
        stats.seconds["copy_base"] = time.perf_counter() - t0
        if on_outputs is not None:
            on_outputs()
        t_dec = t_app = 0.0
        segs = reader.segments(ahead=True)
        while True:
            t0 = time.perf_counter()
            seg = next(segs, None)
            t1 = time.perf_counter()
            t_dec += t1 - t0
            if seg is None:
                break
            app.apply_segment(seg.header.kind, seg.raw, seg.header.records, limits, seg.seq)
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
        if not in_place:
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
        if segs is not None:
            segs.close()  # stops its decode worker
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
