"""An httpx client for a cloudlet's native API (``/v1``).

Its methods have the same names, arguments and results as
:class:`cloudlet.services.local.LocalCloudlet`, so a CLI command is written once and runs
against either (``--server URL`` / ``CLOUDLET_URL`` picks this one). Error replies become the
:class:`~cloudlet.errors.CloudletError` subclass of their status, with the server's message and
hint, so the CLI prints and exits the same way as locally. Long actions (202 + operation) are
followed to their end over the operation's Server-Sent Events.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from cloudlet.config import Paths
from cloudlet.errors import (
    CloudletError,
    ConflictError,
    EnvironmentProblem,
    InvalidInputError,
    NotFoundError,
    VMError,
)
from cloudlet.services.errors import AuthError, ForbiddenError, NoSpaceError, TooLargeError

__all__ = ["Client", "ServerError", "load_token"]

_BY_STATUS: dict[int, type[CloudletError]] = {
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    413: TooLargeError,
    422: InvalidInputError,
    503: EnvironmentProblem,
    507: NoSpaceError,
}


class ServerError(CloudletError):
    """The server answered with an error we have no closer class for (or is unreachable)."""

    exit_code = 10


def load_token(paths: Paths | None = None) -> str | None:
    """``CLOUDLET_TOKEN``, else the admin token the local server wrote to ``<home>/admin-token``."""
    tok = os.environ.get("CLOUDLET_TOKEN")
    if tok:
        return tok.strip()
    if paths is not None:
        f = paths.home / "admin-token"
        try:
            return f.read_text().strip() or None
        except OSError:
            return None
    return None


def _chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


class Client:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------
    def _check(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        try:
            body = r.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        cls = _BY_STATUS.get(r.status_code, ServerError)
        msg = body.get("message") or f"{r.request.method} {r.request.url.path}: {r.status_code}"
        raise cls(msg, hint=body.get("hint"))

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ServerError(
                f"cannot reach the cloudlet at {self.url}: {e}",
                hint="is `cloudlet serve` running? check --server / CLOUDLET_URL",
            ) from e
        self._check(r)
        if r.status_code == 202:
            body = r.json()
            return body | {"result": self.wait_operation(body["operation"])}
        if not r.content:
            return None
        return r.json()

    def wait_operation(self, op_id: str, timeout: float = 900.0) -> dict[str, Any]:
        """Follow an operation's events to its end; raise its error if it failed."""
        final: dict[str, Any] | None = None
        try:
            with self.http.stream(
                "GET", f"/v1/operations/{op_id}/events", timeout=httpx.Timeout(timeout)
            ) as r:
                self._check(r)
                event = None
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "end":
                        final = json.loads(line[5:])
                        break
        except httpx.HTTPError as e:
            raise ServerError(f"lost the events of operation {op_id}: {e}") from e
        if final is None:
            final = self.request("GET", f"/v1/operations/{op_id}")
            assert final is not None
        if final["state"] != "succeeded":
            err = final.get("error") or {}
            raise VMError(
                f"operation {op_id} ({final['kind']}) {final['state']}: {err.get('message', '')}",
                hint=err.get("hint"),
            )
        return dict(final.get("result") or {})

    def _download(self, path: str, out: Path) -> dict[str, Any]:
        out = Path(out)
        part = out.with_name(out.name + ".part")
        n = 0
        try:
            with self.http.stream("GET", path) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                with open(part, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
                        n += len(chunk)
            os.replace(part, out)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return {"file": str(out.resolve()), "bytes": n}

    def _upload(self, method: str, path: str, file: Path, **params: Any) -> Any:
        file = Path(file)
        if not file.is_file():
            raise NotFoundError(f"no file {file}")
        headers = {"Content-Length": str(file.stat().st_size)}
        params = {k: v for k, v in params.items() if v is not None}
        return self.request(method, path, content=_chunks(file), headers=headers, params=params)

    # -- cloudlet --------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self.request("GET", "/v1/info")

    # -- services --------------------------------------------------------------------------
    def list_services(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/services")

    def get_service(self, sid: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/services/{sid}")

    def create_service(self, spec: dict[str, Any], overlay_file: Path | None = None) -> Any:
        if overlay_file is not None:
            spec = spec | {"overlay": self.upload_overlay(overlay_file)["id"]}
        return self.request("POST", "/v1/services", json=spec)

    def update_service(
        self, sid: str, changes: dict[str, Any], overlay_file: Path | None = None
    ) -> dict[str, Any]:
        if overlay_file is not None:
            changes = changes | {"overlay": self.upload_overlay(overlay_file)["id"]}
        return self.request("PATCH", f"/v1/services/{sid}", json=changes)

    def delete_service(self, sid: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/services/{sid}")

    def export_service(self, sid: str, out: Path) -> dict[str, Any]:
        return {"service_id": sid} | self._download(f"/v1/services/{sid}/package", out)

    def import_service(self, file: Path, replace: bool = False) -> dict[str, Any]:
        res = self._upload("POST", "/v1/services/import", file, replace=replace or None)
        return dict(res["result"]["service"])

    # -- overlays --------------------------------------------------------------------------
    def list_overlays(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/overlays")

    def get_overlay(self, oid: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/overlays/{oid}")

    def upload_overlay(self, file: Path, name: str | None = None) -> dict[str, Any]:
        return self._upload("POST", "/v1/overlays/upload", file, name=name)

    def download_overlay(self, oid: str, out: Path) -> dict[str, Any]:
        return {"id": oid} | self._download(f"/v1/overlays/{oid}/file", out)

    def delete_overlay(self, oid: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/overlays/{oid}")

    # -- instances -------------------------------------------------------------------------
    def list_instances(self, service: str | None = None, all: bool = False) -> Any:
        params: dict[str, Any] = {"all": all}
        if service:
            params["service"] = service
        return self.request("GET", "/v1/instances", params=params)

    def get_instance(self, iid: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/instances/{iid}")

    def start_instance(
        self, sid: str, join: bool = True, user: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"service_id": sid, "join": join}
        if user:
            body["user"] = user
        res = self.request("POST", "/v1/instances", json=body, params={"wait": 60})
        iid = res["instance"]["id"]
        if "result" in res:  # it booted (or we waited for its boot)
            res["instance"] = self.get_instance(iid)
        return {k: res.get(k) for k in ("instance", "user", "joined", "operation")}

    def stop_instance(self, iid: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/instances/{iid}/stop")

    def handoff_instance(
        self,
        iid: str,
        to: str,
        token: str,
        *,
        downtime_target_s: float = 1.0,
        max_rounds: int = 20,
        auto_converge: bool = True,
    ) -> dict[str, Any]:
        """Move an instance to the cloudlet at ``to``; returns the operation's result."""
        body = {
            "to": to,
            "token": token,
            "downtime_target_s": downtime_target_s,
            "max_rounds": max_rounds,
            "auto_converge": auto_converge,
        }
        res = self.request("POST", f"/v1/instances/{iid}/handoff", json=body)
        return self.wait_operation(res["operation"])

    def leave_instance(self, iid: str, user: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/instances/{iid}/leave", json={"user": user})

    def instance_console(self, iid: str, lines: int = 50) -> dict[str, Any]:
        return self.request("GET", f"/v1/instances/{iid}/console", params={"lines": lines})

    # -- bases, images, VMs ----------------------------------------------------------------
    def list_bases(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/bases")

    def get_base(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/bases/{name}")

    def list_images(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/images")

    def list_vms(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/vms")

    # -- tokens, operations ----------------------------------------------------------------
    def create_token(
        self, role: str, name: str = "", expires_in: float | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"role": role}
        if name:
            body["name"] = name
        if expires_in:
            body["expires_in"] = expires_in
        return self.request("POST", "/v1/tokens", json=body)

    def list_tokens(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/tokens")

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/tokens/{token_id}")

    def list_operations(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/operations")

    def get_operation(self, op_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/operations/{op_id}")

    def cancel_operation(self, op_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/operations/{op_id}/cancel")
