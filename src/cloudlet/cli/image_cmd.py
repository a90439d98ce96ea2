"""``cloudlet image``: build, import, list, inspect and delete guest images (thin over images/)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors, table
from cloudlet.config import paths
from cloudlet.errors import InvalidInputError
from cloudlet.images.model import Image
from cloudlet.images.store import ImageStore
from cloudlet.images.tiny import build_tiny

app = typer.Typer(help="Guest images: build the tiny image, import disks, list and delete.")

_COLUMNS = ["name", "source", "disk_format", "size", "ports", "agent", "content_id"]


def _record(img: Image) -> dict[str, Any]:
    d = img.to_dict()
    d["dir"] = str(img.dir)
    return d


def _row(img: Image) -> dict[str, Any]:
    return {
        "name": img.name,
        "source": img.source,
        "disk_format": img.disk_format,
        "size": f"{img.disk_size / (1 << 30):.1f} GiB" if img.disk_size else "",
        "ports": ",".join(map(str, img.ports)),
        "agent": "yes" if img.agent else "no",
        "content_id": img.content_id[:16],
    }


def _show(data: dict[str, Any]) -> None:
    for k in sorted(data):
        if data[k] not in (None, "", [], {}):
            console.print(f"[bold]{k}[/]: {data[k]}")


@app.command("build-tiny")
@handle_errors
def build_tiny_cmd(
    name: str = typer.Option("tiny", "--name", help="Name of the new image."),
    force: bool = typer.Option(False, "--force", help="Replace an image of that name."),
    as_json: bool = JsonOpt,
) -> None:
    """Build the tiny image (Debian cloud kernel + busybox, HTTP on port 80, guest agent)."""
    p = paths()
    if not as_json and sys.stdout.isatty():
        with console.status("building the tiny image") as status:
            img = build_tiny(p, name, force=force, progress=lambda m: status.update(m))
    else:
        img = build_tiny(p, name, force=force)
    emit(
        _record(img),
        as_json,
        lambda d: console.print(f"built image [bold]{d['name']}[/] ({d['content_id'][:16]})"),
    )


@app.command("import")
@handle_errors
def import_cmd(
    path: Path = typer.Argument(..., help="A bootable qcow2/raw disk (or the root disk)."),
    kernel: Path | None = typer.Option(None, "--kernel", help="Kernel to boot directly."),
    initrd: Path | None = typer.Option(None, "--initrd", help="Initrd for --kernel."),
    name: str | None = typer.Option(None, "--name", help="Image name (default: file name)."),
    port: list[int] = typer.Option([], "--port", help="A guest port the image serves."),
    ready_marker: str | None = typer.Option(
        None, "--ready-marker", help="Serial console line that means the guest is ready."
    ),
    cmdline: str | None = typer.Option(None, "--cmdline", help="Kernel command line."),
    as_json: bool = JsonOpt,
) -> None:
    """Copy an existing disk (or a kernel + initrd + disk triple) into the image store."""
    if initrd is not None and kernel is None:
        raise InvalidInputError("--initrd needs --kernel")
    source: Path | tuple[Path, Path | None, Path] = (
        path if kernel is None else (kernel, initrd, path)
    )
    image_name = name if name is not None else path.stem
    img = ImageStore(paths()).import_image(
        source, image_name, ports=port, ready_marker=ready_marker, cmdline=cmdline
    )
    emit(_record(img), as_json, lambda d: console.print(f"imported image [bold]{d['name']}[/]"))


@app.command("list")
@handle_errors
def list_cmd(as_json: bool = JsonOpt) -> None:
    """List the images."""
    images = ImageStore(paths()).list()
    if as_json:
        emit([_record(i) for i in images], True)
    else:
        table([_row(i) for i in images], _COLUMNS, title="images")


@app.command("info")
@handle_errors
def info_cmd(name: str = typer.Argument(..., help="Image name."), as_json: bool = JsonOpt) -> None:
    """Show one image's manifest."""
    emit(_record(ImageStore(paths()).get(name)), as_json, _show)


@app.command("verify")
@handle_errors
def verify_cmd(
    name: str = typer.Argument(..., help="Image name."), as_json: bool = JsonOpt
) -> None:
    """Check an image's files (qemu-img check on qcow2); exit 6 if damaged."""
    img = ImageStore(paths()).verify(name)
    emit({"name": img.name, "ok": True}, as_json, lambda d: console.print(f"{d['name']}: ok"))


@app.command("delete")
@handle_errors
def delete_cmd(
    name: str = typer.Argument(..., help="Image name."), as_json: bool = JsonOpt
) -> None:
    """Delete an image and its files."""
    ImageStore(paths()).delete(name)
    emit({"deleted": name}, as_json, lambda d: console.print(f"deleted image {d['deleted']}"))
