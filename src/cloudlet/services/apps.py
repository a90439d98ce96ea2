"""The app repository: client apps ("cloudlet-ready" apps) tied to a service id.

An app is any file (an APK, a wheel, a tarball) with metadata: name, service id, description,
package name, OS name, minimum OS version, app version and tags. We compute its MD5 (what
KD-Cloudlet clients check after a download) and SHA-256. The file is stored as
``<home>/apps/<id>``: named by the id we made, never by what the client sent; the uploaded
file name is kept, reduced to a bare name, only to be offered back on download.

Filters (KD-Cloudlet's ``/api/apps?osName=&osVersion=&tags=``): any of the tags; the OS name,
case-insensitive; an OS version at least the app's minimum (compared number by number).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import re
import secrets
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from cloudlet.catalog.db import Catalog, now
from cloudlet.catalog.models import AppRow
from cloudlet.config import Paths
from cloudlet.errors import InvalidInputError, NotFoundError
from cloudlet.services.errors import TooLargeError
from cloudlet.services.models import ServiceId, Tag, validate

APP_ID_RE = r"^[0-9a-f]{16}$"


class AppFields(BaseModel):
    """Editable metadata of an app (absent fields stay as they are on edit)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    service_id: ServiceId | None = None
    description: Annotated[str, Field(max_length=2000)] | None = None
    package_name: Annotated[str, Field(max_length=255)] | None = None
    os_name: Annotated[str, Field(max_length=32, pattern=r"^[A-Za-z0-9._-]*$")] | None = None
    min_os_version: Annotated[str, Field(max_length=32, pattern=r"^[0-9A-Za-z._-]*$")] | None = None
    app_version: Annotated[str, Field(max_length=64)] | None = None
    tags: Annotated[list[Tag], Field(max_length=32)] | None = None


def safe_file_name(name: str | None, fallback: str = "app.bin") -> str:
    """A bare file name from whatever a client sent: no directories (either slash), no
    control characters, no leading dots, at most 255 bytes."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = unicodedata.normalize("NFC", base)
    base = "".join(c for c in base if c.isprintable() and c not in '"\0')
    base = base.strip().lstrip(".").strip()
    while len(base.encode()) > 255:
        base = base[:-1]
    return base or fallback


def version_key(v: str) -> tuple[int, ...]:
    """``"4.10.2"`` -> ``(4, 10, 2)``: numbers compared as numbers (non-digits ignored)."""
    return tuple(int(x) for x in re.findall(r"\d+", v or ""))


def app_dict(r: AppRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "service_id": r.service_id,
        "description": r.description,
        "package_name": r.package_name,
        "os_name": r.os_name,
        "min_os_version": r.min_os_version,
        "app_version": r.app_version,
        "tags": list(r.tags or []),
        "file_name": r.file_name,
        "size": r.size,
        "md5sum": r.md5sum,
        "sha256": r.sha256,
        "created": r.created,
        "updated": r.updated,
    }


def kd_app(d: dict[str, Any]) -> dict[str, Any]:
    """An app as KD-Cloudlet's ``/api/apps`` lists it."""
    return {
        "_id": d["id"],
        "name": d["name"],
        "service_id": d["service_id"],
        "description": d["description"],
        "package_name": d["package_name"],
        "min_android_version": d["min_os_version"],
        "md5sum": d["md5sum"],
        "app_version": d["app_version"],
        "tags": d["tags"],
    }


def _check_app_id(app_id: str) -> str:
    if not isinstance(app_id, str) or not re.match(APP_ID_RE, app_id):
        raise NotFoundError(f"no app {app_id!r}", hint="see `cloudlet app list`")
    return app_id


