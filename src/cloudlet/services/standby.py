"""Standby VMs: a suspended snapshot resumed ahead of time up to its very last step.

A cached start used to copy the snapshot (~0.25 s for a 128 MB RAM file) and then resume it
(QEMU start ~65 ms, device state ~20 ms). A standby VM has had all of that done in the
background: its QEMU runs with the device state loaded and the vCPUs stopped, so a start only
sends ``cont``. A paused QEMU costs no CPU, and its RAM file is mapped, not read.

This uses :meth:`VMManager._launch`, which is private to the hypervisor package: the public
split it needs (``resume(..., paused=True)`` and ``cont()``) is requested from that package's
owner; until then this module is the one place that reaches in.
"""

from __future__ import annotations

from cloudlet.hypervisor.qmp import Monitor
from cloudlet.hypervisor.vm import VM, VMManager, VMState


async def launch_paused(mgr: VMManager, vm_id: str) -> tuple[VM, Monitor]:
    """Resume suspended VM ``vm_id`` but leave its vCPUs stopped (state ``paused``).

    Returns the VM and its open QMP session (keep it: reconnecting costs ~15 ms of a start).
    On failure the VM is left ``suspended`` with possibly a QEMU behind it: discard it.
    """
    vm = mgr.get(vm_id)
    with mgr.locked(vm):
        if vm.state is not VMState.SUSPENDED:
            raise ValueError(f"VM {vm.id} is {vm.state.value}, not suspended")
        mgr._check_snapshot(vm)
        mon = None
        try:
            await mgr._launch(vm, incoming=True)
            mon = await Monitor.connect(vm.qmp_path)
            await mgr.load_devstate(vm, mon, vm.devstate_path)
        except BaseException:
            if mon is not None:
                await mon.close()
            vm.state = VMState.SUSPENDED  # the caller discards it (kills its QEMU)
            vm.save()
            raise
        vm.state = VMState.PAUSED
        vm.snapshot = None
        vm.save()
        vm.devstate_path.unlink()  # the running QEMU holds the state now
    return vm, mon


async def cont(mgr: VMManager, vm_id: str, mon: Monitor | None = None) -> VM:
    """Start the vCPUs of a standby (paused) VM (through ``mon`` if given; it is closed)."""
    vm = mgr.get(vm_id)
    try:
        with mgr.locked(vm):
            if vm.state is not VMState.PAUSED:
                raise ValueError(f"VM {vm.id} is {vm.state.value}, not paused")
            if mon is None:
                mon = await Monitor.connect(vm.qmp_path)
            await mon.execute("cont")
            vm.state = VMState.RUNNING
            vm.save()
    finally:
        if mon is not None:
            await mon.close()
    return vm
