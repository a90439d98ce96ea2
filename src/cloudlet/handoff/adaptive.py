"""Adaptive compression: choose, per frame, the codec that delivers the most bytes per second.

Delivered throughput of an option is ``min(cores x compress_speed, link_rate x ratio)``
(Elijah's min(compute rate, network rate / ratio) in our terms): on a slow link a stronger
level wins because every byte saved is time saved; on a fast link the CPU becomes the
bottleneck and a cheaper level (or none) wins. Speeds and ratios are measured on the real data
as it goes (exponential moving averages); the link rate comes from how fast the transport
drains what we hand it. Every few frames a neighbouring option is tried so its estimate stays
fresh, which is how the choice follows a link that changes mid-transfer. Each change is logged
with its reason; a change needs an estimated gain of at least ``hysteresis`` (10%), so that
options of near-equal worth do not take turns.

Options are tried on different frames, and frames differ a lot (random memory pages compress
~1x, text-like disk pages ~4x): raw ratios of different frames are not comparable, and
comparing them made the choice follow the content of the last frames rather than the link.
So each frame's size under a reference (zstd-1, on a sample of the frame) is measured too; per
option the controller keeps its *gain* over the reference on the same content, and the content's
compressibility (the reference ratio) is tracked once, for all options alike.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("cloudlet.handoff")


@dataclass(frozen=True)
class Option:
    name: str
    codec: int  # overlay codec id: 0 none, 1 zstd
    level: int


OPTIONS: tuple[Option, ...] = (
    Option("none", 0, 0),
    Option("zstd-1", 1, 1),
    Option("zstd-3", 1, 3),
    Option("zstd-9", 1, 9),
    Option("zstd-19", 1, 19),  # ~3 MB/s a core: only worth it on a slow link
)
_MEMCPY_SPEED = 4e9  # "compressing" with none costs a copy


@dataclass
class _Estimate:
    speed: float | None = None  # raw bytes per CPU-second
    ratio: float | None = None  # raw / stored

    def update(self, speed: float, ratio: float, alpha: float) -> None:
        self.speed = speed if self.speed is None else (1 - alpha) * self.speed + alpha * speed
        self.ratio = ratio if self.ratio is None else (1 - alpha) * self.ratio + alpha * ratio


@dataclass
class Change:
    at: float
    frame: int
    old: str
    new: str
    link_mbps: float
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "t": round(self.at, 3),
            "frame": self.frame,
            "from": self.old,
            "to": self.new,
            "link_mbps": round(self.link_mbps, 2),
            "reason": self.reason,
        }


@dataclass
class CompressionController:
    cores: int = 2
    explore_every: int = 12
    hysteresis: float = 0.1  # switch only to an option estimated this much better
    alpha: float = 0.3
    link_alpha: float = 0.3
    options: tuple[Option, ...] = OPTIONS
    link_rate: float = 12.5e6  # bytes/s: a 100 Mbps guess until measured
    current: Option = OPTIONS[2]
    changes: list[Change] = field(default_factory=list)
    _est: dict[str, _Estimate] = field(default_factory=dict)
    _frames: int = 0
    _t0: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _link_bytes: int = 0
    _link_seconds: float = 0.0
    _ref_ratio: float | None = None  # raw / stored of recent frames under the reference

    def __post_init__(self) -> None:
        for o in self.options:
            self._est[o.name] = _Estimate()
        self._est["none"].speed = _MEMCPY_SPEED
        self._est["none"].ratio = 1.0

    # -- measurements --------------------------------------------------------------------
    def observe_compress(
        self,
        opt: Option,
        raw: int,
        stored: int,
        cpu_seconds: float,
        ref_stored: float | None = None,
    ) -> None:
        """A frame of ``raw`` bytes became ``stored`` with ``opt`` in ``cpu_seconds``.

        ``ref_stored``: the same frame's size under the reference option (estimated from a
        sample is fine). Without it, ratios are taken as they come (frames of like content).
        """
        if raw <= 0 or stored <= 0 or opt.name == "none":
            return
        with self._lock:
            if ref_stored:
                r = raw / ref_stored
                a = self.alpha
                self._ref_ratio = (
                    r if self._ref_ratio is None else (1 - a) * self._ref_ratio + a * r
                )
            gain = ref_stored / stored if ref_stored else raw / stored
            self._est[opt.name].update(raw / max(cpu_seconds, 1e-6), gain, self.alpha)

    def observe_link(self, nbytes: int, seconds: float) -> None:
        """Bytes the transport drained and how long that took (windowed, then smoothed)."""
        with self._lock:
            self._link_bytes += nbytes
            self._link_seconds += seconds
            window_full = self._link_seconds >= 0.05 or self._link_bytes >= 8 << 20
            if window_full and self._link_seconds > 0 and self._link_bytes >= 64 * 1024:
                rate = self._link_bytes / self._link_seconds
                self.link_rate = (1 - self.link_alpha) * self.link_rate + self.link_alpha * rate
                self._link_bytes, self._link_seconds = 0, 0.0

    def set_link_rate(self, rate: float) -> None:
        with self._lock:
            self.link_rate = rate

    # -- decisions -----------------------------------------------------------------------
    def delivered(self, opt: Option) -> float:
        """Estimated raw bytes per second delivered with ``opt`` (0 if never measured)."""
        e = self._est[opt.name]
        if e.speed is None or e.ratio is None:
            return 0.0
        return min(self.cores * e.speed, self.link_rate * self._ratio(opt))

    def _ratio(self, opt: Option) -> float:
        """Expected raw / stored for the current content: gain x reference ratio."""
        ratio = self._est[opt.name].ratio or 0.0
        if opt.codec == 0 or self._ref_ratio is None:
            return ratio
        return ratio * self._ref_ratio

    def choose(self) -> Option:
        """The option for the next frame (occasionally a neighbour, to keep estimates fresh)."""
        with self._lock:
            self._frames += 1
            unmeasured = [o for o in self.options if self._est[o.name].speed is None]
            if unmeasured:
                return unmeasured[0]
            best = max(self.options, key=self.delivered)
            # Estimates of near-equal options cross back and forth with noise; only a clear
            # gain is worth a change (each change also costs a round of exploring).
            clear = self.delivered(best) > self.delivered(self.current) * (1 + self.hysteresis)
            if best != self.current and clear:
                old = self.current
                self.current = best
                c = Change(
                    time.monotonic() - self._t0,
                    self._frames,
                    old.name,
                    best.name,
                    self.link_rate * 8 / 1e6,
                    f"{best.name} delivers {self.delivered(best) / 1e6:.1f} MB/s vs "
                    f"{self.delivered(old) / 1e6:.1f} MB/s for {old.name}",
                )
                self.changes.append(c)
                log.info("handoff compression: %s -> %s at %.1f Mbps (%s)",
                         c.old, c.new, c.link_mbps, c.reason)  # fmt: skip
            if self._frames % self.explore_every == 0:
                i = self.options.index(self.current)
                j = i + 1 if (self._frames // self.explore_every) % 2 else i - 1
                if 0 <= j < len(self.options):
                    return self.options[j]
            return self.current

    def snapshot(self) -> dict[str, object]:
        return {
            "current": self.current.name,
            "link_mbps": round(self.link_rate * 8 / 1e6, 2),
            "estimates": {
                o.name: {
                    "speed_mb_s": round((self._est[o.name].speed or 0) / 1e6, 1),
                    "ratio": round(self._ratio(o), 3),
                }
                for o in self.options
            },
            "reference_ratio": round(self._ref_ratio, 3) if self._ref_ratio else None,
            "changes": [c.to_dict() for c in self.changes],
        }
