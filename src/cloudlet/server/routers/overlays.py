"""Overlays: create a record, upload its bytes (streamed), info, download, delete.

``POST /v1/overlays`` makes a ``queued`` record; ``PUT /v1/overlays/{id}/file`` streams the
bytes (any size up to the limit), verifies them and makes the overlay ``active`` (or ``killed``).
``POST /v1/overlays/upload`` does both in one call.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from cloudlet.server.auth import authorize, get_core
from cloudlet.server.routers._common import HexParam, body_chunks, content_length
from cloudlet.services.core import Cloudlet
from cloudlet.services.models import NAME_RE

router = APIRouter(prefix="/v1/overlays", tags=["overlays"], dependencies=[Depends(authorize)])


class OverlayCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, pattern=NAME_RE)


@router.get("")
async def list_overlays(core: Cloudlet = Depends(get_core)) -> list[dict[str, Any]]:
    return core.overlays.list()


@router.post("", status_code=201)
async def create_overlay(req: OverlayCreate, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.overlays.create(req.name)


@router.post("/upload", status_code=201)
async def upload_new(
    request: Request, name: str | None = None, core: Cloudlet = Depends(get_core)
) -> dict[str, Any]:
    core.overlays.check_length(content_length(request))
    rec = core.overlays.create(name)
    return await core.overlays.upload(
        rec["id"], body_chunks(request), length=content_length(request)
    )


@router.get("/{oid}")
async def get_overlay(oid: HexParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.overlays.get(oid)


@router.put("/{oid}/file")
async def upload(oid: HexParam, request: Request, core: Cloudlet = Depends(get_core)) -> Any:
    return await core.overlays.upload(oid, body_chunks(request), length=content_length(request))


@router.get("/{oid}/file")
async def download(oid: HexParam, core: Cloudlet = Depends(get_core)) -> FileResponse:
    path = core.overlays.active_path(oid)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{oid}.overlay")


@router.delete("/{oid}")
async def delete_overlay(oid: HexParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.overlays.delete(oid)
