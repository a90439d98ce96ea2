"""The overlay file format, version 1.0: structs, manifest, and a streaming verified reader.

::

    +-----------------+  64 bytes   FileHeader: magic, format version, manifest length + blake3
    | header          |
    +-----------------+
    | manifest        |  zstd(JSON): base id, hardware, sizes, features, segment table
    +-----------------+
    | segment 0       |  24-byte SegmentHeader + stored (maybe compressed) records
    | segment 1 ...   |  in apply order: devstate, then memory, then disk
    +-----------------+
    | trailer         |  40 bytes: magic + blake3 of every byte before it
    +-----------------+

Every number read from a file is checked against limits before use: lengths against caps,
page numbers against the manifest's memory and disk sizes (see :class:`RecordLimits`). The
byte layout and the compatibility rule are in docs/overlay-format.md; keep them in step.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3
import numpy as np
import zstandard

from cloudlet.errors import CloudletError
from cloudlet.overlay.codecs import NoneCodec, codec_by_id
from cloudlet.overlay.errors import (
    OverlayCorrupt,
    OverlayFeatureUnsupported,
    OverlayStreamError,
    OverlayTruncated,
    OverlayVersionError,
)

# -- constants ---------------------------------------------------------------------------------

MAGIC = b"CLOVRLAY"
FORMAT_VERSION: tuple[int, int] = (1, 0)  # semver of the FILE FORMAT, not of the package
PAGE = 4096
DISK_CLUSTER = 65536  # cluster size of the qcow2 that apply writes
PAGES_PER_CLUSTER = DISK_CLUSTER // PAGE

# magic, major, minor, flags, header_size, reserved, manifest_length, manifest_blake3
FILE_HEADER = struct.Struct("<8sHHIIIQ32s")
FILE_HEADER_SIZE = 64
assert FILE_HEADER.size == FILE_HEADER_SIZE

SEGMENT_MAGIC = b"CLSG"
SEGMENT_VERSION = 1
SUPPORTED_SEGMENT_VERSIONS = (1,)
# magic, version, codec, kind, reserved, seq, records, raw_length, stored_length
SEGMENT_HEADER = struct.Struct("<4sBBBBIIII")
assert SEGMENT_HEADER.size == 24

# payload, reserved8, reserved16, length, target, arg
RECORD = struct.Struct("<BBHIQQ")
assert RECORD.size == 24

TRAILER_MAGIC = b"CLOVREND"
TRAILER = struct.Struct("<8s32s")
assert TRAILER.size == 40

# Caps on numbers read from files: big enough for any real VM, small enough that a hostile
# file cannot make a reader allocate or loop without bound.
MAX_MANIFEST_STORED = 64 << 20
MAX_MANIFEST_RAW = 256 << 20
MAX_SEGMENTS = 1 << 21
MAX_SEGMENT_RAW = 4 << 20
MAX_SEGMENT_STORED = MAX_SEGMENT_RAW + (64 << 10)
MAX_MEMORY = 1 << 44  # 16 TiB
MAX_DISK = 1 << 42  # 4 TiB: apply keeps one 64 KiB L2 table per 512 MiB touched
MAX_DEVSTATE = 1 << 30
MAX_DEVSTATE_RECORD = 1 << 20
SEGMENT_TARGET = 1 << 20  # writers aim at ~1 MiB of records per segment

KNOWN_FEATURES: frozenset[str] = frozenset()  # 1.0 needs none; newer writers add names here


class Kind(enum.IntEnum):
    """Segment kind; also the apply order (segments never go back to an earlier kind)."""

    DEVSTATE = 1
    MEMORY = 2
    DISK = 3

    @property
    def label(self) -> str:
        return self.name.lower()


KIND_BY_LABEL = {k.label: k for k in Kind}


class Payload(enum.IntEnum):
    """What a record's bytes mean; ``target`` is a page (memory, disk) or byte offset."""

    LITERAL = 0  # data: the page (4096 bytes); devstate: up to 1 MiB at byte offset target
    XOR = 1  # data: page XOR the base page at the same offset (base RAM or base disk)
    BASE_MEM = 2  # arg: a page of the base RAM with the same content
    BASE_DISK = 3  # arg: a 4 KiB page of the base disk with the same content
    SELF_MEM = 4  # arg: a page of the new RAM written by an earlier record (dedup)
    SELF_DISK = 5  # arg: a page of the new disk written by an earlier record (dedup)
    ZERO = 6  # arg: number of consecutive zero pages starting at target
    # data: page XOR what the target page holds when the record is applied (what earlier
    # records wrote there, else what the file held). Handoff wire only (version 3): each
    # round's changed pages against what the destination already has; overlays refuse it.
    XOR_CURRENT = 7


