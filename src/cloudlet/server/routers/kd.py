"""The KD-Cloudlet compatible API under ``/api``, as pycloud 3.x answers it.

What unmodified KD-Cloudlet clients (SEI's Java client library) call: they send plain GETs with
an ``X-Device-ID`` header and no token, need status 200 and read exactly ``Content-Length``
bytes (a chunked reply reads as nothing), and show the text of an error reply; with
encryption on, every command goes through ``POST /api/command`` (see :mod:`.devices`).

Every action is a function of (core, params, device id, the address the client reached) that
returns a JSON-able value or a file; the plain routes and ``/api/command`` dispatch through the
same table, so both modes give the same answers. Successes are 200 with a JSON body (bytes, so
Starlette sets ``Content-Length``); errors are plain-text 400/404/500 bodies (401/403 for
credentials, starting with ``#``). The mode is the server setting ``kd_api``: ``open`` (plain
routes; the server binds loopback unless told otherwise), ``encrypted`` (plain routes answer
403, only ``/api/command`` works), ``off`` (this router is not mounted).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response

from cloudlet import __version__
from cloudlet.errors import CloudletError, InvalidInputError, NotFoundError
from cloudlet.services.apps import kd_app
from cloudlet.services.core import Cloudlet
from cloudlet.services.devices import (
    DEVICE_ID_RE,
    DeviceAuthError,
    KDCryptoError,
    kd_decrypt,
    kd_encrypt,
)
from cloudlet.services.host import cpu_usage, cpuinfo, meminfo
from cloudlet.services.models import SERVICE_ID_RE

router = APIRouter(prefix="/api", include_in_schema=False)

START_TIMEOUT = 300.0  # seconds a start may take before the client is told it failed
MAX_COMMAND_BYTES = 64 << 10
ANON_PREFIX = "kd-"  # users made up for clients that sent no usable device id


class KDError(Exception):
    """An error reply: plain text with its status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass
class KDFile:
    path: Path
    file_name: str


@dataclass
class Call:
    core: Cloudlet
    params: dict[str, str]
    device_id: str | None
    server_addr: str


def _text(status: int, text: str) -> Response:
    return PlainTextResponse(text, status_code=status)


def _json(value: Any) -> Response:
    return Response(json.dumps(value).encode(), media_type="application/json")


def _bool(v: str | None) -> bool:
    return (v or "").strip().upper() in ("T", "TRUE", "Y", "YES", "1")


def _service_kd(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "_id": d["service_id"],
        "service_id": d["service_id"],
        "description": d["description"],
        "version": d["version"],
        "tags": d["tags"],
    }


def _user(device_id: str | None) -> str | None:
    return device_id if device_id and re.match(DEVICE_ID_RE, device_id) else None


def _error(e: CloudletError) -> KDError:
    if isinstance(e, NotFoundError):
        return KDError(404, e.message)
    if isinstance(e, InvalidInputError):
        return KDError(400, e.message)
    return KDError(500, e.message)


# -- actions -------------------------------------------------------------------------------
async def services_list(c: Call) -> Any:
    return {"services": [_service_kd(d) for d in c.core.registry.list()]}


def _service(c: Call) -> dict[str, Any]:
    sid = c.params.get("serviceId")
    if not sid:
        raise KDError(400, "Must provide service id")
    if not re.match(SERVICE_ID_RE, sid):
        raise KDError(404, f"404 Not Found - service for {sid} not found")
    try:
        return c.core.registry.get(sid)
    except NotFoundError:
        raise KDError(404, f"404 Not Found - service for {sid} not found") from None


async def services_get(c: Call) -> Any:
    return _service_kd(_service(c))


def svm_reply(inst: dict[str, Any], svc: dict[str, Any], server_addr: str) -> dict[str, Any]:
    """A running instance as pycloud's ServiceVM: the host port of the service's first guest
    port, at the address the client reached (or the specific address the port is bound to)."""
    port = svc["guest_ports"][0] if svc["guest_ports"] else None
    ep = inst["endpoints"].get(str(port)) if port else None
    if ep is None and inst["endpoints"]:
        ep = next(iter(inst["endpoints"].values()))
    host = (ep or {}).get("host") or server_addr
    if host in ("0.0.0.0", "::", ""):
        host = server_addr
    return {
        "_id": inst["id"],
        "service_id": inst["service_id"],
        "running": inst["state"] == "running",
        "port": (ep or {}).get("port"),
        "ip_address": host,
        "fqdn": None,
        "ssh_port": None,
        "vnc_address": None,
    }


