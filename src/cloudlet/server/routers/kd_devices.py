"""``/v1/devices`` and ``/v1/messages``: paired devices and device messages (admin only).

A device's KD-Cloudlet password (and native token, if asked for) is in the creation reply
only. Messages are what the compatible API hands out at ``/api/system/get_messages``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from cloudlet.catalog.tokens import Principal
from cloudlet.server.auth import authorize, get_core
from cloudlet.services.core import Cloudlet
from cloudlet.services.devices import DEVICE_ID_RE
from cloudlet.services.errors import ForbiddenError
from cloudlet.services.models import ServiceId

DeviceIdParam = Annotated[str, PathParam(pattern=DEVICE_ID_RE)]
DeviceId = Annotated[str, Field(pattern=DEVICE_ID_RE)]


async def admin_only(p: Principal = Depends(authorize)) -> Principal:
    """Device credentials and messages are an admin's business, reads included."""
    if not p.is_admin:
        raise ForbiddenError("only an admin token may manage devices and messages")
    return p


router = APIRouter(prefix="/v1", tags=["devices"], dependencies=[Depends(admin_only)])


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: DeviceId | None = None
    name: Annotated[str, Field(max_length=63)] = ""
    password: Annotated[str, Field(min_length=8, max_length=256)] | None = None
    expires_in: Annotated[float, Field(gt=0)] | None = None
    native_token: bool = False


class Authorize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_in: Annotated[float, Field(gt=0)] | None = None


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service_id: ServiceId
    text: Annotated[str, Field(max_length=2000)]
    device_ids: Annotated[list[DeviceId], Field(max_length=10000)] | None = None
    message: Annotated[str, Field(min_length=1, max_length=63)] = "notice"
    params: dict[str, str] | None = None


@router.get("/devices")
async def list_devices(core: Cloudlet = Depends(get_core)) -> list[dict[str, Any]]:
    return core.devices.list()


@router.post("/devices", status_code=201)
async def create_device(req: DeviceCreate, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    """Pair a device; the reply holds its password (and token), which are not kept."""
    return core.devices.create(
        req.device_id,
        name=req.name,
        password=req.password,
        duration=req.expires_in,
        native_token=req.native_token,
    )


@router.get("/devices/{device_id}")
async def get_device(device_id: DeviceIdParam, core: Cloudlet = Depends(get_core)) -> Any:
    return core.devices.get(device_id)


@router.post("/devices/{device_id}/revoke")
async def revoke_device(device_id: DeviceIdParam, core: Cloudlet = Depends(get_core)) -> Any:
    return core.devices.revoke(device_id)


@router.post("/devices/{device_id}/authorize")
async def authorize_device(
    device_id: DeviceIdParam, req: Authorize | None = None, core: Cloudlet = Depends(get_core)
) -> Any:
    return core.devices.authorize(device_id, duration=req.expires_in if req else None)


@router.delete("/devices/{device_id}")
async def delete_device(device_id: DeviceIdParam, core: Cloudlet = Depends(get_core)) -> Any:
    return core.devices.delete(device_id)


@router.get("/messages")
async def list_messages(
    device_id: str | None = None,
    service_id: str | None = None,
    core: Cloudlet = Depends(get_core),
) -> list[dict[str, Any]]:
    return core.devices.list_messages(device_id=device_id, service_id=service_id)


@router.post("/messages", status_code=201)
async def queue_message(req: MessageCreate, core: Cloudlet = Depends(get_core)) -> Any:
    """Queue a message about a service (for the given devices, or all that used it)."""
    n = core.devices.queue_message(
        req.service_id,
        req.text,
        device_ids=req.device_ids,
        message=req.message,
        params=req.params,
    )
    return {"queued": n}
