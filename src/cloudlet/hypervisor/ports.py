"""Host port forwards (QEMU user-mode networking ``hostfwd``), bound to 127.0.0.1 by default."""

from __future__ import annotations

import errno
import re
import socket
from dataclasses import dataclass

from cloudlet.errors import ConflictError, InvalidInputError


@dataclass(frozen=True)
class PortForward:
    guest: int
    host: int = 0  # 0: pick a free port
    host_addr: str = "127.0.0.1"
    auto: bool = False  # the host port was picked by us (so it may be re-picked on resume)

    def to_dict(self) -> dict[str, object]:
        return {
            "guest": self.guest,
            "host": self.host,
            "host_addr": self.host_addr,
            "auto": self.auto,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> PortForward:
        return cls(
            guest=_port(d["guest"]),
            host=_port(d["host"], allow_zero=True),
            host_addr=str(d.get("host_addr", "127.0.0.1")),
            auto=bool(d.get("auto", False)),
        )

    @property
    def url(self) -> str:
        scheme = "http" if self.guest in (80, 8080) else "tcp"
        return f"{scheme}://{self.host_addr}:{self.host}"

    def hostfwd(self) -> str:
        return f"hostfwd=tcp:{self.host_addr}:{self.host}-:{self.guest}"


def _port(v: object, allow_zero: bool = False) -> int:
    try:
        p = int(v)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise InvalidInputError(f"invalid port {v!r}") from None
    if not ((allow_zero and p == 0) or 1 <= p <= 65535):
        raise InvalidInputError(f"port {p} out of range 1-65535")
    return p


_FWD = re.compile(r"^(?:(?:(?P<addr>[0-9.]+):)?(?P<host>\d+):)?(?P<guest>\d+)$")


def parse_forward(spec: str) -> PortForward:
    """Parse ``[[ADDR:]HOST:]GUEST`` (e.g. ``8080:80`` or ``80``)."""
    m = _FWD.match(spec.strip())
    if not m:
        raise InvalidInputError(
            f"invalid port forward {spec!r}", hint="use HOST:GUEST (e.g. 8080:80) or GUEST"
        )
    host = _port(m.group("host") or 0, allow_zero=True)
    return PortForward(
        guest=_port(m.group("guest")),
        host=host,
        host_addr=m.group("addr") or "127.0.0.1",
        auto=host == 0,
    )


def is_free(port: int, addr: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def pick_free(addr: str = "127.0.0.1", avoid: set[int] | None = None) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
            port = int(s.getsockname()[1])
        if not avoid or port not in avoid:
            return port
    raise ConflictError("could not find a free host port")


def resolve(forwards: list[PortForward]) -> list[PortForward]:
    """Give every auto forward a free host port; refuse explicit ports already taken."""
    out: list[PortForward] = []
    used: set[int] = set()
    for f in forwards:
        if f.host == 0 or (f.auto and not is_free(f.host, f.host_addr)):
            port = pick_free(f.host_addr, used)
            out.append(PortForward(f.guest, port, f.host_addr, auto=True))
        else:
            if f.host in used or not is_free(f.host, f.host_addr):
                raise ConflictError(
                    f"host port {f.host_addr}:{f.host} is already in use",
                    hint=f"choose another host port (--forward OTHER:{f.guest}) "
                    f"or give only the guest port ({f.guest}) to pick a free one",
                )
            out.append(f)
        used.add(out[-1].host)
    return out
