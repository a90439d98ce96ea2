"""``cloudlet handoff INSTANCE --to URL``: move a running instance to another cloudlet."""

from __future__ import annotations

from typing import Any

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors
from cloudlet.cli.connect import ServerOpt, connect


def register(app: typer.Typer) -> None:
    app.command("handoff")(handoff)


@handle_errors
def handoff(
    instance_id: str = typer.Argument(..., help="The running instance to move."),
    to: str = typer.Option(..., "--to", help="The destination cloudlet's URL."),
    token: str = typer.Option(
        ..., "--token", envvar="CLOUDLET_DEST_TOKEN", help="An admin token the destination accepts."
    ),
    downtime: float = typer.Option(1.0, "--downtime", help="Downtime target in seconds."),
    max_rounds: int = typer.Option(20, "--max-rounds", help="Most pre-copy rounds."),
    auto_converge: bool = typer.Option(
        True,
        "--auto-converge/--no-auto-converge",
        help="Throttle a VM whose pre-copy rounds stop shrinking (it runs slower, not stopped).",
    ),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Pre-copy while it runs, then a sub-second stop-and-copy; the source ends it only after
    the destination confirms."""
    res = connect(server).handoff_instance(
        instance_id,
        to,
        token,
        downtime_target_s=downtime,
        max_rounds=max_rounds,
        auto_converge=auto_converge,
    )
    emit(res, as_json, _show)


def _show(d: dict[str, Any]) -> None:
    rep, inst = d["report"], d["instance"]
    where = inst["endpoints"].get("moved_to", {}).get("cloudlet")
    console.print(f"instance [bold]{inst['id']}[/] moved to {where}")
    for guest, e in inst["endpoints"].items():
        if guest != "moved_to":
            console.print(f"  guest port {guest} -> {e['url']}")
    console.print(
        f"  total {rep['total_s']:.2f} s, downtime {rep['downtime_s'] * 1000:.0f} ms, "
        f"{rep['bytes_on_wire']} bytes in {len(rep['rounds'])} rounds"
    )
    for c in rep["compression"]["changes"]:
        console.print(f"  compression {c['from']} -> {c['to']} at {c['link_mbps']} Mbps")
    for t in rep.get("throttle", []):
        console.print(
            f"  after round {t['after_round']}: VM held {100 * t['held']:.0f}% of the time"
        )
