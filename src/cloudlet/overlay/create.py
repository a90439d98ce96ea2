"""Make an overlay: what a VM has that its base VM lacks, as one verifiable file.

Phases (each timed in :class:`CreateStats`):

1. device state: the QEMU migration stream, as literal records (it is small);
2. memory: compare the VM's RAM file with the base RAM, page by page, with numpy over mmaps,
   only inside the data extents of either file (holes on both sides are equal);
3. disk: the qcow2 top layer's own clusters (``qemu-img map`` depth 0), compared page by page
   with the base disk at the same offset.

Every changed page then becomes the cheapest record that reproduces it: ZERO (runs), a
reference to an identical base page (memory or disk, found through the page hash indexes and
confirmed byte for byte, since the base is local), a reference to an earlier record of this
overlay (xxh3_128 of the content: collisions are ~n^2/2^129, negligible), an XOR-delta against
the base page at the same offset when few 8-byte words differ, else a literal. Records are
packed into ~1 MiB segments that a thread pool compresses with zstd (which releases the GIL)
while the main thread keeps classifying pages.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import datetime
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import blake3
import numpy as np
import xxhash

from cloudlet import __version__
from cloudlet.overlay.base import BaseRef
from cloudlet.overlay.codecs import CODECS, NoneCodec, ZstdCodec
from cloudlet.overlay.errors import OverlayInputError, OverlayIOError
from cloudlet.overlay.format import (
    FORMAT_VERSION,
    MAX_DEVSTATE,
    MAX_DEVSTATE_RECORD,
    MAX_DISK,
    MAX_MEMORY,
    PAGE,
    PAGES_PER_CLUSTER,
    RECORD,
    SEGMENT_TARGET,
    SEGMENT_VERSION,
    TRAILER,
    TRAILER_MAGIC,
    FileHeader,
    Kind,
    Manifest,
    Payload,
    SegmentEntry,
    SegmentHeader,
)
from cloudlet.overlay.index import PageLookup, load_index
from cloudlet.overlay.qcow2 import PagePiece, TopLayer
from cloudlet.util.resident import populate
from cloudlet.util.sparse import coalesce_extents, page_extents, union_extents

Progress = Callable[[str, int, int], None]

# An XOR page compresses to roughly its differing words, a literal to the whole page over
# zstd's ratio on RAM (~2.2x, so ~1.8 KiB): XOR wins when under ~1/4 of the 512 words differ.
XOR_MAX_WORDS = 128
_EXAMINE_PAGES = 4096  # 16 MiB per numpy compare step
_EXTENT_GAP_PAGES = 256  # merge data extents less than 1 MiB apart
_DISK_READ_PAGES = 2048  # 8 MiB per pread of qcow2 data
_WORDS = PAGE // 8


@dataclass
class CreateStats:
    """What create examined and produced; ``seconds`` per phase."""

    memory_bytes_examined: int = 0
    disk_bytes_examined: int = 0
    changed_pages: int = 0
    changed_disk_pages: int = 0
    zero_pages: int = 0  # of the changed pages, those that read as zeros (no hashing, no bytes)
    changed_clusters: int = 0
    records: dict[str, int] = field(default_factory=dict)
    raw_bytes: int = 0
    stored_bytes: int = 0
    file_bytes: int = 0
    segments: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_examined(self) -> int:
        return self.memory_bytes_examined + self.disk_bytes_examined

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bytes_examined"] = self.bytes_examined
        return d


# -- segment packing and compression -------------------------------------------------------------


def _seal_segment(seq: int, kind: Kind, nrec: int, raw: bytes, level: int) -> tuple[bytes, str]:
    """Compress one segment (in a worker thread); fall back to no codec if zstd does not help."""
    codec: type[NoneCodec] | type[ZstdCodec] = ZstdCodec
    stored = CODECS[ZstdCodec.ID].compress(raw, level)
    if len(stored) >= len(raw):
        codec, stored = NoneCodec, raw
    hdr = SegmentHeader(SEGMENT_VERSION, codec.ID, kind, seq, nrec, len(raw), len(stored)).pack()
    h = blake3.blake3(hdr)
    h.update(stored)
    return hdr + stored, h.hexdigest()


class _Packer:
    """Collects records into ~1 MiB segments. A pool compresses them; one writer thread
    spools them in order (FIFO), so neither compression nor a slow disk stalls the caller
    until ``inflight`` segments are pending."""

    def __init__(
        self,
        pool: cf.ThreadPoolExecutor,
        writer: cf.ThreadPoolExecutor,
        level: int,
        spool: IO[bytes],
        inflight: int,
    ) -> None:
        self.pool, self.writer, self.level, self.spool = pool, writer, level, spool
        self.inflight = inflight
        self.kind = Kind.DEVSTATE
        self.buf = bytearray()
        self.nrec = 0
        self.seq = 0
        self.pending: collections.deque[cf.Future[None]] = collections.deque()
        self.entries: list[SegmentEntry] = []
        self.offset = 0
        self.raw_bytes = 0
        self.counts = np.zeros((len(Kind) + 1, len(Payload)), dtype=np.int64)
        self.wait_seconds = 0.0

    def begin(self, kind: Kind) -> None:
        if kind != self.kind:
            self.seal()
            self.kind = kind

    def add(self, ptype: int, target: int, arg: int = 0, data: bytes = b"") -> None:
        self.buf += RECORD.pack(ptype, 0, 0, len(data), target, arg)
        if data:
            self.buf += data
        self.nrec += 1
        self.counts[self.kind, ptype] += 1
        if len(self.buf) >= SEGMENT_TARGET:
            self.seal()

    def seal(self) -> None:
        if not self.nrec:
            return
        raw, self.buf = bytes(self.buf), bytearray()
        fut = self.pool.submit(_seal_segment, self.seq, self.kind, self.nrec, raw, self.level)
        self.pending.append(self.writer.submit(self._write, self.kind, self.nrec, len(raw), fut))
        self.seq += 1
        self.raw_bytes += len(raw)
        self.nrec = 0
        while len(self.pending) > self.inflight:
            self._wait_one()

    def _write(
        self, kind: Kind, nrec: int, raw_len: int, fut: cf.Future[tuple[bytes, str]]
    ) -> None:
        """In the writer thread, in submission order."""
        data, digest = fut.result()
        try:
            self.spool.write(data)
        except OSError as e:
            raise OverlayIOError("spooling compressed segments", e) from e
        self.entries.append(SegmentEntry(kind.label, self.offset, len(data), digest, nrec, raw_len))
        self.offset += len(data)

    def _wait_one(self) -> None:
        t0 = time.perf_counter()
        self.pending.popleft().result()
        self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        self.seal()
        while self.pending:
            self._wait_one()

    def record_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in Kind:
            for p in Payload:
                n = int(self.counts[kind, p])
                if n:
                    out[f"{kind.label}.{p.name.lower()}"] = n
        return out


# -- page classification -------------------------------------------------------------------------


class _Encoder:
    """Turns changed pages into records (see the module docstring for the order of choice)."""

    def __init__(
        self,
        packer: _Packer,
        base_ram: np.ndarray,
        base_disk_fd: int,
        base_disk_size: int,
        mem_lookup: PageLookup,
        disk_lookup: PageLookup,
    ) -> None:
        self.packer = packer
        self.base_ram = base_ram
        self.base_disk_fd = base_disk_fd
        self.base_disk_size = base_disk_size
        self.mem_lookup = mem_lookup
        self.disk_lookup = disk_lookup
        self.seen: dict[int, int] = {}  # xxh3_128 -> page * 2 + (1 if disk)
        self.zero_pages = 0

    def _base_mem_page(self, p: int) -> bytes:
        page: bytes = self.base_ram[p].tobytes()
        return page

    def _base_disk_page(self, p: int) -> bytes:
        data = os.pread(self.base_disk_fd, PAGE, p * PAGE)
        return data if len(data) == PAGE else data + bytes(PAGE - len(data))

    def _find_base(
        self, kind: Kind, page: bytes, h: int, cand_mem: int, cand_disk: int
    ) -> tuple[Payload, int] | None:
        """``(Payload, base page)`` of a byte-identical base page, or None."""
        order = (
            (Payload.BASE_MEM, cand_mem, self.mem_lookup, self._base_mem_page),
            (Payload.BASE_DISK, cand_disk, self.disk_lookup, self._base_disk_page),
        )
        if kind is Kind.DISK:
            order = order[::-1]
        for ptype, cand, lookup, read in order:
            if cand < 0:
                continue
            if read(cand) == page:
                return ptype, cand
            for c in lookup.candidates(h)[:8].tolist():  # a rare xxh3_64 collision
                if c != cand and read(c) == page:
                    return ptype, c
        return None

    def encode(
        self, kind: Kind, page_nos: np.ndarray, pages: np.ndarray, base_pages: np.ndarray
    ) -> None:
        """Emit records for ``pages`` (k x 4096 uint8), each known to differ from its base page."""
        k = int(page_nos.shape[0])
        if not k:
            return
        pk = self.packer
        pk.begin(kind)
        w = pages.reshape(k, PAGE).view(np.uint64)
        bw = base_pages.reshape(k, PAGE).view(np.uint64)
        nonzero = np.asarray(w.any(axis=1))
        xor_ok = (np.count_nonzero(w != bw, axis=1) <= XOR_MAX_WORDS) & bw.any(axis=1)
        flat = np.ascontiguousarray(pages).reshape(-1).data
        nz_idx = np.flatnonzero(nonzero)
        self.zero_pages += k - int(nz_idx.size)
        h64f = xxhash.xxh3_64_intdigest
        h64 = np.array(
            [h64f(flat[i * PAGE : (i + 1) * PAGE]) for i in nz_idx.tolist()], dtype=np.uint64
        )
        cmem = self.mem_lookup.first_candidates(h64).tolist()
        cdisk = self.disk_lookup.first_candidates(h64).tolist()
        h64l = h64.tolist()
        h128f = xxhash.xxh3_128_intdigest
        seen = self.seen
        is_disk = 1 if kind is Kind.DISK else 0
        add = pk.add
        pn: list[int] = page_nos.tolist()
        nzl: list[bool] = nonzero.tolist()
        xol: list[bool] = xor_ok.tolist()
        run_start, run_len = -1, 0
        j = 0
        for i in range(k):
            p = pn[i]
            if not nzl[i]:
                if run_len and p == run_start + run_len:
                    run_len += 1
                else:
                    if run_len:
                        add(Payload.ZERO, run_start, run_len)
                    run_start, run_len = p, 1
                continue
            page = flat[i * PAGE : (i + 1) * PAGE].tobytes()
            found = None
            if cmem[j] >= 0 or cdisk[j] >= 0:
                found = self._find_base(kind, page, h64l[j], cmem[j], cdisk[j])
            j += 1
            if found is not None:
                add(found[0], p, found[1])
                continue
            h = h128f(page)
            loc = seen.get(h)
            if loc is not None:
                add(Payload.SELF_DISK if loc & 1 else Payload.SELF_MEM, p, loc >> 1)
                continue
            seen[h] = p * 2 + is_disk
            if xol[i]:
                add(Payload.XOR, p, 0, (w[i] ^ bw[i]).tobytes())
            else:
                add(Payload.LITERAL, p, 0, page)
        if run_len:
            add(Payload.ZERO, run_start, run_len)


# -- phases --------------------------------------------------------------------------------------


def _encode_devstate(path: Path, packer: _Packer) -> int:
    size = path.stat().st_size
    if size > MAX_DEVSTATE:
        raise OverlayInputError(f"{path} is {size} bytes, more than the {MAX_DEVSTATE} limit")
    packer.begin(Kind.DEVSTATE)
    with open(path, "rb") as f:
        off = 0
        while chunk := f.read(MAX_DEVSTATE_RECORD):
            packer.add(Payload.LITERAL, off, 0, chunk)
            off += len(chunk)
    packer.seal()
    return size


def _map_pages(path: Path, size: int) -> tuple[mmap.mmap, np.ndarray]:
    """A read-only ``(pages, 4096)`` uint8 view of a file through mmap (no copy, no
    per-slice overhead of ``np.memmap``); the mapping lives as long as the array."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    return mm, np.frombuffer(mm, dtype=np.uint8).reshape(-1, PAGE)


