"""Operations: list, get, cancel, and progress as Server-Sent Events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from cloudlet.operations.runner import FINAL
from cloudlet.server.auth import authorize, get_core
from cloudlet.server.routers._common import HexParam
from cloudlet.services.core import Cloudlet

router = APIRouter(prefix="/v1/operations", tags=["operations"], dependencies=[Depends(authorize)])


@router.get("")
async def list_operations(
    state: str | None = Query(default=None, pattern=r"^[a-z]{1,16}$"),
    limit: int = Query(default=100, ge=1, le=1000),
    core: Cloudlet = Depends(get_core),
) -> list[dict[str, Any]]:
    return core.runner.list(limit=limit, state=state)


@router.get("/{op_id}")
async def get_operation(op_id: HexParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.runner.get(op_id)


@router.post("/{op_id}/cancel", status_code=202)
async def cancel_operation(op_id: HexParam, core: Cloudlet = Depends(get_core)) -> dict[str, Any]:
    return core.runner.cancel(op_id)


@router.get("/{op_id}/events")
async def events(op_id: HexParam, core: Cloudlet = Depends(get_core)) -> StreamingResponse:
    """``text/event-stream``: a ``progress`` event per change, then one ``end`` event."""
    core.runner.get(op_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[bytes]:
        async for d in core.runner.events(op_id):
            kind = "end" if d.get("state") in FINAL else "progress"
            yield f"event: {kind}\ndata: {json.dumps(d, default=str)}\n\n".encode()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
