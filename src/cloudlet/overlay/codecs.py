"""Segment codecs, borg-style: each codec is a class with a fixed ID byte in one table.

The ID byte is stored in every segment header, and readers dispatch on it, so a new codec
is one class here (plus a format minor version bump) and old files stay readable. Segment
hashes cover the stored bytes, and record ids hash the uncompressed content, so changing the
codec never changes what a segment means.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import zstandard

from cloudlet.overlay.errors import OverlayCorrupt


class Codec:
    """One compression method. ``ID`` is its byte in segment headers; never reuse one."""

    ID: ClassVar[int]
    NAME: ClassVar[str]

    def compress(self, data: bytes | bytearray | memoryview, level: int) -> bytes:
        raise NotImplementedError

    def decompress(self, data: bytes | memoryview, raw_length: int) -> bytes:
        """Return exactly ``raw_length`` bytes or raise ``ValueError``."""
        raise NotImplementedError


class NoneCodec(Codec):
    """Stored as is: used when compression does not make a segment smaller."""

    ID = 0x00
    NAME = "none"

    def compress(self, data: bytes | bytearray | memoryview, level: int) -> bytes:
        return bytes(data)

    def decompress(self, data: bytes | memoryview, raw_length: int) -> bytes:
        if len(data) != raw_length:
            raise ValueError(f"stored {len(data)} bytes, expected {raw_length}")
        return bytes(data)


class ZstdCodec(Codec):
    """zstd: ~2.2x on guest RAM at level 3; releases the GIL, so segments compress in threads.

    zstandard compressor objects are not thread-safe, hence one per thread.
    """

    ID = 0x01
    NAME = "zstd"
    _local = threading.local()

    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        cache: dict[int, zstandard.ZstdCompressor] = getattr(self._local, "c", None) or {}
        self._local.c = cache
        c = cache.get(level)
        if c is None:
            c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return c

    def compress(self, data: bytes | bytearray | memoryview, level: int) -> bytes:
        return self._compressor(level).compress(data)

    def decompress(self, data: bytes | memoryview, raw_length: int) -> bytes:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        try:
            params = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError as e:
            raise ValueError(f"not a zstd frame: {e}") from e
        if params.content_size != raw_length:
            raise ValueError(f"zstd frame says {params.content_size} bytes, expected {raw_length}")
        try:
            out: bytes = d.decompress(data, max_output_size=raw_length)
        except zstandard.ZstdError as e:
            raise ValueError(f"zstd: {e}") from e
        if len(out) != raw_length:
            raise ValueError(f"decompressed {len(out)} bytes, expected {raw_length}")
        return out


RESERVED_ID = 0xFF  # never a codec: kept free for a future extension mechanism

CODECS: dict[int, Codec] = {c.ID: c for c in (NoneCodec(), ZstdCodec())}
assert RESERVED_ID not in CODECS


def codec_by_id(codec_id: int, *, part: str = "segment", segment: int | None = None) -> Codec:
    """The codec for a stored ID byte; an unknown byte is corruption (or a newer writer)."""
    c = CODECS.get(codec_id)
    if c is None:
        raise OverlayCorrupt(part, f"unknown codec id 0x{codec_id:02x}", segment=segment)
    return c
