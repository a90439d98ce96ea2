"""Images: list, info, import (a disk uploaded as the request body), download, delete."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse

from cloudlet.errors import ConflictError
from cloudlet.operations.runner import OperationContext
from cloudlet.server.auth import authorize, get_core
from cloudlet.server.routers._common import NameParam, accepted, save_upload
from cloudlet.services.core import Cloudlet

router = APIRouter(prefix="/v1/images", tags=["images"], dependencies=[Depends(authorize)])


def _image(img: Any) -> dict[str, Any]:
    return img.to_dict() | {"dir": str(img.dir)}


@router.get("")
async def list_images(core: Cloudlet = Depends(get_core)) -> list[dict[str, Any]]:
    from cloudlet.images.store import ImageStore

    return [_image(i) for i in ImageStore(core.paths).list()]


@router.get("/{name}")
async def get_image(name: NameParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    from cloudlet.images.store import ImageStore

    return _image(ImageStore(core.paths).get(name))


@router.get("/{name}/files/{part}")
async def download_image_file(
    name: NameParam,
    part: str = PathParam(pattern="^(disk|kernel|initrd)$"),
    core: Cloudlet = Depends(get_core),
) -> FileResponse:
    """Download one file of an image (its disk, kernel or initrd): what ``import`` takes."""
    from cloudlet.errors import NotFoundError
    from cloudlet.images.store import ImageStore

    img = ImageStore(core.paths).get(name)
    path = {"disk": img.disk_path, "kernel": img.kernel_path, "initrd": img.initrd_path}[part]
    if path is None or not path.exists():
        raise NotFoundError(f"image {name!r} has no {part}")
    return FileResponse(path, filename=f"{name}-{path.name}", media_type="application/octet-stream")


@router.delete("/{name}")
async def delete_image(name: NameParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    from cloudlet.images.store import ImageStore

    store = ImageStore(core.paths)
    store.get(name)
    users = core.vms.users_of("image", name)
    if users:
        raise ConflictError(f"image {name!r} is used by VM(s) {', '.join(users)}")
    store.delete(name)
    return {"name": name, "deleted": True}


@router.post("/{name}/import", status_code=202)
async def import_image(
    name: NameParam,
    request: Request,
    port: list[int] = Query(default=[]),
    core: Cloudlet = Depends(get_core),
) -> JSONResponse:
    """Upload a bootable disk (qcow2 without backing file, or raw) as image ``name``; it is
    checked in an operation, and copied into the store only if it passes."""
    from cloudlet.images.store import ImageStore, check_ports

    store = ImageStore(core.paths)
    check_ports(port)
    if store.exists(name):
        raise ConflictError(f"an image named {name!r} already exists")
    tmp = await save_upload(core, request, "image")

    async def body(ctx: OperationContext) -> dict[str, Any]:
        ctx.add_temp(tmp)
        try:
            ctx.progress(0.1, "checking the disk")
            img = await asyncio.to_thread(store.import_image, tmp, name, ports=port)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return {"image": _image(img)}

    return accepted(core.runner.submit("image.import", body, target=f"images/{name}"))
