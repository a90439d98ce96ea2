"""The overlay store: uploaded overlay files, under ``<home>/overlays/<id>.overlay``.

Like Glance's images, an overlay record is made first (``queued``), then its bytes are streamed
in (``saving``) to a temporary file under the data dir, with the size limit enforced while
streaming; the whole file is then verified (every segment's hash and bounds, the trailer) and
only then renamed into place and marked ``active``. A failed or corrupt upload ends ``killed``
and leaves no file: a killed overlay can never be used by a service.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from cloudlet.catalog.db import Catalog, now
from cloudlet.catalog.models import OverlayRow, ServiceRow
from cloudlet.config import Paths
from cloudlet.errors import CloudletError, ConflictError, IntegrityError, NotFoundError
from cloudlet.services.errors import NoSpaceError, TooLargeError
from cloudlet.services.models import HEX_ID_RE
from cloudlet.util.fs import fsync_dir

QUEUED, SAVING, ACTIVE, KILLED = "queued", "saving", "active", "killed"
DEFAULT_MAX_UPLOAD = 16 << 30
SPACE_MARGIN = 256 << 20  # keep this much free after an upload of known length


def overlay_dict(r: OverlayRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "state": r.state,
        "size": r.size,
        "sha256": r.sha256,
        "base_id": r.base_id,
        "format": (r.info or {}).get("format"),
        "error": r.error,
        "created": r.created,
        "updated": r.updated,
    }


def check_overlay_id(oid: str) -> str:
    import re

    from cloudlet.errors import InvalidInputError

    if not isinstance(oid, str) or not re.match(HEX_ID_RE, oid):
        raise InvalidInputError(f"invalid overlay id {oid!r}", hint="see `cloudlet overlay list`")
    return oid


def verify_overlay_file(path: Path) -> dict[str, Any]:
    """Full check of an overlay file; raises IntegrityError (or a subclass) if it is bad."""
    from cloudlet.overlay import overlay_info

    try:
        info = overlay_info(path, verify=True)
    except CloudletError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"not a readable overlay: {e}") from e
    if not info.get("verified"):
        raise IntegrityError("the overlay could not be verified")
    if info.get("size") != info.get("expected_size"):
        raise IntegrityError(
            f"the overlay is {info.get('size')} bytes, its header says {info.get('expected_size')}"
        )
    return info


class OverlayStore:
    def __init__(
        self, catalog: Catalog, paths: Paths, *, max_upload: int = DEFAULT_MAX_UPLOAD
    ) -> None:
        self.catalog = catalog
        self.paths = paths
        self.dir = paths.home / "overlays"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.upload_dir = paths.tmp / "uploads"
        self.max_upload = max_upload

    def path(self, oid: str) -> Path:
        return self.dir / f"{check_overlay_id(oid)}.overlay"

    # -- records -------------------------------------------------------------------------
    def create(self, name: str | None = None) -> dict[str, Any]:
        if name is not None:
            from cloudlet.util.names import check_name

            check_name(name, "overlay name")
        t = now()
        row = OverlayRow(
            id=secrets.token_hex(8), name=name, state=QUEUED, size=0, info={}, created=t, updated=t
        )
        with self.catalog.session() as s:
            s.add(row)
        return overlay_dict(row)

    def _row(self, s: Any, oid: str) -> OverlayRow:
        check_overlay_id(oid)
        r = s.get(OverlayRow, oid)
        if r is None:
            raise NotFoundError(f"no overlay {oid!r}", hint="see `cloudlet overlay list`")
        return r

    def get(self, oid: str) -> dict[str, Any]:
        with self.catalog.session() as s:
            return overlay_dict(self._row(s, oid))

    def list(self) -> list[dict[str, Any]]:
        with self.catalog.session() as s:
            rows = s.scalars(select(OverlayRow).order_by(OverlayRow.created))
            return [overlay_dict(r) for r in rows]

    def active_path(self, oid: str) -> Path:
        """The file of an active overlay, or ConflictError saying why it cannot be used."""
        d = self.get(oid)
        if d["state"] != ACTIVE:
            raise ConflictError(f"overlay {oid} is {d['state']}, not active")
        p = self.path(oid)
        if not p.is_file():
            raise ConflictError(f"overlay {oid}'s file is missing from the data dir")
        return p

    def users(self, oid: str) -> builtins.list[str]:
        with self.catalog.session() as s:
            q = select(ServiceRow.service_id).where(ServiceRow.overlay_id == oid)
            return list(s.scalars(q))

    def delete(self, oid: str) -> dict[str, Any]:
        users = self.users(check_overlay_id(oid))
        if users:
            raise ConflictError(
                f"overlay {oid} is used by service(s) {', '.join(users)}",
                hint="change or delete those services first",
            )
        with self.catalog.session() as s:
            r = self._row(s, oid)
            if r.state == SAVING:
                raise ConflictError(f"overlay {oid} is being uploaded")
            d = overlay_dict(r)
            s.delete(r)
        with contextlib.suppress(FileNotFoundError):
            self.path(oid).unlink()
        return d | {"deleted": True}

    def count_active(self) -> int:
        with self.catalog.session() as s:
            q = select(func.count()).select_from(OverlayRow).where(OverlayRow.state == ACTIVE)
            return int(s.scalar(q) or 0)

    # -- upload --------------------------------------------------------------------------
    def check_length(self, length: int | None) -> None:
        """Refuse an upload of known length before reading a byte of it."""
        if length is None:
            return
        if length > self.max_upload:
            raise TooLargeError(
                f"the upload is {length} bytes, the limit is {self.max_upload}",
                hint="raise it with `cloudlet serve --max-upload`",
            )
        free = shutil.disk_usage(self.paths.home).free
        if length + SPACE_MARGIN > free:
            raise NoSpaceError(f"the upload is {length} bytes, the data dir has {free} free")

    async def upload(
        self, oid: str, chunks: AsyncIterator[bytes], *, length: int | None = None
    ) -> dict[str, Any]:
        """Stream an upload into overlay ``oid`` (queued), verify it, make it active."""
        self.check_length(length)
        with self.catalog.session() as s:
            r = self._row(s, oid)
            if r.state != QUEUED:
                raise ConflictError(
                    f"overlay {oid} is {r.state}; only a queued overlay takes an upload",
                    hint="create a new overlay record",
                )
            self.upload_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.upload_dir / f"{oid}.{secrets.token_hex(4)}.part"
            r.state = SAVING
            r.info = {"tmp": str(tmp)}
            r.updated = now()
        try:
            size, digest = await self._receive(chunks, tmp)
            info = await asyncio.to_thread(verify_overlay_file, tmp)
            final = self.path(oid)
            os.replace(tmp, final)
            fsync_dir(self.dir)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            msg = e.message if isinstance(e, CloudletError) else f"{type(e).__name__}: {e}"
            self._set(oid, state=KILLED, info={}, error=msg or "upload interrupted")
            raise
        info.pop("path", None)
        return self._set(
            oid,
            state=ACTIVE,
            size=size,
            sha256=digest,
            base_id=info.get("base_id"),
            info={k: info[k] for k in ("format", "hardware", "meta", "kinds") if k in info},
            error=None,
        )

    async def _receive(self, chunks: AsyncIterator[bytes], tmp: Path) -> tuple[int, str]:
        size = 0
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_upload:
                    raise TooLargeError(
                        f"the upload went past the limit of {self.max_upload} bytes; refused",
                        hint="raise it with `cloudlet serve --max-upload`",
                    )
                h.update(chunk)
                f.write(chunk)
            f.flush()
            await asyncio.to_thread(os.fsync, f.fileno())
        return size, h.hexdigest()

    async def add_file(self, file: Path, name: str | None = None) -> dict[str, Any]:
        """Add a local overlay file (CLI without a server, package import): same checks."""
        if not file.is_file():
            raise NotFoundError(f"no file {file}")
        rec = self.create(name)

        async def chunks() -> AsyncIterator[bytes]:
            for c in _file_chunks(file):
                yield c

        return await self.upload(rec["id"], chunks(), length=file.stat().st_size)

    def _set(self, oid: str, **fields: Any) -> dict[str, Any]:
        with self.catalog.session() as s:
            r = self._row(s, oid)
            for k, v in fields.items():
                setattr(r, k, v)
            r.updated = now()
            return overlay_dict(r)

    def recover(self) -> builtins.list[str]:
        """Uploads cut by a server kill end ``killed``; their temp files are removed."""
        killed = []
        with self.catalog.session() as s:
            for r in s.scalars(select(OverlayRow).where(OverlayRow.state == SAVING)):
                tmp = (r.info or {}).get("tmp")
                if tmp:
                    with contextlib.suppress(FileNotFoundError):
                        Path(tmp).unlink()
                r.state, r.info, r.updated = KILLED, {}, now()
                r.error = "upload interrupted by server restart"
                killed.append(r.id)
        return killed


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
