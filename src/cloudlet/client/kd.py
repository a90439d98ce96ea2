"""A client of the KD-Cloudlet compatible API (``/api``), open or encrypted.

It speaks to a cloudlet the way KD-Cloudlet's own clients do (plain GETs with
``X-Device-ID``, or every command encrypted through ``POST /api/command``), so it works against
cloudlet and against pycloud alike. Used by :mod:`cloudlet.client.mobile` to read metadata and
start services on discovered cloudlets.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cloudlet.errors import CloudletError
from cloudlet.services.devices import KDCryptoError, kd_decrypt, kd_encrypt, kd_key


class KDClientError(CloudletError):
    """The cloudlet answered with an error (``status``; 0: unreachable) or garbage."""

    exit_code = 10

    def __init__(self, message: str, *, status: int = 0, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class KDCredentialsError(KDClientError):
    """401/403 from the encrypted API: unknown device, revoked, expired, wrong password."""

    exit_code = 9


@dataclass(frozen=True)
class ServiceVM:
    """A started (or joined) instance as the compatible API describes it."""

    instance_id: str
    service_id: str
    host: str
    port: int
    fqdn: str | None
    raw: dict[str, Any]

    @property
    def address(self) -> str:
        return f"{self.fqdn or self.host}:{self.port}"


class KDClient:
    """One cloudlet's ``/api``. ``password``: the device's password when encryption is on."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        device_id: str = "",
        password: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = int(port)
        self.device_id = device_id
        self.key = kd_key(password) if password is not None else None
        self.timeout = timeout

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    # -- plumbing ------------------------------------------------------------------------
    def _send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException) as e:
            raise KDClientError(f"cannot reach the cloudlet at {self.host}:{self.port}: {e}") from e
        finally:
            conn.close()

    def call(
        self, path: str, params: dict[str, str] | None = None, *, timeout: float | None = None
    ) -> bytes:
        """Run one command (``/services``, ``/servicevm/start``, ...); the reply's bytes."""
        params = params or {}
        t = self.timeout if timeout is None else timeout
        headers = {"X-Device-ID": self.device_id}
        if self.key is None:
            query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
            url = f"/api{path}" + (f"?{query}" if query else "")
            status, data = self._send("GET", url, None, headers, t)
        else:
            plain = path + "".join(f"&{k}={v}" for k, v in params.items())
            token = kd_encrypt(plain.encode(), self.key).decode()
            body = f"command={quote(token, safe='')}".encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            status, data = self._send("POST", "/api/command", body, headers, t)
        if status != 200:
            text = data.decode("utf-8", "replace").strip()
            if status in (401, 403):
                raise KDCredentialsError(text.lstrip("#") or f"HTTP {status}", status=status)
            raise KDClientError(text or f"HTTP {status}", status=status)
        if self.key is not None:
            try:
                data = kd_decrypt(data, self.key)
            except KDCryptoError as e:
                raise KDClientError(f"undecryptable reply from {self.host}: {e}") from e
        return data

    def call_json(self, path: str, params: dict[str, str] | None = None, **kw: Any) -> Any:
        data = self.call(path, params, **kw)
        try:
            return json.loads(data)
        except ValueError as e:
            raise KDClientError(f"{path}: not a JSON reply: {data[:200]!r}") from e

    def rtt(self, tries: int = 3) -> float:
        """The round-trip time to the cloudlet: the fastest of ``tries`` TCP handshakes."""
        best = float("inf")
        for _ in range(tries):
            t0 = time.perf_counter()
            try:
                with socket.create_connection((self.host, self.port), timeout=self.timeout):
                    best = min(best, time.perf_counter() - t0)
            except OSError as e:
                raise KDClientError(f"cannot reach {self.host}:{self.port}: {e}") from e
        return best

    # -- commands ------------------------------------------------------------------------
    def services(self) -> list[dict[str, Any]]:
        return list(self.call_json("/services").get("services", []))

    def service(self, service_id: str) -> dict[str, Any]:
        return dict(self.call_json("/services/get", {"serviceId": service_id}))

    def system(
        self, *, services: bool = False, apps: bool = False, cloudlet: bool = False
    ) -> dict[str, Any]:
        params = {k: "true" for k, v in (("services", services), ("apps", apps),
                                          ("cloudlet", cloudlet)) if v}  # fmt: skip
        return dict(self.call_json("/system", params))

    def start(self, service_id: str, join: bool = True, timeout: float = 330.0) -> ServiceVM:
        d = self.call_json(
            "/servicevm/start",
            {"join": "true" if join else "false", "serviceId": service_id},
            timeout=timeout,
        )
        if not d.get("_id") or not d.get("port"):
            raise KDClientError(f"the start reply names no instance or port: {d}")
        return ServiceVM(
            instance_id=str(d["_id"]),
            service_id=service_id,
            host=str(d.get("ip_address") or self.host),
            port=int(d["port"]),
            fqdn=d.get("fqdn") or None,
            raw=d,
        )

    def stop(self, instance_id: str) -> None:
        self.call("/servicevm/stop", {"instanceId": instance_id})

    def messages(self, service_id: str) -> list[dict[str, Any]]:
        return list(self.call_json("/system/get_messages", {"serviceId": service_id})["messages"])

    def apps(
        self,
        *,
        os_name: str | None = None,
        os_version: str | None = None,
        tags: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        params: dict[str, str] = {}
        if os_name:
            params["osName"] = os_name
            if os_version:
                params["osVersion"] = os_version
        if tags:
            params["tags"] = ",".join(tags)
        return list(self.call_json("/apps", params)["apps"])

    def get_app(self, app_id: str, out: Path) -> str:
        """Download an app to ``out``; returns the MD5 of what arrived (compare to ``md5sum``)."""
        import hashlib

        data = self.call("/apps/get", {"appId": app_id}, timeout=max(self.timeout, 300.0))
        Path(out).write_bytes(data)
        return hashlib.md5(data, usedforsecurity=False).hexdigest()