PAYLOAD_NAMES = {p: p.name.lower() for p in Payload}


def check_version(found: tuple[int, int]) -> None:
    """Accept the same major and a minor no newer than ours (older minors stay readable)."""
    if found[0] != FORMAT_VERSION[0] or found[1] > FORMAT_VERSION[1]:
        raise OverlayVersionError(found, FORMAT_VERSION)


# -- file header ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileHeader:
    major: int
    minor: int
    flags: int
    manifest_length: int
    manifest_hash: bytes

    def pack(self) -> bytes:
        return FILE_HEADER.pack(
            MAGIC,
            self.major,
            self.minor,
            self.flags,
            FILE_HEADER_SIZE,
            0,
            self.manifest_length,
            self.manifest_hash,
        )

    @classmethod
    def parse(cls, data: bytes) -> FileHeader:
        if len(data) < FILE_HEADER_SIZE:
            raise OverlayTruncated("header", f"{len(data)} of {FILE_HEADER_SIZE} bytes")
        magic, major, minor, flags, hsize, reserved, mlen, mhash = FILE_HEADER.unpack_from(data)
        if magic != MAGIC:
            raise OverlayCorrupt("header", f"bad magic {magic!r} (not a cloudlet overlay)")
        check_version((major, minor))  # before anything a newer major may lay out otherwise
        if hsize != FILE_HEADER_SIZE:
            raise OverlayCorrupt("header", f"header size {hsize}, expected {FILE_HEADER_SIZE}")
        if flags or reserved:
            raise OverlayCorrupt("header", f"reserved fields set (flags {flags:#x})")
        if not 0 < mlen <= MAX_MANIFEST_STORED:
            raise OverlayCorrupt("header", f"manifest length {mlen} out of range")
        return cls(major, minor, flags, mlen, mhash)


# -- segments ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentHeader:
    version: int
    codec: int
    kind: Kind
    seq: int
    records: int
    raw_length: int
    stored_length: int

    def pack(self) -> bytes:
        return SEGMENT_HEADER.pack(
            SEGMENT_MAGIC,
            self.version,
            self.codec,
            int(self.kind),
            0,
            self.seq,
            self.records,
            self.raw_length,
            self.stored_length,
        )


@dataclass(frozen=True)
class SegmentEntry:
    """One row of the manifest's segment table. ``offset`` is from the first segment."""

    kind: str
    offset: int
    length: int
    blake3: str
    records: int
    raw: int


def parse_segment_header(data: bytes, entry: SegmentEntry, seq: int) -> SegmentHeader:
    """Check a segment header against its manifest entry before anything is decoded."""
    part = f"segment {seq}"
    magic, ver, codec, kind, reserved, hseq, nrec, raw, stored = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        raise OverlayCorrupt(part, f"bad segment magic {magic!r}", segment=seq)
    if ver not in SUPPORTED_SEGMENT_VERSIONS:
        raise OverlayCorrupt(part, f"unsupported segment version {ver}", segment=seq)
    codec_by_id(codec, part=part, segment=seq)
    problems = []
    if reserved:
        problems.append("reserved byte set")
    if kind != KIND_BY_LABEL[entry.kind]:
        problems.append(f"kind {kind} but the manifest says {entry.kind}")
    if hseq != seq:
        problems.append(f"sequence number {hseq}")
    if nrec != entry.records or raw != entry.raw:
        problems.append("record count or raw length differs from the manifest")
    if stored != entry.length - SEGMENT_HEADER.size:
        problems.append(f"stored length {stored} does not match the manifest")
    if raw > MAX_SEGMENT_RAW or nrec > raw // RECORD.size:
        problems.append(f"{nrec} records in {raw} bytes is impossible")
    if problems:
        raise OverlayCorrupt(part, "; ".join(problems), segment=seq)
    return SegmentHeader(ver, codec, Kind(kind), hseq, nrec, raw, stored)


