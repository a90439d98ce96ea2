"""The ``cloudlet`` command as a whole: every command takes ``--json``."""

from __future__ import annotations

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
