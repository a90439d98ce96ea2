"""The ``cloudlet`` command: one sub-app per concept, all thin over the core packages."""

from __future__ import annotations

import typer

from cloudlet import __version__
from cloudlet.cli import (
    app_cmd,
    base_cmd,
    device_cmd,
    discover_cmd,
    handoff_cmd,
    image_cmd,
    instance_cmd,
    overlay_cmd,
    serve_cmd,
    service_cmd,
    synthesis_cmd,
    system_cmd,
    token_cmd,
    vm_cmd,
)
from cloudlet.cli.common import JsonOpt, emit
from cloudlet.cli.debian_cmd import build_debian_cmd

app = typer.Typer(
    help="cloudlet: service VMs one hop from their users, from compact VM overlays.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(image_cmd.app, name="image")
image_cmd.app.command("build-debian")(build_debian_cmd)
app.add_typer(vm_cmd.app, name="vm")
app.add_typer(base_cmd.app, name="base")
app.add_typer(overlay_cmd.app, name="overlay")
overlay_cmd.app.command("create")(synthesis_cmd.overlay_create)
app.command("synthesize")(synthesis_cmd.synthesize)
system_cmd.register(app)
serve_cmd.register(app)
app.add_typer(service_cmd.app, name="service")
app.add_typer(instance_cmd.app, name="instance")
app.add_typer(token_cmd.app, name="token")
app.add_typer(app_cmd.app, name="app")
app.add_typer(device_cmd.app, name="device")
app.add_typer(device_cmd.messages, name="message")
discover_cmd.register(app)
handoff_cmd.register(app)


@app.command("version")
def version(as_json: bool = JsonOpt) -> None:
    """Print cloudlet's version."""
    emit({"version": __version__}, as_json, lambda d: print(d["version"]))


def run() -> None:
    app()
