"""What every CLI command shares: ``--json`` output, error mapping, progress bars.

A command computes a plain ``dict``/``list`` result by calling core functions, then hands it to
:func:`emit`, which prints it as one JSON document (``--json``) or through a human renderer.
Errors go through :func:`handle_errors`: a :class:`~cloudlet.errors.CloudletError` becomes a
message (or a JSON error object) on stderr and the class's ``exit_code``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from cloudlet.errors import CloudletError

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)

JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of text.")


def emit(data: Any, as_json: bool, human: Callable[[Any], None] | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()
    elif human is not None:
        human(data)
    else:
        console.print_json(json.dumps(data, default=str))


def table(rows: Iterable[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    n = 0
    for r in rows:
        t.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
        n += 1
    if n == 0:
        console.print("(none)")
    else:
        console.print(t)


def detail(title: str, *lines: str | None) -> None:
    """Print one record: ``title``, then each given line indented; ``None``/empty lines drop.

    Shared so that every ``info``-style view (apps, services...) lays a record out alike.
    """
    console.print(title)
    for line in lines:
        if line:
            console.print(f"  {line}")


def tags_line(d: dict[str, Any]) -> str | None:
    """The ``tags: a, b`` line of a record, or None if it has no tags."""
    return f"tags: {', '.join(d['tags'])}" if d.get("tags") else None


def show_written(d: dict[str, Any]) -> None:
    """Human view of a download/export result (``{"file": ..., "bytes": ...}``)."""
    console.print(f"wrote {d['file']} ({d['bytes']} bytes)")


def handle_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Map CloudletError to a clear message and its exit code; Ctrl-C to exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except CloudletError as e:
            if as_json:
                sys.stdout.write(json.dumps(e.to_dict()) + "\n")
            err_console.print(f"[bold red]error:[/] {e.message}")
            if e.hint:
                err_console.print(f"[yellow]hint:[/] {e.hint}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Drive an async core function from a sync command (qemu.qmp's ``legacy`` idea)."""
    return asyncio.run(coro)
