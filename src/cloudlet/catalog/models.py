"""Catalog tables. Times are UNIX seconds (float); JSON columns hold small lists and dicts.

The migrations in ``migrations/versions`` create exactly these tables; a change here needs a new
migration (``tests/server/test_catalog.py`` checks that the two agree).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class OverlayRow(Base):
    """An overlay blob (``<home>/overlays/<id>.overlay``). States follow Glance's images:
    ``queued`` (record only) -> ``saving`` (upload streaming) -> ``active`` (verified) or
    ``killed`` (upload failed or did not verify; never used)."""

    __tablename__ = "overlays"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(16), index=True)
    size: Mapped[int] = mapped_column(Integer, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64))
    base_id: Mapped[str | None] = mapped_column(String(64))
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class ServiceRow(Base):
    __tablename__ = "services"

    service_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[str] = mapped_column(String(64), default="1.0")
    tags: Mapped[list[Any]] = mapped_column(default=list)
    base: Mapped[str] = mapped_column(String(63), index=True)
    overlay_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("overlays.id", ondelete="RESTRICT"), index=True
    )
    guest_ports: Mapped[list[Any]] = mapped_column(default=list)
    memory_min_mib: Mapped[int] = mapped_column(Integer)
    memory_ideal_mib: Mapped[int] = mapped_column(Integer)
    cpus: Mapped[int] = mapped_column(Integer, default=1)
    max_users: Mapped[int] = mapped_column(Integer, default=10)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class InstanceRow(Base):
    """A VM running a service. ``starting`` -> ``running`` -> ``stopped``, or ``failed``."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    service_id: Mapped[str] = mapped_column(
        String(200), ForeignKey("services.service_id", ondelete="RESTRICT"), index=True
    )
    vm_id: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    max_users: Mapped[int] = mapped_column(Integer)
    endpoints: Mapped[dict[str, Any]] = mapped_column(default=dict)
    start_kind: Mapped[str | None] = mapped_column(String(16))
    operation_id: Mapped[str | None] = mapped_column(String(32))
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)
    ready_at: Mapped[float | None] = mapped_column(Float)
    last_active: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float)


class InstanceUserRow(Base):
    """One user (a device id, or an id the server made up) joined to an instance."""

    __tablename__ = "instance_users"

    instance_id: Mapped[str] = mapped_column(
        String(16), ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True
    )
    user: Mapped[str] = mapped_column(String(128), primary_key=True)
    joined: Mapped[float] = mapped_column(Float)


class OperationRow(Base):
    """A long action: ``pending`` -> ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``."""

    __tablename__ = "operations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    target: Mapped[str | None] = mapped_column(String(255))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    temp_paths: Mapped[list[Any]] = mapped_column(default=list)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float)


class TokenRow(Base):
    """An API token, kept only as its SHA-256: the token itself is shown once, at creation."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(63), default="")
    created: Mapped[float] = mapped_column(Float)
    expires: Mapped[float | None] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class SettingRow(Base):
    """Small persistent facts (e.g. that the embedded defaults were bootstrapped)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


class AppRow(Base):
    """A client app in the app repository (``<home>/apps/<id>``), tied to a service id.

    The stored file is named by the id only: the uploaded file name is kept as metadata
    (a bare, cleaned name) so nothing a client sends picks a path.
    """

    __tablename__ = "apps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    service_id: Mapped[str] = mapped_column(String(200), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    package_name: Mapped[str] = mapped_column(String(255), default="")
    os_name: Mapped[str] = mapped_column(String(32), default="android")
    min_os_version: Mapped[str] = mapped_column(String(32), default="")
    app_version: Mapped[str] = mapped_column(String(64), default="")
    tags: Mapped[list[Any]] = mapped_column(default=list)
    file_name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer, default=0)
    md5sum: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class DeviceRow(Base):
    """A paired mobile device: KD-Cloudlet credentials for the encrypted API.

    ``kd_key`` is SHA-256 of the device password (the AES key the protocol needs; the password
    itself is shown once). ``token_id`` links an optional native ``device`` token.
    """

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), default="")
    kd_key: Mapped[str] = mapped_column(String(64))
    auth_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    auth_start: Mapped[float] = mapped_column(Float)
    expires: Mapped[float | None] = mapped_column(Float)
    token_id: Mapped[str | None] = mapped_column(String(16))
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float)


class DeviceServiceRow(Base):
    """Which device (paired or not: the ``X-Device-ID`` it sent) used which service, last in
    which instance: who gets the messages about a service."""

    __tablename__ = "device_services"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    service_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    instance_id: Mapped[str | None] = mapped_column(String(16))
    last_used: Mapped[float] = mapped_column(Float)


class DeviceMessageRow(Base):
    """A message queued for a device about a service; handed out once (``read`` set then)."""

    __tablename__ = "device_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    service_id: Mapped[str] = mapped_column(String(200), index=True)
    message: Mapped[str] = mapped_column(String(63))
    text: Mapped[str] = mapped_column(Text, default="")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created: Mapped[float] = mapped_column(Float)
    read: Mapped[float | None] = mapped_column(Float)
