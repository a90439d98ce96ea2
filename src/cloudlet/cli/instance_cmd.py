"""``cloudlet instance ...``: running services (locally or via ``--server``)."""

from __future__ import annotations

from typing import Any

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors, table
from cloudlet.cli.connect import ServerOpt, connect

app = typer.Typer(help="Instances: VMs running a service for its users.", no_args_is_help=True)


def show_instance(d: dict[str, Any]) -> None:
    console.print(
        f"[bold]{d['id']}[/] {d['service_id']} [green]{d['state']}[/] "
        f"users {d['users']}/{d['max_users']}"
    )
    for guest, ep in (d.get("endpoints") or {}).items():
        console.print(f"  guest port {guest} -> {ep['url']}")
    if d.get("timings", {}).get("total_s") is not None:
        console.print(
            f"  started by {d.get('start_kind')} in {d['timings']['total_s'] * 1000:.0f} ms"
        )
    if d.get("error"):
        console.print(f"  [red]{d['error']}[/]")


def _rows(rows: list[dict[str, Any]]) -> None:
    table(
        [
            r | {"endpoints": " ".join(e["url"] for e in (r.get("endpoints") or {}).values())}
            for r in rows
        ],
        ["id", "service_id", "state", "users", "max_users", "start_kind", "endpoints"],
    )


@app.command("list")
@handle_errors
def list_(
    service: str = typer.Option(None, "--service", help="Only this service's instances."),
    all: bool = typer.Option(False, "--all", help="Include stopped and failed ones."),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List instances (running and starting ones, unless --all)."""
    emit(connect(server).list_instances(service, all), as_json, _rows)


@app.command("info")
@handle_errors
def info(instance_id: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """An instance: state, users, endpoints, timings."""
    emit(connect(server).get_instance(instance_id), as_json, show_instance)


@app.command("start")
@handle_errors
def start(
    service_id: str,
    join: bool = typer.Option(
        True, "--join/--no-join", help="Reuse a running instance of the service with room."
    ),
    user: str = typer.Option(None, "--user", help="User id to count (default: a new one)."),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Start a service (or join its running instance) and wait until it answers."""
    res = connect(server).start_instance(service_id, join, user)

    def show(d: dict[str, Any]) -> None:
        show_instance(d["instance"])
        how = "joined" if d["joined"] else "started"
        console.print(f"  {how} as user {d['user']}")

    emit(res, as_json, show)


@app.command("stop")
@handle_errors
def stop(instance_id: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Stop an instance now, whatever its users."""
    emit(connect(server).stop_instance(instance_id), as_json, show_instance)


@app.command("leave")
@handle_errors
def leave(instance_id: str, user: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Remove a user from an instance (with no users left it stops after the idle timeout)."""
    emit(connect(server).leave_instance(instance_id, user), as_json, show_instance)


@app.command("logs")
@handle_errors
def logs(
    instance_id: str,
    lines: int = typer.Option(50, "--lines", "-n"),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """The instance VM's serial console log."""
    d = connect(server).instance_console(instance_id, lines)
    emit(d, as_json, lambda d: print("\n".join(d["lines"])))
