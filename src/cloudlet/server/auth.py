"""Bearer tokens on every ``/v1`` call, and who may do what.

The policy is one function: reads (GET/HEAD) and everything under ``/v1/instances`` (start, stop,
leave) are open to ``device`` tokens; every other call needs ``admin``. It runs as a dependency
before the request body is read, so a wrong or missing token is a 401 with nothing done.
The functions are ``async`` only so that FastAPI does not hand them to a worker thread, which
would cost more than the check itself.
"""

from __future__ import annotations

from fastapi import Request

from cloudlet.catalog.tokens import Principal
from cloudlet.services.core import Cloudlet
from cloudlet.services.errors import AuthError, ForbiddenError

DEVICE_WRITABLE = ("/v1/instances",)


async def get_core(request: Request) -> Cloudlet:
    core: Cloudlet = request.app.state.core
    return core


def authenticate(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(
            "this call needs a bearer token",
            hint="send 'Authorization: Bearer TOKEN' (see `cloudlet token create`)",
        )
    core: Cloudlet = request.app.state.core
    p = core.tokens.check(token.strip())
    if p is None:
        raise AuthError("the token is unknown, revoked or expired")
    request.state.principal = p
    return p


async def authorize(request: Request) -> Principal:
    """Router-level dependency of every ``/v1`` router."""
    p = authenticate(request)
    if p.is_admin or request.method in ("GET", "HEAD"):
        return p
    if request.url.path.startswith(DEVICE_WRITABLE):
        return p
    raise ForbiddenError(
        f"a {p.role} token may not {request.method} {request.url.path}",
        hint="use an admin token",
    )


async def authorize_info(request: Request) -> Principal | None:
    """``/v1/info``: open to anyone when the server runs with ``--public-info``."""
    if request.app.state.core.settings.public_info:
        return None
    return await authorize(request)
