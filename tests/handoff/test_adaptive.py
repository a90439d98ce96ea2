"""The adaptive compression controller follows the link (pure logic, measured inputs)."""

from __future__ import annotations

from cloudlet.handoff.adaptive import CompressionController


def feed(ctl: CompressionController, link_mbps: float, frames: int) -> list[str]:
    """Simulate frames: zstd levels with fixed speed/ratio, the link at ``link_mbps``."""
    model = {
        "zstd-1": (400e6, 2.1),
        "zstd-3": (150e6, 2.3),
        "zstd-9": (80e6, 2.45),
        "zstd-19": (3e6, 2.75),
    }
    chosen = []
    for _ in range(frames):
        opt = ctl.choose()
        chosen.append(opt.name)
        if opt.name in model:
            speed, ratio = model[opt.name]
            raw = 1 << 20
            ctl.observe_compress(opt, raw, int(raw / ratio), raw / speed)
            wire = int(raw / ratio)
        else:
            wire = 1 << 20
        ctl.observe_link(wire, wire * 8 / (link_mbps * 1e6))
    return chosen


def test_choice_follows_the_link_5_25_5() -> None:
    ctl = CompressionController(cores=2)
    feed(ctl, 5, 40)
    slow = ctl.current.name
    feed(ctl, 25, 60)
    mid = ctl.current.name
    feed(ctl, 5, 60)
    slow_again = ctl.current.name
    feed(ctl, 1000, 80)
    fast = ctl.current.name
    # At 5 Mbps the strongest level delivers most; at 25 Mbps zstd-19 is CPU-bound (2 x 3 MB/s)
    # and zstd-9 delivers more; on a fast link a cheap level wins.
    assert (slow, mid, slow_again) == ("zstd-19", "zstd-9", "zstd-19")
    assert fast in ("zstd-1", "zstd-3")
    assert len(ctl.changes) >= 3
    assert all(c.reason for c in ctl.changes)


def test_cpu_bound_prefers_cheaper_levels() -> None:
    ctl = CompressionController(cores=1)
    feed(ctl, 10_000, 50)
    assert ctl.current.name in ("none", "zstd-1")


def test_delivered_is_min_of_cpu_and_link() -> None:
    ctl = CompressionController(cores=2)
    feed(ctl, 25, 30)
    best = ctl.current
    assert ctl.delivered(best) == max(ctl.delivered(o) for o in ctl.options)
    snap = ctl.snapshot()
    assert snap["current"] == best.name and 20 < float(snap["link_mbps"]) < 30
