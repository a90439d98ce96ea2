"""Base VMs: list, info, create from an image (operation), import/export, delete."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from cloudlet.errors import ConflictError
from cloudlet.operations.runner import OperationContext
from cloudlet.server.auth import authorize, get_core
from cloudlet.server.routers._common import NameParam, accepted, save_upload
from cloudlet.services.core import Cloudlet
from cloudlet.services.models import BaseCreateRequest

router = APIRouter(prefix="/v1/bases", tags=["base VMs"], dependencies=[Depends(authorize)])


def _store(core: Cloudlet) -> Any:
    from cloudlet.synthesis.base import BaseStore

    return BaseStore(core.paths)


@router.get("")
async def list_bases(core: Cloudlet = Depends(get_core)) -> list[dict[str, Any]]:
    return core.list_bases()


@router.get("/{name}")
async def get_base(name: NameParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.base_detail(name)


@router.post("", status_code=202)
async def create_base(req: BaseCreateRequest, core: Cloudlet = Depends(get_core)) -> JSONResponse:
    """Boot an image, snapshot it and keep it as a base VM (an operation)."""
    from cloudlet.images.store import ImageStore

    img = ImageStore(core.paths).verify(req.image)
    store = _store(core)
    if store.dir(req.name).exists():
        raise ConflictError(f"base VM {req.name!r} already exists")

    async def body(ctx: OperationContext) -> dict[str, Any]:
        ctx.progress(0.05, f"booting image {req.image}")
        b = await store.create(
            img, req.name, memory_mib=req.memory_mib, cpus=req.cpus, ports=req.ports
        )
        return {"base": b.summary()}

    return accepted(core.runner.submit("base.create", body, target=f"bases/{req.name}"))


@router.delete("/{name}")
async def delete_base(name: NameParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    store = _store(core)
    store.get(name)
    services = core.registry.bases_in_use(name)
    if services:
        raise ConflictError(
            f"base VM {name!r} is used by service(s) {', '.join(services)}",
            hint="delete or change those services first",
        )
    store.delete(name)  # refuses (409) while VMs use it
    return {"name": name, "deleted": True}


@router.get("/{name}/export")
async def export_base(name: NameParam, core: Cloudlet = Depends(get_core)) -> FileResponse:
    """The base VM as one file (zstd tar), for another cloudlet to import."""
    store = _store(core)
    store.get(name)
    d = core.paths.tmp / "exports"
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{name}.{secrets.token_hex(4)}.base"
    await asyncio.to_thread(store.export, name, out)

    def cleanup() -> None:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()

    return FileResponse(
        out,
        media_type="application/octet-stream",
        filename=f"{name}.base",
        background=BackgroundTask(cleanup),
    )


@router.post("/import", status_code=202)
async def import_base(
    request: Request, name: str | None = None, core: Cloudlet = Depends(get_core)
) -> JSONResponse:
    """Upload an exported base VM (request body); verified in an operation before use."""
    if name is not None:
        from cloudlet.util.names import check_name

        check_name(name, "base name")
    tmp = await save_upload(core, request, "base")
    store = _store(core)

    async def body(ctx: OperationContext) -> dict[str, Any]:
        ctx.add_temp(tmp)
        try:
            ctx.progress(0.05, "verifying the base VM")
            b = await asyncio.to_thread(store.import_, tmp, name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return {"base": b.summary()}

    return accepted(core.runner.submit("base.import", body, target="bases"))
