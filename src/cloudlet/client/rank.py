"""Rank cloudlets for a service: KD-Cloudlet's three rankers and ours, pluggable.

A ranker is any ``f(info, service_id) -> float`` (higher is better). :func:`rank` keeps the
cloudlets that offer the service and orders them by the tuple of the rankers' scores, first
ranker first: ``rank(infos, sid, ["warm", "rtt"])`` prefers a cloudlet where the service is
running or cached, then the nearer one.

KD-Cloudlet's (from its Java client): ``cpu`` = 100 x cores - usage; ``cpu-performance`` = that
x MHz / 100; ``memory`` = free memory in MiB. Ours: ``warm`` (2: an instance with room runs, so
a start is a join; 1: it ran or its snapshot is cached, so a start is a resume; 0: a
synthesis), ``rtt`` (minus the measured round trip), ``capacity`` (how many more users fit: free
places in running instances plus new instances that fit in free memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudlet.discovery.browse import Found

MIB = 1 << 20


@dataclass
class CloudletInfo:
    """A discovered cloudlet and what it said about itself (``/api/system``)."""

    found: Found
    system: dict[str, Any] = field(default_factory=dict)
    rtt: float | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.found.name

    @property
    def cpu(self) -> dict[str, Any]:
        return dict(self.system.get("cpu_info") or {})

    @property
    def memory(self) -> dict[str, Any]:
        return dict(self.system.get("memory_info") or {})

    @property
    def services(self) -> list[str]:
        return [str(s.get("service_id")) for s in self.system.get("services") or []]

    def offers(self, service_id: str) -> bool:
        return self.error is None and service_id.lower() in (s.lower() for s in self.services)

    def ext(self, service_id: str) -> dict[str, Any]:
        """Our extension's view of a service (empty against a plain KD-Cloudlet server)."""
        ext = self.system.get("cloudlet") or {}
        return dict((ext.get("services") or {}).get(service_id) or {})

    def to_dict(self) -> dict[str, Any]:
        return self.found.to_dict() | {
            "cpu_info": self.cpu,
            "memory_info": self.memory,
            "services": self.services,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "error": self.error,
            "cloudlet": self.system.get("cloudlet"),
        }


Ranker = Callable[[CloudletInfo, str], float]


def cpu(info: CloudletInfo, _sid: str) -> float:
    c = info.cpu
    return 100.0 * float(c.get("max_cores") or 0) - float(c.get("usage") or 0.0)


def cpu_performance(info: CloudletInfo, sid: str) -> float:
    return cpu(info, sid) * float(info.cpu.get("speed") or 0.0) / 100.0


def memory(info: CloudletInfo, _sid: str) -> float:
    return float(info.memory.get("free_memory") or 0) / MIB


def warm(info: CloudletInfo, sid: str) -> float:
    e = info.ext(sid)
    if e.get("room", 0) > 0:
        return 2.0
    if e.get("instances", 0) > 0 or e.get("cached"):
        return 1.0
    return 0.0


def rtt(info: CloudletInfo, _sid: str) -> float:
    return -(info.rtt if info.rtt is not None else float("inf"))


def capacity(info: CloudletInfo, sid: str) -> float:
    e = info.ext(sid)
    per_instance = int(e.get("memory_mib") or 256)
    users = int(e.get("max_users") or 1)
    free_mib = float(info.memory.get("free_memory") or 0) / MIB
    return float(e.get("room", 0)) + (free_mib // per_instance) * users


RANKERS: dict[str, Ranker] = {
    "cpu": cpu,
    "cpu-performance": cpu_performance,
    "memory": memory,
    "warm": warm,
    "rtt": rtt,
    "capacity": capacity,
}
DEFAULT: tuple[str, ...] = ("warm", "capacity", "rtt")


def resolve(rankers: Iterable[str | Ranker]) -> list[Ranker]:
    out = []
    for r in rankers:
        if callable(r):
            out.append(r)
        elif r in RANKERS:
            out.append(RANKERS[r])
        else:
            from cloudlet.errors import InvalidInputError

            raise InvalidInputError(f"unknown ranker {r!r}", hint=f"one of {', '.join(RANKERS)}")
    return out


def rank(
    infos: Iterable[CloudletInfo], service_id: str, rankers: Sequence[str | Ranker] = DEFAULT
) -> list[tuple[CloudletInfo, tuple[float, ...]]]:
    """The cloudlets offering ``service_id``, best first, with their scores."""
    fs = resolve(rankers)
    scored = [(i, tuple(f(i, service_id) for f in fs)) for i in infos if i.offers(service_id)]
    return sorted(scored, key=lambda x: x[1], reverse=True)
