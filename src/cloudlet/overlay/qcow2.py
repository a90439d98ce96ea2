"""Read a qcow2 top layer's own clusters, and write a new top layer in one pass.

Reading: ``qemu-img map --output=json`` lists the top layer's clusters (``depth`` 0) with
their host offsets, and we ``pread`` the data straight from the qcow2 file: no NBD server, no
full conversion. Only compressed clusters (no host offset) need ``qemu-img convert`` of the
top layer alone, done lazily.

Writing: there is no maintained Python qcow2 writer. ``qemu-io`` only fills a write from a
pattern or (``write -s FILE``) from a file, one command and one file per range, and
``qemu-img convert`` needs a complete source image: neither can take clusters as they arrive
from a stream. So :class:`Qcow2Writer` writes qcow2 v3 itself. It streams data
clusters to the file in arrival order (one pass, nothing buffered but one L2 table per 512 MiB
of touched guest disk), then appends the L2 tables, L1 table and refcount structures, and
writes the header last: a file cut short has no qcow2 magic and can never be opened as valid.
Layout (65536-byte clusters, 16-bit refcounts)::

    cluster 0          header + backing-format extension + backing file name
    clusters 1..D      data clusters, in the order they were written
    then               L2 tables, L1 table, refcount table, refcount blocks

See docs/qcow2.txt in QEMU for the on-disk format.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloudlet.hypervisor.qemu import find_tool
from cloudlet.overlay.errors import Qcow2Error
from cloudlet.util.sparse import pwrite_all, pwritev_all, zero_range

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
PAGE = 4096

QCOW2_MAGIC = b"QFI\xfb"
QCOW2_VERSION = 3
REFCOUNT_ORDER = 4  # 16-bit refcounts, qemu-img's default
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1  # v3 "reads as zeros" flag in an L2 entry
L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
EXT_BACKING_FORMAT = 0xE279_2ACA
EXT_END = 0

# magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
# l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
# snapshots_offset, incompatible, compatible, autoclear, refcount_order, header_length
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
assert _HEADER.size == 104


@dataclass(frozen=True)
class Extent:
    """A byte range of the guest disk that the top layer itself defines.

    ``kind`` is ``"data"`` (bytes at ``offset`` in the qcow2 file, or in the raw copy when
    ``compressed``) or ``"zero"``. Ranges outside every extent read from the backing file.
    """

    start: int
    length: int
    kind: str
    offset: int | None = None
    compressed: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length


def _run(args: list[str]) -> str:
    r = subprocess.run([find_tool(args[0]), *args[1:]], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise Qcow2Error(f"{' '.join(args[:2])} failed: {r.stderr.strip() or r.returncode}")
    return r.stdout


def qemu_img_info(path: Path | str, *, force_share: bool = False) -> dict[str, Any]:
    """``qemu-img info --output=json`` of one image (no backing chain)."""
    args = ["qemu-img", "info", "--output=json", *(["-U"] if force_share else []), str(path)]
    info: dict[str, Any] = json.loads(_run(args))
    return info


def top_layer_extents(path: Path | str, *, force_share: bool = False) -> list[Extent]:
    """The top layer's own extents (``depth`` 0 entries of ``qemu-img map``), sorted.

    ``force_share`` passes ``-U`` (read an image another QEMU holds open; only safe while that
    VM is paused).
    """
    args = ["qemu-img", "map", "--output=json"]
    if force_share:
        args.append("-U")
    entries = json.loads(_run([*args, str(path)]))
    out: list[Extent] = []
    for e in entries:
        if e.get("depth") != 0:
            continue
        start, length = int(e["start"]), int(e["length"])
        if e.get("zero"):
            out.append(Extent(start, length, "zero"))
        elif e.get("data"):
            off = e.get("offset")
            if off is None:
                out.append(Extent(start, length, "data", None, compressed=True))
            else:
                out.append(Extent(start, length, "data", int(off)))
        # depth 0 with neither data nor zero cannot happen for qcow2; ignore defensively
    out.sort(key=lambda x: x.start)
    return out


@dataclass(frozen=True)
class PagePiece:
    """A piece of the top layer in 4 KiB pages, as :meth:`TopLayer.pieces` yields them.

    ``kind`` ``"data"``: pages ``first .. first+count`` are whole in the top layer, bytes at
    ``offset`` of :attr:`TopLayer` ``fd_for(piece)``. ``"zero"``: they read as zeros.
    ``"partial"``: one page (``count`` 1) that the top layer only partly covers; ``parts``
    lists ``(offset_in_page, length, extent)`` and the rest of the page comes from the backing.
    """

    kind: str
    first: int
    count: int
    offset: int = 0
    compressed: bool = False
    parts: tuple[tuple[int, int, Extent], ...] = ()


class TopLayer:
    """An open qcow2 top layer: its virtual size, backing file and own extents.

    Use as a context manager; it owns the file descriptor (and the lazily made raw copy of
    compressed clusters, if any).
    """

    def __init__(self, path: Path | str, *, force_share: bool = False, tmp_dir: Path | None = None):
        self.path = Path(path).absolute()  # so qemu-img reports an absolute backing path
        info = qemu_img_info(self.path, force_share=force_share)
        if info.get("format") != "qcow2":
            raise Qcow2Error(f"{self.path} is {info.get('format')!r}, not qcow2")
        self.virtual_size = int(info["virtual-size"])
        self.cluster_size = int(info.get("cluster-size") or CLUSTER)
        self.backing: str | None = info.get("full-backing-filename") or info.get("backing-filename")
        self.backing_format: str | None = info.get("backing-filename-format")
        self.extents = top_layer_extents(self.path, force_share=force_share)
        self.fd = os.open(self.path, os.O_RDONLY)
        self._tmp_dir = tmp_dir
        self._raw_dir: str | None = None
        self._raw_fd: int | None = None

    def __enter__(self) -> TopLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self.fd, self._raw_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = -1
        self._raw_fd = None
        if self._raw_dir is not None:
            shutil.rmtree(self._raw_dir, ignore_errors=True)
            self._raw_dir = None

    def _raw_copy_fd(self) -> int:
        """A raw image of the top layer alone (unallocated reads as zero), for compressed data.

        Opening the qcow2 with ``backing: null`` keeps the backing file out of the copy.
        """
        if self._raw_fd is None:
            self._raw_dir = tempfile.mkdtemp(prefix="cloudlet-top-", dir=self._tmp_dir)
            raw = os.path.join(self._raw_dir, "top.raw")
            spec = {
                "driver": "qcow2",
                "backing": None,
                "file": {"driver": "file", "filename": str(self.path.resolve())},
            }
            _run(["qemu-img", "convert", "-O", "raw", "json:" + json.dumps(spec), raw])
            self._raw_fd = os.open(raw, os.O_RDONLY)
        return self._raw_fd

    def read(self, ext: Extent, rel: int, length: int) -> bytes:
        """``length`` bytes of ``ext`` starting ``rel`` bytes into it (zero-padded at EOF)."""
        if ext.kind == "zero":
            return bytes(length)
        if ext.compressed:
            data = os.pread(self._raw_copy_fd(), length, ext.start + rel)
        else:
            assert ext.offset is not None
            data = os.pread(self.fd, length, ext.offset + rel)
        return data if len(data) == length else data + bytes(length - len(data))

    def pieces(self, page: int = PAGE) -> Iterator[PagePiece]:
        """The top layer as whole-page pieces, ascending; partial pages come as their own."""
        partial: dict[int, list[tuple[int, int, Extent]]] = {}
        for ext in self.extents:
            a, b = ext.start, ext.end
            first_full, end_full = -(-a // page), b // page
            if first_full < end_full:
                rel = first_full * page - a
                yield PagePiece(
                    ext.kind,
                    first_full,
                    end_full - first_full,
                    offset=(ext.offset or 0) + rel if ext.kind == "data" else 0,
                    compressed=ext.compressed,
                    parts=((rel, (end_full - first_full) * page, ext),) if ext.compressed else (),
                )
            # the (at most two) partly covered pages at the ends of this extent
            for p in {a // page, (b - 1) // page}:
                if first_full <= p < end_full:
                    continue
                lo, hi = max(a, p * page), min(b, (p + 1) * page)
                partial.setdefault(p, []).append((lo - p * page, hi - lo, ext))
        for p in sorted(partial):
            yield PagePiece("partial", p, 1, parts=tuple(partial[p]))

    def read_piece(self, piece: PagePiece, rel_pages: int, count: int, page: int = PAGE) -> bytes:
        """``count`` pages of a ``data`` piece starting ``rel_pages`` into it."""
        if piece.compressed:
            rel0, _, ext = piece.parts[0]
            return self.read(ext, rel0 + rel_pages * page, count * page)
        data = os.pread(self.fd, count * page, piece.offset + rel_pages * page)
        return data if len(data) == count * page else data + bytes(count * page - len(data))


# --------------------------------------------------------------------------------------------
# Writer


class Qcow2Writer:
    """Write a qcow2 v3 top layer over a raw backing file, data first, metadata last.

    ``write_cluster`` allocates a host cluster on first use (appending to the file) and
    overwrites it in place afterwards; ``zero_clusters`` sets the v3 zero flag (keeping an
    allocated host cluster as "zero, allocated" so nothing leaks). ``finish`` writes L2, L1,
    refcounts and finally the header. ``abort`` closes without making a valid file.

    ``openable``: the file is a valid, empty image from the start (header, a zero L1 table
    and refcounts for those clusters), so that a QEMU waiting for an incoming migration can
    open it (inactive) while the data is still being written; it reads the image again when
    the migration completes. ``finish`` then frees those first clusters (refcount 0, holes).
    """

    def __init__(
        self,
        path: Path | str,
        virtual_size: int,
        *,
        backing: str | None,
        backing_format: str = "raw",
        openable: bool = False,
    ) -> None:
        if virtual_size <= 0 or virtual_size % 512:
            raise ValueError(f"virtual size must be a positive multiple of 512: {virtual_size}")
        self.backing = backing.encode() if backing is not None else None
        if self.backing is not None and (len(self.backing) > 1023 or b"\0" in self.backing):
            raise ValueError("backing file name must be at most 1023 bytes, without NUL")
        self.backing_format = backing_format.encode()
        self.path = Path(path)
        self.virtual_size = virtual_size
        self.clusters = -(-virtual_size // CLUSTER)
        self.l2_entries = CLUSTER // 8
        self._l2: dict[int, np.ndarray] = {}
        self._next = 1  # cluster 0 is the header, written last
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)  # guest data
        self.data_clusters = 0
        self.zero_flagged = 0
        self._placeholder_end = 1  # clusters 1 .. this-1 hold the placeholder's tables
        if openable:
            self._write_placeholder()

    def _write_placeholder(self) -> None:
        """An empty image: L1 (all zero) at cluster 1, a refcount table and one block after."""
        cl = CLUSTER
        l1_size = self._l1_size()
        l1_clusters = max(1, -(-l1_size * 8 // cl))
        rt_start = 1 + l1_clusters
        rb_start = rt_start + 1
        end = rb_start + 1
        os.ftruncate(self.fd, end * cl)  # the L1 table: a hole reads as zeros
        pwrite_all(self.fd, struct.pack(">Q", rb_start * cl), rt_start * cl)
        pwrite_all(self.fd, np.ones(end, dtype=">u2").tobytes(), rb_start * cl)
        pwrite_all(self.fd, self._header(l1_size, cl, rt_start * cl, 1), 0)
        self._next = self._placeholder_end = end

    def _l1_size(self) -> int:
        return -(-self.virtual_size // (CLUSTER * self.l2_entries))

    # -- state -----------------------------------------------------------------------------
    def _table(self, c: int, create: bool) -> np.ndarray | None:
        t = self._l2.get(c // self.l2_entries)
        if t is None and create:
            t = np.zeros(self.l2_entries, dtype=np.uint64)
            self._l2[c // self.l2_entries] = t
        return t

    def _check(self, c: int) -> None:
        if not 0 <= c < self.clusters:
            raise ValueError(f"cluster {c} outside the disk ({self.clusters} clusters)")

    def host_offset(self, c: int) -> int | None:
        """Host offset of guest cluster ``c`` if it has a host cluster (data or zero-alloc)."""
        self._check(c)
        t = self._table(c, False)
        if t is None:
            return None
        off = int(t[c % self.l2_entries]) & L2E_OFFSET_MASK
        return off or None

    def state(self, c: int) -> str:
        """``"unallocated"`` (reads the backing), ``"zero"`` or ``"data"``."""
        self._check(c)
        t = self._table(c, False)
        e = 0 if t is None else int(t[c % self.l2_entries])
        if e == 0:
            return "unallocated"
        return "zero" if e & OFLAG_ZERO else "data"

    def read_cluster(self, c: int) -> bytes | None:
        """Current content of cluster ``c``, or None if it reads from the backing file."""
        st = self.state(c)
        if st == "unallocated":
            return None
        if st == "zero":
            return bytes(CLUSTER)
        off = self.host_offset(c)
        assert off is not None
        data = os.pread(self.fd, CLUSTER, off)
        return data + bytes(CLUSTER - len(data))

    # -- writes ----------------------------------------------------------------------------
    def write_cluster(self, c: int, data: bytes | bytearray | memoryview) -> None:
        """Set guest cluster ``c`` to ``data`` (at most one cluster; the rest reads zeros)."""
        self._check(c)
        if len(data) > CLUSTER:
            raise ValueError(f"cluster data is {len(data)} bytes, more than {CLUSTER}")
        t = self._table(c, True)
        assert t is not None
        i = c % self.l2_entries
        off = int(t[i]) & L2E_OFFSET_MASK
        if off:
            if len(data) < CLUSTER:  # an existing cluster: clear what data does not cover
                pwrite_all(self.fd, bytes(CLUSTER - len(data)), off + len(data))
        else:
            off = self._next * CLUSTER
            self._next += 1
            self.data_clusters += 1
            if len(data) < CLUSTER:  # keep the file cluster-aligned
                os.ftruncate(self.fd, max(os.fstat(self.fd).st_size, off + CLUSTER))
        pwrite_all(self.fd, data, off)
        t[i] = np.uint64(off | OFLAG_COPIED)

    def entries(self, cs: np.ndarray) -> np.ndarray:
        """The L2 entries (``uint64``; 0 = unallocated) of guest clusters ``cs``."""
        out = np.zeros(len(cs), np.uint64)
        if len(cs) == 0:
            return out
        if cs.min() < 0 or cs.max() >= self.clusters:
            raise ValueError(f"cluster outside the disk ({self.clusters} clusters)")
        tables = cs // self.l2_entries
        for ti in np.unique(tables).tolist():
            t = self._l2.get(ti)
            if t is not None:
                sel = tables == ti
                out[sel] = t[cs[sel] % self.l2_entries]
        return out

    def write_clusters(self, cs: np.ndarray, data: np.ndarray) -> None:
        """:meth:`write_cluster` for whole clusters ``cs`` (rows of ``data``), in that order.

        New clusters are appended in the order given, so runs of them go to the file in
        one ``pwritev`` instead of one ``pwrite`` per cluster.
        """
        if len(cs) != len(data) or (len(data) and data.shape[1] != CLUSTER):
            raise ValueError("write_clusters needs one whole cluster per index")
        if len(cs) == 0:
            return
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        offs = self.entries(cs) & np.uint64(L2E_OFFSET_MASK)
        new = offs == 0
        n_new = int(np.count_nonzero(new))
        offs[new] = (self._next + np.arange(n_new, dtype=np.uint64)) * np.uint64(CLUSTER)
        self._next += n_new
        self.data_clusters += n_new
        flat = data.data.cast("B")
        offs_l = offs.tolist()
        start = 0
        for i in range(1, len(offs_l) + 1):
            if i == len(offs_l) or offs_l[i] != offs_l[i - 1] + CLUSTER:
                bufs = [flat[k * CLUSTER : (k + 1) * CLUSTER] for k in range(start, i)]
                pwritev_all(self.fd, bufs, offs_l[start])
                start = i
        per = self.l2_entries
        for c, off in zip(cs.tolist(), offs_l, strict=True):
            t = self._table(c, True)
            assert t is not None
            t[c % per] = np.uint64(off | OFLAG_COPIED)

    def zero_clusters(self, c0: int, c1: int) -> None:
        """Make guest clusters ``c0 .. c1-1`` read as zeros with the v3 zero flag."""
        if c0 >= c1:
            return
        self._check(c0)
        self._check(c1 - 1)
        per = self.l2_entries
        for ti in range(c0 // per, (c1 - 1) // per + 1):
            t = self._table(ti * per, True)
            assert t is not None
            a, b = max(c0 - ti * per, 0), min(c1 - ti * per, per)
            seg = t[a:b]
            alloc = (seg & np.uint64(L2E_OFFSET_MASK)) != 0
            seg[alloc] = (seg[alloc] & np.uint64(L2E_OFFSET_MASK)) | np.uint64(
                OFLAG_ZERO | OFLAG_COPIED
            )
            seg[~alloc] = np.uint64(OFLAG_ZERO)
            self.zero_flagged += b - a

    # -- finish ----------------------------------------------------------------------------
    def finish(self, *, fsync: bool = True) -> None:
        """Append L2/L1/refcount structures, write the header, (fsync,) close."""
        cl = CLUSTER
        data_end = self._next
        l2_keys = sorted(self._l2)
        l1_size = self._l1_size()
        l1_clusters = max(1, -(-l1_size * 8 // cl))
        rb_entries = cl * 8 // (1 << REFCOUNT_ORDER)
        rb, rt = 1, 1
        while True:
            total = data_end + len(l2_keys) + l1_clusters + rt + rb
            need_rb = -(-total // rb_entries)
            need_rt = -(-need_rb * 8 // cl)
            if (need_rb, need_rt) == (rb, rt):
                break
            rb, rt = max(rb, need_rb), max(rt, need_rt)
        l2_start = data_end
        l1_start = l2_start + len(l2_keys)
        rt_start = l1_start + l1_clusters
        rb_start = rt_start + rt

        l1 = np.zeros(l1_clusters * cl // 8, dtype=">u8")
        for n, key in enumerate(l2_keys):
            off = (l2_start + n) * cl
            pwrite_all(self.fd, self._l2[key].astype(">u8").tobytes(), off)
            l1[key] = off | OFLAG_COPIED
        pwrite_all(self.fd, l1.tobytes(), l1_start * cl)
        rtab = np.zeros(rt * cl // 8, dtype=">u8")
        rtab[:rb] = (rb_start + np.arange(rb, dtype=np.uint64)) * np.uint64(cl)
        pwrite_all(self.fd, rtab.tobytes(), rt_start * cl)
        counts = np.zeros(rb * rb_entries, dtype=">u2")
        counts[:total] = 1
        counts[1 : self._placeholder_end] = 0  # the placeholder's tables: free space now
        pwrite_all(self.fd, counts.tobytes(), rb_start * cl)
        zero_range(self.fd, cl, (self._placeholder_end - 1) * cl)
        if fsync:
            os.fsync(self.fd)
        pwrite_all(self.fd, self._header(l1_size, l1_start * cl, rt_start * cl, rt), 0)
        if fsync:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def _header(self, l1_size: int, l1_off: int, rt_off: int, rt_clusters: int) -> bytes:
        exts = b""
        if self.backing is not None:
            fmt = self.backing_format
            exts += struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt
            exts += bytes(-len(exts) % 8)
        exts += struct.pack(">II", EXT_END, 0)
        backing_off = _HEADER.size + len(exts) if self.backing is not None else 0
        hdr = _HEADER.pack(
            QCOW2_MAGIC,
            QCOW2_VERSION,
            backing_off,
            len(self.backing or b""),
            CLUSTER_BITS,
            self.virtual_size,
            0,  # no encryption
            l1_size,
            l1_off,
            rt_off,
            rt_clusters,
            0,  # no snapshots
            0,
            0,  # incompatible features: none
            0,  # compatible features: none
            0,  # autoclear features: none
            REFCOUNT_ORDER,
            _HEADER.size,
        )
        out = hdr + exts + (self.backing or b"")
        assert len(out) <= CLUSTER
        return out

    def abort(self) -> None:
        """Close without writing metadata; the caller deletes the file."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def write_qcow2(
    path: Path | str,
    virtual_size: int,
    *,
    backing: str | None,
    data: dict[int, bytes] | None = None,
    zero: list[int] | None = None,
    backing_format: str = "raw",
) -> None:
    """Write a top layer with ``data`` clusters (guest cluster -> bytes) and ``zero`` clusters."""
    w = Qcow2Writer(path, virtual_size, backing=backing, backing_format=backing_format)
    try:
        for c in sorted(data or {}):
            w.write_cluster(c, (data or {})[c])
        for c in zero or []:
            w.zero_clusters(c, c + 1)
        w.finish()
    except BaseException:
        w.abort()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
