"""The instance manager: start (with join), stop, users, the idle reaper, re-adoption.

Join: each service has one asyncio lock; under it a start either adds its user to an instance
of the service that is ``starting`` or ``running`` and has room (``max_users``), or records a
new ``starting`` instance and submits its boot as an operation. The lock is held only for that
decision (no I/O but the catalog), so 20 concurrent join-starts make one instance, and a user
joining an instance that is still booting waits for that boot (its operation), not another one.

Boot: the first start of a service synthesizes it (base VM + overlay, applied into a new VM
directory, its QEMU started meanwhile: :class:`~cloudlet.synthesis.synthesize.EarlyLaunch`),
copies the rebuilt snapshot into the :class:`~.cache.SnapshotCache` and resumes it;
later starts copy the cached snapshot into a new VM directory and resume it (no overlay
decoding at all).

Re-adoption at server start: an instance recorded ``running`` whose QEMU is alive and whose QMP
monitor answers is kept; every other one is marked failed and its VM removed, as are VMs the
server made (named ``inst-*``) that no adopted instance owns.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from sqlalchemy import delete, func, select

from cloudlet.catalog.db import Catalog, now
from cloudlet.catalog.models import InstanceRow, InstanceUserRow
from cloudlet.config import Paths
from cloudlet.errors import (
    CloudletError,
    ConflictError,
    EnvironmentProblem,
    NotFoundError,
    VMError,
)
from cloudlet.hypervisor.ports import PortForward
from cloudlet.hypervisor.probe import first_answer
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.hypervisor.vm import VM, VMManager, VMState
from cloudlet.operations.runner import OperationContext, OperationRunner
from cloudlet.services.cache import SnapshotCache, cache_key
from cloudlet.services.host import mem_available_mib
from cloudlet.services.models import check_service_id
from cloudlet.services.overlays import OverlayStore
from cloudlet.services.registry import ServiceRegistry
from cloudlet.util.resident import ResidentFile

log = logging.getLogger("cloudlet.instances")

STARTING, RUNNING, STOPPING, STOPPED, FAILED = (
    "starting",
    "running",
    "stopping",
    "stopped",
    "failed",
)
ACTIVE = (STARTING, RUNNING, STOPPING)
VM_PREFIX = "inst-"
FIRST_RESPONSE_TIMEOUT = 60.0


# Per candidate instance: id, state, max_users, operation, users, and whether ``user`` is in.
_JOIN_CANDIDATES = """
SELECT i.id, i.state, i.max_users, i.operation_id, count(u.user),
       coalesce(max(u.user = ?), 0)
