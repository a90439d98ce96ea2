"""Find cloudlets on the local network: browse ``_cloudlet._tcp.local.`` for a while."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cloudlet.discovery.advertise import SERVICE_TYPE


@dataclass(frozen=True)
class Found:
    """One advertised cloudlet: its instance name, first IPv4 address, API port, TXT pairs."""

    name: str
    host: str
    port: int
    encryption: bool
    addresses: list[str] = field(default_factory=list)
    server: str = ""
    txt: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"url": self.url}


def _decode(v: bytes | None) -> str:
    return "" if v is None else v.decode("utf-8", "replace")


def discover(
    timeout: float = 3.0, *, interfaces: list[str] | None = None, wait_for: int | None = None
) -> list[Found]:
    """Browse for ``timeout`` seconds (or until ``wait_for`` cloudlets answered) and resolve
    what answered; sorted by name. ``interfaces``: IPv4 addresses to use (default: all)."""
    from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    names: dict[str, None] = {}
    seen = threading.Event()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names[name] = None
        elif state_change is ServiceStateChange.Removed:
            names.pop(name, None)
        if wait_for is not None and len(names) >= wait_for:
            seen.set()

    zc = Zeroconf(
        interfaces=interfaces if interfaces else InterfaceChoice.All,
        ip_version=IPVersion.V4Only,
    )
    found: list[Found] = []
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        try:
            seen.wait(timeout)
        finally:
            browser.cancel()
        deadline = time.monotonic() + max(1.0, timeout)
        for name in list(names):
            left = max(0.2, deadline - time.monotonic())
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=int(left * 1000))
            if info is None or not info.port:
                continue
            addrs = [socket.inet_ntoa(a) for a in info.addresses if len(a) == 4]
            if not addrs:
                continue
            txt = {_decode(k): _decode(v) for k, v in (info.properties or {}).items()}
            found.append(
                Found(
                    name=name[: -len(SERVICE_TYPE) - 1],
                    host=addrs[0],
                    port=int(info.port),
                    encryption=txt.get("encryption") == "enabled",
                    addresses=addrs,
                    server=info.server or "",
                    txt=txt,
                )
            )
    finally:
        zc.close()
    return sorted(found, key=lambda f: (f.name, f.host))
