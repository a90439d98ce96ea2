"""Handoff as a cloudlet does it: instances move between servers, users and devices follow.

Source side: ``start(instance, to, token)`` marks the instance ``moving`` (no new users join
it), and runs the handoff engine as an operation against the destination's native API. When the
destination confirms, the instance becomes ``moved``; its endpoints are the destination's and
``moved_to`` names the destination, so the native API and the KD-compatible API can say where
it went, and the ``on_moved`` callbacks (device messages) run. On failure it is ``running``
again: the engine has resumed the VM, which never stopped serving.

Destination side: the sessions of :class:`~cloudlet.handoff.destination.HandoffDestination`;
after a session finishes, the VM is adopted as a running instance of the same service (when
this cloudlet knows the service), with the users it had.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete

from cloudlet.catalog.db import Catalog, now
from cloudlet.catalog.models import InstanceRow, InstanceUserRow, ServiceRow
from cloudlet.config import Paths
from cloudlet.errors import ConflictError
from cloudlet.handoff.adaptive import CompressionController
from cloudlet.handoff.destination import HandoffDestination
from cloudlet.handoff.link import HttpLink
from cloudlet.handoff.source import HandoffOptions, HandoffSource
from cloudlet.hypervisor.qmp import Monitor
from cloudlet.operations.runner import OperationContext, OperationRunner
from cloudlet.services.instances import RUNNING, InstanceManager, instance_dict

log = logging.getLogger("cloudlet.handoff")

MOVING, MOVED = "moving", "moved"

# (service_id, instance dict after the move, user ids) -> None
MovedHook = Callable[[str, dict[str, Any], list[str]], None]


class HandoffManager:
    def __init__(
        self,
        catalog: Catalog,
        paths: Paths,
        instances: InstanceManager,
        runner: OperationRunner,
        *,
        name: str,
        vm_bind: str = "127.0.0.1",
    ) -> None:
        self.catalog = catalog
        self.paths = paths
        self.instances = instances
        self.runner = runner
        self.name = name
        self.destination = HandoffDestination(paths, vm_bind=vm_bind)
        self.on_moved: list[MovedHook] = []

    # -- source --------------------------------------------------------------------------
    def start(self, iid: str, to: str, token: str, options: HandoffOptions) -> dict[str, Any]:
        """Mark the instance moving and submit the handoff; 409 if it is not running."""
        to = to.rstrip("/")
        if urlsplit(to).scheme not in ("http", "https") or not urlsplit(to).hostname:
            from cloudlet.errors import InvalidInputError

            raise InvalidInputError(f"invalid destination URL {to!r}", hint="e.g. http://HOST:9999")
        with self.catalog.session() as s:
            r = self.instances.row(s, iid)
            if r.state == MOVING:
                raise ConflictError(f"instance {iid} is already being handed off")
            if r.state != RUNNING or not r.vm_id:
                raise ConflictError(f"instance {iid} is {r.state}; only a running one can move")
            r.state = MOVING
            vm_id, sid = r.vm_id, r.service_id
            users = self.instances.users(s, iid)
        op = self.runner.submit(
            "instance.handoff",
            lambda ctx: self._run(ctx, iid, vm_id, sid, users, to, token, options),
            target=f"instances/{iid}",
        )
        return {"instance": self.instances.get(iid), "operation": op}

    async def _run(
        self,
        ctx: OperationContext,
        iid: str,
        vm_id: str,
        sid: str,
        users: list[str],
        to: str,
        token: str,
        options: HandoffOptions,
    ) -> dict[str, Any]:
        ctl = CompressionController()
        link = HttpLink(to, token, ctl)

        def progress(phase: str, done: int, total: int) -> None:
            ctx.progress(
                min(0.95, len(src.rounds) / max(1, options.max_rounds)), f"{phase}: {done} bytes"
            )

        meta = {"service_id": sid, "users": users, "from": self.name, "instance": iid}
        src = HandoffSource(
            self.paths, vm_id, link, options=options, controller=ctl, meta=meta, progress=progress
        )
        try:
            report = await src.run()
        except BaseException:
            with self.catalog.session() as s:
                r = s.get(InstanceRow, iid)
                if r is not None and r.state == MOVING:
                    r.state = RUNNING  # the engine resumed the VM: it is still ours
            raise
        finally:
            await link.close()
        dest = report["destination"]
        host = urlsplit(to).hostname or "127.0.0.1"
        endpoints: dict[str, Any] = {
            str(f["guest"]): {
                "host": host,
                "port": f["host"],
                "url": f"{'http' if f['guest'] in (80, 8080) else 'tcp'}://{host}:{f['host']}",
            }
            for f in dest.get("forwards", [])
        }
        endpoints["moved_to"] = {
            "cloudlet": to,
            "instance": dest.get("instance"),
            "vm": dest.get("vm"),
        }
        with self.catalog.session() as s:
            r = s.get(InstanceRow, iid)
            assert r is not None
            r.state, r.endpoints, r.vm_id, r.stopped_at = MOVED, endpoints, None, now()
            r.timings = dict(r.timings or {}) | {
                "handoff_total_s": report["total_s"],
                "handoff_downtime_s": report["downtime_s"],
                "handoff_bytes": report["bytes_on_wire"],
            }
            s.execute(delete(InstanceUserRow).where(InstanceUserRow.instance_id == iid))
            moved = instance_dict(r, [])
        for hook in self.on_moved:
            try:
                hook(sid, moved, users)
            except Exception:  # a failing notifier must not undo a completed move
                log.exception("on_moved hook failed for instance %s", iid)
        ctx.progress(1.0, f"moved to {to}")
        return {"instance": moved, "report": report}

    async def recover(self) -> list[str]:
        """At server start: an instance left ``moving`` by a crash is ``running`` again.

        The destination never confirmed (or we never heard it), so the VM here is the real
        one; if the crash came after the pause, it is resumed. ``InstanceManager.recover``
        then re-adopts it (or fails it if its QEMU is gone).
        """
        out = []
        with self.catalog.session() as s:
            rows = [
                (r.id, r.vm_id) for r in s.query(InstanceRow).filter(InstanceRow.state == MOVING)
            ]
        for iid, vm_id in rows:
            if vm_id:
                with contextlib.suppress(Exception):
                    vm = self.instances.vms.get(vm_id)
                    if vm.process_alive():
                        async with await Monitor.connect(vm.qmp_path, timeout=3) as mon:
                            if not (await mon.execute("query-status")).get("running"):
                                await mon.execute("cont")
            with self.catalog.session() as s:
                r = s.get(InstanceRow, iid)
                if r is not None:
                    r.state = RUNNING
            out.append(iid)
        return out

    # -- destination ---------------------------------------------------------------------
    def adopt(self, result: dict[str, Any]) -> dict[str, Any] | None:
        """Record a handed-off VM as a running instance here, if this cloudlet has its service."""
        meta = result.get("meta") or {}
        sid = meta.get("service_id")
        with self.catalog.session() as s:
            svc = s.get(ServiceRow, sid) if isinstance(sid, str) else None
            if svc is None:
                return None
            iid, t = secrets.token_hex(6), now()
            endpoints = {
                str(f["guest"]): {
                    "host": f["host_addr"],
                    "port": f["host"],
                    "url": f"{'http' if f['guest'] in (80, 8080) else 'tcp'}://{f['host_addr']}:{f['host']}",
                }
                for f in result.get("forwards", [])
            }
            s.add(
                InstanceRow(
                    id=iid,
                    service_id=sid,
                    vm_id=result["vm"],
                    state=RUNNING,
                    max_users=svc.max_users,
                    endpoints=endpoints,
                    start_kind="handoff",
                    timings={"restore_s": result.get("restore_s")},
                    created=t,
                    ready_at=t,
                    last_active=t,
                )
            )
            s.flush()
            for u in meta.get("users") or []:
                if isinstance(u, str) and 0 < len(u) <= 200:
                    s.add(InstanceUserRow(instance_id=iid, user=u, joined=time.time()))
            s.flush()
            return instance_dict(s.get(InstanceRow, iid), list(meta.get("users") or []))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.destination.close()
