"""Managing the app repository, devices and messages: through a server or on the data dir.

The same pattern as :class:`cloudlet.client.Client` / :class:`cloudlet.services.local.
LocalCloudlet`: two classes with the same methods and results, so each CLI command is written
once (``connect_mobile(server)`` in :mod:`cloudlet.cli.connect` picks one).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cloudlet.client import Client
from cloudlet.config import Paths

T = TypeVar("T")


def _app_params(fields: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in fields.items() if v is not None and k != "tags"}
    if fields.get("tags") is not None:
        out["tags"] = ",".join(fields["tags"])
    return out


class RemoteMobileAdmin:
    """Apps, devices and messages through a server's ``/v1`` (admin token for writes)."""

    def __init__(self, client: Client) -> None:
        self.c = client

    def close(self) -> None:
        self.c.close()

    # -- apps ------------------------------------------------------------------------------
    def list_apps(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v}
        if isinstance(params.get("tags"), list):
            params["tags"] = ",".join(params["tags"])
        return self.c.request("GET", "/v1/apps", params=params)

    def get_app(self, app_id: str) -> dict[str, Any]:
        return self.c.request("GET", f"/v1/apps/{app_id}")

    def upload_app(self, file: Path, fields: dict[str, Any], file_name: str | None) -> Any:
        params = _app_params(fields) | {"file_name": file_name or Path(file).name}
        return self.c._upload("POST", "/v1/apps", Path(file), **params)

    def edit_app(self, app_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self.c.request("PATCH", f"/v1/apps/{app_id}", json=changes)

    def replace_app_file(self, app_id: str, file: Path, file_name: str | None) -> Any:
        name = file_name or Path(file).name
        return self.c._upload("PUT", f"/v1/apps/{app_id}/file", Path(file), file_name=name)

    def download_app(self, app_id: str, out: Path) -> dict[str, Any]:
        return {"id": app_id} | self.c._download(f"/v1/apps/{app_id}/file", out)

    def delete_app(self, app_id: str) -> dict[str, Any]:
        return self.c.request("DELETE", f"/v1/apps/{app_id}")

    # -- devices and messages --------------------------------------------------------------
    def list_devices(self) -> list[dict[str, Any]]:
        return self.c.request("GET", "/v1/devices")

    def create_device(self, **kw: Any) -> dict[str, Any]:
        body = {k: v for k, v in kw.items() if v not in (None, "")}
        return self.c.request("POST", "/v1/devices", json=body)

    def get_device(self, device_id: str) -> dict[str, Any]:
        return self.c.request("GET", f"/v1/devices/{device_id}")

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        return self.c.request("POST", f"/v1/devices/{device_id}/revoke")

    def authorize_device(self, device_id: str, expires_in: float | None = None) -> Any:
        body = {"expires_in": expires_in} if expires_in else {}
        return self.c.request("POST", f"/v1/devices/{device_id}/authorize", json=body)

    def delete_device(self, device_id: str) -> dict[str, Any]:
        return self.c.request("DELETE", f"/v1/devices/{device_id}")

    def list_messages(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v}
        return self.c.request("GET", "/v1/messages", params=params)

    def queue_message(self, service_id: str, text: str, device_ids: list[str] | None) -> Any:
        body: dict[str, Any] = {"service_id": service_id, "text": text}
        if device_ids:
            body["device_ids"] = device_ids
        return self.c.request("POST", "/v1/messages", json=body)


class LocalMobileAdmin:
    """The same on the data dir directly (no server needed)."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def close(self) -> None:
        """Nothing stays open between calls."""

    @contextmanager
    def _open(self) -> Iterator[Any]:
        from types import SimpleNamespace

        from cloudlet.catalog.db import Catalog
        from cloudlet.catalog.tokens import TokenStore
        from cloudlet.services.apps import AppRepository
        from cloudlet.services.devices import DeviceManager

        catalog = Catalog(self.paths)
        try:
            yield SimpleNamespace(
                apps=AppRepository(catalog, self.paths),
                devices=DeviceManager(catalog, TokenStore(catalog)),
            )
        finally:
            catalog.close()

    def _run(self, fn: Callable[[Any], T]) -> T:
        with self._open() as m:
            return fn(m)

    # -- apps ------------------------------------------------------------------------------
    def list_apps(self, **filters: Any) -> list[dict[str, Any]]:
        tags = filters.get("tags")
        if isinstance(tags, str):
            filters["tags"] = tags.split(",")
        return self._run(lambda m: m.apps.list(**{k: v for k, v in filters.items() if v}))

    def get_app(self, app_id: str) -> dict[str, Any]:
        return self._run(lambda m: m.apps.get(app_id))

    def upload_app(self, file: Path, fields: dict[str, Any], file_name: str | None) -> Any:
        clean = {k: v for k, v in fields.items() if v is not None}
        return self._run(lambda m: m.apps.add(Path(file), clean, file_name or Path(file).name))

    def edit_app(self, app_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        return self._run(lambda m: m.apps.update(app_id, changes))

    def replace_app_file(self, app_id: str, file: Path, file_name: str | None) -> Any:
        name = file_name or Path(file).name
        return self._run(lambda m: m.apps.replace_file(app_id, Path(file), name))

    def download_app(self, app_id: str, out: Path) -> dict[str, Any]:
        def go(m: Any) -> dict[str, Any]:
            m.apps.get(app_id)
            shutil.copyfile(m.apps.path(app_id), out)
            size = Path(out).stat().st_size
            return {"id": app_id, "file": str(Path(out).resolve()), "bytes": size}

        return self._run(go)

    def delete_app(self, app_id: str) -> dict[str, Any]:
        return self._run(lambda m: m.apps.delete(app_id))

    # -- devices and messages --------------------------------------------------------------
    def list_devices(self) -> list[dict[str, Any]]:
        return self._run(lambda m: m.devices.list())

    def create_device(self, **kw: Any) -> dict[str, Any]:
        return self._run(
            lambda m: m.devices.create(
                kw.get("device_id"),
                name=kw.get("name") or "",
                password=kw.get("password"),
                duration=kw.get("expires_in"),
                native_token=bool(kw.get("native_token")),
            )
        )

    def get_device(self, device_id: str) -> dict[str, Any]:
        return self._run(lambda m: m.devices.get(device_id))

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        return self._run(lambda m: m.devices.revoke(device_id))

    def authorize_device(self, device_id: str, expires_in: float | None = None) -> Any:
        return self._run(lambda m: m.devices.authorize(device_id, duration=expires_in))

    def delete_device(self, device_id: str) -> dict[str, Any]:
        return self._run(lambda m: m.devices.delete(device_id))

    def list_messages(self, **filters: Any) -> list[dict[str, Any]]:
        return self._run(lambda m: m.devices.list_messages(**{k: v for k, v in filters.items()}))

    def queue_message(self, service_id: str, text: str, device_ids: list[str] | None) -> Any:
        return self._run(
            lambda m: {"queued": m.devices.queue_message(service_id, text, device_ids=device_ids)}
        )
