"""What a mobile client does: find cloudlets, read them, rank them, start or join a service on
the best one, and follow it when it moves (a handoff).

    ep = connect("org.example.face")            # discover, rank, start/join
    print(ep.host, ep.port)                       # where the service answers
    ep = follow(ep, timeout=60) or ep             # a "moved" message -> the new endpoint

Against a cloudlet with encryption on, pass ``credentials={cloudlet name: password}`` and the
``device_id`` it was paired with. Everything goes through the KD-Cloudlet compatible API, so
SEI's pycloud servers are found and used the same way (without our extension, the ``warm`` and
``capacity`` rankers see nothing and fall back to memory).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cloudlet.client.kd import KDClient, KDClientError, ServiceVM
from cloudlet.client.rank import DEFAULT, CloudletInfo, Ranker, rank
from cloudlet.discovery.browse import Found, discover
from cloudlet.errors import CloudletError, NotFoundError
from cloudlet.services.devices import MOVED


def default_device_id() -> str:
    """``CLOUDLET_DEVICE_ID``, else one made from the host name (stable across runs)."""
    env = os.environ.get("CLOUDLET_DEVICE_ID")
    if env:
        return env
    return "py-" + (re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "client")[:100]


@dataclass
class Endpoint:
    """A service instance a client uses: where it answers and which cloudlet runs it."""

    cloudlet: str
    cloudlet_host: str
    cloudlet_port: int
    service_id: str
    instance_id: str
    host: str
    port: int
    encryption: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "cloudlet": self.cloudlet,
            "cloudlet_url": f"http://{self.cloudlet_host}:{self.cloudlet_port}",
            "service_id": self.service_id,
            "instance_id": self.instance_id,
            "host": self.host,
            "port": self.port,
            "endpoint": f"{self.host}:{self.port}",
            "encryption": self.encryption,
        }


def client_for(
    found: Found,
    *,
    device_id: str | None = None,
    credentials: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> KDClient:
    """A KD client for a found cloudlet (with its password when it encrypts)."""
    password = None
    if found.encryption:
        password = (credentials or {}).get(found.name)
        if password is None:
            raise KDClientError(
                f"cloudlet {found.name} has encryption on and no password was given for it",
                hint="pair this device with it (`cloudlet device create`) and pass the password",
            )
    return KDClient(
        found.host,
        found.port,
        device_id=device_id or default_device_id(),
        password=password,
        timeout=timeout,
    )


def probe(
    found: Found,
    *,
    device_id: str | None = None,
    credentials: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> CloudletInfo:
    """Read a cloudlet's metadata (with services and our extension) and measure its RTT.
    Errors are kept in the result rather than raised: one bad cloudlet must not hide others."""
    info = CloudletInfo(found)
    try:
        c = client_for(found, device_id=device_id, credentials=credentials, timeout=timeout)
        info.rtt = c.rtt()
        info.system = c.system(services=True, cloudlet=True)
    except CloudletError as e:
        info.error = e.message
    return info


def parse_url(url: str) -> Found:
    """``http://HOST:PORT`` (or ``HOST:PORT``) as a cloudlet found without discovery."""
    m = re.match(r"^(?:http://)?\[?([^\]/]+?)\]?(?::(\d+))?/?$", url.strip())
    if not m:
        raise NotFoundError(f"not a cloudlet address: {url!r}", hint="use http://HOST:PORT")
    host, port = m.group(1), int(m.group(2) or 9999)
    return Found(name=f"{host}:{port}", host=host, port=port, encryption=False, addresses=[host])


def find(
    timeout: float = 3.0,
    *,
    device_id: str | None = None,
    credentials: dict[str, str] | None = None,
    urls: Sequence[str] = (),
    encrypted_urls: bool = False,
    wait_for: int | None = None,
) -> list[CloudletInfo]:
    """Discover cloudlets (or take ``urls``), then probe them all in parallel."""
    if urls:
        founds = [parse_url(u) for u in urls]
        if encrypted_urls:
            founds = [
                Found(f.name, f.host, f.port, True, f.addresses, f.server, f.txt) for f in founds
            ]
    else:
        founds = discover(timeout, wait_for=wait_for)
    if not founds:
        return []
    with ThreadPoolExecutor(min(8, len(founds))) as pool:
        return list(
            pool.map(lambda f: probe(f, device_id=device_id, credentials=credentials), founds)
        )


def start_on(
    info: CloudletInfo,
    service_id: str,
    *,
    join: bool = True,
    device_id: str | None = None,
    credentials: dict[str, str] | None = None,
) -> Endpoint:
    c = client_for(info.found, device_id=device_id, credentials=credentials, timeout=330.0)
    vm: ServiceVM = c.start(service_id, join=join)
    return Endpoint(
        cloudlet=info.name,
        cloudlet_host=info.found.host,
        cloudlet_port=info.found.port,
        service_id=service_id,
        instance_id=vm.instance_id,
        host=vm.fqdn or vm.host,
        port=vm.port,
        encryption=info.found.encryption,
    )


def connect(
    service_id: str,
    *,
    timeout: float = 3.0,
    join: bool = True,
    rankers: Sequence[str | Ranker] = DEFAULT,
    device_id: str | None = None,
    credentials: dict[str, str] | None = None,
    urls: Sequence[str] = (),
    infos: list[CloudletInfo] | None = None,
) -> Endpoint:
    """Discover, rank, and start (or join) ``service_id`` on the best cloudlet; if that start
    fails, the next best is tried."""
    if infos is None:
        infos = find(timeout, device_id=device_id, credentials=credentials, urls=urls)
    ranked = rank(infos, service_id, rankers)
    if not ranked:
        seen = ", ".join(f"{i.name}{' (' + i.error + ')' if i.error else ''}" for i in infos)
        raise NotFoundError(
            f"no cloudlet offers {service_id}" + (f" (found: {seen})" if seen else ""),
            hint="is a cloudlet on this network? (`cloudlet discover`)",
        )
    errors = []
    for info, _scores in ranked:
        try:
            return start_on(
                info, service_id, join=join, device_id=device_id, credentials=credentials
            )
        except CloudletError as e:
            errors.append(f"{info.name}: {e.message}")
    raise KDClientError(f"could not start {service_id}: " + "; ".join(errors))


def follow(
    ep: Endpoint,
    *,
    timeout: float | None = None,
    poll: float = 2.0,
    device_id: str | None = None,
    credentials: dict[str, str] | None = None,
) -> Endpoint | None:
    """Poll the cloudlet's messages for the service until a "moved" one arrives (or until
    ``timeout``), and return the endpoint on the new cloudlet: the moved instance when the
    message names its port, else one joined there."""
    found = Found(ep.cloudlet, ep.cloudlet_host, ep.cloudlet_port, ep.encryption)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        c = client_for(found, device_id=device_id, credentials=credentials)
        for m in c.messages(ep.service_id):
            if m.get("message") != MOVED:
                continue
            p = m.get("params") or {}
            new = Found(
                name=str(p.get("cloudlet_name") or p.get("cloudlet_ip")),
                host=str(p["cloudlet_ip"]),
                port=int(p["cloudlet_port"]),
                encryption=str(p.get("cloudlet_encryption_enabled")) == "true",
            )
            if p.get("service_port") and p.get("instance_id"):
                return Endpoint(
                    new.name, new.host, new.port, ep.service_id, str(p["instance_id"]),
                    new.host, int(p["service_port"]), new.encryption,
                )  # fmt: skip
            return start_on(
                CloudletInfo(new),
                ep.service_id,
                join=True,
                device_id=device_id,
                credentials=credentials,
            )
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
