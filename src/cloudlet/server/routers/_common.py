"""What the routers share: path-parameter patterns, the 202 reply, streaming an upload."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Path as PathParam
from fastapi import Request
from fastapi.responses import JSONResponse

from cloudlet.services.core import Cloudlet
from cloudlet.services.errors import TooLargeError
from cloudlet.services.models import HEX_ID_RE, NAME_RE, SERVICE_ID_RE

# Ids from the URL are checked against these before anything uses them (422 otherwise), so
# no name or id reaches a file path unchecked.
NameParam = Annotated[str, PathParam(pattern=NAME_RE)]
HexParam = Annotated[str, PathParam(pattern=HEX_ID_RE)]
ServiceIdParam = Annotated[str, PathParam(pattern=SERVICE_ID_RE, max_length=200)]
InstanceIdParam = Annotated[str, PathParam(pattern=r"^[0-9a-f]{1,16}$")]


def accepted(op_id: str, **extra: Any) -> JSONResponse:
    """202 with the operation to follow."""
    body = {"operation": op_id, "links": {"self": f"/v1/operations/{op_id}"}} | extra
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/operations/{op_id}"})


def content_length(request: Request) -> int | None:
    v = request.headers.get("content-length")
    return int(v) if v and v.isdigit() else None


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


async def save_upload(core: Cloudlet, request: Request, prefix: str) -> Path:
    """Stream the request body to a temp file under the data dir, within the size limit."""
    core.overlays.check_length(content_length(request))
    d = core.paths.tmp / "uploads"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f"{prefix}.{secrets.token_hex(6)}.part"
    size = 0
    try:
        with open(tmp, "wb") as f:
            async for chunk in body_chunks(request):
                size += len(chunk)
                if size > core.overlays.max_upload:
                    raise TooLargeError(
                        f"the upload went past the limit of {core.overlays.max_upload} bytes",
                        hint="raise it with `cloudlet serve --max-upload`",
                    )
                f.write(chunk)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp
