"""The ``cloudlet`` command as a whole: every command takes ``--json``; it starts light."""

from __future__ import annotations

import subprocess
import sys

import click
import typer

from cloudlet.cli.main import app


def _leaves(cmd: click.Command, path: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    subs = getattr(cmd, "commands", None)
    if not subs:
        return [(" ".join(path), cmd)]
    return [leaf for name, sub in subs.items() for leaf in _leaves(sub, (*path, name))]


def test_every_command_takes_json() -> None:
    leaves = _leaves(typer.main.get_command(app))
    assert len(leaves) > 50  # the walk found the sub-apps' commands, not just the top
    without = [name for name, c in leaves if not any("--json" in p.opts for p in c.params)]
    assert without == []


def test_starting_the_cli_loads_no_heavy_module() -> None:
    """Every call pays for what ``cloudlet.cli.main`` imports: numpy, httpx and the overlay
    engine wait until a command needs them."""
    code = (
        "import sys, cloudlet.cli.main; "
        "print(sorted(m for m in ('numpy', 'httpx', 'cloudlet.overlay', 'cloudlet.synthesis',"
        " 'cloudlet.handoff', 'cloudlet.client', 'zstandard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
