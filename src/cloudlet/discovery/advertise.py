"""Advertise this cloudlet over zeroconf while the server runs.

Bound to the address the API listens on (``--host``): a specific address advertises on that
interface only, ``0.0.0.0`` on every IPv4 interface. A failure to advertise (no multicast
interface, say) is logged, not fatal: the API works without discovery.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from typing import Any

log = logging.getLogger("cloudlet.discovery")

SERVICE_TYPE = "_cloudlet._tcp.local."
WILDCARDS = ("", "0.0.0.0")


def txt_record(encrypted: bool) -> dict[str, str]:
    """Exactly one pair: KD-Cloudlet clients read the TXT record as one ``key=value``."""
    return {"encryption": "enabled" if encrypted else "disabled"}


def instance_name(name: str) -> str:
    """The cloudlet name as a DNS-SD instance name (at most 63 bytes, no control chars)."""
    clean = "".join(c for c in name if c.isprintable()).strip() or "cloudlet"
    while len(clean.encode()) > 63:
        clean = clean[:-1]
    return clean


def host_label(name: str) -> str:
    """A host name for the SRV record: the cloudlet name reduced to one DNS label."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "cloudlet"


def local_ipv4() -> list[str]:
    """The non-loopback IPv4 addresses of this host (for a server bound to ``0.0.0.0``)."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                out.append(ip.ip)
    return sorted(set(out))


class Advertiser:
    """One registration of ``_cloudlet._tcp.local.``; :meth:`close` withdraws it (goodbye)."""

    def __init__(self, name: str, host: str, port: int, *, encrypted: bool) -> None:
        self.name = instance_name(name)
        self.host = host
        self.port = port
        self.encrypted = encrypted
        self._zc: Any = None
        self._info: Any = None

    @property
    def registered_name(self) -> str | None:
        """The instance name in use (it changes if another cloudlet had the same one)."""
        if self._info is None:
            return None
        return str(self._info.name)[: -len(SERVICE_TYPE) - 1]

    async def start(self) -> Advertiser:
        from zeroconf import InterfaceChoice, IPVersion, ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        addrs = local_ipv4() if self.host in WILDCARDS else [self.host]
        interfaces: Any = InterfaceChoice.All if self.host in WILDCARDS else [self.host]
        self._zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{self.name}.{SERVICE_TYPE}",
            port=self.port,
            properties=txt_record(self.encrypted),
            addresses=[socket.inet_aton(a) for a in addrs],
            server=f"{host_label(self.name)}.local.",
        )
        try:
            await (await self._zc.async_register_service(self._info, allow_name_change=True))
        except BaseException:
            await self._zc.async_close()
            self._zc = None
            raise
        log.info(
            "advertising %r as %s on %s:%d", self.registered_name, SERVICE_TYPE, addrs, self.port
        )
        return self

    async def close(self) -> None:
        """Send the goodbye (TTL 0) records, then close the sockets."""
        if self._zc is None:
            return
        try:
            with contextlib.suppress(Exception):
                await (await self._zc.async_unregister_service(self._info))
        finally:
            await self._zc.async_close()
            self._zc = None


async def start_advertising(settings: Any) -> Advertiser | None:
    """The server's advertisement per its settings (None when off or when it failed)."""
    if not settings.advertise or settings.kd_api == "off":
        return None
    adv = Advertiser(
        settings.name, settings.host, settings.port, encrypted=settings.kd_api == "encrypted"
    )
    try:
        return await adv.start()
    except Exception as e:  # discovery is a convenience: the API works without it
        log.warning("could not advertise over zeroconf on %s: %s", settings.host, e)
        return None
