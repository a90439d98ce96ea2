"""``cloudlet vm ...``: start, list, exec, logs, stop, suspend, resume, rm."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import typer

from cloudlet.cli.common import JsonOpt, console, emit, handle_errors, run_async, table
from cloudlet.cli.connect import ServerOpt, connect
from cloudlet.config import paths
from cloudlet.errors import InvalidInputError
from cloudlet.hypervisor.ports import PortForward, parse_forward
from cloudlet.hypervisor.vm import BootSource, VMManager

app = typer.Typer(help="Run and manage VMs (one QEMU machine each).", no_args_is_help=True)


def parse_memory(spec: str) -> int:
    """``256M``, ``1G``, ``1024`` (MiB) -> MiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([MmGg]i?[Bb]?)?\s*", spec)
    if not m:
        raise InvalidInputError(f"invalid memory size {spec!r}", hint="use e.g. 256M or 1G")
    n = int(m.group(1))
    return n * 1024 if m.group(2) and m.group(2)[0] in "Gg" else n


def _forwards(specs: list[str], guest_ports: list[int]) -> list[PortForward]:
    given = [parse_forward(s) for s in specs]
    covered = {f.guest for f in given}
    return given + [PortForward(p, 0, auto=True) for p in guest_ports if p not in covered]


def _show_vm(d: dict[str, Any]) -> None:
    console.print(f"[bold]{d['id']}[/] {d['name']} [green]{d['state']}[/]")
    for guest, url in d.get("endpoints", {}).items():
        console.print(f"  guest port {guest} -> {url}")
    if d.get("timings"):
        console.print("  " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in d["timings"].items()))


@app.command("start")
@handle_errors
def start(
    image: str = typer.Argument(None, help="Image to boot (see `cloudlet image list`)."),
    base: str = typer.Option(None, "--base", help="Resume from a base VM instead of booting."),
    memory: str = typer.Option("256M", "--memory", "-m", help="Guest memory, e.g. 256M, 1G."),
    cpus: int = typer.Option(1, "--cpus", help="Virtual CPUs."),
    forward: list[str] = typer.Option([], "--forward", "-p", help="HOST:GUEST port forward."),
    name: str = typer.Option(None, "--name", help="A name for the VM."),
    timeout: float = typer.Option(90.0, "--timeout", help="Seconds to wait for readiness."),
    as_json: bool = JsonOpt,
) -> None:
    """Boot a VM from an image (or resume one from a base VM) and wait until it is ready."""
    p = paths()
    t0 = time.monotonic()
    if (image is None) == (base is None):
        raise InvalidInputError("give either an IMAGE or --base NAME")
    if base is not None:
        from cloudlet.synthesis.base import BaseStore

        vm = run_async(
            BaseStore(p).start_vm(base, forwards=[parse_forward(s) for s in forward], vm_name=name)
        )
    else:
        from cloudlet.images.store import ImageStore

        store = ImageStore(p)
        img = store.get(image)
        store.verify(image)
        src = BootSource.from_image(img)
        vm = run_async(
            VMManager(p).start(
                src,
                memory_mib=parse_memory(memory),
                cpus=cpus,
                forwards=_forwards(forward, src.guest_ports),
                name=name,
                ready_timeout=timeout,
            )
        )
    d = vm.summary() | {"seconds": round(time.monotonic() - t0, 3)}
    emit(d, as_json, _show_vm)


@app.command("list")
@handle_errors
def list_(server: str = ServerOpt, as_json: bool = JsonOpt) -> None:
    """List VMs with their state (a QEMU that died behind our back shows as crashed)."""
    vms = connect(server).list_vms()
    emit(
        vms,
        as_json,
        lambda rows: table(
            [r | {"endpoints": " ".join(r["endpoints"].values())} for r in rows],
            ["id", "name", "state", "source", "memory_mib", "endpoints"],
        ),
    )


@app.command("info")
@handle_errors
def info(vm_id: str, as_json: bool = JsonOpt) -> None:
    """Everything recorded about a VM."""
    vm = VMManager(paths()).get(vm_id)
    emit(vm.to_dict() | {"dir": str(vm.dir)}, as_json)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def exec_(
    vm_id: str,
    command: list[str] = typer.Argument(..., help="Command to run in the guest (after --)."),
    timeout: float = typer.Option(60.0, "--timeout"),
    stdin: bool = typer.Option(False, "--stdin", help="Send this command's stdin to the guest."),
    as_json: bool = JsonOpt,
) -> None:
    """Run a command in the guest through its agent; exits with the guest command's code."""
    import shlex

    data = sys.stdin.buffer.read() if stdin else b""
    cmd = command[0] if len(command) == 1 else shlex.join(command)
    res = run_async(VMManager(paths()).exec(vm_id, cmd, data, timeout))
    if as_json:
        emit(res.to_dict(), True)
    else:
        sys.stdout.buffer.write(res.stdout)
        sys.stderr.buffer.write(res.stderr)
    raise typer.Exit(res.exit_code)


@app.command("logs")
@handle_errors
def logs(
    vm_id: str,
    lines: int = typer.Option(50, "--lines", "-n"),
    follow: bool = typer.Option(False, "--follow", "-f"),
    as_json: bool = JsonOpt,
) -> None:
    """The VM's serial console log."""
    vm = VMManager(paths()).get(vm_id)
    if as_json:
        emit({"id": vm.id, "lines": vm.console_tail(lines)}, True)
        return
    for ln in vm.console_tail(lines):
        print(ln)
    if follow:
        with open(vm.serial_log, "rb") as f:
            f.seek(0, 2)
            while True:
                chunk = f.read()
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.2)


@app.command("stop")
@handle_errors
def stop(
    vm_id: str,
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for a clean poweroff."),
    as_json: bool = JsonOpt,
) -> None:
    """Power the VM off (ACPI, then forced). Its disk is kept until `vm rm`."""
    emit(run_async(VMManager(paths()).stop(vm_id, timeout)).summary(), as_json, _show_vm)


@app.command("suspend")
@handle_errors
def suspend(vm_id: str, as_json: bool = JsonOpt) -> None:
    """Snapshot the VM's memory and devices and end its QEMU process."""
    t0 = time.monotonic()
    vm = run_async(VMManager(paths()).suspend(vm_id))
    emit(vm.summary() | {"seconds": round(time.monotonic() - t0, 3)}, as_json, _show_vm)


@app.command("resume")
@handle_errors
def resume(
    vm_id: str,
    forward: list[str] = typer.Option([], "--forward", "-p", help="New HOST:GUEST forwards."),
    as_json: bool = JsonOpt,
) -> None:
    """Restore a suspended VM and run it from where it was."""
    t0 = time.monotonic()
    fw = [parse_forward(s) for s in forward] or None
    vm = run_async(VMManager(paths()).resume(vm_id, forwards=fw))
    emit(vm.summary() | {"seconds": round(time.monotonic() - t0, 3)}, as_json, _show_vm)


@app.command("rm")
@handle_errors
def rm(
    vm_id: str,
    force: bool = typer.Option(False, "--force", help="Kill it if it is running."),
    as_json: bool = JsonOpt,
) -> None:
    """Delete a VM and its directory."""
    run_async(VMManager(paths()).delete(vm_id, force=force))
    emit({"id": vm_id, "deleted": True}, as_json, lambda d: console.print(f"deleted {vm_id}"))
