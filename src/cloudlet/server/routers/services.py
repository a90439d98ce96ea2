"""Services: list, info, create, edit, delete, and export/import as one package file."""

from __future__ import annotations

import contextlib
import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from cloudlet.operations.runner import OperationContext
from cloudlet.server.auth import authorize, get_core
from cloudlet.server.routers._common import ServiceIdParam, accepted, save_upload
from cloudlet.services.core import Cloudlet
from cloudlet.services.models import ServiceSpec, ServiceUpdate

router = APIRouter(prefix="/v1/services", tags=["services"], dependencies=[Depends(authorize)])


@router.get("")
async def list_services(core: Cloudlet = Depends(get_core)) -> JSONResponse:
    return JSONResponse(core.registry.list())


@router.post("", status_code=201)
async def create_service(spec: ServiceSpec, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.registry.create(spec)


@router.post("/import", status_code=202)
async def import_service(
    request: Request, replace: bool = False, core: Cloudlet = Depends(get_core)
) -> JSONResponse:
    """Upload a service package (request body); its overlay is verified in an operation."""
    tmp = await save_upload(core, request, "service")

    async def body(ctx: OperationContext) -> dict[str, Any]:
        ctx.add_temp(tmp)
        try:
            ctx.progress(0.05, "verifying the package")
            return {"service": await core.registry.import_(tmp, replace=replace)}
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    return accepted(core.runner.submit("service.import", body, target="services"))


@router.get("/{sid}")
async def get_service(sid: ServiceIdParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.registry.get(sid)


@router.patch("/{sid}")
async def update_service(
    sid: ServiceIdParam, changes: ServiceUpdate, core: Cloudlet = Depends(get_core)
) -> dict[str, Any]:
    return core.registry.update(sid, changes)


@router.delete("/{sid}")
async def delete_service(sid: ServiceIdParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.registry.delete(sid)


@router.get("/{sid}/package")
async def export_service(sid: ServiceIdParam, core: Cloudlet = Depends(get_core)) -> FileResponse:
    """The service (metadata and overlay) as one package file."""
    import asyncio

    d = core.paths.tmp / "exports"
    d.mkdir(parents=True, exist_ok=True)
    out = d / f"{sid}.{secrets.token_hex(4)}.service"
    await asyncio.to_thread(core.registry.export, sid, out)

    def cleanup() -> None:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()

    return FileResponse(
        out,
        media_type="application/x-tar",
        filename=f"{sid}.service",
        background=BackgroundTask(cleanup),
    )