@dataclass(frozen=True)
class RecordLimits:
    """Bounds that every record's numbers must respect (from the manifest and local base)."""

    mem_pages: int
    disk_pages: int
    base_mem_pages: int
    base_disk_pages: int
    devstate_size: int
    xor_current: bool = False  # accept :attr:`Payload.XOR_CURRENT` (the handoff wire)


def iter_records(
    kind: Kind, raw: bytes | memoryview, count: int, limits: RecordLimits, seq: int
) -> Iterator[tuple[Payload, int, int, memoryview]]:
    """Yield ``(payload, target, arg, data)`` of a decoded segment, checking every number.

    Raises :class:`OverlayCorrupt` naming the segment on the first record out of bounds, on
    unknown payload types and if the records do not fill the segment exactly.
    """
    part = f"segment {seq}"
    mv = memoryview(raw)
    pos, end = 0, len(raw)
    unpack = RECORD.unpack_from
    rsize = RECORD.size
    if kind is Kind.MEMORY:
        pages = limits.mem_pages
    elif kind is Kind.DISK:
        pages = limits.disk_pages
    else:
        pages = 0
    for n in range(count):
        if pos + rsize > end:
            raise OverlayCorrupt(part, f"record {n} header runs past the segment", segment=seq)
        ptype, r8, r16, length, target, arg = unpack(raw, pos)
        pos += rsize
        if pos + length > end:
            raise OverlayCorrupt(part, f"record {n} data runs past the segment", segment=seq)
        bad = _check_record(kind, ptype, r8 | r16, length, target, arg, pages, limits)
        if bad:
            raise OverlayCorrupt(part, f"record {n}: {bad}", segment=seq)
        yield Payload(ptype), target, arg, mv[pos : pos + length]
        pos += length
    if pos != end:
        raise OverlayCorrupt(part, f"{end - pos} bytes after the last record", segment=seq)


def _check_record(
    kind: Kind,
    ptype: int,
    reserved: int,
    length: int,
    target: int,
    arg: int,
    pages: int,
    lim: RecordLimits,
) -> str | None:
    """Why a record is invalid, or None. Pure arithmetic on already-unpacked integers."""
    if reserved:
        return "reserved fields set"
    if kind is Kind.DEVSTATE:
        if ptype != Payload.LITERAL:
            return f"payload type {ptype} in a devstate segment"
        if length > MAX_DEVSTATE_RECORD or target + length > lim.devstate_size:
            return f"{length} bytes at offset {target} beyond device state size {lim.devstate_size}"
        return None
    if ptype > (Payload.XOR_CURRENT if lim.xor_current else Payload.ZERO):
        return f"unknown payload type {ptype}"
    if target >= pages:
        return f"page {target} beyond the {kind.label} size ({pages} pages)"
    if ptype in (Payload.LITERAL, Payload.XOR, Payload.XOR_CURRENT):
        return None if length == PAGE else f"page data of {length} bytes"
    if length:
        return f"{length} data bytes on a reference record"
    if ptype == Payload.BASE_MEM:
        return None if arg < lim.base_mem_pages else f"base memory page {arg} out of range"
    if ptype == Payload.BASE_DISK:
        return None if arg < lim.base_disk_pages else f"base disk page {arg} out of range"
    if ptype == Payload.SELF_MEM:
        return None if arg < lim.mem_pages else f"memory page {arg} out of range"
    if ptype == Payload.SELF_DISK:
        return None if arg < lim.disk_pages else f"disk page {arg} out of range"
    if ptype == Payload.ZERO:
        return None if 0 < arg <= pages - target else f"zero run of {arg} pages out of range"
    return f"unknown payload type {ptype}"


_RECORD_LENGTH = struct.Struct("<I")  # the length field, at offset 4 of a record header
_RECORD_DTYPE = np.dtype(
    [
        ("ptype", "u1"),
        ("r8", "u1"),
        ("r16", "<u2"),
        ("length", "<u4"),
        ("target", "<u8"),
        ("arg", "<u8"),
    ]
)
assert _RECORD_DTYPE.itemsize == RECORD.size


