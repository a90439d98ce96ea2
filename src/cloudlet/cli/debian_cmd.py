"""``cloudlet image build-debian`` (thin over :func:`cloudlet.images.debian.build_debian`).

Register it on the image command group::

    from cloudlet.cli.debian_cmd import build_debian_cmd
    app.command("build-debian")(build_debian_cmd)      # in cli/image_cmd.py
"""

from __future__ import annotations

import sys

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors
from cloudlet.config import paths
from cloudlet.images.debian import build_debian


@handle_errors
def build_debian_cmd(
    name: str = typer.Option("debian", "--name", help="Name of the image."),
    suite: str = typer.Option("bookworm", "--suite", help="Debian suite for debootstrap."),
    package: list[str] = typer.Option(
        [], "--package", help="Extra Debian package to install (repeatable)."
    ),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build even if up to date."),
    as_json: bool = JsonOpt,
) -> None:
    """Build a Debian image (debootstrap minbase, cloud kernel, guest agent); cached."""
    p = paths()
    if not as_json and sys.stdout.isatty():
        with console.status("building the Debian image") as status:
            img = build_debian(
                p,
                name,
                suite=suite,
                packages=package,
                rebuild=rebuild,
                progress=lambda m: status.update(m),
            )
    else:
        img = build_debian(p, name, suite=suite, packages=package, rebuild=rebuild)
    record = img.to_dict() | {"dir": str(img.dir)}
    emit(
        record,
        as_json,
        lambda d: console.print(f"image [bold]{d['name']}[/] ready ({d['content_id'][:16]})"),
    )
