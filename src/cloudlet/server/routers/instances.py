"""Instances: start (join), list, info, stop, leave, console log.

``POST /v1/instances`` answers 200 when it joined a running instance, and 202 with the boot's
operation when the instance is new or still booting (the user is counted either way); with
``?wait=S`` it waits up to S seconds for that boot and then answers 200 if it is done.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from cloudlet.errors import VMError
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
async def start_instance(
    req: StartRequest,
    wait: float = Query(default=0.0, ge=0.0, le=300.0),
    core: Cloudlet = Depends(get_core),
) -> JSONResponse:
    """Join or start; with ``?wait=S``, answer 200 with the running instance if its boot ends
    within S seconds (one round trip for a cached start), else 202 as usual."""
    res = await core.instances.start(req.service_id, join=req.join, user=req.user)
    op = res["operation"]
    if op and wait > 0:
        try:
            d = await core.runner.wait(op, wait)
        except TimeoutError:
            d = None
        if d is not None:
            if d["state"] != "succeeded":
                err = d.get("error") or {}
                raise VMError(
                    f"instance {res['instance']['id']} did not start: "
                    f"{err.get('message', d['state'])}",
                    hint=err.get("hint"),
                )
            res["instance"] = core.instances.get(res["instance"]["id"])
            return JSONResponse(res)
    if op:
        return accepted(op, **{k: v for k, v in res.items() if k != "operation"})
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
