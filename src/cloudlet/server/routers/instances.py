"""Instances: start (join), list, info, stop, leave, console log.

``POST /v1/instances`` answers 200 when it joined a running instance, and 202 with the boot's
operation when the instance is new or still booting (the user is counted either way).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from cloudlet.server.auth import authorize, get_core
from cloudlet.server.routers._common import InstanceIdParam, accepted
from cloudlet.services.core import Cloudlet
from cloudlet.services.models import SERVICE_ID_RE, LeaveRequest, StartRequest

router = APIRouter(prefix="/v1/instances", tags=["instances"], dependencies=[Depends(authorize)])


@router.get("")
async def list_instances(
    service: str | None = Query(default=None, pattern=SERVICE_ID_RE),
    all: bool = False,
    core: Cloudlet = Depends(get_core),
) -> list[dict[str, Any]]:
    return core.instances.list(service=service, all=all)


@router.post("", responses={202: {"description": "booting: follow the operation"}})
async def start_instance(req: StartRequest, core: Cloudlet = Depends(get_core)) -> JSONResponse:
    res = await core.instances.start(req.service_id, join=req.join, user=req.user)
    if res["operation"]:
        return accepted(res["operation"], **{k: v for k, v in res.items() if k != "operation"})
    return JSONResponse(res)


@router.get("/{iid}")
async def get_instance(iid: InstanceIdParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.instances.get(iid)


@router.post("/{iid}/stop")
async def stop_instance(iid: InstanceIdParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return await core.instances.stop(iid)


@router.post("/{iid}/leave")
async def leave_instance(
    iid: InstanceIdParam, req: LeaveRequest, core: Cloudlet = Depends(get_core)
) -> dict[str, Any]:
    return core.instances.leave(iid, req.user)


@router.get("/{iid}/endpoints")
async def endpoints(iid: InstanceIdParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    d = core.instances.get(iid)
    return {"id": iid, "state": d["state"], "endpoints": d["endpoints"]}


@router.get("/{iid}/console")
async def console(
    iid: InstanceIdParam,
    lines: int = Query(default=50, ge=1, le=5000),
    core: Cloudlet = Depends(get_core),
) -> dict[str, Any]:
    return core.instances.console(iid, lines)