def _encode_memory(
    vm_ram: Path,
    base_ram_path: Path,
    base_mm: mmap.mmap,
    base2: np.ndarray,
    enc: _Encoder,
    stats: CreateStats,
    progress: Progress | None,
) -> None:
    size = base2.shape[0] * PAGE
    vm_mm, vm2 = _map_pages(vm_ram, size)
    with open(vm_ram, "rb") as fv, open(base_ram_path, "rb") as fb:
        extents = union_extents(
            page_extents(fv.fileno(), size, dense=0.5), page_extents(fb.fileno(), size, dense=0.5)
        )
    # Comparing a short gap of holes costs less than a numpy call per tiny extent (guest
    # RAM is often fragmented into thousands of extents).
    extents = coalesce_extents(extents, _EXTENT_GAP_PAGES)
    neq = np.empty((_EXAMINE_PAGES, _WORDS), dtype=bool)
    t_exam = t_enc = cpu_exam = 0.0
    for a, b in extents:
        for p0 in range(a, b, _EXAMINE_PAGES):
            t0, c0 = time.perf_counter(), time.thread_time()
            n = min(_EXAMINE_PAGES, b - p0)
            # Map the range in one call: page faults one by one cost more than the compare
            # itself (measured 2.2-3.2 GB/s faulting vs 3.4-3.9 GB/s populated, 7 GB/s warm).
            span = [(p0 * PAGE, (p0 + n) * PAGE)]
            populate(vm_mm, span)
            populate(base_mm, span)
            np.not_equal(
                vm2[p0 : p0 + n].view(np.uint64), base2[p0 : p0 + n].view(np.uint64), out=neq[:n]
            )
            changed = np.flatnonzero(neq[:n].any(axis=1))
            stats.memory_bytes_examined += n * PAGE
            t1 = time.perf_counter()
            t_exam += t1 - t0
            cpu_exam += time.thread_time() - c0
            if changed.size:
                idx = changed + p0
                stats.changed_pages += int(changed.size)
                enc.encode(Kind.MEMORY, idx, vm2[idx], base2[idx])
                t_enc += time.perf_counter() - t1
            if progress:
                progress("memory", (p0 + n) * PAGE, size)
    stats.seconds["memory_examine"] = t_exam
    stats.seconds["memory_examine_cpu"] = cpu_exam  # tells a busy host from a slow compare
    stats.seconds["memory_encode"] = t_enc


