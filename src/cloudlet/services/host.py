"""What this host has: CPU, memory, load (for ``GET /v1/info`` and admission checks).

Read from ``/proc`` directly: cheap enough for every call, and no extra dependency. CPU usage
is the busy share of all cores between two samples of ``/proc/stat`` (the previous call's and
this one's), so it needs no sleeping inside a request.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_last_stat: tuple[float, int, int] | None = None  # (when, busy jiffies, total jiffies)


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes (MemTotal, MemAvailable, ...)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                parts = v.split()
                if parts and parts[0].isdigit():
                    out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def mem_available_mib() -> int | None:
    avail = meminfo().get("MemAvailable")
    return None if avail is None else avail >> 20


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def cpu_usage() -> float | None:
    """Busy fraction of all cores since the previous call (None on the first call)."""
    global _last_stat
    try:
        busy, total = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    with _lock:
        prev, _last_stat = _last_stat, (time.monotonic(), busy, total)
    if prev is None or total == prev[2]:
        return None
    return round((busy - prev[1]) / (total - prev[2]), 4)


def cpuinfo() -> dict[str, Any]:
    mhz: list[float] = []
    cache = None
    model = None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        if k == "cpu MHz":
            with contextlib.suppress(ValueError):
                mhz.append(float(v))
        elif k == "cache size" and cache is None:
            cache = v
        elif k == "model name" and model is None:
            model = v
    return {
        "cores": os.cpu_count() or 1,
        "model": model,
        "mhz": round(sum(mhz) / len(mhz), 1) if mhz else None,
        "cache": cache,
    }


def host_info() -> dict[str, Any]:
    mem = meminfo()
    load1, load5, load15 = os.getloadavg()
    return {
        "cpu": cpuinfo() | {"usage": cpu_usage()},
        "memory": {
            "total": mem.get("MemTotal"),
            "free": mem.get("MemAvailable", mem.get("MemFree")),
        },
        "load": [round(load1, 2), round(load5, 2), round(load15, 2)],
    }
