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
    # The best, or one within the hysteresis margin of it.
    assert ctl.delivered(best) * (1 + ctl.hysteresis) >= max(ctl.delivered(o) for o in ctl.options)
    snap = ctl.snapshot()
    assert snap["current"] == best.name and 20 < float(snap["link_mbps"]) < 30


def test_mixed_content_does_not_make_the_choice_flap() -> None:
    """Frames differ in content (text-like disk pages, random memory pages): every option is
    tried on other frames than the current one, so raw ratios of different frames must not
    be compared. On a 5 Mbit/s link zstd-19 compresses every frame best and the CPU keeps
    up: it must stay the choice whatever the frames happen to hold (bench/handoff.py saw 68
    changes in a 219 s handoff, with long stretches of zstd-1 at 5 Mbit/s)."""
    gain = {"zstd-1": 1.0, "zstd-3": 1.07, "zstd-9": 1.15, "zstd-19": 1.3}  # same content
    speed = {"zstd-1": 400e6, "zstd-3": 150e6, "zstd-9": 80e6, "zstd-19": 6e6}
    ctl = CompressionController(cores=2)
    raw = 1 << 20
    chosen = []
    for i in range(400):
        content = 4.0 if (i // 7) % 2 else 1.1  # runs of compressible and random frames
        opt = ctl.choose()
        chosen.append(opt.name)
        ratio = content * gain[opt.name]
        ref_stored = int(raw / content)  # the same frame under the reference, zstd-1
        ctl.observe_compress(opt, raw, int(raw / ratio), raw / speed[opt.name], ref_stored)
        ctl.observe_link(int(raw / ratio), raw / ratio * 8 / 5e6)
    late = chosen[100:]
    assert late.count("zstd-19") >= 0.85 * len(late), late
    assert len([c for c in ctl.changes if c.frame > 100]) <= 2, [c.to_dict() for c in ctl.changes]


def _noisy_near_equal(hysteresis: float) -> CompressionController:
    """zstd-3 and zstd-9 deliver within 2% of each other; each measurement is off by up to 8%."""
    import random

    rnd = random.Random(7)
    gain = {"zstd-1": 0.8, "zstd-3": 1.0, "zstd-9": 1.02, "zstd-19": 1.1}
    speed = {"zstd-1": 400e6, "zstd-3": 150e6, "zstd-9": 80e6, "zstd-19": 1e6}
    ctl = CompressionController(cores=2, hysteresis=hysteresis)
    raw = 1 << 20
    for _ in range(400):
        opt = ctl.choose()
        noise = rnd.uniform(0.92, 1.08)
        ratio = 2.0 * gain.get(opt.name, 0.5) * noise
        ctl.observe_compress(opt, raw, int(raw / ratio), raw / speed[opt.name], raw / 2.0)
        ctl.observe_link(int(raw / ratio), raw / ratio * 8 / 25e6)
    return ctl


def test_near_equal_options_do_not_take_turns() -> None:
    """After a link change the estimates of neighbouring levels cross back and forth with the
    noise of each frame; a change needs a clear gain (bench/handoff.py saw the choice flip
    among near-equal levels after the link dropped)."""
    calm = _noisy_near_equal(0.1)
    flappy = _noisy_near_equal(0.0)
    late = [c for c in calm.changes if c.frame > 50]
    assert len(late) <= 1, [c.to_dict() for c in calm.changes]
    assert len([c for c in flappy.changes if c.frame > 50]) > 3 * max(1, len(late))