FROM instances i LEFT JOIN instance_users u ON u.instance_id = i.id
WHERE i.service_id = ? AND i.state IN (?, ?)
GROUP BY i.id ORDER BY i.created
"""
_ADD_USER = "INSERT INTO instance_users (instance_id, user, joined) VALUES (?, ?, ?)"
_USERS = "SELECT user FROM instance_users WHERE instance_id = ? ORDER BY joined"


def instance_dict(r: Any, users: list[str]) -> dict[str, Any]:
    return {
        "id": r.id,
        "service_id": r.service_id,
        "vm_id": r.vm_id,
        "state": r.state,
        "users": len(users),
        "user_ids": users,
        "max_users": r.max_users,
        "endpoints": r.endpoints or {},
        "start_kind": r.start_kind,
        "operation": r.operation_id,
        "timings": r.timings or {},
        "error": r.error,
        "created": r.created,
        "ready_at": r.ready_at,
        "last_active": r.last_active,
        "stopped_at": r.stopped_at,
    }


def _check_instance_id(iid: str) -> str:
    if not isinstance(iid, str) or not (1 <= len(iid) <= 16) or not iid.isalnum():
        from cloudlet.errors import InvalidInputError

        raise InvalidInputError(f"invalid instance id {iid!r}", hint="see `cloudlet instance list`")
    return iid


class InstanceManager:
    def __init__(
        self,
        catalog: Catalog,
        paths: Paths,
        registry: ServiceRegistry,
        overlays: OverlayStore,
        runner: OperationRunner,
        *,
        idle_timeout: float = 600.0,
        keep_spares: bool = False,
        vm_bind: str = "127.0.0.1",
    ) -> None:
        self.catalog = catalog
        self.paths = paths
        self.registry = registry
        self.overlays = overlays
        self.runner = runner
        self.idle_timeout = idle_timeout
        # Where instances' host ports bind: loopback, or an address mobile clients can reach.
        self.vm_bind = vm_bind
        self.vms = VMManager(paths)
        self.cache = SnapshotCache(paths)
        self._locks: dict[str, asyncio.Lock] = {}
        # Called with (start_kind, timings, overlay_bytes) after each successful boot (metrics).
        self.on_started: list[Callable[[str, dict[str, float], int], None]] = []
        self._reaper: asyncio.Task[None] | None = None
        # Standby VMs: a service's cached snapshot copied and resumed ahead of time up to the
        # last step (VMManager.resume_paused), so that a cached start only sends ``cont``.
        self.keep_spares = keep_spares
        self._spares: dict[tuple[str, str], str] = {}
        self._spare_tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._spare_mons: dict[str, Monitor] = {}  # their open QMP sessions
        self._spare_ram: dict[str, ResidentFile] = {}  # their RAM, held in memory until used
        registry.on_change.append(self.forget_service)

    # -- queries -------------------------------------------------------------------------
    # ``row``/``users`` take the caller's session so that a read and the change it decides
    # (e.g. the handoff source marking an instance moving) happen in one transaction.
    def users(self, s: Any, iid: str) -> list[str]:
        """The users of instance ``iid`` in session ``s``, in the order they joined."""
        q = select(InstanceUserRow.user).where(InstanceUserRow.instance_id == iid)
        return list(s.scalars(q.order_by(InstanceUserRow.joined)))

    def row(self, s: Any, iid: str) -> InstanceRow:
        """The catalog row of instance ``iid`` in session ``s``; NotFoundError if none."""
        r = s.get(InstanceRow, _check_instance_id(iid))
        if r is None:
            raise NotFoundError(f"no instance {iid!r}", hint="see `cloudlet instance list`")
        return r

    def get(self, iid: str) -> dict[str, Any]:
        with self.catalog.session() as s:
            r = self.row(s, iid)
            return instance_dict(r, self.users(s, iid))

    def list(self, *, service: str | None = None, all: bool = False) -> list[dict[str, Any]]:
        with self.catalog.session() as s:
            q = select(InstanceRow).order_by(InstanceRow.created)
            if service is not None:
                q = q.where(InstanceRow.service_id == check_service_id(service))
            if not all:
                q = q.where(InstanceRow.state.in_(ACTIVE))
            rows = list(s.scalars(q))
            users: dict[str, list[str]] = {r.id: [] for r in rows}
            if rows:
                uq = select(InstanceUserRow).where(InstanceUserRow.instance_id.in_(list(users)))
                for u in s.scalars(uq.order_by(InstanceUserRow.joined)):
                    users[u.instance_id].append(u.user)
            return [instance_dict(r, users[r.id]) for r in rows]

    def count(self, state: str = RUNNING) -> int:
        with self.catalog.session() as s:
            q = select(func.count()).select_from(InstanceRow).where(InstanceRow.state == state)
            return int(s.scalar(q) or 0)

    def console(self, iid: str, lines: int = 50) -> dict[str, Any]:
        d = self.get(iid)
        if not d["vm_id"]:
            return {"id": iid, "lines": []}
        try:
            vm = self.vms.get(d["vm_id"])
        except NotFoundError:
            return {"id": iid, "lines": []}
        return {"id": iid, "lines": vm.console_tail(lines)}

    # -- start ---------------------------------------------------------------------------
    def _lock(self, sid: str) -> asyncio.Lock:
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        return lock

    def check_startable(self, svc: dict[str, Any]) -> None:
        """A service can start only if its base VM and active overlay are here (else 409)."""
        from cloudlet.synthesis.base import BaseStore

        sid = svc["service_id"]
        try:
            base = BaseStore(self.paths).get(svc["base"])
        except NotFoundError:
            raise ConflictError(
                f"service {sid} cannot start: its base VM {svc['base']!r} is not on this cloudlet",
                hint="import or create the base VM first",
            ) from None
        if not svc["overlay"]:
            raise ConflictError(
                f"service {sid} cannot start: it has no overlay", hint="upload one and set it"
            )
        try:
            self.overlays.active_path(svc["overlay"])
        except (NotFoundError, ConflictError) as e:
            raise ConflictError(f"service {sid} cannot start: {e.message}") from None
        avail = mem_available_mib()
        if avail is not None and avail < base.hardware.memory_mib:
            raise EnvironmentProblem(
                f"service {sid} needs {base.hardware.memory_mib} MiB, {avail} MiB are free",
                hint="stop some instances",
            )

    async def start(
        self, sid: str, *, join: bool = True, user: str | None = None
    ) -> dict[str, Any]:
        """Join an instance of ``sid`` with room, or start a new one (an operation).

        Returns ``{"instance", "user", "joined", "operation"}``; ``operation`` is the id of the
        boot to wait for (None when the joined instance is already running).
        """
        svc = self.registry.get(sid)
        user = user or f"u-{secrets.token_hex(6)}"
        async with self._lock(sid):
            t = now()
            if join:
                joined = self._join(sid, user)
                if joined is not None:
                    return joined
            self.check_startable(svc)
            iid = secrets.token_hex(6)
            with self.catalog.session() as s:
                s.add(
                    InstanceRow(
                        id=iid,
                        service_id=sid,
                        state=STARTING,
                        max_users=svc["max_users"],
                        endpoints={},
                        timings={},
                        created=t,
                        last_active=t,
                    )
                )
                s.flush()
                s.add(InstanceUserRow(instance_id=iid, user=user, joined=t))
            op = self.runner.submit(
                "instance.start",
                lambda ctx: self._boot_op(ctx, iid),
                target=f"instances/{iid}",
            )
            with self.catalog.session() as s:
                r = self.row(s, iid)
                r.operation_id = op
                d = instance_dict(r, self.users(s, iid))
        return {"instance": d, "user": user, "joined": False, "operation": op}

    def _join(self, sid: str, user: str) -> dict[str, Any] | None:
        """Add ``user`` to an instance of ``sid`` with room (or find the one it is in).

        The hot path of a busy cloudlet (every mobile client's start is a join), so it is plain
        SQL on the DB-API connection (SQLAlchemy's statement and result layers cost ~10x the
        queries themselves), and it writes nothing when the user is in already.
        """
        with self.catalog.engine.begin() as conn:
            db = conn.connection.driver_connection  # the sqlite3 connection, in this transaction
            assert db is not None
            rows = db.execute(_JOIN_CANDIDATES, (user, sid, STARTING, RUNNING)).fetchall()
            pick = next((r for r in rows if r[5]), None)  # the user is in this one already
            if pick is None:
                room = [r for r in rows if r[4] < r[2]]
                if not room:
                    return None
                pick = max(room, key=lambda r: r[4])  # the fullest with room: fewest instances
                db.execute(_ADD_USER, (pick[0], user, now()))
            d = self._view(db, pick[0])
        op = pick[3] if pick[1] == STARTING else None
        return {"instance": d, "user": user, "joined": True, "operation": op}

    def _view(self, db: Any, iid: str) -> dict[str, Any]:
        cur = db.execute("SELECT * FROM instances WHERE id = ?", (iid,))
        r = dict(zip([c[0] for c in cur.description], cur.fetchone(), strict=True))
        for k in ("endpoints", "timings"):
            r[k] = json.loads(r[k]) if r[k] else {}
        users = [u for (u,) in db.execute(_USERS, (iid,))]
        return instance_dict(SimpleNamespace(**r), users)

    async def wait(self, start: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Wait for a start's boot (if any) and return the instance as it ends up."""
        iid = start["instance"]["id"]
        if start.get("operation"):
            op = await self.runner.wait(start["operation"], timeout)
            if op["state"] != "succeeded":
                err = op.get("error") or {}
                raise VMError(
                    f"instance {iid} did not start: {err.get('message', op['state'])}",
                    hint=err.get("hint"),
                )
        return self.get(iid)

    async def _boot_op(self, ctx: OperationContext, iid: str) -> dict[str, Any]:
        try:
            return await self._boot(ctx, iid)
        except BaseException as e:
            msg = e.message if isinstance(e, CloudletError) else (str(e) or type(e).__name__)
            with self.catalog.session() as s:
                r = s.get(InstanceRow, iid)
                if r is not None:
                    stopping = r.state in (STOPPING, STOPPED)
                    r.state = STOPPED if stopping else FAILED
                    r.error = None if stopping else msg
                    r.stopped_at = now()
                    s.execute(delete(InstanceUserRow).where(InstanceUserRow.instance_id == iid))
            raise

    async def _boot(self, ctx: OperationContext, iid: str) -> dict[str, Any]:
        from cloudlet.overlay import apply_overlay, file_chunks
        from cloudlet.synthesis.base import BaseStore
        from cloudlet.synthesis.synthesize import EarlyLaunch

        t0 = time.monotonic()
        with self.catalog.session() as s:
            sid = self.row(s, iid).service_id
        svc = self.registry.get(sid)
        bases = BaseStore(self.paths)
        base = bases.get(svc["base"])
        overlay = self.overlays.get(svc["overlay"])
        overlay_path = self.overlays.active_path(svc["overlay"])
        key = cache_key(overlay["sha256"], base.base_id)
        fwd = self._forwards(bases, base, svc)
        timings: dict[str, float] = {}
        overlay_bytes = 0
        hit = self.cache.lookup(sid, key)
        vm = self._take_spare(sid, key, f"{VM_PREFIX}{iid}") if hit is not None else None
        if vm is None:
            vm = self.vms.new_vm(
                base.boot_source(), base.hardware, forwards=fwd, name=f"{VM_PREFIX}{iid}"
            )
        with self.catalog.session() as s:
            self.row(s, iid).vm_id = vm.id
        early: EarlyLaunch | None = None  # synthesis: QEMU starts while the overlay applies
        try:
            if vm.state in (VMState.SUSPENDED, VMState.PAUSED):
                kind = "cached"  # a standby VM: the cached snapshot, resumed ahead
            elif hit is not None:
                ctx.progress(0.1, "copying the cached snapshot")
                await asyncio.to_thread(self.cache.restore, sid, key, vm.dir)
                kind = "cached"
            else:
                ctx.progress(0.02, "applying the overlay")
                early = EarlyLaunch(self.vms, vm.id)
                await asyncio.to_thread(
                    apply_overlay,
                    file_chunks(overlay_path),
                    base.ref(),
                    vm.dir,
                    backing=str(base.path("disk.raw")),
                    expected_base_id=base.base_id,
                    progress=ctx.step_progress(0.02, 0.8),
                    on_outputs=early.files_ready,
                )
                overlay_bytes = overlay["size"]
                timings["apply_s"] = time.monotonic() - t0
                ctx.progress(0.82, "caching the snapshot")
                try:
                    await asyncio.to_thread(
                        self.cache.store,
                        sid,
                        key,
                        vm.dir,
                        {"service_id": sid, "overlay": overlay["id"], "base_id": base.base_id},
                    )
                except OSError as e:  # the cache only speeds up later starts
                    log.warning("could not cache the snapshot of %s: %s", sid, e)
                kind = "synthesis"
            t_prepared = time.monotonic()
            ctx.progress(0.9, "resuming")
            if vm.state is VMState.PAUSED:
                vm = await self.vms.cont(vm.id, self._spare_mons.pop(vm.id, None))
            elif early is not None:
                vm = await early.resume()
            else:
                if vm.state is not VMState.SUSPENDED:
                    self.vms.mark_suspended(vm)
                vm = await self.vms.resume(vm.id)
            t_resumed = time.monotonic()
            ctx.progress(0.95, "waiting for the first response")
            t_first = None
            if vm.forwards:
                f = vm.forwards[0]
                t_first = await first_answer(f.host_addr, f.host, f.guest, FIRST_RESPONSE_TIMEOUT)
                if t_first is None:
                    raise VMError(
                        f"instance {iid}: no answer on guest port {f.guest} "
                        f"within {FIRST_RESPONSE_TIMEOUT:g} s",
                        hint="see its console with `cloudlet instance logs`",
                    )
            self._release_spare_ram(vm.id)  # running: QEMU maps what the guest uses
        except BaseException as e:
            if early is not None:
                await early.settle()
            self._release_spare_ram(vm.id)
            spare_mon = self._spare_mons.pop(vm.id, None)
            if spare_mon is not None:
                await spare_mon.close()
            await self.vms.discard(vm)
            if hit is not None and not isinstance(e, asyncio.CancelledError):
                self.cache.drop(sid, key)  # a cache entry that fails to resume is not kept
            raise
        if self.keep_spares and self.cache.lookup(sid, key) is not None:
            self._refill_spare(sid, key, bases, base, fwd)
        t_end = t_first or t_resumed
        timings |= {
            "prepare_s": t_prepared - t0,
            "resume_s": t_resumed - t_prepared,
            "first_response_s": t_end - t_resumed,
            "total_s": t_end - t0,
        }
        timings = {k: round(v, 4) for k, v in timings.items()}
        endpoints = {
            str(f.guest): {"host": f.host_addr, "port": f.host, "url": f.url}
            for f in vm.forwards
            if f.host
        }
        with self.catalog.session() as s:
            r = self.row(s, iid)
            if r.state != STARTING:  # stopped while it booted: do not resurrect it
                raise asyncio.CancelledError()
            r.state, r.endpoints, r.start_kind = RUNNING, endpoints, kind
            r.timings, r.ready_at, r.last_active = timings, now(), now()
            d = instance_dict(r, self.users(s, iid))
        for cb in self.on_started:
            with contextlib.suppress(Exception):
                cb(kind, timings, overlay_bytes)
        return {"instance": d}

    # -- standby VMs -------------------------------------------------------------------
    def _forwards(self, bases: Any, base: Any, svc: dict[str, Any]) -> builtins.list[PortForward]:
        wanted = [PortForward(p, 0, self.vm_bind, auto=True) for p in svc["guest_ports"]]
        fwd: list[PortForward] = bases.forwards_for(base.boot_source(), wanted)
        return [PortForward(f.guest, f.host, self.vm_bind, f.auto) for f in fwd]

    def _take_spare(self, sid: str, key: str, name: str) -> VM | None:
        vm_id = self._spares.pop((sid, key), None)
        if vm_id is None:
            return None
        try:
            vm = self.vms.get(vm_id)
        except CloudletError:
            return None
        if vm.state not in (VMState.SUSPENDED, VMState.PAUSED):
            return None
        vm.name = name
        vm.save()
        return vm

    def _refill_spare(self, sid: str, key: str, bases: Any, base: Any, fwd: Any) -> None:
        if (sid, key) in self._spares or (sid, key) in self._spare_tasks:
            return
        task = asyncio.create_task(self._make_spare(sid, key, base, fwd), name=f"spare-{sid}")
        self._spare_tasks[(sid, key)] = task
        task.add_done_callback(lambda _t: self._spare_tasks.pop((sid, key), None))

    async def _make_spare(
        self, sid: str, key: str, base: Any, fwd: builtins.list[PortForward]
    ) -> None:
        name = f"{VM_PREFIX}spare-{secrets.token_hex(4)}"
        vm = self.vms.new_vm(base.boot_source(), base.hardware, forwards=fwd, name=name)
        try:
            await asyncio.to_thread(self.cache.restore, sid, key, vm.dir)
            self.vms.mark_suspended(vm)
            # Its RAM stays in memory while it waits, however long (see ResidentFile).
            self._spare_ram[vm.id] = await asyncio.to_thread(ResidentFile, vm.ram_path)
            _, mon = await self.vms.resume_paused(vm.id)
        except BaseException as e:
            self._release_spare_ram(vm.id)
            await self.vms.discard(vm)
            if not isinstance(e, asyncio.CancelledError):
                log.warning("could not prepare a standby VM for %s: %s", sid, e)
                return
            raise
        self._spares[(sid, key)] = vm.id
        self._spare_mons[vm.id] = mon

    def forget_service(self, sid: str) -> None:
        """Drop the standby VMs of a service whose overlay or base changed, or that is gone."""
        for k, task in list(self._spare_tasks.items()):
            if k[0] == sid:
                task.cancel()
        for k in [k for k in self._spares if k[0] == sid]:
            vm_id = self._spares.pop(k)
            with contextlib.suppress(RuntimeError):  # no loop: the restart cleans it up
                asyncio.get_running_loop().create_task(self._delete_vm(vm_id))

    def _release_spare_ram(self, vm_id: str) -> None:
        ram = self._spare_ram.pop(vm_id, None)
        if ram is not None:
            ram.close()

    async def _delete_vm(self, vm_id: str) -> None:
        self._release_spare_ram(vm_id)
        mon = self._spare_mons.pop(vm_id, None)
        if mon is not None:
            await mon.close()
        with contextlib.suppress(CloudletError, OSError):
            await self.vms.delete(vm_id, force=True)

    # -- stop / leave --------------------------------------------------------------------
    async def stop(self, iid: str) -> dict[str, Any]:
        """Stop an instance whatever its users (its VM is disposable: killed, not shut down)."""
        d = self.get(iid)
        if d["state"] in (STOPPED, FAILED):
            return d
        async with self._lock(d["service_id"]):
            with self.catalog.session() as s:
                r = self.row(s, iid)
                state, vm_id, op = r.state, r.vm_id, r.operation_id
                if state in (STOPPED, FAILED):
                    return instance_dict(r, self.users(s, iid))
                r.state = STOPPING
        if state == STARTING and op:
            with contextlib.suppress(ConflictError, NotFoundError):
                self.runner.cancel(op)
            with contextlib.suppress(Exception):
                await self.runner.wait(op, 30)
        with self.catalog.session() as s:
            vm_id = self.row(s, iid).vm_id or vm_id
        if vm_id:
            with contextlib.suppress(NotFoundError):
                await self.vms.delete(vm_id, force=True)
        with self.catalog.session() as s:
            r = self.row(s, iid)
            r.state, r.stopped_at = STOPPED, now()
            s.execute(delete(InstanceUserRow).where(InstanceUserRow.instance_id == iid))
            return instance_dict(r, [])

    def leave(self, iid: str, user: str) -> dict[str, Any]:
        """Remove ``user`` from an instance; with no users left it idles until reaped."""
        with self.catalog.session() as s:
            r = self.row(s, iid)
            u = s.get(InstanceUserRow, (iid, user))
            if u is None:
                raise NotFoundError(f"user {user!r} is not in instance {iid}")
            s.delete(u)
            r.last_active = now()
            s.flush()
            return instance_dict(r, self.users(s, iid))

    # -- background ----------------------------------------------------------------------
    async def refresh(self) -> builtins.list[str]:
        """Mark failed the running instances whose VM is gone or crashed; returns their ids."""
        failed = []
        for d in self.list():
            if d["state"] != RUNNING:
                continue
            alive = False
            if d["vm_id"]:
                with contextlib.suppress(CloudletError):
                    alive = self.vms.get(d["vm_id"]).state is VMState.RUNNING
            if not alive:
                self._fail(d["id"], "its VM stopped or crashed")
                failed.append(d["id"])
                if d["vm_id"]:
                    with contextlib.suppress(CloudletError):
                        await self.vms.delete(d["vm_id"], force=True)
        return failed

    async def reap_once(self) -> builtins.list[str]:
        """Stop instances idle (no users) past the timeout; mark dead VMs' instances failed."""
        stopped = []
        t = now()
        await self.refresh()
        for d in self.list():
            if d["state"] != RUNNING:
                continue
            if d["users"] == 0 and t - d["last_active"] > self.idle_timeout:
                log.info("stopping idle instance %s of %s", d["id"], d["service_id"])
                await self.stop(d["id"])
                stopped.append(d["id"])
        return stopped

    async def _reap_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap_once()
            except Exception:
                log.exception("idle reaper pass failed")

    def start_reaper(self) -> None:
        interval = max(0.2, min(self.idle_timeout / 4, 10.0))
        self._reaper = asyncio.create_task(self._reap_forever(interval), name="idle-reaper")

    async def close(self) -> None:
        """Stop the reaper and remove the standby VMs (running instances stay)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        tasks = list(self._spare_tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for vm_id in self._spares.values():
            await self._delete_vm(vm_id)
        self._spares.clear()

    def _fail(self, iid: str, why: str) -> None:
        with self.catalog.session() as s:
            r = self.row(s, iid)
            r.state, r.error, r.stopped_at = FAILED, why, now()
            s.execute(delete(InstanceUserRow).where(InstanceUserRow.instance_id == iid))

    async def recover(self) -> dict[str, builtins.list[str]]:
        """At server start: re-adopt live instances, fail and clean the rest (see module doc)."""
        adopted: list[str] = []
        failed: list[str] = []
        keep: set[str] = set()
        with self.catalog.session() as s:
            rows = [(r.id, r.state, r.vm_id, r.operation_id) for r in s.scalars(
                select(InstanceRow).where(InstanceRow.state.in_(ACTIVE)))]  # fmt: skip
        for iid, state, vm_id, op in rows:
            if state == RUNNING and vm_id and await self._vm_answers(vm_id):
                adopted.append(iid)
                keep.add(vm_id)
                if op:  # its boot had finished when the server died: it did not fail
                    self.runner.settle(op, {"instance": self.get(iid)})
                continue
            why = (
                "interrupted by server restart"
                if state != RUNNING
                else "its VM did not survive the server restart"
            )
            self._fail(iid, why)
            failed.append(iid)
            if vm_id:
                with contextlib.suppress(CloudletError, OSError):
                    await self.vms.delete(vm_id, force=True)
        for vm in self.vms.list():
            if vm.name.startswith(VM_PREFIX) and vm.id not in keep:
                with contextlib.suppress(CloudletError, OSError):
                    await self.vms.delete(vm.id, force=True)
        self.cache.clean_staging()
        return {"adopted": adopted, "failed": failed}

    async def _vm_answers(self, vm_id: str) -> bool:
        try:
            vm = self.vms.get(vm_id)
        except CloudletError:
            return False
        if vm.state is not VMState.RUNNING or not vm.process_alive():
            return False
        try:
            async with await Monitor.connect(vm.qmp_path, timeout=3) as mon:
                st = await asyncio.wait_for(mon.execute("query-status"), 3)
                return bool(st.get("running"))
        except (CloudletError, OSError, TimeoutError) as e:
            log.info("VM %s (pid %s) does not answer on QMP: %s", vm_id, vm.pid, e)
            return False
