"""The handoff wire format: frames, and device state sent against the base's (pure logic)."""

from __future__ import annotations

import os

import pytest

from cloudlet.handoff.wire import (
    CODEC_DEVSTATE_DICT,
    FRAME,
    FrameDecoder,
    WireError,
    compress_devstate,
    devstate_dictionary,
    encode_frame,
)
from cloudlet.overlay.format import MAX_DEVSTATE, Kind, Payload, RecordLimits, pack_record

LIMITS = RecordLimits(
    mem_pages=1024, disk_pages=1024, base_mem_pages=1024, base_disk_pages=1024,
    devstate_size=MAX_DEVSTATE,
)  # fmt: skip


def _devstates() -> tuple[bytes, bytes]:
    """A base device state and a VM's: the same but for a few scattered bytes."""
    base = os.urandom(200_000) + bytes(300_000) + os.urandom(200_000)
    vm = bytearray(base)
    for off in (10, 99_999, 250_000, 650_123):
        vm[off] ^= 0x5A
    return base, bytes(vm)


def test_device_state_goes_as_a_small_delta_and_comes_back_exact() -> None:
    base, vm = _devstates()
    raw = pack_record(Payload.LITERAL, 0, 0, vm)
    stored = compress_devstate(raw, devstate_dictionary(base))
    assert len(stored) < 2000  # 700 KB, mostly random, against a base that has it
    frame = encode_frame(0, Kind.DEVSTATE, 1, stored, len(raw), CODEC_DEVSTATE_DICT, 3)
    dec = FrameDecoder(LIMITS, devstate_dictionary(base))
    [(kind, recs)] = list(dec.feed(frame))
    dec.close()
    assert kind is Kind.DEVSTATE
    assert bytes(recs[0][3]) == vm


def test_a_different_base_device_state_is_detected() -> None:
    base, vm = _devstates()
    raw = pack_record(Payload.LITERAL, 0, 0, vm)
    frame = encode_frame(
        0, Kind.DEVSTATE, 1, compress_devstate(raw, devstate_dictionary(base)), len(raw),
        CODEC_DEVSTATE_DICT, 3,
    )  # fmt: skip
    other = devstate_dictionary(os.urandom(len(base)))
    with pytest.raises(WireError, match="frame 0"):
        list(FrameDecoder(LIMITS, other).feed(frame))


@pytest.mark.parametrize("case", ["memory frame", "no dictionary"])
def test_the_dictionary_codec_is_refused_where_it_does_not_belong(case: str) -> None:
    base, _ = _devstates()
    page = os.urandom(4096)
    raw = pack_record(Payload.LITERAL, 3, 0, page)
    kind = Kind.MEMORY if case == "memory frame" else Kind.DEVSTATE
    if kind is Kind.DEVSTATE:
        raw = pack_record(Payload.LITERAL, 0, 0, page)
    stored = compress_devstate(raw, devstate_dictionary(base))
    frame = encode_frame(0, kind, 1, stored, len(raw), CODEC_DEVSTATE_DICT, 3)
    dec = FrameDecoder(LIMITS, devstate_dictionary(base) if case == "memory frame" else None)
    with pytest.raises(WireError, match="codec 0x80"):
        list(dec.feed(frame))


@pytest.mark.parametrize("old", [1, 2])
def test_an_older_version_frame_is_refused_by_name(old: int) -> None:
    raw = pack_record(Payload.ZERO, 0, 1)
    frame = bytearray(encode_frame(0, Kind.MEMORY, 1, raw, len(raw), 0, 0))
    frame[4] = old
    with pytest.raises(WireError, match=f"wire version {old}, this cloudlet speaks 3"):
        list(FrameDecoder(LIMITS).feed(bytes(frame)))
    assert FRAME.size == 32
