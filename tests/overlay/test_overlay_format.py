"""Unit tests of the format layer: structs, codecs, manifest validation, the stream reader."""

from __future__ import annotations

import pytest
import zstandard

from cloudlet.errors import IntegrityError, InvalidInputError
from cloudlet.overlay.codecs import CODECS, RESERVED_ID, NoneCodec, ZstdCodec, codec_by_id
from cloudlet.overlay.errors import (
    OverlayCorrupt,
    OverlayFeatureUnsupported,
    OverlayStreamError,
    OverlayTruncated,
    OverlayVersionError,
)
from cloudlet.overlay.format import (
    FILE_HEADER_SIZE,
    FORMAT_VERSION,
    ByteStream,
    FileHeader,
    Kind,
    Manifest,
    OverlayReader,
    Payload,
    check_version,
)
from overlay.overlay_testlib import craft_overlay, rec


def test_codec_registry_ids_are_fixed() -> None:
    assert CODECS[0].__class__ is NoneCodec and CODECS[1].__class__ is ZstdCodec
    assert RESERVED_ID == 0xFF and 0xFF not in CODECS
    data = b"abc" * 10000
    for c in CODECS.values():
        assert c.decompress(c.compress(data, 3), len(data)) == data
    z = CODECS[1]
    with pytest.raises(ValueError):
        z.decompress(z.compress(data, 3), len(data) - 1)  # the frame says another size
    with pytest.raises(ValueError):
        z.decompress(b"not zstd at all", 10)
    with pytest.raises(OverlayCorrupt, match="unknown codec id 0x7f"):
        codec_by_id(0x7F, part="segment 3", segment=3)


def test_version_rule() -> None:
    assert FORMAT_VERSION == (1, 0)
    check_version((1, 0))
    with pytest.raises(OverlayVersionError) as e:
        check_version((2, 0))
    assert "2.0" in str(e.value) and "1.0" in str(e.value) and "major" in str(e.value)
    with pytest.raises(OverlayVersionError, match=r"1\.1 is newer than this reader's 1\.0"):
        check_version((1, 1))
    assert issubclass(OverlayVersionError, InvalidInputError)


def test_header_roundtrip_and_checks() -> None:
    h = FileHeader(1, 0, 0, 123, b"\x01" * 32)
    raw = h.pack()
    assert len(raw) == FILE_HEADER_SIZE and raw[:8] == b"CLOVRLAY"
    assert FileHeader.parse(raw) == h
    with pytest.raises(OverlayCorrupt, match="bad magic"):
        FileHeader.parse(b"X" + raw[1:])
    with pytest.raises(OverlayCorrupt, match="reserved"):
        FileHeader.parse(raw[:12] + b"\x01" + raw[13:])  # a flag bit
    with pytest.raises(OverlayCorrupt, match="manifest length"):
        FileHeader.parse(FileHeader(1, 0, 0, 1 << 40, b"\x01" * 32).pack())


def _manifest_json() -> dict[str, object]:
    m = Manifest("b", 1 << 20, 1 << 20, 1 << 20, 0)
    return m.to_json()


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"memory_size": 1 << 60}, "memory_size"),
        ({"memory_size": 4097}, "multiple of 4096"),
        ({"memory_size": True}, "memory_size"),
        ({"disk_size": 1000}, "multiple of 512"),
        ({"disk_size": -1}, "disk_size"),
        ({"devstate_size": 1 << 40}, "devstate_size"),
        ({"base_id": ""}, "base_id"),
        ({"hardware": []}, "hardware"),
        ({"page_size": 8192}, "page size"),
        ({"segments": "x"}, "segment table"),
        ({"segments_length": 5}, "segments_length"),
        ({"format": "one"}, "format version"),
    ],
)
def test_manifest_rejects_hostile_values(patch: dict[str, object], match: str) -> None:
    obj = _manifest_json() | patch
    with pytest.raises(OverlayCorrupt, match=match):
        Manifest.from_json(obj)


def test_manifest_segment_table_checks() -> None:
    seg = {"kind": "memory", "offset": 0, "length": 48, "blake3": "0" * 64, "records": 1, "raw": 24}
    base = _manifest_json() | {"segments_length": 48}
    assert Manifest.from_json(base | {"segments": [seg]}).segments[0].records == 1
    for bad, match in [
        (seg | {"records": 10**9}, "records"),
        (seg | {"raw": 1 << 40}, "raw"),
        (seg | {"length": 1 << 40}, "length"),
        (seg | {"offset": 8}, "offset"),
        (seg | {"kind": "swap"}, "kind"),
        (seg | {"blake3": "zz"}, "blake3"),
    ]:
        with pytest.raises(OverlayCorrupt, match=match):
            Manifest.from_json(base | {"segments": [bad]})
    disk_then_mem = [seg | {"kind": "disk"}, seg | {"offset": 48}]
    with pytest.raises(OverlayCorrupt, match="out of order"):
        Manifest.from_json(base | {"segments": disk_then_mem, "segments_length": 96})


def test_manifest_versions_and_features() -> None:
    with pytest.raises(OverlayVersionError):
        Manifest.from_json(_manifest_json() | {"format": "1.9"})
    feats = {"required": ["sparse-v2"], "optional": []}
    with pytest.raises(OverlayFeatureUnsupported, match="sparse-v2"):
        Manifest.from_json(_manifest_json() | {"features": feats})
    opt = {"required": [], "optional": ["whatever"]}  # optional ones are fine to ignore
    assert Manifest.from_json(_manifest_json() | {"features": opt}).features_optional == [
        "whatever"
    ]
    with pytest.raises(OverlayCorrupt, match="cannot decode"):
        Manifest.from_bytes(zstandard.ZstdCompressor().compress(b"{not json"))


def test_byte_stream_any_chunking_and_errors() -> None:
    s = ByteStream([b"ab", b"", bytearray(b"cdef"), memoryview(b"g")])
    assert s.read_exact(3, "x") == b"abc"
    assert s.read_exact(4, "x") == b"defg"
    assert s.at_end()
    with pytest.raises(OverlayTruncated, match="in the middle of segment 4") as e:
        ByteStream([b"abc"]).read_exact(5, "segment 4", 4)
    assert e.value.segment == 4

    def broken():  # type: ignore[no-untyped-def]
        yield b"abc"
        raise ConnectionResetError("peer went away")

    with pytest.raises(OverlayStreamError, match=r"after 3 bytes.*peer went away") as e2:
        ByteStream(broken()).read_exact(10, "x")
    assert not isinstance(e2.value, IntegrityError)  # retryable, not corruption


def test_reader_checks_records_against_the_manifest() -> None:
    """A crafted file with valid hashes is still refused when a number is out of bounds."""
    page = b"\x01" * 4096
    good = craft_overlay([(Kind.MEMORY, rec(Payload.LITERAL, 5, 0, page), 1)])
    r = OverlayReader([good])
    m = r.read_head()
    assert [s.entry.records for s in r.segments()] == [1]
    r.finish()
    assert m.mem_pages == 16384


def test_public_api_is_exported_and_sorted() -> None:
    import cloudlet.overlay as ov

    assert list(ov.__all__) == sorted(ov.__all__, key=lambda n: (not n.isupper(), n))
    for name in ov.__all__:
        assert hasattr(ov, name), name
