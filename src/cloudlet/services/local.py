"""The core as the CLI uses it without a server, same methods as the HTTP client.

Each call opens the data dir's catalog in this process, does its work (async core functions are
driven to completion here, boots included) and closes it again. Results are the same dicts the
API returns, so a command prints the same thing with or without ``--server``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cloudlet.config import Paths
from cloudlet.services.core import Cloudlet, Settings
from cloudlet.services.models import ServiceSpec, ServiceUpdate, validate

T = TypeVar("T")


class LocalCloudlet:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def _run(self, fn: Callable[[Cloudlet], Any]) -> Any:
        async def go() -> Any:
            core = Cloudlet(self.paths, Settings(bootstrap=False))
            try:
                res = fn(core)
                if asyncio.iscoroutine(res):
                    res = await res
                return res
            finally:
                await core.runner.close()
                core.catalog.close()

        return asyncio.run(go())

    def close(self) -> None:
        """Nothing stays open between calls."""

    # -- cloudlet --------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self._run(lambda c: c.info())

    # -- services --------------------------------------------------------------------------
    def list_services(self) -> list[dict[str, Any]]:
        return self._run(lambda c: c.registry.list())

    def get_service(self, sid: str) -> dict[str, Any]:
        return self._run(lambda c: c.registry.get(sid))

    def create_service(self, spec: dict[str, Any], overlay_file: Path | None = None) -> Any:
        async def go(c: Cloudlet) -> dict[str, Any]:
            s = spec
            if overlay_file is not None:
                s = s | {"overlay": (await c.overlays.add_file(Path(overlay_file)))["id"]}
            return c.registry.create(validate(ServiceSpec, s))

        return self._run(go)

    def update_service(
        self, sid: str, changes: dict[str, Any], overlay_file: Path | None = None
    ) -> dict[str, Any]:
        async def go(c: Cloudlet) -> dict[str, Any]:
            ch = changes
            if overlay_file is not None:
                ch = ch | {"overlay": (await c.overlays.add_file(Path(overlay_file)))["id"]}
            return c.registry.update(sid, validate(ServiceUpdate, ch))

        return self._run(go)

    def delete_service(self, sid: str) -> dict[str, Any]:
        return self._run(lambda c: c.registry.delete(sid))

    def export_service(self, sid: str, out: Path) -> dict[str, Any]:
        return self._run(lambda c: c.registry.export(sid, Path(out)))

    def import_service(self, file: Path, replace: bool = False) -> dict[str, Any]:
        return self._run(lambda c: c.registry.import_(Path(file), replace=replace))

    # -- overlays --------------------------------------------------------------------------
    def list_overlays(self) -> list[dict[str, Any]]:
        return self._run(lambda c: c.overlays.list())

    def get_overlay(self, oid: str) -> dict[str, Any]:
        return self._run(lambda c: c.overlays.get(oid))

    def upload_overlay(self, file: Path, name: str | None = None) -> dict[str, Any]:
        return self._run(lambda c: c.overlays.add_file(Path(file), name))

    def download_overlay(self, oid: str, out: Path) -> dict[str, Any]:
        import shutil

        def go(c: Cloudlet) -> dict[str, Any]:
            src = c.overlays.active_path(oid)
            shutil.copyfile(src, out)
            return {"id": oid, "file": str(Path(out).resolve()), "bytes": Path(out).stat().st_size}

        return self._run(go)

    def delete_overlay(self, oid: str) -> dict[str, Any]:
        return self._run(lambda c: c.overlays.delete(oid))

    # -- instances -------------------------------------------------------------------------
    # Without a server no reaper runs: check the VMs of running instances before showing them.
    def list_instances(self, service: str | None = None, all: bool = False) -> Any:
        async def go(c: Cloudlet) -> Any:
            await c.instances.refresh()
            return c.instances.list(service=service, all=all)

        return self._run(go)

    def get_instance(self, iid: str) -> dict[str, Any]:
        async def go(c: Cloudlet) -> dict[str, Any]:
            await c.instances.refresh()
            return c.instances.get(iid)

        return self._run(go)

    def start_instance(
        self, sid: str, join: bool = True, user: str | None = None
    ) -> dict[str, Any]:
        async def go(c: Cloudlet) -> dict[str, Any]:
            res = await c.instances.start(sid, join=join, user=user)
            res["instance"] = await c.instances.wait(res)
            return res

        return self._run(go)

    def stop_instance(self, iid: str) -> dict[str, Any]:
        return self._run(lambda c: c.instances.stop(iid))

    def handoff_instance(
        self,
        iid: str,
        to: str,
        token: str,
        *,
        downtime_target_s: float = 1.0,
        max_rounds: int = 20,
        auto_converge: bool = True,
    ) -> dict[str, Any]:
        from cloudlet.errors import VMError
        from cloudlet.handoff.source import HandoffOptions

        async def go(c: Cloudlet) -> dict[str, Any]:
            opts = HandoffOptions(
                downtime_target_s=downtime_target_s,
                max_rounds=max_rounds,
                auto_converge=auto_converge,
            )
            op = await c.runner.wait(c.handoff.start(iid, to, token, opts)["operation"])
            if op["state"] != "succeeded":
                err = op.get("error") or {}
                raise VMError(
                    f"handoff {op['state']}: {err.get('message', '')}", hint=err.get("hint")
                )
            return dict(op.get("result") or {})

        return self._run(go)

    def leave_instance(self, iid: str, user: str) -> dict[str, Any]:
        return self._run(lambda c: c.instances.leave(iid, user))

    def instance_console(self, iid: str, lines: int = 50) -> dict[str, Any]:
        return self._run(lambda c: c.instances.console(iid, lines))

    # -- bases, images, VMs ----------------------------------------------------------------
    def list_bases(self) -> list[dict[str, Any]]:
        return self._run(lambda c: c.list_bases())

    def get_base(self, name: str) -> dict[str, Any]:
        return self._run(lambda c: c.base_detail(name))

    def list_images(self) -> list[dict[str, Any]]:
        from cloudlet.images.store import ImageStore

        return [i.to_dict() | {"dir": str(i.dir)} for i in ImageStore(self.paths).list()]

    def list_vms(self) -> list[dict[str, Any]]:
        from cloudlet.hypervisor.vm import VMManager

        return [v.summary() for v in VMManager(self.paths).list()]

    # -- tokens, operations ----------------------------------------------------------------
    def create_token(
        self, role: str, name: str = "", expires_in: float | None = None
    ) -> dict[str, Any]:
        return self._run(lambda c: c.tokens.create(role, name=name, expires_in=expires_in))

    def list_tokens(self) -> list[dict[str, Any]]:
        return self._run(lambda c: c.tokens.list())

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self._run(lambda c: c.tokens.revoke(token_id))

    def list_operations(self) -> list[dict[str, Any]]:
        return self._run(lambda c: c.runner.list())

    def get_operation(self, op_id: str) -> dict[str, Any]:
        return self._run(lambda c: c.runner.get(op_id))

    def cancel_operation(self, op_id: str) -> dict[str, Any]:
        return self._run(lambda c: c.runner.cancel(op_id))
