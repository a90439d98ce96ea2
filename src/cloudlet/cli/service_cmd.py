"""``cloudlet service ...``: the services this cloudlet can run (locally or via ``--server``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cloudlet.cli.common import (
    JsonOpt,
    console,
    detail,
    emit,
    handle_errors,
    show_written,
    table,
    tags_line,
)
from cloudlet.cli.connect import ServerOpt, connect
from cloudlet.cli.vm_cmd import parse_memory

app = typer.Typer(
    help="Services: a base VM + an overlay, ports and resources.", no_args_is_help=True
)


def show_service(d: dict[str, Any]) -> None:
    detail(
        f"[bold]{d['service_id']}[/] {d['version']}  {d['description']}",
        f"base {d['base']}  overlay {d['overlay']}  ports {d['guest_ports']}  "
        f"memory {d['memory_min_mib']}-{d['memory_ideal_mib']} MiB  cpus {d['cpus']}  "
        f"max users {d['max_users']}",
        tags_line(d),
    )


def _fields(**kw: Any) -> dict[str, Any]:
    out = {k: v for k, v in kw.items() if v not in (None, [], ())}
    for k in ("memory_min_mib", "memory_ideal_mib"):
        if k in out:
            out[k] = parse_memory(str(out[k]))
    return out


@app.command("list")
@handle_errors
def list_(server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """List services, with their running instances and whether a snapshot is cached."""
    rows = connect(server).list_services()
    cols = ["service_id", "version", "base", "overlay", "guest_ports", "max_users", "instances"]
    emit(rows, as_json, lambda r: table(r, [*cols, "cached"]))


@app.command("info")
@handle_errors
def info(service_id: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Everything recorded about a service."""
    emit(connect(server).get_service(service_id), as_json, show_service)


@app.command("create")
@handle_errors
def create(
    service_id: str = typer.Argument(..., help="Reverse-DNS id, e.g. org.example.face."),
    base: str = typer.Option(..., "--base", help="Base VM the overlay was made against."),
    overlay: Path = typer.Option(None, "--overlay", help="Overlay file to upload."),
    overlay_id: str = typer.Option(None, "--overlay-id", help="An already uploaded overlay."),
    description: str = typer.Option(None, "--description"),
    version: str = typer.Option(None, "--version"),
    tag: list[str] = typer.Option([], "--tag"),
    port: list[int] = typer.Option([], "--port", help="Guest port the service listens on."),
    memory_min: str = typer.Option(None, "--memory-min", help="e.g. 256M"),
    memory_ideal: str = typer.Option(None, "--memory-ideal"),
    cpus: int = typer.Option(None, "--cpus"),
    max_users: int = typer.Option(None, "--max-users", help="Users per instance."),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Register a service (uploading its overlay file if one is given)."""
    spec = _fields(
        service_id=service_id,
        base=base,
        overlay=overlay_id,
        description=description,
        version=version,
        tags=tag,
        guest_ports=port,
        memory_min_mib=memory_min,
        memory_ideal_mib=memory_ideal,
        cpus=cpus,
        max_users=max_users,
    )
    emit(connect(server).create_service(spec, overlay), as_json, show_service)


@app.command("edit")
@handle_errors
def edit(
    service_id: str,
    base: str = typer.Option(None, "--base"),
    overlay: Path = typer.Option(None, "--overlay", help="New overlay file to upload."),
    overlay_id: str = typer.Option(None, "--overlay-id"),
    description: str = typer.Option(None, "--description"),
    version: str = typer.Option(None, "--version"),
    tag: list[str] = typer.Option([], "--tag", help="Replaces all tags."),
    port: list[int] = typer.Option([], "--port", help="Replaces all guest ports."),
    memory_min: str = typer.Option(None, "--memory-min"),
    memory_ideal: str = typer.Option(None, "--memory-ideal"),
    cpus: int = typer.Option(None, "--cpus"),
    max_users: int = typer.Option(None, "--max-users"),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Change a service; options not given stay as they are."""
    changes = _fields(
        base=base,
        overlay=overlay_id,
        description=description,
        version=version,
        tags=tag,
        guest_ports=port,
        memory_min_mib=memory_min,
        memory_ideal_mib=memory_ideal,
        cpus=cpus,
        max_users=max_users,
    )
    emit(connect(server).update_service(service_id, changes, overlay), as_json, show_service)


@app.command("delete")
@handle_errors
def delete(service_id: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Delete a service (refused while it has instances running)."""
    d = connect(server).delete_service(service_id)
    emit(d, as_json, lambda d: console.print(f"deleted service {d['service_id']}"))


@app.command("export")
@handle_errors
def export(
    service_id: str,
    output: Path = typer.Option(..., "-o", "--output", help="Package file to write."),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write a service (metadata and overlay) as one package file."""
    d = connect(server).export_service(service_id, output)
    emit(d, as_json, show_written)


@app.command("import")
@handle_errors
def import_(
    file: Path,
    replace: bool = typer.Option(False, "--replace", help="Replace a service of the same id."),
    server: str = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Register the service in a package file (its overlay is verified first)."""
    emit(connect(server).import_service(file, replace), as_json, show_service)
