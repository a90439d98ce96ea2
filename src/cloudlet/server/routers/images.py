"""Images: list, info, delete (``/v1/images``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from cloudlet.errors import ConflictError
from cloudlet.server.auth import authorize, get_core
from cloudlet.server.routers._common import NameParam
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
