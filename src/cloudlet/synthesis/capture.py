"""``overlay create``: capture what a VM changed relative to its base VM.

First the guest clears what it no longer uses (``garbage.py``: free disk blocks trimmed, free
pages zeroed), so that deleted files and freed memory do not travel as changed data. Then the
VM is paused (so memory and disk stop changing and QEMU flushes the disk layer), its device
state is saved beside its RAM file, and the delta engine diffs RAM file and disk layer against
the base. Afterwards the VM runs on (unless asked to stay paused, or it was paused before):
capturing is not destructive.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloudlet.config import Paths
from cloudlet.errors import ConflictError
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.hypervisor.vm import VMManager, VMState
from cloudlet.overlay.create import create_overlay
from cloudlet.synthesis.base import BaseStore
from cloudlet.synthesis.garbage import clear_garbage


async def capture_overlay(
    paths: Paths,
    vm_id: str,
    out: Path,
    *,
    level: int = 3,
    keep_paused: bool = False,
    clear: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    mgr = VMManager(paths)
    vm = mgr.get(vm_id)
    if vm.state not in (VMState.RUNNING, VMState.PAUSED):
        raise ConflictError(f"VM {vm.id} is {vm.state.value}; overlay create needs it running")
    if vm.source.kind != "base":
        raise ConflictError(
            f"VM {vm.id} was booted from image {vm.source.name!r}, not from a base VM",
            hint="start the customization VM with `cloudlet vm start --base NAME`",
        )
    base = BaseStore(paths).get(vm.source.name)
    if base.base_id != vm.source.content_id:
        raise ConflictError(f"base VM {base.name!r} changed since VM {vm.id} was started from it")
    async with await Monitor.connect(vm.qmp_path) as mon:
        # QEMU's own word, not the record's: a VM left paused by an older capture may be
        # recorded as running.
        status = await mon.execute("query-status")
        if status.get("status") == "postmigrate":
            raise ConflictError(
                f"VM {vm.id} is still paused by an earlier capture, and QEMU cannot save"
                " a VM's state twice without running it in between",
                hint=f"run it first: `cloudlet vm resume {vm.id}`",
            )
        was_running = bool(status.get("running"))
        garbage: dict[str, Any] | None = None
        if clear and was_running and vm.source.agent:
            garbage = (await clear_garbage(mgr, vm.id)).to_dict()
        with mgr.locked(vm):
            await mgr.pause(vm, mon)
            try:
                await mgr.save_devstate(vm, mon, vm.devstate_path)
                stats = await asyncio.to_thread(
                    create_overlay,
                    base.ref(),
                    vm.dir,
                    out,
                    hardware=vm.hardware.to_dict(),
                    meta={"guest_ports": [f.guest for f in vm.forwards], "base_name": base.name},
                    level=level,
                    progress=progress,
                )
            finally:
                with contextlib.suppress(FileNotFoundError):
                    vm.devstate_path.unlink()
                if was_running and not keep_paused:
                    await mon.execute("cont")
                elif was_running:  # the record says what QEMU does: paused
                    rec = mgr.get(vm.id)
                    rec.state = VMState.PAUSED
                    rec.save()
    # garbage None: not cleared (asked not to, paused, or no guest agent)
    head = {"vm": vm.id, "base": base.name, "base_id": base.base_id, "file": str(out)}
    return head | stats.to_dict() | {"garbage": garbage}
