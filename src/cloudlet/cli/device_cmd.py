"""``cloudlet device ...`` and ``cloudlet message ...``: paired devices and their messages."""

from __future__ import annotations

import datetime
from typing import Any

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors, table
from cloudlet.cli.connect import ServerOpt, connect_mobile

app = typer.Typer(
    help="Paired mobile devices (credentials for the encrypted KD-Cloudlet API).",
    no_args_is_help=True,
)
messages = typer.Typer(help="Messages queued for devices about a service.", no_args_is_help=True)


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def show_device(d: dict[str, Any]) -> None:
    console.print(f"[bold]{d['device_id']}[/] {d['name']}  {d['state']}")
    console.print(f"  authorised since {_when(d['auth_start'])}, expires {_when(d['expires'])}")
    if d.get("password"):
        console.print(f"  [bold]password[/] (shown once): {d['password']}")
    if d.get("token"):
        console.print(f"  [bold]native token[/] (shown once): {d['token']}")


def _minutes(m: float | None) -> float | None:
    return None if m is None else m * 60.0


@app.command("create")
@handle_errors
def create(
    device_id: str = typer.Argument(None, help="The device's id (X-Device-ID); default: made."),
    name: str = typer.Option("", "--name"),
    password: str = typer.Option(None, "--password", help="Default: a random one."),
    minutes: float = typer.Option(
        None, "--minutes", help="How long the authorisation lasts (default: until revoked)."
    ),
    native_token: bool = typer.Option(
        False, "--native-token", help="Also make a native-API device token for it."
    ),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Pair a device: prints its password (and token) once."""
    d = connect_mobile(server).create_device(
        device_id=device_id,
        name=name,
        password=password,
        expires_in=_minutes(minutes),
        native_token=native_token,
    )
    emit(d, as_json, show_device)


@app.command("list")
@handle_errors
def list_(server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """List paired devices and whether each is authorised, revoked or expired."""
    rows = connect_mobile(server).list_devices()
    shown = [r | {"expires": _when(r["expires"]), "last_seen": _when(r["last_seen"])} for r in rows]
    emit(
        rows,
        as_json,
        lambda _r: table(shown, ["device_id", "name", "state", "expires", "last_seen"]),
    )


@app.command("info")
@handle_errors
def info(device_id: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    emit(connect_mobile(server).get_device(device_id), as_json, show_device)


@app.command("revoke")
@handle_errors
def revoke(device_id: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Refuse the device from now on (re-authorise to undo)."""
    emit(connect_mobile(server).revoke_device(device_id), as_json, show_device)


@app.command("authorize")
@handle_errors
def authorize(
    device_id: str,
    minutes: float = typer.Option(None, "--minutes", help="Default: until revoked."),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Authorise a revoked or expired device again, from now."""
    d = connect_mobile(server).authorize_device(device_id, _minutes(minutes))
    emit(d, as_json, show_device)


@app.command("delete")
@handle_errors
def delete(device_id: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Unpair a device (its credentials are gone)."""
    d = connect_mobile(server).delete_device(device_id)
    emit(d, as_json, lambda d: console.print(f"deleted device {d['device_id']}"))


@messages.command("list")
@handle_errors
def list_messages(
    device: str = typer.Option(None, "--device"),
    service: str = typer.Option(None, "--service"),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Messages queued (and handed out: ``read`` set) for devices."""
    rows = connect_mobile(server).list_messages(device_id=device, service_id=service)
    shown = [r | {"read": _when(r["read"]) if r["read"] else ""} for r in rows]
    emit(
        rows,
        as_json,
        lambda _r: table(shown, ["id", "device_id", "service_id", "message", "text", "read"]),
    )


@messages.command("send")
@handle_errors
def send(
    service_id: str,
    text: str,
    device: list[str] = typer.Option([], "--device", help="Default: every device that used it."),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Queue a message about a service for devices (handed out once, when they poll)."""
    d = connect_mobile(server).queue_message(service_id, text, device or None)
    emit(d, as_json, lambda d: console.print(f"queued {d['queued']} message(s)"))
