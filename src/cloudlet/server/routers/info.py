"""``GET /v1/info``: this cloudlet, its host and what it holds."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from cloudlet.server.auth import authorize_info, get_core
from cloudlet.services.core import Cloudlet

router = APIRouter(prefix="/v1", tags=["info"])


@router.get("/info", dependencies=[Depends(authorize_info)])
async def info(core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    """Name, CPU (cores, usage, MHz, cache), memory, load, accelerator, bases, services,
    running instances."""
    return core.info()