class AppRepository:
    def __init__(self, catalog: Catalog, paths: Paths, *, max_upload: int = 16 << 30) -> None:
        self.catalog = catalog
        self.paths = paths
        self.dir = paths.home / "apps"
        self.max_upload = max_upload

    def path(self, app_id: str) -> Path:
        return self.dir / _check_app_id(app_id)

    def _row(self, s: Any, app_id: str) -> AppRow:
        r: AppRow | None = s.get(AppRow, _check_app_id(app_id))
        if r is None:
            raise NotFoundError(f"no app {app_id!r}", hint="see `cloudlet app list`")
        return r

    # -- reading -------------------------------------------------------------------------
    def get(self, app_id: str) -> dict[str, Any]:
        with self.catalog.session() as s:
            return app_dict(self._row(s, app_id))

    def list(
        self,
        *,
        service_id: str | None = None,
        tags: Iterable[str] | None = None,
        os_name: str | None = None,
        os_version: str | None = None,
    ) -> builtins.list[dict[str, Any]]:
        """Apps matching every filter given: any of ``tags``; ``os_name``; an ``os_version``
        at least the app's minimum."""
        with self.catalog.session() as s:
            q = select(AppRow).order_by(AppRow.name, AppRow.created)
            if service_id:
                q = q.where(AppRow.service_id == service_id)
            rows = [app_dict(r) for r in s.scalars(q)]
        wanted = {t.strip() for t in (tags or []) if t and t.strip()}
        if wanted:
            rows = [r for r in rows if wanted & set(r["tags"])]
        if os_name:
            rows = [r for r in rows if not r["os_name"] or r["os_name"].lower() == os_name.lower()]
        if os_version and version_key(os_version):
            have = version_key(os_version)
            rows = [r for r in rows if version_key(r["min_os_version"]) <= have]
        return rows

    # -- writing -------------------------------------------------------------------------
    def check_length(self, n: int | None) -> None:
        if n is not None and n > self.max_upload:
            raise TooLargeError(
                f"the app is {n} bytes, over the limit of {self.max_upload}",
                hint="raise it with `cloudlet serve --max-upload`",
            )

    def add(self, src: Path, fields: dict[str, Any], file_name: str | None) -> dict[str, Any]:
        """Store a copy of the file at ``src`` as a new app (the caller removes ``src``)."""
        f = validate(AppFields, fields)
        if not f.name or not f.service_id:
            raise InvalidInputError("an app needs a name and a service id")
        app_id = secrets.token_hex(8)
        self.dir.mkdir(parents=True, exist_ok=True)
        size, md5, sha = self._place(Path(src), self.dir / app_id)
        t = now()
        row = AppRow(
            id=app_id,
            name=f.name,
            service_id=f.service_id,
            description=f.description or "",
            package_name=f.package_name or "",
            os_name=f.os_name if f.os_name is not None else "android",
            min_os_version=f.min_os_version or "",
            app_version=f.app_version or "",
            tags=list(f.tags or []),
            file_name=safe_file_name(file_name, f"{app_id}.bin"),
            size=size,
            md5sum=md5,
            sha256=sha,
            created=t,
            updated=t,
        )
        try:
            with self.catalog.session() as s:
                s.add(row)
                return app_dict(row)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / app_id).unlink()
            raise

    def update(self, app_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        changes = validate(AppFields, fields).model_dump(exclude_unset=True)
        with self.catalog.session() as s:
            r = self._row(s, app_id)
            for k, v in changes.items():
                if v is None and k in ("name", "service_id"):
                    raise InvalidInputError(f"an app's {k} cannot be empty")
                setattr(r, k, list(v) if k == "tags" else (v or ""))
            r.updated = now()
            return app_dict(r)

    def replace_file(self, app_id: str, src: Path, file_name: str | None) -> dict[str, Any]:
        """A new file for an existing app (a new version of the same app)."""
        self.get(app_id)
        size, md5, sha = self._place(Path(src), self.dir / app_id)
        with self.catalog.session() as s:
            r = self._row(s, app_id)
            r.size, r.md5sum, r.sha256, r.updated = size, md5, sha, now()
            if file_name:
                r.file_name = safe_file_name(file_name, r.file_name)
            return app_dict(r)

    def delete(self, app_id: str) -> dict[str, Any]:
        with self.catalog.session() as s:
            r = self._row(s, app_id)
            d = app_dict(r)
            s.delete(r)
        with contextlib.suppress(FileNotFoundError):
            self.path(app_id).unlink()
        return d | {"deleted": True}

    def _place(self, src: Path, dest: Path) -> tuple[int, str, str]:
        """Hash ``src`` and put it at ``dest`` atomically (a rename within the data dir)."""
        if not src.is_file():
            raise NotFoundError(f"no file {src}")
        size = src.stat().st_size
        self.check_length(size)
        md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".app.", dir=dest.parent)
        try:
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    md5.update(chunk)
                    sha.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return size, md5.hexdigest(), sha.hexdigest()

    def add_bytes(self, data: bytes, fields: dict[str, Any], file_name: str | None) -> Any:
        """:meth:`add` for data in memory (tests, small files)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload.", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self.add(Path(tmp), fields, file_name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


__all__ = ["AppFields", "AppRepository", "app_dict", "kd_app", "safe_file_name"]
