"""The service registry: named applications this cloudlet can run, kept in the catalog.

A service ties a base VM (by name) to an overlay (by id) with its guest ports, resources and
users per instance. Its package (``export``/``import_``) is one uncompressed tar file holding a
magic member, ``service.json`` and the overlay (already compressed): a service travels between
cloudlets as that one file, verified on arrival like any upload.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from cloudlet.catalog.db import Catalog, now
from cloudlet.catalog.models import InstanceRow, ServiceRow
from cloudlet.config import Paths
from cloudlet.errors import ConflictError, IntegrityError, NotFoundError
from cloudlet.services.cache import bump as bump_cache_generation
from cloudlet.services.cache import generation as cache_generation
from cloudlet.services.models import ServiceSpec, ServiceUpdate, check_service_id, validate
from cloudlet.services.overlays import ACTIVE, OverlayStore

PACKAGE_MAGIC = "cloudlet-service-package"
PACKAGE_VERSION = 1
PACKAGE_MEMBERS = (PACKAGE_MAGIC, "service.json", "overlay")
MAX_METADATA_BYTES = 1 << 20
ACTIVE_STATES = ("starting", "running", "stopping")


def service_dict(r: ServiceRow, *, instances: int = 0, cached: bool = False) -> dict[str, Any]:
    return {
        "service_id": r.service_id,
        "description": r.description,
        "version": r.version,
        "tags": list(r.tags or []),
        "base": r.base,
        "overlay": r.overlay_id,
        "guest_ports": list(r.guest_ports or []),
        "memory_min_mib": r.memory_min_mib,
        "memory_ideal_mib": r.memory_ideal_mib,
        "cpus": r.cpus,
        "max_users": r.max_users,
        "created": r.created,
        "updated": r.updated,
        "instances": instances,
        "cached": cached,
    }


def spec_of(d: dict[str, Any]) -> dict[str, Any]:
    """The editable fields of a service dict (what a package carries)."""
    keys = ServiceSpec.model_fields.keys()
    return {k: v for k, v in d.items() if k in keys}


MISSING_HINT = "see `cloudlet service list`"


class ServiceRegistry:
    def __init__(self, catalog: Catalog, paths: Paths, overlays: OverlayStore) -> None:
        self.catalog = catalog
        self.paths = paths
        self.overlays = overlays
        self.cache_root = paths.cache / "services"
        # Called with a service id when its overlay or base changed or it was deleted.
        self.on_change: list[Callable[[str], None]] = []
        # The listing, valid while neither the catalog nor the snapshot cache changed: the
        # listing is the API's hottest read and costs ~1 ms of ORM work to rebuild.
        self._view: tuple[tuple[int, int], list[dict[str, Any]]] | None = None
        # Services on their way (id -> the hint a "no service" gives for it meanwhile): the
        # server's embedded sample while it is being set up.
        self.pending: dict[str, str] = {}

    def _row(self, s: Any, sid: str) -> ServiceRow:
        check_service_id(sid)
        r = s.get(ServiceRow, sid)
        if r is None:
            raise NotFoundError(f"no service {sid!r}", hint=self.pending.get(sid, MISSING_HINT))
        return r

    def _counts(self, s: Any) -> dict[str, int]:
        q = (
            select(InstanceRow.service_id, func.count())
            .where(InstanceRow.state.in_(ACTIVE_STATES))
            .group_by(InstanceRow.service_id)
        )
        return {sid: int(n) for sid, n in s.execute(q)}

    def _cached(self, sid: str) -> bool:
        d = self.cache_root / sid
        return d.is_dir() and any(d.glob("*/snapshot.json"))

    def get(self, sid: str) -> dict[str, Any]:
        check_service_id(sid)
        for d in self.list():
            if d["service_id"] == sid:
                return dict(d)
        raise NotFoundError(f"no service {sid!r}", hint=self.pending.get(sid, MISSING_HINT))

    def list(self) -> list[dict[str, Any]]:
        """All services (a cached view: rebuilt only after a commit or a cache change)."""
        key = (self.catalog.version(), cache_generation())
        view = self._view
        if view is not None and view[0] == key:
            return view[1]
        rows = self._list()
        self._view = (key, rows)
        return rows

    def _list(self) -> builtins.list[dict[str, Any]]:
        with self.catalog.session() as s:
            counts = self._counts(s)
            rows = s.scalars(select(ServiceRow).order_by(ServiceRow.service_id))
            return [
                service_dict(
                    r, instances=counts.get(r.service_id, 0), cached=self._cached(r.service_id)
                )
                for r in rows
            ]

    def count(self) -> int:
        with self.catalog.session() as s:
            return int(s.scalar(select(func.count()).select_from(ServiceRow)) or 0)

    # -- checks --------------------------------------------------------------------------
    def _check_refs(self, base: str, overlay: str | None, memory_min_mib: int) -> None:
        """The overlay must be active and made for the base (if the base is here)."""
        base_id = None
        with contextlib.suppress(NotFoundError):
            from cloudlet.synthesis.base import BaseStore

            b = BaseStore(self.paths).get(base)
            base_id = b.base_id
            if b.hardware.memory_mib < memory_min_mib:
                raise ConflictError(
                    f"base VM {base!r} has {b.hardware.memory_mib} MiB of memory, "
                    f"the service needs at least {memory_min_mib}",
                    hint="lower memory_min_mib or use a bigger base VM",
                )
        if overlay is None:
            return
        try:
            o = self.overlays.get(overlay)
        except NotFoundError:
            raise ConflictError(
                f"overlay {overlay} does not exist", hint="upload it first"
            ) from None
        if o["state"] != ACTIVE:
            raise ConflictError(f"overlay {overlay} is {o['state']}, not active")
        if base_id is not None and o["base_id"] != base_id:
            raise ConflictError(
                f"overlay {overlay} was made for base VM {o['base_id']}, "
                f"not for {base!r} ({base_id})",
                hint="use the base VM the overlay was made against",
            )

    # -- create / edit / delete ----------------------------------------------------------
    def create(self, spec: ServiceSpec) -> dict[str, Any]:
        assert spec.memory_ideal_mib is not None
        self._check_refs(spec.base, spec.overlay, spec.memory_min_mib)
        t = now()
        with self.catalog.session() as s:
            if s.get(ServiceRow, spec.service_id) is not None:
                raise ConflictError(
                    f"service {spec.service_id!r} already exists",
                    hint="edit it, or delete it first",
                )
            r = ServiceRow(
                service_id=spec.service_id,
                description=spec.description,
                version=spec.version,
                tags=list(spec.tags),
                base=spec.base,
                overlay_id=spec.overlay,
                guest_ports=list(spec.guest_ports),
                memory_min_mib=spec.memory_min_mib,
                memory_ideal_mib=spec.memory_ideal_mib,
                cpus=spec.cpus,
                max_users=spec.max_users,
                created=t,
                updated=t,
            )
            s.add(r)
            return service_dict(r)

    def update(self, sid: str, changes: ServiceUpdate) -> dict[str, Any]:
        fields = changes.model_dump(exclude_unset=True)
        with self.catalog.session() as s:
            r = self._row(s, sid)
            current = service_dict(r)
        merged = spec_of(current) | fields
        spec = validate(ServiceSpec, merged)  # the result must be a valid service as a whole
        assert spec.memory_ideal_mib is not None
        self._check_refs(spec.base, spec.overlay, spec.memory_min_mib)
        with self.catalog.session() as s:
            r = self._row(s, sid)
            for k, v in spec_of(spec.model_dump()).items():
                if k == "service_id":
                    continue
                setattr(r, "overlay_id" if k == "overlay" else k, v)
            r.updated = now()
            d = service_dict(r)
        if current["overlay"] != d["overlay"] or current["base"] != d["base"]:
            self.drop_cache(sid)
            for cb in self.on_change:
                cb(sid)
        return d

    def delete(self, sid: str) -> dict[str, Any]:
        with self.catalog.session() as s:
            r = self._row(s, sid)
            n = self._counts(s).get(sid, 0)
            if n:
                raise ConflictError(
                    f"service {sid!r} has {n} instance(s) running",
                    hint=f"stop them first (`cloudlet instance list --service {sid}`)",
                )
            d = service_dict(r)
            for inst in s.scalars(select(InstanceRow).where(InstanceRow.service_id == sid)):
                s.delete(inst)
            s.flush()
            s.delete(r)
        self.drop_cache(sid)
        for cb in self.on_change:
            cb(sid)
        return d | {"deleted": True}

    def drop_cache(self, sid: str) -> None:
        d = self.cache_root / check_service_id(sid)
        if d.exists():
            trash = Path(tempfile.mkdtemp(prefix="drop-cache.", dir=self.paths.tmp))
            os.rename(d, trash / "x")
            shutil.rmtree(trash, ignore_errors=True)
            bump_cache_generation()

    def bases_in_use(self, base: str) -> builtins.list[str]:
        with self.catalog.session() as s:
            return list(s.scalars(select(ServiceRow.service_id).where(ServiceRow.base == base)))

    # -- packages ------------------------------------------------------------------------
    def export(self, sid: str, out: Path) -> dict[str, Any]:
        """Write service ``sid`` (metadata and overlay) as one package file at ``out``."""
        svc = self.get(sid)
        overlay = self.overlays.active_path(svc["overlay"]) if svc["overlay"] else None
        meta = {
            "package_version": PACKAGE_VERSION,
            "service": spec_of(svc),
            "overlay": self.overlays.get(svc["overlay"]) if svc["overlay"] else None,
        }
        out = Path(out).resolve()
        part = out.with_name(out.name + ".part")
        try:
            with open(part, "wb") as f:
                with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    for name, data in (
                        (PACKAGE_MAGIC, str(PACKAGE_VERSION).encode()),
                        ("service.json", json.dumps(meta, indent=2, sort_keys=True).encode()),
                    ):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        info.mtime = int(now())
                        tar.addfile(info, io.BytesIO(data))
                    if overlay is not None:
                        tar.add(overlay, arcname="overlay", recursive=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise
        return {"service_id": sid, "file": str(out), "bytes": out.stat().st_size}

    async def import_(self, file: Path, *, replace: bool = False) -> dict[str, Any]:
        """Register the service in package ``file``; its overlay is verified before use."""
        work = Path(tempfile.mkdtemp(prefix="import-service.", dir=self.paths.tmp))
        try:
            meta = _unpack(file, work)
            spec = validate(ServiceSpec, dict(meta.get("service") or {}))
            exists = True
            try:
                self.get(spec.service_id)
            except NotFoundError:
                exists = False
            if exists and not replace:
                raise ConflictError(
                    f"service {spec.service_id!r} already exists", hint="delete it first"
                )
            if (work / "overlay").exists():
                o = await self.overlays.add_file(
                    work / "overlay", (meta.get("overlay") or {}).get("name")
                )
                spec.overlay = o["id"]
            else:
                spec.overlay = None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if exists:
            upd = validate(ServiceUpdate, {k: v for k, v in spec_of(spec.model_dump()).items()
                                           if k != "service_id"})  # fmt: skip
            return self.update(spec.service_id, upd)
        return self.create(spec)


def _unpack(file: Path, work: Path) -> dict[str, Any]:
    """Read a package: only its known members, by bare name, so nothing in it picks a path."""
    try:
        with tarfile.open(file, mode="r:") as tar:
            for m in tar:
                if m.name not in PACKAGE_MEMBERS or not m.isfile():
                    raise IntegrityError(
                        f"not a cloudlet service package (unexpected member {m.name!r})"
                    )
                if m.name != "overlay" and m.size > MAX_METADATA_BYTES:
                    raise IntegrityError(f"package member {m.name} is too large")
                src = tar.extractfile(m)
                assert src is not None
                with open(work / m.name, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (tarfile.TarError, EOFError) as e:
        raise IntegrityError(f"not a readable cloudlet service package: {e}") from e
    if not (work / PACKAGE_MAGIC).exists() or not (work / "service.json").exists():
        raise IntegrityError("not a cloudlet service package (missing its header or metadata)")
    version = (work / PACKAGE_MAGIC).read_text().strip()
    if version != str(PACKAGE_VERSION):
        raise IntegrityError(f"service package version {version!r} is not supported")
    try:
        meta = json.loads((work / "service.json").read_text())
    except ValueError as e:
        raise IntegrityError(f"unreadable service.json in the package: {e}") from e
    if not isinstance(meta, dict):
        raise IntegrityError("service.json in the package is not an object")
    return meta
