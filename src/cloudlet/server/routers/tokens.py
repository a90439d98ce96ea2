"""Tokens (admin only): create (the token is in the reply, once), list, revoke."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from cloudlet.server.auth import authorize, get_core
from cloudlet.services.core import Cloudlet
from cloudlet.services.errors import ForbiddenError
from cloudlet.services.models import TokenRequest

router = APIRouter(prefix="/v1/tokens", tags=["tokens"], dependencies=[Depends(authorize)])


async def _admin_only(core: Cloudlet, principal: Any) -> None:
    if not principal.is_admin:
        raise ForbiddenError("only an admin token may see tokens")


@router.get("")
async def list_tokens(
    principal: Any = Depends(authorize), core: Cloudlet = Depends(get_core)
) -> list[dict[str, Any]]:
    await _admin_only(core, principal)
    return core.tokens.list()


@router.post("", status_code=201)
async def create_token(req: TokenRequest, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.tokens.create(req.role, name=req.name or "", expires_in=req.expires_in)


@router.delete("/{token_id}")
async def revoke_token(
    token_id: str = PathParam(pattern=r"^[0-9a-f]{1,16}$"), core: Cloudlet = Depends(get_core)
) -> dict[str, Any]:
    return core.tokens.revoke(token_id)
