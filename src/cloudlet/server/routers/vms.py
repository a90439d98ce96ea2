"""VMs (read-only): what QEMU machines this cloudlet runs, for ``cloudlet vm list --server``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from cloudlet.server.auth import authorize, get_core
from cloudlet.services.core import Cloudlet

router = APIRouter(prefix="/v1/vms", tags=["VMs"], dependencies=[Depends(authorize)])


@router.get("")
async def list_vms(core: Cloudlet = Depends(get_core)) -> list[dict[str, Any]]:
    return [v.summary() for v in core.vms.list()]


@router.get("/{vm_id}")
async def get_vm(
    vm_id: str = PathParam(pattern=r"^[0-9a-f]{1,32}$"), core: Cloudlet = Depends(get_core)
) -> dict[str, Any]:
    return core.vms.get(vm_id).summary()
