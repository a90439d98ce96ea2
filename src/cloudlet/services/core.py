"""The cloudlet's core, composed once per process: what the HTTP layer and the CLI both call.

``Cloudlet(paths)`` opens the catalog (running migrations) and wires the stores together. The
server additionally calls :meth:`Cloudlet.start_server` (recovery after a crash, re-adoption of
running instances, the idle reaper, the bootstrap) and :meth:`Cloudlet.close` at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cloudlet import __version__
from cloudlet.catalog.db import Catalog
from cloudlet.catalog.tokens import TokenStore
from cloudlet.config import Paths
from cloudlet.errors import CloudletError, ConflictError
from cloudlet.hypervisor.vm import VMManager
from cloudlet.operations.runner import OperationRunner
from cloudlet.services.apps import AppRepository
from cloudlet.services.devices import DeviceManager
from cloudlet.services.handoff import HandoffManager
from cloudlet.services.host import host_info
from cloudlet.services.instances import InstanceManager
from cloudlet.services.overlays import DEFAULT_MAX_UPLOAD, OverlayStore
from cloudlet.services.registry import ServiceRegistry

SERVER_LOCK = "server.lock"


log = logging.getLogger("cloudlet.server")


@dataclass
class Settings:
    """How a cloudlet is run (``cloudlet serve`` options)."""

    name: str = field(default_factory=socket.gethostname)
    idle_timeout: float = 600.0
    max_upload: int = DEFAULT_MAX_UPLOAD
    public_info: bool = False
    bootstrap: bool = True
    keep_spares: bool = False  # standby VMs for cached starts (the server turns this on)
    # Mobile side (docs/mobile-api.md): the KD-Cloudlet compatible API under /api, where VM
    # host ports bind (so that its clients can reach them), and the zeroconf advertisement.
    kd_api: str = "open"  # off | open | encrypted
    vm_bind: str = "127.0.0.1"
    host: str = "127.0.0.1"  # where the API listens (advertised)
    port: int = 9999
    advertise: bool = False


class Cloudlet:
    def __init__(self, paths: Paths, settings: Settings | None = None) -> None:
        self.paths = paths
        self.settings = settings or Settings()
        self.catalog = Catalog(paths)
        self.tokens = TokenStore(self.catalog)
        self.runner = OperationRunner(self.catalog)
        self.overlays = OverlayStore(self.catalog, paths, max_upload=self.settings.max_upload)
        self.registry = ServiceRegistry(self.catalog, paths, self.overlays)
        self.instances = InstanceManager(
            self.catalog,
            paths,
            self.registry,
            self.overlays,
            self.runner,
            idle_timeout=self.settings.idle_timeout,
            keep_spares=self.settings.keep_spares,
            vm_bind=self.settings.vm_bind,
        )
        self.apps = AppRepository(self.catalog, paths, max_upload=self.settings.max_upload)
        self.devices = DeviceManager(self.catalog, self.tokens)
        self.handoff = HandoffManager(
            self.catalog,
            paths,
            self.instances,
            self.runner,
            name=self.settings.name,
            vm_bind=self.settings.vm_bind,
        )
        self.handoff.on_moved.append(self._tell_devices_moved)
        self.vms = VMManager(paths)
        self._lock_fd: int | None = None
        self.bootstrap_op: str | None = None
        self._bootstrap_watch: asyncio.Task[None] | None = None

    def _tell_devices_moved(self, sid: str, inst: dict[str, Any], users: list[str]) -> None:
        """After a handoff: a "moved" message for the devices that use the service."""
        to = urlsplit(inst["endpoints"]["moved_to"]["cloudlet"])
        ports = [e for k, e in inst["endpoints"].items() if k != "moved_to"]
        self.devices.queue_moved(
            sid,
            cloudlet_name=to.hostname or "",
            host=to.hostname or "",
            port=to.port or (443 if to.scheme == "https" else 80),
            encrypted=self.settings.kd_api == "encrypted",
            instance_id=inst["endpoints"]["moved_to"].get("instance"),
            service_port=ports[0]["port"] if ports else None,
        )

    # -- server lifecycle ----------------------------------------------------------------
    async def start_server(self) -> dict[str, Any]:
        """Take the data dir, recover from a crash, re-adopt instances, start background work."""
        self._take_lock()
        report: dict[str, Any] = {
            "operations_failed": self.runner.recover(),
            "overlays_killed": self.overlays.recover(),
        }
        # Before instances.recover: an instance caught mid-handoff is ours again, running.
        report["handoffs_resumed"] = await self.handoff.recover()
        report |= await self.instances.recover()
        self.instances.start_reaper()
        from cloudlet.services import bootstrap

        if self.settings.bootstrap and not bootstrap.is_done(self):
            op = self.runner.submit(
                "bootstrap", lambda ctx: bootstrap.bootstrap(self, ctx), target="services"
            )
            self.bootstrap_op = op
            log.info(
                "setting up the embedded defaults (operation %s): image %s, base VM %s, "
                "service %s",
                op, bootstrap.SAMPLE_IMAGE, bootstrap.SAMPLE_BASE, bootstrap.SAMPLE_SERVICE,
            )  # fmt: skip
            # A client that asks for the sample meanwhile is told why it is not there yet.
            self.registry.pending[bootstrap.SAMPLE_SERVICE] = (
                f"this server is still setting up its embedded defaults, this service among "
                f"them (operation {op}: `GET /v1/operations/{op}`); try again when it has finished"
            )
            self._bootstrap_watch = asyncio.create_task(self._bootstrap_ended(op))
        return report

    async def _bootstrap_ended(self, op: str) -> None:
        t0 = time.monotonic()
        try:
            d = await self.runner.wait(op)
        finally:
            self.registry.pending.clear()
        if d["state"] == "succeeded":
            log.info("embedded defaults ready in %.0f s: %s", time.monotonic() - t0, d["result"])
        else:
            log.warning("setting up the embedded defaults %s: %s", d["state"], d.get("error"))

    def _take_lock(self) -> None:
        fd = os.open(self.paths.home / SERVER_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConflictError(
                f"another cloudlet server runs on {self.paths.home}",
                hint="stop it, or give this one another --data-dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def close(self) -> None:
        """Stop background work. Instances keep running (a restarted server re-adopts them)."""
        if self._bootstrap_watch is not None:
            self._bootstrap_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._bootstrap_watch
        await self.handoff.close()
        await self.instances.close()
        await self.runner.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.catalog.close()

    # -- views ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        from cloudlet.hypervisor.accel import choose_accel

        accel: dict[str, Any] | None = None
        with contextlib.suppress(CloudletError, OSError):
            accel_file = self.paths.cache / "accel.json"
            if accel_file.exists() or os.environ.get("CLOUDLET_ACCEL"):
                accel = choose_accel(self.paths, None).to_dict()
        return {
            "name": self.settings.name,
            "version": __version__,
            **host_info(),
            "accelerator": accel,
            "bases": [b["name"] for b in self.list_bases()],
            "services": [s["service_id"] for s in self.registry.list()],
            "instances": {"running": self.instances.count("running")},
        }

    def base_detail(self, name: str) -> dict[str, Any]:
        """A base VM with what uses it (VMs and services)."""
        from cloudlet.synthesis.base import BaseStore

        store = BaseStore(self.paths)
        b = store.get(name)
        return b.summary() | {
            "hardware": b.hardware.to_dict(),
            "used_by": {"vms": store.users(name), "services": self.registry.bases_in_use(name)},
        }

    def list_bases(self) -> list[dict[str, Any]]:
        from cloudlet.synthesis.base import BaseStore

        return [b.summary() for b in BaseStore(self.paths).list()]

    async def wait_bootstrap(self, timeout: float | None = None) -> dict[str, Any] | None:
        if self.bootstrap_op is None:
            return None
        return await self.runner.wait(self.bootstrap_op, timeout)