async def servicevm_start(c: Call) -> Any:
    svc = _service(c)
    sid = svc["service_id"]
    join = _bool(c.params.get("join"))
    user = _user(c.device_id)
    try:
        res = await c.core.instances.start(
            sid, join=join, user=user or f"{ANON_PREFIX}{secrets.token_hex(6)}"
        )
        inst = await c.core.instances.wait(res, START_TIMEOUT)
    except TimeoutError:
        raise KDError(500, f"service {sid} did not start within {START_TIMEOUT:g} s") from None
    except CloudletError as e:
        raise KDError(500, e.message) from None
    if user:
        c.core.devices.record_use(user, sid, inst["id"])
    return svm_reply(inst, svc, c.server_addr)


async def servicevm_stop(c: Call) -> Any:
    """One user leaves; the last one stops the instance (pycloud's user count, with users)."""
    iid = c.params.get("instanceId")
    if not iid:
        raise KDError(400, "Must provide instance id")
    missing = KDError(404, f"Service vm for {iid} not found")
    if not re.match(r"^[0-9a-f]{1,16}$", iid):
        raise missing
    try:
        inst = c.core.instances.get(iid)
    except NotFoundError:
        raise missing from None
    if inst["state"] not in ("starting", "running"):
        raise missing
    users: list[str] = inst["user_ids"]
    try:
        if len(users) > 1:
            me = _user(c.device_id)
            if me not in users:  # someone else's count: the latest anonymous user, else latest
                anon = [u for u in users if u.startswith(ANON_PREFIX)]
                me = (anon or users)[-1]
            c.core.instances.leave(iid, me)
        else:
            await c.core.instances.stop(iid)
    except NotFoundError:
        raise missing from None
    except CloudletError as e:
        raise KDError(500, e.message) from None
    return {}


async def _usage_percent() -> float:
    u = cpu_usage()
    if u is None:  # first sample since start: measure over 0.1 s (as pycloud did)
        await asyncio.sleep(0.1)
        u = cpu_usage()
    return round((u or 0.0) * 100.0, 2)


def _cache_kib(cache: str | None) -> int:
    m = re.match(r"\s*(\d+)\s*([KMG]?)", cache or "")
    if not m:
        return 0
    return int(m.group(1)) * {"": 1, "K": 1, "M": 1024, "G": 1 << 20}[m.group(2)]


async def system(c: Call) -> Any:
    mem = meminfo()
    cpu = cpuinfo()
    out: dict[str, Any] = {
        "memory_info": {
            "max_memory": int(mem.get("MemTotal", 0)),
            "free_memory": int(mem.get("MemAvailable", mem.get("MemFree", 0))),
        },
        "cpu_info": {
            "max_cores": int(cpu["cores"]),
            "usage": await _usage_percent(),
            "speed": float(cpu["mhz"] or 0.0),
            "cache": _cache_kib(cpu["cache"]),
        },
    }
    if _bool(c.params.get("services")):
        out["services"] = [_service_kd(d) for d in c.core.registry.list()]
    if _bool(c.params.get("apps")):
        out["apps"] = [kd_app(a) for a in c.core.apps.list()]
    if _bool(c.params.get("cloudlet")):  # our extension: what our client's rankers use
        out["cloudlet"] = cloudlet_extension(c.core)
    return out


def cloudlet_extension(core: Cloudlet) -> dict[str, Any]:
    """Per service: instances, their users and free places, whether a snapshot is cached,
    and the memory an instance needs; and this cloudlet's name, version and mode."""
    per: dict[str, dict[str, Any]] = {}
    for s in core.registry.list():
        per[s["service_id"]] = {
            "instances": 0,
            "users": 0,
            "room": 0,
            "cached": bool(s.get("cached")),
            "memory_mib": s["memory_ideal_mib"],
            "max_users": s["max_users"],
        }
    for i in core.instances.list():
        p = per.get(i["service_id"])
        if p is None or i["state"] not in ("starting", "running"):
            continue
        p["instances"] += 1
        p["users"] += i["users"]
        p["room"] += max(0, i["max_users"] - i["users"])
    return {
        "name": core.settings.name,
        "version": __version__,
        "encryption": core.settings.kd_api == "encrypted",
        "services": per,
    }


async def get_messages(c: Call) -> Any:
    if not c.device_id:
        raise KDError(400, "Must provide a device id (header X-Device-ID)")
    sid = c.params.get("serviceId") or None
    return {"messages": c.core.devices.take_messages(c.device_id, sid)}


