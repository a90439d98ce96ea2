"""Handoff: ``POST /v1/instances/{id}/handoff`` on the source; sessions on the destination.

The destination routes take the source's streamed frame bodies (``/rounds``, ``/finish``); the
finish answers only once the VM runs here. All of it needs an admin token: a device token may
start and leave instances, never move them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cloudlet.catalog.tokens import Principal
from cloudlet.handoff.source import HandoffOptions
from cloudlet.server.auth import authorize, get_core
from cloudlet.server.routers._common import InstanceIdParam, accepted, body_chunks
from cloudlet.services.core import Cloudlet
from cloudlet.services.errors import ForbiddenError

router = APIRouter(tags=["handoff"], dependencies=[Depends(authorize)])

SessionParam = PathParam(pattern=r"^[0-9a-f]{24}$")


async def admin_only(p: Principal = Depends(authorize)) -> Principal:
    if not p.is_admin:
        raise ForbiddenError("handoff needs an admin token", hint="use an admin token")
    return p


class HandoffRequest(BaseModel):
    to: str = Field(min_length=8, max_length=2000, description="Destination cloudlet URL")
    token: str = Field(min_length=1, max_length=500, description="A token it accepts")
    downtime_target_s: float = Field(default=1.0, gt=0, le=60)
    max_rounds: int = Field(default=20, ge=1, le=64)
    auto_converge: bool = Field(
        default=True, description="Throttle a VM that dirties memory faster than the link sends"
    )


class PrepareRequest(BaseModel):
    base_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    hardware: dict[str, Any]
    guest_ports: list[int] = Field(default_factory=list, max_length=32)
    name: str | None = Field(default=None, max_length=63)
    meta: dict[str, Any] = Field(default_factory=dict)


@router.post("/v1/instances/{iid}/handoff", dependencies=[Depends(admin_only)])
async def handoff_instance(
    iid: InstanceIdParam, req: HandoffRequest, core: Cloudlet = Depends(get_core)
) -> JSONResponse:
    """Move a running instance to another cloudlet (202 with the operation)."""
    opts = HandoffOptions(
        downtime_target_s=req.downtime_target_s,
        max_rounds=req.max_rounds,
        auto_converge=req.auto_converge,
    )
    res = core.handoff.start(iid, req.to, req.token, opts)
    return accepted(res["operation"], instance=res["instance"])


@router.post("/v1/handoff/sessions", dependencies=[Depends(admin_only)])
async def prepare(req: PrepareRequest, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    """Take an incoming VM: refused (409) unless this cloudlet holds its base VM."""
    return await core.handoff.destination.prepare(req.model_dump())


@router.post("/v1/handoff/sessions/{sid}/rounds", dependencies=[Depends(admin_only)])
async def round_(
    request: Request, sid: str = SessionParam, core: Cloudlet = Depends(get_core)
) -> dict[str, Any]:
    return await core.handoff.destination.receive(sid, body_chunks(request))


@router.post("/v1/handoff/sessions/{sid}/finish", dependencies=[Depends(admin_only)])
async def finish(
    request: Request, sid: str = SessionParam, core: Cloudlet = Depends(get_core)
) -> dict[str, Any]:
    """The last round and the device state; answers once the VM runs here."""
    res = await core.handoff.destination.finish(sid, body_chunks(request))
    inst = core.handoff.adopt(res)
    return res | {"instance": inst["id"] if inst else None}


@router.delete("/v1/handoff/sessions/{sid}", dependencies=[Depends(admin_only)])
async def abort(sid: str = SessionParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    await core.handoff.destination.abort(sid)
    return {"session": sid, "aborted": True}
