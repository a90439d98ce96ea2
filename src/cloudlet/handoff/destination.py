"""The receiving end of a handoff: rebuild the VM from frames, then resume it and confirm.

A session is prepared (the destination must hold the base VM, or it refuses before the source
pauses anything), receives rounds of frames (each applied as it arrives, with the same record
code as synthesis), and finishes with the last round plus the device state: the disk layer is
closed, the VM resumed, and only then is the answer sent. A session that fails, is aborted, or
hears nothing for ``idle_timeout`` seconds is discarded: its QEMU (if any) killed, its VM
directory removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cloudlet.config import Paths
from cloudlet.errors import CloudletError, InvalidInputError, NotFoundError
from cloudlet.handoff.errors import HandoffPrepareError, HandoffRestoreError
from cloudlet.handoff.wire import FrameDecoder, devstate_dictionary
from cloudlet.hypervisor.hardware import Hardware
from cloudlet.hypervisor.ports import PortForward
from cloudlet.hypervisor.vm import VM, VMManager
from cloudlet.overlay.apply import RecordApplier
from cloudlet.overlay.format import MAX_DEVSTATE, PAGE, RecordLimits
from cloudlet.synthesis.base import BaseStore, BaseVM

log = logging.getLogger("cloudlet.handoff")


@dataclass
class _Sizes:
    memory_size: int
    disk_size: int
    devstate_size: int = 0


@dataclass
class Session:
    id: str
    vm: VM
    base: BaseVM
    applier: RecordApplier
    limits: RecordLimits
    meta: dict[str, Any]
    devstate_dict: Any  # zstandard.ZstdCompressionDict of the base's device state
    created: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    bytes: int = 0
    rounds: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    cleanup: asyncio.Future[None] | None = None  # the abort's clean-up, once started


class HandoffDestination:
    """Incoming handoff sessions of one cloudlet (one instance per server process)."""

    def __init__(
        self, paths: Paths, *, idle_timeout: float = 30.0, vm_bind: str = "127.0.0.1"
    ) -> None:
        self.paths = paths
        self.vm_bind = vm_bind  # where the moved VM's host ports listen
        self.vms = VMManager(paths)
        self.bases = BaseStore(paths)
        self.idle_timeout = idle_timeout
        self.sessions: dict[str, Session] = {}
        self._reaper: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def prepare(self, req: dict[str, Any]) -> dict[str, Any]:
        """Check we can take the VM and set up its directory. Nothing is paused yet."""
        base_id = str(req.get("base_id", ""))
        try:
            base = self.bases.by_id(base_id)
        except NotFoundError:
            raise HandoffPrepareError(
                "preparing the destination",
                f"this cloudlet does not hold base VM {base_id[:16]}",
                hint="import the base VM here first (`cloudlet base import`)",
            ) from None
        try:
            hw = Hardware.from_dict(req["hardware"])
        except (KeyError, CloudletError) as e:
            raise InvalidInputError(f"bad hardware description: {e}") from e
        diff = base.hardware.differences(hw)
        if diff:
            raise HandoffPrepareError(
                "preparing the destination",
                f"the VM's hardware differs from this cloudlet's base VM: {sorted(diff)}",
            )
        # Named like the server's own instance VMs, so a restart mid-session cleans it up.
        name = f"inst-in-{secrets.token_hex(4)}"
        ports = [int(p) for p in req.get("guest_ports", [])]
        src = base.boot_source()
        vm = self.vms.new_vm(
            src,
            base.hardware,
            forwards=[PortForward(p, 0, self.vm_bind, auto=True) for p in ports],
            name=name,
        )
        applier: RecordApplier | None = None
        try:
            base_disk = base.path("disk.raw").stat().st_size
            sizes = _Sizes(hw.memory_bytes, base_disk)
            parts = {n: vm.dir / n for n in ("memory.ram", "disk.qcow2", "devstate")}
            # The disk layer is a valid (empty) qcow2 from the start, so the VM's QEMU can be
            # started now, not in the downtime (see VMManager.launch_incoming).
            applier = RecordApplier(
                sizes, base.ref(), parts, str(base.path("disk.raw")), disk_openable=True
            )
            await asyncio.to_thread(applier.start)
            await asyncio.to_thread(applier.keep_resident)  # until the VM runs
            ds_dict = devstate_dictionary(base.path("devstate").read_bytes())
            base_mem_pages = base.path("memory.ram").stat().st_size // PAGE
            limits = RecordLimits(
                mem_pages=hw.memory_bytes // PAGE,
                disk_pages=-(-base_disk // PAGE),
                base_mem_pages=base_mem_pages,
                base_disk_pages=-(-base_disk // PAGE),
                devstate_size=MAX_DEVSTATE,
                xor_current=True,  # each round's pages against what this side holds
            )
            vm = await self.vms.launch_incoming(vm.id)
        except BaseException:
            if applier is not None:
                with contextlib.suppress(Exception):
                    applier.close()
            await self.vms.discard(vm)
            raise
        sid = secrets.token_hex(12)
        self.sessions[sid] = Session(
            sid, vm, base, applier, limits, dict(req.get("meta") or {}), ds_dict
        )
        self._ensure_reaper()
        log.info("handoff session %s prepared for VM %s (base %s)", sid, vm.id, base.name)
        return {"session": sid, "vm": vm.id}

    def _get(self, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None or s.cleanup is not None:
            raise NotFoundError(f"no handoff session {sid!r} (it may have timed out)")
        return s

    async def receive(self, sid: str, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """Apply one round of frames as they arrive."""
        s = self._get(sid)
        async with s.lock:
            try:
                n = await self._apply(s, chunks)
            except BaseException:
                await self.abort(sid)
                raise
            s.rounds += 1
            return {"session": sid, "round": s.rounds, "bytes": n}

    async def finish(self, sid: str, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """Apply the last round and the device state, resume the VM, and only then answer."""
        s = self._get(sid)
        async with s.lock:
            try:
                n = await self._apply(s, chunks)
                t0 = time.monotonic()
                await asyncio.to_thread(s.applier.finish, False)
                s.applier.close()
                for n_ in ("memory.ram", "disk.qcow2", "devstate"):
                    (s.vm.dir / n_).stat()  # all three must exist
                t_applied = time.monotonic()
                self.vms.mark_suspended(s.vm)
                steps: dict[str, float] = {}
                run_steps: dict[str, float] = {}
                try:
                    vm, mon = await self.vms.resume_paused(
                        s.vm.id, launched=True, listen=False, timings=steps
                    )
                    t_loaded = time.monotonic()
                    vm = await self.vms.cont(vm.id, mon, listen=True, timings=run_steps)
                except CloudletError as e:
                    raise HandoffRestoreError(
                        "resuming the VM on the destination", e.message
                    ) from e
                t_run = time.monotonic()
            except BaseException:
                await self.abort(sid)
                raise
            self.sessions.pop(sid, None)
            log.info("handoff session %s: VM %s resumed", sid, vm.id)
            return {
                "session": sid,
                "vm": vm.id,
                "endpoints": vm.endpoints(),
                "forwards": [f.to_dict() for f in vm.forwards],
                "bytes": s.bytes + n,
                "restore_s": round(t_run - t0, 4),
                # where the restore went: the last records applied and the disk layer closed,
                # the device state loaded into the waiting QEMU, the vCPUs run, the host
                # ports listen (after cont: see VMManager.cont)
                "restore": {
                    "apply_s": round(t_applied - t0, 4),
                    "load_s": round(t_loaded - t_applied, 4),
                    "load_steps": steps,
                    "cont_s": run_steps["cont"],
                    "listen_s": run_steps["listen"],
                },
                "meta": s.meta,
            }

    async def abort(self, sid: str) -> None:
        """Discard the session: its QEMU killed, its VM directory removed.

        The session stays listed until that is done (a caller that sees it gone may rely on
        it), and the clean-up runs to its end even if the caller is cancelled.
        """
        s = self.sessions.get(sid)
        if s is None:
            return
        if s.cleanup is None:
            s.cleanup = asyncio.ensure_future(self._discard(s))
        try:
            await asyncio.shield(s.cleanup)
        finally:
            if s.cleanup.done():
                self.sessions.pop(sid, None)

    async def _discard(self, s: Session) -> None:
        with contextlib.suppress(Exception):
            s.applier.close()
        await self.vms.discard(s.vm)
        log.info("handoff session %s aborted; VM %s discarded", s.id, s.vm.id)

    async def _apply(self, s: Session, chunks: AsyncIterator[bytes]) -> int:
        dec = FrameDecoder(s.limits, s.devstate_dict)
        n = 0
        async for chunk in chunks:
            s.last_activity = time.monotonic()
            n += len(chunk)
            batches = list(dec.feed(chunk))
            if batches:
                await asyncio.to_thread(_apply_batches, s.applier, batches)
        dec.close()
        s.bytes += n
        s.last_activity = time.monotonic()
        return n

    # -- idle sessions -------------------------------------------------------------------
    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while self.sessions:
            await asyncio.sleep(min(1.0, self.idle_timeout / 4))
            now = time.monotonic()
            for sid, s in list(self.sessions.items()):
                if not s.lock.locked() and now - s.last_activity > self.idle_timeout:
                    log.warning(
                        "handoff session %s idle for %.0f s: discarding", sid, now - s.last_activity
                    )
                    await self.abort(sid)

    async def close(self) -> None:
        for sid in list(self.sessions):
            await self.abort(sid)
        if self._reaper is not None:
            self._reaper.cancel()


def _apply_batches(applier: RecordApplier, batches: list[Any]) -> None:
    for kind, recs in batches:
        applier.apply(kind, recs)
