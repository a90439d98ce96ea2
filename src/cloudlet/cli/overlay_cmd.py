"""``cloudlet overlay ...``: inspect overlay files (``create`` is registered by cli/main.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors, table
from cloudlet.errors import NotFoundError

app = typer.Typer(
    help="Overlays: what a VM has that its base VM lacks, as one verifiable file.",
    no_args_is_help=True,
)


@app.callback()
def overlay() -> None:
    """Overlays: what a VM has that its base VM lacks, as one verifiable file."""
    # A callback keeps ``overlay`` a group even while ``info`` is its only command.


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _render(d: dict[str, Any]) -> None:
    console.print(f"[bold]{d['path']}[/]  overlay format {d['format']} ({_size(d['size'])})")
    console.print(f"  base id      {d['base_id']}")
    console.print(
        f"  memory       {_size(d['memory_size'])}   disk {_size(d['disk_size'])}   "
        f"device state {_size(d['devstate_size'])}"
    )
    if d["hardware"]:
        hw = ", ".join(f"{k}={v}" for k, v in sorted(d["hardware"].items()))
        console.print(f"  hardware     {hw}")
    console.print(f"  created      {d['created']} by {d['creator']}")
    if d["size"] != d["expected_size"]:
        console.print(f"  [red]size mismatch: the manifest describes {d['expected_size']} bytes[/]")
    table(
        [
            {"kind": k, **v, "ratio": f"{v['raw_bytes'] / max(v['stored_bytes'], 1):.2f}x"}
            for k, v in d["kinds"].items()
        ],
        ["kind", "segments", "records", "raw_bytes", "stored_bytes", "ratio"],
        title="segments",
    )
    if d["records"]:
        table(
            [{"record": k, "count": v} for k, v in sorted(d["records"].items())],
            ["record", "count"],
            title="records" + (" (counted while verifying)" if d["verified"] else ""),
        )
    if d["verified"]:
        console.print("[green]verified:[/] every segment hash, record bound and the trailer")


@app.command("info")
@handle_errors
def info(
    file: Path = typer.Argument(..., help="Overlay file."),
    verify: bool = typer.Option(
        False, "--verify", help="Read and check every segment and the whole-file hash."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Show what is inside an overlay FILE (header, manifest, segments, record counts)."""
    from cloudlet.overlay import overlay_info

    if not file.is_file():
        raise NotFoundError(f"no overlay file {file}")
    emit(overlay_info(file, verify=verify), as_json, _render)
