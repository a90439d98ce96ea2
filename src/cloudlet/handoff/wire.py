"""The handoff wire format (version 3): a stream of self-checking frames.

Each frame carries records of one kind (device state, memory pages or disk pages), in exactly
the record format of overlay segments (``overlay.format.RECORD``), so the destination applies
them with the same code as synthesis. Frames are independent: each is compressed on its own,
with the codec the sender chose for it, and checked before it is decompressed.

Version 2 adds codec 0x80 for device-state frames only: zstd with the base VM's own device
state (which both ends hold) as a raw-content dictionary. A VM's device state is ~0.7 MB, and
nearly all of it equals the base's: 0.3 MB under plain zstd, ~0.5 KB against the base. It is
sent while the VM is paused, so on a 5 Mbit/s link that is ~0.5 s of downtime saved.

Version 3 allows payload 7 (``xor_current``, see ``overlay.format.Payload``) in memory and disk
frames: a page as its XOR with what the destination holds there.

    offset size field
    0      4    magic b"CLHF"
    4      1    wire version (3)
    5      1    kind (1 devstate, 2 memory, 3 disk)
    6      1    codec id (0 none, 1 zstd: the overlay codec table; 0x80 zstd with the
                base's device state as dictionary, device-state frames only)
    7      1    codec level (informational)
    8      4    sequence number (0, 1, 2, ... within one request body)
    12     4    record count
    16     4    raw (uncompressed) length
    20     4    stored length (the bytes that follow the header)
    24     8    xxh3-64 of the stored bytes

Little-endian. A request body is a sequence of frames and nothing else.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash
import zstandard

from cloudlet.errors import IntegrityError
from cloudlet.overlay.codecs import codec_by_id
from cloudlet.overlay.errors import OverlayCorrupt
from cloudlet.overlay.format import Kind, Payload, RecordLimits, iter_records

FRAME_MAGIC = b"CLHF"
WIRE_VERSION = 3
CODEC_DEVSTATE_DICT = 0x80  # zstd, the base VM's device state as a raw-content dictionary
DEVSTATE_DICT_LEVEL = 3  # measured: ~450 bytes for a tiny or Debian guest, < 1 ms
FRAME = struct.Struct("<4sBBBBIIIIQ")
assert FRAME.size == 32
MAX_FRAME_RAW = 8 << 20
MAX_FRAME_STORED = MAX_FRAME_RAW + (64 << 10)
MAX_RECORDS = MAX_FRAME_RAW // 24


class WireError(IntegrityError):
    """A frame failed a magic, version, length, checksum or record check."""

    def __init__(self, part: str, detail: str) -> None:
        self.part = part
        super().__init__(
            f"handoff stream is corrupt in {part}: {detail}",
            hint="the transfer was damaged; the handoff is aborted and can be retried",
        )


@dataclass(frozen=True)
class FrameHeader:
    kind: Kind
    codec: int
    level: int
    seq: int
    records: int
    raw_length: int
    stored_length: int
    checksum: int


def encode_frame(
    seq: int, kind: Kind, records: int, stored: bytes, raw_length: int, codec: int, level: int
) -> bytes:
    """Header + stored bytes (already compressed with ``codec``)."""
    h = FRAME.pack(
        FRAME_MAGIC, WIRE_VERSION, int(kind), codec, level, seq, records, raw_length,
        len(stored), xxhash.xxh3_64_intdigest(stored),
    )  # fmt: skip
    return h + stored


def _parse_header(data: bytes, expect_seq: int) -> FrameHeader:
    magic, ver, kind, codec, level, seq, nrec, raw, stored, checksum = FRAME.unpack(data)
    where = f"frame {expect_seq}"
    if magic != FRAME_MAGIC:
        raise WireError(where, f"bad magic {magic!r}")
    if ver != WIRE_VERSION:
        raise WireError(where, f"wire version {ver}, this cloudlet speaks {WIRE_VERSION}")
    if seq != expect_seq:
        raise WireError(where, f"sequence number {seq}, expected {expect_seq}")
    try:
        k = Kind(kind)
    except ValueError:
        raise WireError(where, f"unknown kind {kind}") from None
    if raw > MAX_FRAME_RAW or stored > MAX_FRAME_STORED or nrec > MAX_RECORDS:
        raise WireError(where, f"frame too large ({raw} raw, {stored} stored, {nrec} records)")
    return FrameHeader(k, codec, level, seq, nrec, raw, stored, checksum)


def devstate_dictionary(base_devstate: bytes) -> zstandard.ZstdCompressionDict:
    """The base VM's device state as a zstd raw-content dictionary (both ends build the same)."""
    return zstandard.ZstdCompressionDict(base_devstate, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def compress_devstate(raw: bytes, dictionary: zstandard.ZstdCompressionDict) -> bytes:
    """``raw`` device-state records under codec :data:`CODEC_DEVSTATE_DICT`.

    With a content checksum: a raw-content dictionary has no id, so a destination whose base
    device state differs would otherwise decode wrong bytes without noticing.
    """
    c = zstandard.ZstdCompressor(
        level=DEVSTATE_DICT_LEVEL, dict_data=dictionary, write_content_size=True,
        write_checksum=True,
    )  # fmt: skip
    return c.compress(raw)


def _decompress_devstate(
    stored: bytes, raw_length: int, dictionary: zstandard.ZstdCompressionDict
) -> bytes:
    try:
        params = zstandard.get_frame_parameters(stored)
        if params.content_size != raw_length:
            raise ValueError(f"zstd frame says {params.content_size} bytes, expected {raw_length}")
        out: bytes = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(
            stored, max_output_size=raw_length
        )
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd with the base's device state: {e}") from e
    if len(out) != raw_length:
        raise ValueError(f"decompressed {len(out)} bytes, expected {raw_length}")
    return out


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get checked records out.

    ``devstate_dict``: the destination's base device state as a dictionary; without it a frame
    under :data:`CODEC_DEVSTATE_DICT` is refused.
    """

    def __init__(
        self, limits: RecordLimits, devstate_dict: zstandard.ZstdCompressionDict | None = None
    ) -> None:
        self.limits = limits
        self.devstate_dict = devstate_dict
        self.buf = bytearray()
        self.seq = 0
        self.bytes = 0

    def feed(
        self, chunk: bytes
    ) -> Iterator[tuple[Kind, list[tuple[Payload, int, int, memoryview]]]]:
        self.buf += chunk
        self.bytes += len(chunk)
        while len(self.buf) >= FRAME.size:
            h = _parse_header(bytes(self.buf[: FRAME.size]), self.seq)
            end = FRAME.size + h.stored_length
            if len(self.buf) < end:
                return
            stored = bytes(self.buf[FRAME.size : end])
            del self.buf[:end]
            if xxhash.xxh3_64_intdigest(stored) != h.checksum:
                raise WireError(f"frame {h.seq}", "checksum mismatch")
            try:
                if h.codec == CODEC_DEVSTATE_DICT:
                    if h.kind is not Kind.DEVSTATE or self.devstate_dict is None:
                        raise ValueError(
                            "codec 0x80 (base device-state dictionary) on a "
                            f"{h.kind.name.lower()} frame"
                            if h.kind is not Kind.DEVSTATE
                            else "codec 0x80 but no base device state to decode it with"
                        )
                    raw = _decompress_devstate(stored, h.raw_length, self.devstate_dict)
                else:
                    codec = codec_by_id(h.codec, part=f"frame {h.seq}", segment=h.seq)
                    raw = codec.decompress(stored, h.raw_length)
                recs = list(iter_records(h.kind, raw, h.records, self.limits, h.seq))
            except OverlayCorrupt as e:
                raise WireError(f"frame {h.seq}", e.message) from e
            except ValueError as e:
                raise WireError(f"frame {h.seq}", str(e)) from e
            self.seq += 1
            yield h.kind, recs

    def close(self) -> None:
        if self.buf:
            raise WireError(
                f"frame {self.seq}", f"stream ended inside a frame ({len(self.buf)} bytes)"
            )
