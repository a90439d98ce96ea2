"""``/v1/apps``: the app repository (client apps tied to a service id), native API.

Uploads are the request body (any file type, streamed to the data dir within the upload limit)
with the metadata as query parameters; the MD5 and SHA-256 are computed here. Reading is open
to ``device`` tokens; writing needs ``admin`` (the router's usual policy).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from cloudlet.server.auth import authorize, get_core
from cloudlet.server.routers._common import save_upload
from cloudlet.services.apps import APP_ID_RE
from cloudlet.services.core import Cloudlet

router = APIRouter(prefix="/v1/apps", tags=["apps"], dependencies=[Depends(authorize)])
AppIdParam = Annotated[str, PathParam(pattern=APP_ID_RE)]
META = (
    "name",
    "service_id",
    "description",
    "package_name",
    "os_name",
    "min_os_version",
    "app_version",
)


def _fields(request: Request) -> dict[str, Any]:
    q = request.query_params
    out: dict[str, Any] = {k: q[k] for k in META if k in q}
    if "tags" in q:
        out["tags"] = [t.strip() for t in q["tags"].split(",") if t.strip()]
    return out


@router.get("")
async def list_apps(
    service_id: str | None = None,
    tags: str | None = Query(default=None, description="comma-separated: any of them"),
    os_name: str | None = None,
    os_version: str | None = None,
    core: Cloudlet = Depends(get_core),
) -> list[dict[str, Any]]:
    return core.apps.list(
        service_id=service_id,
        tags=(tags or "").split(","),
        os_name=os_name,
        os_version=os_version,
    )


@router.post("", status_code=201)
async def upload_app(
    request: Request,
    file_name: str | None = Query(default=None, max_length=1024),
    core: Cloudlet = Depends(get_core),
) -> dict[str, Any]:
    """Body: the app file. Query: ``name``, ``service_id`` (required), ``description``,
    ``package_name``, ``os_name`` (default android), ``min_os_version``, ``app_version``,
    ``tags`` (comma-separated), ``file_name`` (kept as a bare name, for downloads)."""
    fields = _fields(request)
    tmp = await save_upload(core, request, "app")
    try:
        return await asyncio.to_thread(core.apps.add, tmp, fields, file_name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@router.get("/{app_id}")
async def get_app(app_id: AppIdParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.apps.get(app_id)


@router.patch("/{app_id}")
async def edit_app(
    app_id: AppIdParam, changes: dict[str, Any], core: Cloudlet = Depends(get_core)
) -> dict[str, Any]:
    """Change metadata (fields as in the upload; ``tags`` a list); absent fields stay."""
    return core.apps.update(app_id, changes)


@router.put("/{app_id}/file")
async def replace_app_file(
    app_id: AppIdParam,
    request: Request,
    file_name: str | None = Query(default=None, max_length=1024),
    core: Cloudlet = Depends(get_core),
) -> dict[str, Any]:
    core.apps.get(app_id)
    tmp = await save_upload(core, request, "app")
    try:
        return await asyncio.to_thread(core.apps.replace_file, app_id, tmp, file_name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@router.get("/{app_id}/file")
async def download_app(app_id: AppIdParam, core: Cloudlet = Depends(get_core)) -> FileResponse:
    d = core.apps.get(app_id)
    return FileResponse(
        core.apps.path(app_id),
        media_type="application/octet-stream",
        filename=d["file_name"],
        headers={"X-MD5": d["md5sum"]},
    )


@router.delete("/{app_id}")
async def delete_app(app_id: AppIdParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.apps.delete(app_id)
