"""``cloudlet base ...``: base VMs (an image booted once and snapshotted)."""

from __future__ import annotations

from pathlib import Path

import typer

from cloudlet.cli.common import (
    JsonOpt,
    console,
    emit,
    handle_errors,
    run_async,
    show_written,
    table,
)
from cloudlet.cli.connect import ServerOpt, connect
from cloudlet.cli.vm_cmd import parse_memory
from cloudlet.config import paths

app = typer.Typer(
    help="Base VMs: snapshotted images that overlays are made against.", no_args_is_help=True
)


@app.command("create")
@handle_errors
def create(
    image: str = typer.Argument(..., help="Image to boot and snapshot."),
    name: str = typer.Option(..., "--name", help="Name of the new base VM."),
    memory: str = typer.Option("256M", "--memory", "-m"),
    cpus: int = typer.Option(1, "--cpus"),
    port: list[int] = typer.Option([], "--port", help="Guest port the service listens on."),
    as_json: bool = JsonOpt,
) -> None:
    """Boot IMAGE, wait until ready, snapshot it and store it as base VM NAME."""
    from cloudlet.images.store import ImageStore
    from cloudlet.synthesis.base import BaseStore

    p = paths()
    store = ImageStore(p)
    img = store.verify(image)
    with console.status(f"booting {image} and snapshotting it as base {name}..."):
        base = run_async(
            BaseStore(p).create(
                img, name, memory_mib=parse_memory(memory), cpus=cpus, ports=port or None
            )
        )
    emit(
        base.summary(),
        as_json,
        lambda d: console.print(f"base [bold]{d['name']}[/] {d['base_id']}"),
    )


@app.command("list")
@handle_errors
def list_(server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """List base VMs."""
    rows = connect(server).list_bases()
    emit(rows, as_json, lambda r: table(
        [x | {"base_id": x["base_id"][:16]} for x in r],
        ["name", "base_id", "image", "memory_mib", "cpus", "guest_ports"],
    ))  # fmt: skip


@app.command("info")
@handle_errors
def info(name: str, server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """Everything recorded about a base VM, and what uses it (VMs, services)."""
    emit(connect(server).get_base(name), as_json)


@app.command("delete")
@handle_errors
def delete(name: str, as_json: bool = JsonOpt) -> None:
    """Delete a base VM (refused while any VM uses it)."""
    from cloudlet.synthesis.base import BaseStore

    BaseStore(paths()).delete(name)
    emit({"name": name, "deleted": True}, as_json, lambda d: console.print(f"deleted base {name}"))


@app.command("export")
@handle_errors
def export(
    name: str,
    output: Path = typer.Option(..., "-o", "--output", help="File to write."),
    as_json: bool = JsonOpt,
) -> None:
    """Write a base VM as one file (for another cloudlet to import)."""
    from cloudlet.synthesis.base import BaseStore

    with console.status(f"exporting base {name}..."):
        d = BaseStore(paths()).export(name, output)
    emit(d, as_json, show_written)


@app.command("import")
@handle_errors
def import_(
    file: Path,
    name: str = typer.Option(None, "--name", help="Store it under another name."),
    as_json: bool = JsonOpt,
) -> None:
    """Import an exported base VM; it is verified before it is accepted."""
    from cloudlet.synthesis.base import BaseStore

    with console.status(f"importing and verifying {file}..."):
        b = BaseStore(paths()).import_(file, name)
    emit(
        b.summary(),
        as_json,
        lambda d: console.print(f"imported base [bold]{d['name']}[/] {d['base_id']}"),
    )