async def apps_list(c: Call) -> Any:
    tags = [t for t in (c.params.get("tags") or "").split(",") if t]
    apps = c.core.apps.list(
        tags=tags, os_name=c.params.get("osName"), os_version=c.params.get("osVersion")
    )
    return {"apps": [kd_app(a) for a in apps]}


async def apps_get(c: Call) -> Any:
    app_id = c.params.get("appId")
    if not app_id:
        raise KDError(400, "400 Bad Request - must provide app_id")
    try:
        d = c.core.apps.get(app_id)
        path = c.core.apps.path(app_id)
    except NotFoundError:
        raise KDError(404, f'404 Not Found - app with id "{app_id}" was not found') from None
    if not path.is_file():
        raise KDError(404, f'404 Not Found - file for app with id "{app_id}" was not found')
    return KDFile(path, d["file_name"])


Action = Callable[[Call], Awaitable[Any]]
ACTIONS: dict[str, Action] = {
    "/services": services_list,
    "/services/get": services_get,
    "/servicevm/start": servicevm_start,
    "/servicevm/stop": servicevm_stop,
    "/system": system,
    "/system/get_messages": get_messages,
    "/apps": apps_list,
    "/apps/get": apps_get,
}


def _server_addr(request: Request) -> str:
    server = request.scope.get("server")
    if server and server[0]:
        return str(server[0])
    return request.url.hostname or "127.0.0.1"


def _file_response(f: KDFile) -> Response:
    media = (
        "application/vnd.android.package-archive"
        if f.file_name.lower().endswith(".apk")
        else "application/octet-stream"
    )
    return FileResponse(f.path, media_type=media, filename=f.file_name)


# -- routes --------------------------------------------------------------------------------
@router.post("/command")
async def command(request: Request) -> Response:
    """Encrypted mode: one encrypted command in, its encrypted reply out."""
    core: Cloudlet = request.app.state.core
    if core.settings.kd_api != "encrypted":
        return _text(404, "404 Not Found - encryption is not enabled on this cloudlet")
    device_id = request.headers.get("x-device-id")
    try:
        key = core.devices.check(device_id)
    except DeviceAuthError as e:
        return _text(e.status, e.text)
    n = request.headers.get("content-length")
    if n and n.isdigit() and int(n) > MAX_COMMAND_BYTES:
        return _text(400, "#The command is too long")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_COMMAND_BYTES:
            return _text(400, "#The command is too long")
    try:
        form = parse_qs(body.decode("latin-1"), keep_blank_values=True)
    except ValueError:
        form = {}
    token = (form.get("command") or [""])[0]
    if not token:
        return _text(400, "#Must provide an encrypted command")
    try:
        plain = kd_decrypt(token, key).decode("utf-8")
    except KDCryptoError as e:
        return _text(400 if e.kind == "base64" else 401, f"#{e}")
    except UnicodeDecodeError:
        return _text(401, "#the command does not decrypt with this device's key")
    path, *pairs = plain.split("&")
    if not path.startswith("/"):
        return _text(401, "#the command does not decrypt with this device's key")
    params: dict[str, str] = {}
    for p in pairs:
        k, _, v = p.partition("=")
        if k:
            params[k] = v
    action = ACTIONS.get(path.rstrip("/") or path)
    if action is None:
        return _text(404, f"#Command {path} not found")
    try:
        value = await action(Call(core, params, device_id, _server_addr(request)))
    except KDError as e:
        return _text(e.status, e.text)
    if isinstance(value, KDFile):
        data = await asyncio.to_thread(value.path.read_bytes)
    else:
        data = json.dumps(value).encode()
    reply = kd_encrypt(data, key)
    return Response(reply, media_type="text/plain")


@router.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
async def plain(path: str, request: Request) -> Response:
    """The open-mode routes (GET), and a plain-text 404 for anything else under ``/api``."""
    core: Cloudlet = request.app.state.core
    action = ACTIONS.get("/" + path.rstrip("/"))
    if action is None or request.method not in ("GET", "HEAD"):
        return _text(404, f"404 Not Found - no command /api/{path}")
    if core.settings.kd_api == "encrypted":
        return _text(403, "#This cloudlet only accepts encrypted commands (POST /api/command)")
    params = {k: v for k, v in request.query_params.items()}
    try:
        value = await action(
            Call(core, params, request.headers.get("x-device-id"), _server_addr(request))
        )
    except KDError as e:
        return _text(e.status, e.text)
    if isinstance(value, KDFile):
        return _file_response(value)
    return _json(value)
