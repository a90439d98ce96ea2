"""The FastAPI application: lifespan (open the core, recover, bootstrap), errors, routers.

Errors: every :class:`~cloudlet.errors.CloudletError` becomes its class's ``status_code`` with
``{"error", "message", "hint"}`` (Starlette finds the handler by walking the exception's MRO).
Request validation errors are 422 and keep FastAPI's ``detail`` list (field and reason), with
the same three keys beside it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloudlet import __version__
from cloudlet.config import Paths
from cloudlet.discovery import start_advertising
from cloudlet.errors import CloudletError
from cloudlet.server.metrics import LatencyMiddleware, Metrics
from cloudlet.server.routers import (
    bases,
    handoff,
    images,
    info,
    instances,
    kd,
    kd_apps,
    kd_devices,
    operations,
    overlays,
    services,
    tokens,
    vms,
)
from cloudlet.services.core import Cloudlet, Settings

log = logging.getLogger("cloudlet.server")

DESCRIPTION = """Native API of a cloudlet: base VMs, overlays, services and their instances.

Every `/v1` call needs `Authorization: Bearer TOKEN`. Long actions answer 202 with an operation
id: follow it at `/v1/operations/{id}` or as Server-Sent Events at `/v1/operations/{id}/events`.
"""


def _error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


async def _cloudlet_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CloudletError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return _error(exc.status_code, exc.to_dict(), headers)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = jsonable_encoder(exc.errors(), exclude={"input", "url", "ctx"})
    first = detail[0] if detail else {}
    where = ".".join(str(x) for x in first.get("loc", []))
    return _error(
        422,
        {
            "error": "ValidationError",
            "message": f"{where}: {first.get('msg', 'invalid')}" if first else "invalid request",
            "hint": None,
            "detail": detail,
        },
    )


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    names = {404: "NotFoundError", 405: "MethodNotAllowed"}
    name = names.get(exc.status_code, "HTTPError")
    return _error(exc.status_code, {"error": name, "message": str(exc.detail), "hint": None})


def create_app(
    paths: Paths,
    settings: Settings | None = None,
    *,
    on_admin_token: Any = None,
) -> FastAPI:
    """The app for data dir ``paths``. ``on_admin_token(made)`` gets the first admin token."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        report = await core.start_server()
        log.info("started: %s", report)
        made = core.tokens.ensure_admin()
        if made is not None and on_admin_token is not None:
            on_admin_token(made)
        advertiser = await start_advertising(core.settings)  # zeroconf, if asked for
        gc.freeze()  # what startup made lives on: keep it out of every later GC pass
        try:
            yield
        finally:
            if advertiser is not None:
                await advertiser.close()
            await core.close()

    core = Cloudlet(paths, settings)
    app = FastAPI(
        title="cloudlet",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.core = core
    metrics = Metrics(core)
    app.state.metrics = metrics
    app.add_exception_handler(CloudletError, _cloudlet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # The hottest routes first: matching walks the route list in order.
    for r in (instances, services, info, operations, overlays, bases, images, tokens, vms, handoff):
        app.include_router(r.router)
    for r in (kd_apps, kd_devices):  # the mobile side (docs/mobile-api.md)
        app.include_router(r.router)
    if core.settings.kd_api != "off":
        app.include_router(kd.router)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(LatencyMiddleware, metrics=metrics)
    return app