@dataclass(frozen=True)
class RecordArrays:
    """The records of a memory or disk segment as arrays (what :func:`iter_records` yields).

    Record ``i``'s page (literal and xor records) is row ``data[i]`` of the 2-D ``uint8``
    array ``pages`` (``data[i]`` is -1 for records without data); :meth:`page_view` gives
    the same bytes as a memoryview, for ``pwritev``, without going through numpy.
    """

    ptype: np.ndarray  # uint8
    target: np.ndarray  # int64 pages
    arg: np.ndarray  # int64
    data: np.ndarray  # int64 row of ``pages``, -1 if none
    pages: np.ndarray
    buf: memoryview
    scale: int

    def __len__(self) -> int:
        return len(self.ptype)

    def page_view(self, row: int) -> memoryview:
        return self.buf[row * self.scale : row * self.scale + PAGE]


def record_arrays(
    kind: Kind, raw: bytes | memoryview, count: int, limits: RecordLimits, seq: int
) -> RecordArrays:
    """The records of a decoded memory or disk segment as arrays, every number checked.

    Same checks and errors as :func:`iter_records` (which re-walks the segment to name the
    first bad record when a vectorized check fails), at a fraction of the per-record cost.
    """
    assert kind is not Kind.DEVSTATE
    end = len(raw)
    st = _record_starts(raw, count)
    ok = st is not None
    if st is not None:
        if count:
            headers = np.ndarray((end - RECORD.size + 1,), _RECORD_DTYPE, raw, 0, (1,))[st]
        else:
            headers = np.zeros(0, _RECORD_DTYPE)
        ok = _records_valid(kind, headers, limits)
    if not ok:
        for _ in iter_records(kind, raw, count, limits, seq):  # raises, naming the record
            pass
        raise OverlayCorrupt(f"segment {seq}", "malformed records", segment=seq)
    assert st is not None
    ptype = headers["ptype"]
    data = np.where(headers["length"] != 0, st + RECORD.size, -1)
    u8 = np.frombuffer(raw, np.uint8)
    if end >= PAGE:
        pages = np.lib.stride_tricks.as_strided(u8, (end - PAGE + 1, PAGE), (1, 1), writeable=False)
    else:
        pages = np.zeros((0, PAGE), np.uint8)
    return RecordArrays(
        ptype=ptype,
        target=headers["target"].astype(np.int64),
        arg=headers["arg"].astype(np.int64),
        data=data,
        pages=pages,
        buf=memoryview(raw).cast("B"),
        scale=1,
    )


