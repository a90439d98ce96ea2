"""``cloudlet discover`` and ``cloudlet connect``: the mobile client's side, from a shell.

``discover`` browses zeroconf for cloudlets and reads each one's metadata (with ``--service``,
ranks them for that service); ``connect`` does what a mobile client does: discover, rank, start
or join the service on the best cloudlet, and print where it answers.
"""

from __future__ import annotations

from typing import Any

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors, table
from cloudlet.errors import InvalidInputError

TimeoutOpt = typer.Option(3.0, "--timeout", help="Seconds to browse zeroconf.")
UrlOpt = typer.Option(
    [], "--url", help="A cloudlet's address (http://HOST:PORT) instead of discovering."
)
DeviceOpt = typer.Option(
    None, "--device-id", envvar="CLOUDLET_DEVICE_ID", help="This device's id (X-Device-ID)."
)
PasswordOpt = typer.Option(
    [],
    "--password",
    help="NAME=PASSWORD for a cloudlet with encryption on (the device's password there).",
)
RankerOpt = typer.Option(
    [],
    "--ranker",
    help="Rankers, most important first: warm, capacity, rtt, cpu, cpu-performance, memory "
    "(default: warm, capacity, rtt).",
)


def register(app: typer.Typer) -> None:
    app.command("discover")(discover)
    app.command("connect")(connect)


def _credentials(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        name, sep, pw = p.partition("=")
        if not sep or not name:
            raise InvalidInputError(f"--password takes NAME=PASSWORD, not {p!r}")
        out[name] = pw
    return out


def _row(d: dict[str, Any]) -> dict[str, Any]:
    cpu, mem = d.get("cpu_info") or {}, d.get("memory_info") or {}
    free = mem.get("free_memory")
    return {
        "rank": d.get("rank", ""),
        "name": d["name"],
        "address": f"{d['host']}:{d['port']}",
        "encryption": "on" if d["encryption"] else "off",
        "cores": cpu.get("max_cores"),
        "cpu %": cpu.get("usage"),
        "free MiB": None if free is None else free >> 20,
        "rtt ms": d.get("rtt_ms"),
        "services": len(d.get("services") or []),
        "error": d.get("error") or "",
    }


@handle_errors
def discover(
    timeout: float = TimeoutOpt,
    service: str = typer.Option(None, "--service", help="Rank the cloudlets for this service."),
    ranker: list[str] = RankerOpt,
    url: list[str] = UrlOpt,
    device_id: str = DeviceOpt,
    password: list[str] = PasswordOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Find cloudlets on the local network (zeroconf) and show what each says about itself."""
    from cloudlet.client.mobile import find
    from cloudlet.client.rank import DEFAULT, rank

    infos = find(timeout, device_id=device_id, credentials=_credentials(password), urls=url)
    rows = [i.to_dict() for i in infos]
    if service:
        order = rank(infos, service, ranker or DEFAULT)
        position = {id(i): n for n, (i, _s) in enumerate(order, 1)}
        scores = {id(i): list(s) for i, s in order}
        rows = [
            r | {"rank": position.get(id(i)), "scores": scores.get(id(i))}
            for r, i in zip(rows, infos, strict=True)
        ]
        rows.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0))
    cols = ["rank", "name", "address", "encryption", "cores", "cpu %", "free MiB", "rtt ms"]
    emit(rows, as_json, lambda rs: table([_row(r) for r in rs], [*cols, "services", "error"]))


@handle_errors
def connect(
    service_id: str = typer.Argument(..., help="The service to start or join."),
    timeout: float = TimeoutOpt,
    join: bool = typer.Option(True, "--join/--no-join", help="Share a running instance."),
    ranker: list[str] = RankerOpt,
    url: list[str] = UrlOpt,
    device_id: str = DeviceOpt,
    password: list[str] = PasswordOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Discover cloudlets, pick the best for SERVICE_ID, start or join it there, print the
    endpoint (HOST:PORT)."""
    from cloudlet.client.mobile import connect as mobile_connect
    from cloudlet.client.rank import DEFAULT

    ep = mobile_connect(
        service_id,
        timeout=timeout,
        join=join,
        rankers=ranker or DEFAULT,
        device_id=device_id,
        credentials=_credentials(password),
        urls=url,
    )
    emit(
        ep.to_dict(),
        as_json,
        lambda d: console.print(
            f"{d['endpoint']}  (instance {d['instance_id']} of {d['service_id']} "
            f"on cloudlet {d['cloudlet']})"
        ),
    )
