"""Rankers: KD-Cloudlet's three formulas, ours, their order, and what is left out."""

from __future__ import annotations

from typing import Any

import pytest

from cloudlet.client.rank import RANKERS, CloudletInfo, rank
from cloudlet.discovery.browse import Found
from cloudlet.errors import InvalidInputError

SID = "org.example.face"
MIB = 1 << 20


def info(name: str, *, cores: int = 4, usage: float = 0.0, mhz: float = 2000.0,
         free_mib: int = 4096, rtt: float = 0.001, ext: dict[str, Any] | None = None,
         services: tuple[str, ...] = (SID,), error: str | None = None) -> CloudletInfo:  # fmt: skip
    system: dict[str, Any] = {
        "cpu_info": {"max_cores": cores, "usage": usage, "speed": mhz, "cache": 512},
        "memory_info": {"max_memory": 8192 * MIB, "free_memory": free_mib * MIB},
        "services": [{"_id": s, "service_id": s} for s in services],
    }
    if ext is not None:
        system["cloudlet"] = {"services": {SID: ext}}
    return CloudletInfo(Found(name, "10.0.0.1", 9999, False), system, rtt, error)


def test_kd_cloudlet_formulas() -> None:
    a = info("a", cores=4, usage=50.0, mhz=3000.0, free_mib=2048)
    assert RANKERS["cpu"](a, SID) == 350.0  # 100 x cores - usage
    assert RANKERS["cpu-performance"](a, SID) == 350.0 * 3000.0 / 100.0
    assert RANKERS["memory"](a, SID) == 2048.0  # free MiB (cache weight 0)


def test_ours_and_the_default_order() -> None:
    cold_near = info("cold-near", rtt=0.0001, ext={"instances": 0, "room": 0, "cached": False,
                                                   "memory_mib": 256, "max_users": 10})  # fmt: skip
    cached = info("cached", rtt=0.01, ext={"instances": 0, "room": 0, "cached": True,
                                           "memory_mib": 256, "max_users": 10})  # fmt: skip
    joinable = info("joinable", rtt=0.02, free_mib=512, ext={"instances": 1, "room": 3,
                    "cached": True, "memory_mib": 256, "max_users": 10})  # fmt: skip
    full = {"instances": 1, "room": 0, "cached": True, "memory_mib": 256, "max_users": 10}
    full_busy = info("full", rtt=0.05, ext=full)
    plain_kd = info("pycloud")  # no extension: warm 0, capacity from free memory alone
    others = info("elsewhere", services=("org.other.app",))
    broken = info("broken", error="cannot reach it")
    infos = [cold_near, cached, joinable, full_busy, plain_kd, others, broken]
    assert RANKERS["warm"](joinable, SID) == 2.0 and RANKERS["warm"](full_busy, SID) == 1.0
    assert RANKERS["capacity"](joinable, SID) == 3 + (512 // 256) * 10
    order = [i.name for i, _ in rank(infos, SID)]  # warm, then capacity, then rtt
    assert order == ["joinable", "cached", "full", "cold-near", "pycloud"]
    assert next(i.name for i, _ in rank(infos, SID, ["rtt"])) == "cold-near"
    # A ranker is any callable; cloudlets without the service or with an error are left out.
    by_name = rank(infos, SID, [lambda i, s: -ord(i.name[0])])
    assert {i.name for i, _ in by_name} == {"cold-near", "cached", "joinable", "full", "pycloud"}
    with pytest.raises(InvalidInputError):
        rank(infos, SID, ["fastest"])