def _record_starts(raw: bytes | memoryview, count: int) -> np.ndarray | None:
    """Offsets of the ``count`` record headers, or None unless they fill ``raw`` exactly.

    Each length says where the next header starts; a run of records of one length (pages,
    or references with no data) is found with one numpy look at the length fields where
    they would be, instead of one step per record.
    """
    end = len(raw)
    rsize = RECORD.size
    unpack_len = _RECORD_LENGTH.unpack_from
    st = np.empty(count, np.int64)
    pos = n = 0
    try:
        while n < count:
            length = unpack_len(raw, pos + 4)[0]
            stride = rsize + length
            if (
                count - n > 8
                and pos + 2 * stride + 8 <= end
                and unpack_len(raw, pos + stride + 4)[0] == length
                and unpack_len(raw, pos + 2 * stride + 4)[0] == length
            ):
                k = min(count - n, (end - pos) // stride, 4096)  # >= 2
                lengths = np.ndarray((k,), "<u4", raw, pos + 4, (stride,))
                other = np.flatnonzero(lengths != length)
                run = int(other[0]) if len(other) else k  # >= 1: lengths[0] == length
                st[n : n + run] = pos + stride * np.arange(run)
                n += run
                pos += stride * run
                continue
            st[n] = pos
            n += 1
            pos += rsize + length
    except (struct.error, ValueError, TypeError):  # a header or length runs past the end
        return None
    return st if pos == end else None


def _records_valid(kind: Kind, h: np.ndarray, lim: RecordLimits) -> bool:
    """The checks of :func:`_check_record`, vectorized (numbers stay uint64: no overflow)."""
    pages = np.uint64(lim.mem_pages if kind is Kind.MEMORY else lim.disk_pages)
    ptype, target, arg, length = h["ptype"], h["target"], h["arg"], h["length"]
    top = Payload.XOR_CURRENT if lim.xor_current else Payload.ZERO
    if np.any(h["r8"]) or np.any(h["r16"]) or np.any(ptype > top):
        return False
    if np.any(target >= pages):
        return False
    with_data = (ptype <= Payload.XOR) | (ptype == Payload.XOR_CURRENT)
    if np.any(length != np.where(with_data, PAGE, 0)):
        return False
    bound = np.zeros(len(h), np.uint64)
    bound[ptype == Payload.BASE_MEM] = lim.base_mem_pages
    bound[ptype == Payload.BASE_DISK] = lim.base_disk_pages
    bound[ptype == Payload.SELF_MEM] = lim.mem_pages
    bound[ptype == Payload.SELF_DISK] = lim.disk_pages
    refs = (ptype >= Payload.BASE_MEM) & (ptype <= Payload.SELF_DISK)
    if np.any(refs & (arg >= bound)):
        return False
    zero = ptype == Payload.ZERO
    return not np.any(zero & ((arg == 0) | (arg > pages - np.minimum(target, pages))))


def pack_record(ptype: int, target: int, arg: int = 0, data: bytes | memoryview = b"") -> bytes:
    return RECORD.pack(ptype, 0, 0, len(data), target, arg) + bytes(data)


# -- manifest ------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """What the overlay is for and where everything is. Stored as zstd-compressed JSON."""

    base_id: str
    memory_size: int
    disk_size: int
    base_disk_size: int
    devstate_size: int
    hardware: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    features_required: list[str] = field(default_factory=list)
    features_optional: list[str] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    segments: list[SegmentEntry] = field(default_factory=list)
    created: str = ""
    creator: str = ""
    format: tuple[int, int] = FORMAT_VERSION

    @property
    def mem_pages(self) -> int:
        return self.memory_size // PAGE

    @property
    def disk_pages(self) -> int:
        return -(-self.disk_size // PAGE)

    @property
    def segments_length(self) -> int:
        return sum(s.length for s in self.segments)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": f"{self.format[0]}.{self.format[1]}",
            "base_id": self.base_id,
            "hardware": self.hardware,
            "meta": self.meta,
            "memory_size": self.memory_size,
            "disk_size": self.disk_size,
            "base_disk_size": self.base_disk_size,
            "devstate_size": self.devstate_size,
            "page_size": PAGE,
            "disk_cluster": DISK_CLUSTER,
            "features": {
                "required": self.features_required,
                "optional": self.features_optional,
            },
            "totals": self.totals,
            "segments_length": self.segments_length,
            "segments": [asdict(s) for s in self.segments],
            "created": self.created,
            "creator": self.creator,
        }

    def to_bytes(self) -> bytes:
        text = json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()
        return zstandard.ZstdCompressor(level=9, write_content_size=True).compress(text)

    @classmethod
    def from_bytes(cls, stored: bytes) -> Manifest:
        """Decompress (capped), parse and validate; raises :class:`OverlayCorrupt`."""
        try:
            text = zstandard.ZstdDecompressor().decompress(stored, max_output_size=MAX_MANIFEST_RAW)
            obj = json.loads(text)
        except (zstandard.ZstdError, ValueError) as e:
            raise OverlayCorrupt("manifest", f"cannot decode: {e}") from e
        return cls.from_json(obj)

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        try:
            return cls._from_json(obj)
        except CloudletError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OverlayCorrupt("manifest", f"malformed: {type(e).__name__}: {e}") from e

    @classmethod
    def _from_json(cls, obj: Any) -> Manifest:
        if not isinstance(obj, dict):
            raise OverlayCorrupt("manifest", "not a JSON object")
        fmt = obj["format"]
        m = re.fullmatch(r"(\d{1,5})\.(\d{1,5})", fmt) if isinstance(fmt, str) else None
        if m is None:
            raise OverlayCorrupt("manifest", f"bad format version {fmt!r}")
        check_version((int(m[1]), int(m[2])))
        features = obj["features"]
        required = _str_list(features["required"], "features.required")
        unknown = sorted(set(required) - KNOWN_FEATURES)
        if unknown:
            raise OverlayFeatureUnsupported(unknown)
        if obj["page_size"] != PAGE or obj["disk_cluster"] != DISK_CLUSTER:
            raise OverlayCorrupt("manifest", "page size or disk cluster size is not 4096/65536")
        base_id = obj["base_id"]
        if not isinstance(base_id, str) or not 0 < len(base_id) <= 256:
            raise OverlayCorrupt("manifest", "base_id must be a string of 1-256 characters")
        for key in ("hardware", "meta", "totals"):
            if not isinstance(obj[key], dict):
                raise OverlayCorrupt("manifest", f"{key} is not an object")
        mem = _int(obj, "memory_size", 1, MAX_MEMORY)
        if mem % PAGE:
            raise OverlayCorrupt("manifest", f"memory_size {mem} is not a multiple of {PAGE}")
        disk = _int(obj, "disk_size", 512, MAX_DISK)
        if disk % 512:
            raise OverlayCorrupt("manifest", f"disk_size {disk} is not a multiple of 512")
        raw_segs = obj["segments"]
        if not isinstance(raw_segs, list) or len(raw_segs) > MAX_SEGMENTS:
            raise OverlayCorrupt("manifest", "segment table missing or too long")
        segs: list[SegmentEntry] = []
        offset, last_kind = 0, 0
        for i, s in enumerate(raw_segs):
            if not isinstance(s, dict):
                raise OverlayCorrupt("manifest", f"segment {i} entry is not an object")
            kind = KIND_BY_LABEL.get(s["kind"])
            if kind is None or kind < last_kind:
                raise OverlayCorrupt("manifest", f"segment {i}: kind {s['kind']!r} out of order")
            last_kind = kind
            length = _int(s, "length", SEGMENT_HEADER.size, MAX_SEGMENT_STORED + 24, f"segment {i}")
            if _int(s, "offset", 0, 1 << 62, f"segment {i}") != offset:
                raise OverlayCorrupt("manifest", f"segment {i}: offset is not {offset}")
            raw = _int(s, "raw", 0, MAX_SEGMENT_RAW, f"segment {i}")
            recs = _int(s, "records", 0, raw // RECORD.size, f"segment {i}")
            h = s["blake3"]
            if not isinstance(h, str) or not re.fullmatch(r"[0-9a-f]{64}", h):
                raise OverlayCorrupt("manifest", f"segment {i}: bad blake3 {h!r}")
            segs.append(SegmentEntry(kind.label, offset, length, h, recs, raw))
            offset += length
        if _int(obj, "segments_length", 0, 1 << 62) != offset:
            raise OverlayCorrupt("manifest", "segments_length does not match the segment table")
        return cls(
            base_id=base_id,
            memory_size=mem,
            disk_size=disk,
            base_disk_size=_int(obj, "base_disk_size", 0, MAX_DISK),
            devstate_size=_int(obj, "devstate_size", 0, MAX_DEVSTATE),
            hardware=obj["hardware"],
            meta=obj["meta"],
            features_required=required,
            features_optional=_str_list(features["optional"], "features.optional"),
            totals=obj["totals"],
            segments=segs,
            created=str(obj.get("created", "")),
            creator=str(obj.get("creator", "")),
            format=(int(m[1]), int(m[2])),
        )


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, where: str = "") -> int:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        loc = f"{where}: " if where else ""
        raise OverlayCorrupt("manifest", f"{loc}{key}={v!r} not in [{lo}, {hi}]")
    return v


def _str_list(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise OverlayCorrupt("manifest", f"{what} is not a list of strings")
    return list(v)


# -- streaming reader ----------------------------------------------------------------------------


class ByteStream:
    """Exact reads over an iterable of byte chunks of any size (file loop, HTTP stream).

    Errors raised by the iterator become :class:`OverlayStreamError`; an early end becomes
    :class:`OverlayTruncated`. ``offset`` counts bytes handed out so far.
    """

    def __init__(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        self._it = iter(chunks)
        self._buf = bytearray()
        self._pos = 0
        self.offset = 0
        self.received = 0

    def _more(self) -> bool:
        try:
            chunk = next(self._it)
        except StopIteration:
            return False
        except CloudletError:
            raise
        except Exception as e:
            raise OverlayStreamError(self.received, e) from e
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        try:
            self._buf += chunk
        except TypeError as e:
            raise OverlayStreamError(self.received, e) from e
        self.received += len(chunk)
        return True

    def read_exact(self, n: int, part: str, segment: int | None = None) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._more():
                have = len(self._buf) - self._pos
                raise OverlayTruncated(
                    part,
                    f"the overlay ends after {self.offset + have} bytes, in the middle of {part}",
                    segment=segment,
                )
        with memoryview(self._buf) as view:  # one copy (a bytearray slice would be two)
            out = bytes(view[self._pos : self._pos + n])
        self._pos += n
        self.offset += n
        return out

    def at_end(self) -> bool:
        """True if no bytes are left (reads ahead to find out)."""
        while len(self._buf) - self._pos == 0:
            if not self._more():
                return True
        return False


@dataclass(frozen=True)
class Segment:
    """A verified, decoded segment."""

    seq: int
    entry: SegmentEntry
    header: SegmentHeader
    raw: bytes | memoryview  # a view of the stored bytes when the codec is "none"


class OverlayReader:
    """Read an overlay front to back, verifying as it goes; nothing is trusted unverified.

    ``read_head()`` checks the header and the manifest hash; ``segments()`` checks each
    segment's blake3 against the manifest *before* decoding it; ``finish()`` checks the
    trailer (whole-file blake3) and that nothing follows it.
    """

    def __init__(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        self.stream = ByteStream(chunks)
        self._whole = blake3.blake3()
        self.header: FileHeader | None = None
        self.manifest: Manifest | None = None

    def _read(self, n: int, part: str, segment: int | None = None) -> bytes:
        data = self.stream.read_exact(n, part, segment)
        self._whole.update(data)
        return data

    def read_head(self) -> Manifest:
        self.header = FileHeader.parse(self._read(FILE_HEADER_SIZE, "header"))
        stored = self._read(self.header.manifest_length, "manifest")
        if blake3.blake3(stored).digest() != self.header.manifest_hash:
            raise OverlayCorrupt("manifest", "blake3 hash does not match the header")
        self.manifest = Manifest.from_bytes(stored)
        if self.manifest.format != (self.header.major, self.header.minor):
            raise OverlayCorrupt("manifest", "format version differs from the header's")
        return self.manifest

    def segments(self, *, ahead: bool = False) -> Generator[Segment, None, None]:
        """Each segment, verified and decoded, in file order.

        With ``ahead``, a worker thread hashes and decompresses segment N+1 (both release
        the GIL) while the caller applies segment N; errors still surface in file order.
        """
        assert self.manifest is not None, "read_head() first"
        entries = list(enumerate(self.manifest.segments))
        if not ahead:
            for seq, entry in entries:
                yield self._decode(seq, entry, self._read(entry.length, f"segment {seq}", seq))
            return
        with ThreadPoolExecutor(1, thread_name_prefix="overlay-decode") as pool:
            pending: Future[Segment] | None = None
            for seq, entry in entries:
                data = self.stream.read_exact(entry.length, f"segment {seq}", seq)
                nxt = pool.submit(self._decode, seq, entry, data, whole=True)
                if pending is not None:
                    yield pending.result()
                pending = nxt
            if pending is not None:
                yield pending.result()

    def _decode(self, seq: int, entry: SegmentEntry, data: bytes, whole: bool = False) -> Segment:
        """Check one segment's hash and header and decode it (``whole``: also feed the
        whole-file hash, which the single worker thread then sees in file order)."""
        part = f"segment {seq}"
        if whole:
            self._whole.update(data)
        if blake3.blake3(data).hexdigest() != entry.blake3:
            raise OverlayCorrupt(part, "blake3 hash does not match the manifest", segment=seq)
        hdr = parse_segment_header(data, entry, seq)
        body = memoryview(data)[SEGMENT_HEADER.size :]
        codec = codec_by_id(hdr.codec, part=part, segment=seq)
        if codec.ID == NoneCodec.ID and len(body) == hdr.raw_length:
            return Segment(seq, entry, hdr, body)  # stored as is: no copy
        try:
            raw = codec.decompress(body, hdr.raw_length)
        except ValueError as e:
            raise OverlayCorrupt(part, f"cannot decompress: {e}", segment=seq) from e
        return Segment(seq, entry, hdr, raw)

    def finish(self) -> None:
        expect = self._whole.digest()
        magic, digest = TRAILER.unpack(self.stream.read_exact(TRAILER.size, "trailer"))
        if magic != TRAILER_MAGIC:
            raise OverlayCorrupt("trailer", f"bad trailer magic {magic!r}")
        if digest != expect:
            raise OverlayCorrupt("trailer", "whole-file blake3 hash does not match")
        if not self.stream.at_end():
            raise OverlayCorrupt("trailer", "unexpected data after the trailer")


def file_chunks(path: str | Any, size: int = 1 << 20) -> Iterator[bytes]:
    """Read a file as chunks for :class:`OverlayReader` (and as the model of a download)."""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
