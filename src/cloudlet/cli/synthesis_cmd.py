"""``cloudlet overlay create`` and ``cloudlet synthesize``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors, run_async
from cloudlet.cli.progress import progress_bar
from cloudlet.config import paths
from cloudlet.hypervisor.ports import parse_forward


@handle_errors
def overlay_create(
    vm_id: str = typer.Argument(..., help="A VM started from a base VM (`vm start --base`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Overlay file to write."),
    level: int = typer.Option(3, "--level", help="zstd level (1-19)."),
    keep_paused: bool = typer.Option(False, "--keep-paused", help="Leave the VM paused after."),
    keep_garbage: bool = typer.Option(
        False,
        "--keep-garbage",
        help="Do not have the guest trim its free disk blocks and zero its free memory first"
        " (the overlay then carries deleted files and freed pages).",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Capture what VM changed relative to its base VM as one overlay file."""
    from cloudlet.synthesis.capture import capture_overlay

    with progress_bar(not as_json) as prog:
        d = run_async(
            capture_overlay(
                paths(),
                vm_id,
                output.resolve(),
                level=level,
                keep_paused=keep_paused,
                clear=not keep_garbage,
                progress=prog,
            )
        )
    emit(d, as_json, _show_created)


def _show_created(d: dict[str, Any]) -> None:
    size = d.get("stored_bytes") or d.get("file_bytes") or Path(d["file"]).stat().st_size
    console.print(f"wrote overlay [bold]{d['file']}[/] ({size} bytes) against base {d['base']}")
    g = d.get("garbage")
    if g:
        console.print(
            f"  first cleared in the guest: trimmed {', '.join(g['trimmed']) or 'nothing'},"
            f" {g['zeroed_bytes'] / 2**20:.0f} MiB of free memory zeroed ({g['seconds']:.1f} s)"
        )


@handle_errors
def synthesize(
    base: str = typer.Argument(..., help="Base VM the overlay was made against."),
    source: str = typer.Argument(..., help="Overlay file path or http(s) URL."),
    forward: list[str] = typer.Option([], "--forward", "-p", help="HOST:GUEST port forward."),
    name: str = typer.Option(None, "--name"),
    as_json: bool = JsonOpt,
) -> None:
    """Rebuild a VM from BASE + the overlay at SOURCE and resume it, with a timing breakdown."""
    from cloudlet.synthesis.synthesize import synthesize as core

    with progress_bar(not as_json) as prog:
        res = run_async(
            core(
                paths(),
                base,
                source,
                forwards=[parse_forward(s) for s in forward],
                name=name,
                progress=prog,
            )
        )
    emit(res.to_dict(), as_json, _show_synth)


def _show_synth(d: dict[str, Any]) -> None:
    console.print(f"VM [bold]{d['id']}[/] is running ({d['overlay_bytes']} overlay bytes)")
    for guest, url in d["endpoints"].items():
        console.print(f"  guest port {guest} -> {url}")
    t = d["timings"]
    console.print(
        "  "
        + ", ".join(
            f"{k.removesuffix('_s')} {v * 1000:.0f} ms"
            for k, v in t.items()
            if k in ("fetch_s", "decode_s", "apply_s", "resume_s", "first_response_s", "total_s")
        )
    )