def _encode_disk(
    top: TopLayer,
    base_disk_fd: int,
    base_disk_size: int,
    enc: _Encoder,
    stats: CreateStats,
    progress: Progress | None,
) -> None:
    clusters: list[np.ndarray] = []
    zero_ranges: list[tuple[int, int]] = []
    total = -(-top.virtual_size // PAGE)
    t_exam = t_enc = 0.0

    def base_pages(first: int, n: int) -> np.ndarray:
        off = first * PAGE
        data = os.pread(base_disk_fd, n * PAGE, off) if off < base_disk_size else b""
        buf = np.zeros(n * PAGE, dtype=np.uint8)
        buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        return buf.reshape(n, PAGE)

    def compare_encode(first: int, vm: np.ndarray, base: np.ndarray) -> None:
        nonlocal t_exam, t_enc
        t0 = time.perf_counter()
        n = vm.shape[0]
        changed = np.flatnonzero((vm.view(np.uint64) != base.view(np.uint64)).any(axis=1))
        stats.disk_bytes_examined += n * PAGE
        t1 = time.perf_counter()
        t_exam += t1 - t0
        if changed.size:
            stats.changed_disk_pages += int(changed.size)
            idx = changed + first
            clusters.append(np.unique(idx // PAGES_PER_CLUSTER))
            enc.encode(Kind.DISK, idx, vm[changed], base[changed])
            t_enc += time.perf_counter() - t1

    enc.packer.begin(Kind.DISK)
    piece: PagePiece
    for piece in top.pieces():
        if piece.kind == "zero":
            enc.packer.begin(Kind.DISK)
            enc.packer.add(Payload.ZERO, piece.first, piece.count)
            stats.changed_disk_pages += piece.count
            stats.zero_pages += piece.count
            end = piece.first + piece.count
            zero_ranges.append((piece.first // PAGES_PER_CLUSTER, -(-end // PAGES_PER_CLUSTER)))
        elif piece.kind == "data":
            for rel in range(0, piece.count, _DISK_READ_PAGES):
                n = min(_DISK_READ_PAGES, piece.count - rel)
                t0 = time.perf_counter()
                vm = np.frombuffer(top.read_piece(piece, rel, n), dtype=np.uint8).reshape(n, PAGE)
                base = base_pages(piece.first + rel, n)
                t_exam += time.perf_counter() - t0
                compare_encode(piece.first + rel, vm, base)
        else:  # a page the top layer covers only in part: the rest is the backing (base)
            base = base_pages(piece.first, 1)
            vm = base.copy()
            for off, length, ext in piece.parts:
                rel = piece.first * PAGE + off - ext.start
                vm[0, off : off + length] = np.frombuffer(top.read(ext, rel, length), np.uint8)
            compare_encode(piece.first, vm, base)
        if progress:
            progress("disk", piece.first + piece.count, total)
    stats.seconds["disk_examine"] = t_exam
    stats.seconds["disk_encode"] = t_enc
    stats.changed_clusters = _count_clusters(clusters, zero_ranges)


def _count_clusters(clusters: list[np.ndarray], zero_ranges: list[tuple[int, int]]) -> int:
    """Number of distinct clusters touched by data pages or zero runs."""
    data = np.unique(np.concatenate(clusters)) if clusters else np.zeros(0, np.int64)
    merged: list[tuple[int, int]] = []
    for a, b in sorted(zero_ranges):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    n = sum(b - a for a, b in merged)
    if merged and data.size:
        starts = np.array([a for a, _ in merged])
        ends = np.array([b for _, b in merged])
        pos = np.searchsorted(starts, data, side="right") - 1
        inside = (pos >= 0) & (data < ends[np.maximum(pos, 0)])
        n += int(np.count_nonzero(~inside))
    else:
        n += int(data.size)
    return n


# -- assembly ------------------------------------------------------------------------------------


def _assemble(out_fd: int, manifest: Manifest, spool: IO[bytes], progress: Progress | None) -> int:
    """Write header, manifest, the spooled segments and the trailer; return the file size."""
    mbytes = manifest.to_bytes()
    header = FileHeader(
        FORMAT_VERSION[0], FORMAT_VERSION[1], 0, len(mbytes), blake3.blake3(mbytes).digest()
    ).pack()
    whole = blake3.blake3(header)
    whole.update(mbytes)
    with os.fdopen(os.dup(out_fd), "wb", buffering=1 << 20) as out:
        out.write(header)
        out.write(mbytes)
        total = manifest.segments_length
        spool.seek(0)
        done = 0
        buf = bytearray(8 << 20)
        mv = memoryview(buf)
        while True:
            n = spool.readinto(buf)  # type: ignore[attr-defined]
            if not n:
                break
            whole.update(mv[:n])
            out.write(mv[:n])
            done += n
            if progress:
                progress("write", done, total)
        if done != total:
            raise OSError(f"segment spool has {done} bytes, expected {total}")
        out.write(TRAILER.pack(TRAILER_MAGIC, whole.digest()))
        out.flush()
        os.fsync(out.fileno())
        return len(header) + len(mbytes) + total + TRAILER.size


def create_overlay(
    base: BaseRef,
    vm_dir: Path,
    out: Path,
    *,
    hardware: dict[str, Any],
    meta: dict[str, Any] | None = None,
    level: int = 3,
    threads: int = 2,
    progress: Progress | None = None,
) -> CreateStats:
    """Write the overlay of the VM in ``vm_dir`` against ``base`` to ``out``.

    ``vm_dir`` holds ``memory.ram``, ``disk.qcow2`` (backing file: ``base.disk``, raw) and
    ``devstate``. The VM must be paused or stopped: a paused QEMU has flushed its qcow2
    metadata but still holds the image lock, so qemu-img runs with ``-U`` (force share).
    ``out`` appears only when complete (temp file in the same directory, fsync, rename).
    ``level`` is the zstd level, ``threads`` the number of compression threads;
    ``progress(phase, done, total)`` is called as work proceeds.
    """
    t_start = time.perf_counter()
    vm_dir, out = Path(vm_dir), Path(out)
    if threads < 1 or not 1 <= level <= 22:
        raise OverlayInputError(f"threads must be >= 1 and level 1-22, not {threads}/{level}")
    vm_ram, vm_disk, vm_dev = vm_dir / "memory.ram", vm_dir / "disk.qcow2", vm_dir / "devstate"
    for p in (vm_ram, vm_disk, vm_dev, base.ram, base.disk, base.ram_index, base.disk_index):
        if not p.is_file():
            raise OverlayInputError(f"missing file {p}")
    mem_size = base.ram.stat().st_size
    if vm_ram.stat().st_size != mem_size:
        raise OverlayInputError(
            f"VM RAM is {vm_ram.stat().st_size} bytes, the base RAM {mem_size}",
            hint="the VM must have the base VM's memory size",
        )
    if mem_size == 0 or mem_size % PAGE or mem_size > MAX_MEMORY:
        raise OverlayInputError(f"RAM size {mem_size} is not a non-zero multiple of {PAGE}")
    base_disk_size = base.disk.stat().st_size
    if base_disk_size > MAX_DISK:
        raise OverlayInputError(f"base disk is larger than {MAX_DISK} bytes")
    try:
        ram_index = load_index(base.ram_index, pages=mem_size // PAGE)
        disk_index = load_index(base.disk_index, pages=-(-base_disk_size // PAGE))
    except ValueError as e:
        raise OverlayInputError(f"stale or invalid base index: {e}") from e

    stats = CreateStats()
    t0 = time.perf_counter()
    mem_lookup, disk_lookup = PageLookup(ram_index), PageLookup(disk_index)
    stats.seconds["load_indexes"] = time.perf_counter() - t0

    out.parent.mkdir(parents=True, exist_ok=True)
    step = "opening the inputs"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with (
            TopLayer(vm_disk, force_share=True, tmp_dir=out.parent) as top,
            tempfile.TemporaryFile(dir=out.parent) as spool,
            cf.ThreadPoolExecutor(threads, thread_name_prefix="overlay-zstd") as pool,
            cf.ThreadPoolExecutor(1, thread_name_prefix="overlay-spool") as writer,
            open(base.disk, "rb") as bdisk,
        ):
            _check_backing(top, base)
            if top.virtual_size > MAX_DISK:
                raise OverlayInputError(f"VM disk is larger than {MAX_DISK} bytes")
            base_mm, base_ram = _map_pages(base.ram, mem_size)
            packer = _Packer(pool, writer, level, spool, inflight=2 * threads + 2)
            enc = _Encoder(
                packer, base_ram, bdisk.fileno(), base_disk_size, mem_lookup, disk_lookup
            )

            t0 = time.perf_counter()
            step = "reading the device state"
            devstate_size = _encode_devstate(vm_dev, packer)
            stats.seconds["devstate"] = time.perf_counter() - t0
            step = "comparing memory with the base"
            _encode_memory(vm_ram, base.ram, base_mm, base_ram, enc, stats, progress)
            step = "comparing the disk layer with the base"
            _encode_disk(top, bdisk.fileno(), base_disk_size, enc, stats, progress)
            step = "writing the overlay"
            t0 = time.perf_counter()
            packer.close()
            stats.seconds["compress_drain"] = time.perf_counter() - t0
            stats.seconds["compress_wait"] = packer.wait_seconds
            stats.zero_pages += enc.zero_pages
            del enc, base_ram, base_mm

            stats.records = packer.record_counts()
            stats.raw_bytes = packer.raw_bytes
            stats.stored_bytes = packer.offset
            stats.segments = len(packer.entries)
            manifest = Manifest(
                base_id=base.base_id,
                memory_size=mem_size,
                disk_size=top.virtual_size,
                base_disk_size=base_disk_size,
                devstate_size=devstate_size,
                hardware=dict(hardware),
                meta=dict(meta or {}),
                totals={
                    "changed_memory_pages": stats.changed_pages,
                    "changed_disk_pages": stats.changed_disk_pages,
                    "changed_disk_clusters": stats.changed_clusters,
                    "records": stats.records,
                    "raw_bytes": stats.raw_bytes,
                    "stored_bytes": stats.stored_bytes,
                },
                segments=packer.entries,
                created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                creator=f"cloudlet {__version__}",
            )
            t0 = time.perf_counter()
            stats.file_bytes = _assemble(fd, manifest, spool, progress)
            stats.seconds["assemble"] = time.perf_counter() - t0
        os.close(fd)
        fd = -1
        os.replace(tmp, out)
        dfd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OverlayIOError(step, e) from e
        raise
    stats.seconds["total"] = time.perf_counter() - t_start
    return stats


def _check_backing(top: TopLayer, base: BaseRef) -> None:
    """The top layer must sit directly on the base's raw disk, or 'unchanged' means nothing."""
    if top.backing is None:
        raise OverlayInputError(f"{top.path} has no backing file; expected {base.disk}")
    backing = Path(top.backing)
    if not backing.is_absolute():
        backing = top.path.parent / backing
    if top.backing_format not in (None, "raw") or not (
        backing.exists() and os.path.samefile(backing, base.disk)
    ):
        raise OverlayInputError(
            f"{top.path} is backed by {top.backing} ({top.backing_format}), not by the base "
            f"disk {base.disk} (raw)",
            hint="create the VM disk with qemu-img create -f qcow2 -b BASE_DISK -F raw",
        )
