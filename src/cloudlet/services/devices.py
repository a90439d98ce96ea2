"""Paired devices, their KD-Cloudlet credentials, and the messages queued for devices.

KD-Cloudlet's encrypted API authenticates a device by its id (header ``X-Device-ID``) and a
shared password: every command and reply is ``base64(IV || AES-256-CBC(PKCS#7(data)))`` with
key ``SHA-256(password)``. The password is shown once, when the device is made; the catalog
keeps only the derived key, which is all the protocol needs (so a leaked catalog does not reveal
a password a person may have reused elsewhere).

A device is authorised from ``auth_start`` until ``expires`` (None: no end) while
``auth_enabled``; revoking clears the flag, re-authorising sets it and starts a new window.

Messages: a device polls ``/api/system/get_messages?serviceId=X``; each queued message is
handed out once (marked read in the same transaction that selects it). The handoff code calls
:meth:`DeviceManager.queue_moved` after moving an instance, which KD-Cloudlet clients know as
``move-to-new-cloudlet-network``.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import hashlib
import os
import re
import secrets
from typing import Any

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from sqlalchemy import select, update

from cloudlet.catalog.db import Catalog, now
from cloudlet.catalog.models import DeviceMessageRow, DeviceRow, DeviceServiceRow
from cloudlet.catalog.tokens import TokenStore
from cloudlet.errors import ConflictError, InvalidInputError, NotFoundError
from cloudlet.services.models import check_service_id

DEVICE_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
MOVED = "move-to-new-cloudlet-network"  # the KD-Cloudlet message type clients act upon
NOTICE = "notice"
BLOCK = 16


# -- the KD-Cloudlet cipher ----------------------------------------------------------------
class KDCryptoError(Exception):
    """A command that cannot be decrypted. ``kind`` is ``base64`` (malformed: a 400) or
    ``key`` (bad padding, wrong key, not text: an authentication failure, 401)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def kd_key(password: str) -> bytes:
    """The AES-256 key of a device password: SHA-256 of its UTF-8 bytes (as the clients do)."""
    return hashlib.sha256(password.encode()).digest()


def kd_encrypt(data: bytes, key: bytes) -> bytes:
    """``base64(IV || AES-256-CBC(PKCS#7(data)))`` with a fresh random IV (ASCII bytes)."""
    iv = os.urandom(BLOCK)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(data) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + enc.update(padded) + enc.finalize())


def kd_decrypt(token: bytes | str, key: bytes) -> bytes:
    """The inverse of :func:`kd_encrypt`; raises :class:`KDCryptoError`."""
    raw_token = token.encode() if isinstance(token, str) else token
    try:
        raw = base64.b64decode(raw_token.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KDCryptoError("base64", "the command is not valid base64") from None
    if len(raw) < 2 * BLOCK or len(raw) % BLOCK:
        raise KDCryptoError("base64", "the command is not an IV and whole AES blocks")
    dec = Cipher(algorithms.AES(key), modes.CBC(raw[:BLOCK])).decryptor()
    padded = dec.update(raw[BLOCK:]) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise KDCryptoError("key", "the command does not decrypt with this device's key") from None


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not re.match(DEVICE_ID_RE, device_id):
        raise InvalidInputError(
            f"invalid device id {device_id!r}",
            hint="letters, digits and ._:@- (up to 128), starting with a letter or digit",
        )
    return device_id


def _device_dict(r: DeviceRow) -> dict[str, Any]:
    t = now()
    state = "authorized"
    if not r.auth_enabled:
        state = "revoked"
    elif r.expires is not None and r.expires <= t:
        state = "expired"
    return {
        "device_id": r.device_id,
        "name": r.name,
        "state": state,
        "auth_enabled": r.auth_enabled,
        "auth_start": r.auth_start,
        "expires": r.expires,
        "token_id": r.token_id,
        "created": r.created,
        "updated": r.updated,
        "last_seen": r.last_seen,
    }


def _message_dict(r: DeviceMessageRow) -> dict[str, Any]:
    """As KD-Cloudlet clients read it (``message`` and string ``params``), plus our ``text``."""
    return {
        "device_id": r.device_id,
        "service_id": r.service_id,
        "message": r.message,
        "params": dict(r.params or {}),
        "text": r.text,
    }


class DeviceAuthError(Exception):
    """The encrypted API refused a device. ``status`` is 401 (unknown) or 403 (revoked,
    expired); ``text`` starts with ``#`` (KD-Cloudlet clients show what follows it)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class DeviceManager:
    def __init__(self, catalog: Catalog, tokens: TokenStore | None = None) -> None:
        self.catalog = catalog
        self.tokens = tokens

    # -- devices -------------------------------------------------------------------------
    def _row(self, s: Any, device_id: str) -> DeviceRow:
        r: DeviceRow | None = s.get(DeviceRow, check_device_id(device_id))
        if r is None:
            raise NotFoundError(f"no device {device_id!r}", hint="see `cloudlet device list`")
        return r

    def create(
        self,
        device_id: str | None = None,
        *,
        name: str = "",
        password: str | None = None,
        duration: float | None = None,
        native_token: bool = False,
    ) -> dict[str, Any]:
        """Pair a device: the reply holds its password (and native token), shown only here.

        ``duration`` is how long (seconds) the authorisation lasts; None: until revoked.
        """
        device_id = check_device_id(device_id or f"dev-{secrets.token_hex(8)}")
        if len(name) > 63:
            raise InvalidInputError("a device name has at most 63 characters")
        if duration is not None and duration <= 0:
            raise InvalidInputError("an authorisation must last a positive time")
        if password is not None and len(password) < 8:
            raise InvalidInputError("a device password has at least 8 characters")
        password = password or secrets.token_urlsafe(18)
        t = now()
        with self.catalog.session() as s:
            if s.get(DeviceRow, device_id) is not None:
                raise ConflictError(
                    f"device {device_id!r} is already paired",
                    hint="re-authorise it (`cloudlet device authorize`) or delete it first",
                )
        token = None
        if native_token and self.tokens is not None:
            token = self.tokens.create(
                "device", name=re.sub(r"[^A-Za-z0-9._-]", "-", device_id)[:63]
            )
        row = DeviceRow(
            device_id=device_id,
            name=name,
            kd_key=kd_key(password).hex(),
            auth_enabled=True,
            auth_start=t,
            expires=t + duration if duration else None,
            token_id=token["id"] if token else None,
            created=t,
            updated=t,
            last_seen=None,
        )
        with self.catalog.session() as s:
            s.add(row)
            d = _device_dict(row)
        d["password"] = password
        if token:
            d["token"] = token["token"]
        return d

    def list(self) -> list[dict[str, Any]]:
        with self.catalog.session() as s:
            rows = s.scalars(select(DeviceRow).order_by(DeviceRow.created))
            return [_device_dict(r) for r in rows]

    def get(self, device_id: str) -> dict[str, Any]:
        with self.catalog.session() as s:
            return _device_dict(self._row(s, device_id))

    def revoke(self, device_id: str) -> dict[str, Any]:
        """Refuse the device from now on (its native token too); re-authorise to undo."""
        with self.catalog.session() as s:
            r = self._row(s, device_id)
            r.auth_enabled, r.updated = False, now()
            token_id, d = r.token_id, _device_dict(r)
        if token_id and self.tokens is not None:
            with contextlib.suppress(NotFoundError):
                self.tokens.revoke(token_id)
        return d

    def authorize(self, device_id: str, *, duration: float | None = None) -> dict[str, Any]:
        """Authorise a revoked or expired device again, for ``duration`` s from now (None: no
        end). A native token, once revoked, stays revoked: make a new one."""
        if duration is not None and duration <= 0:
            raise InvalidInputError("an authorisation must last a positive time")
        t = now()
        with self.catalog.session() as s:
            r = self._row(s, device_id)
            r.auth_enabled, r.auth_start, r.updated = True, t, t
            r.expires = t + duration if duration else None
            return _device_dict(r)

    def delete(self, device_id: str) -> dict[str, Any]:
        d = self.revoke(device_id)
        with self.catalog.session() as s:
            s.delete(self._row(s, device_id))
        return d | {"deleted": True}

    def check(self, device_id: str | None) -> bytes:
        """The AES key of a device allowed to use the encrypted API, or :class:`DeviceAuthError`.

        The texts are KD-Cloudlet's, so its clients show them as they would pycloud's.
        """
        if not device_id:
            raise DeviceAuthError(401, "#No device id was sent (header X-Device-ID)")
        try:
            check_device_id(device_id)
        except InvalidInputError:
            raise DeviceAuthError(401, "#Device id is not valid") from None
        with self.catalog.session() as s:
            r = s.get(DeviceRow, device_id)
            if r is None:
                raise DeviceAuthError(
                    401, f"#Device with id {device_id} is not paired to this cloudlet"
                )
            if not r.auth_enabled:
                raise DeviceAuthError(
                    403, f"#Authorization has been revoked for device with id {device_id}"
                )
            if r.expires is not None and r.expires <= now():
                raise DeviceAuthError(
                    403, f"#Authorization has expired for device with id {device_id}"
                )
            r.last_seen = now()
            return bytes.fromhex(r.kd_key)

    # -- who used what -------------------------------------------------------------------
    def record_use(self, device_id: str, service_id: str, instance_id: str | None) -> None:
        """Remember that ``device_id`` uses ``service_id`` (in ``instance_id``)."""
        if not device_id or not re.match(DEVICE_ID_RE, device_id):
            return
        with self.catalog.session() as s:
            s.merge(
                DeviceServiceRow(
                    device_id=device_id,
                    service_id=service_id,
                    instance_id=instance_id,
                    last_used=now(),
                )
            )

    def users_of(self, service_id: str) -> builtins.list[str]:
        """Devices that used a service (the default recipients of its messages)."""
        with self.catalog.session() as s:
            q = select(DeviceServiceRow.device_id).where(DeviceServiceRow.service_id == service_id)
            return list(s.scalars(q.order_by(DeviceServiceRow.last_used)))

    # -- messages ------------------------------------------------------------------------
    def queue_message(
        self,
        service_id: str,
        text: str,
        *,
        device_ids: builtins.list[str] | None = None,
        message: str = NOTICE,
        params: dict[str, str] | None = None,
    ) -> int:
        """Queue ``text`` about ``service_id`` for ``device_ids`` (None: every device that used
        the service). ``message`` is the KD-Cloudlet message type; ``params`` its string
        parameters. Returns how many messages were queued."""
        check_service_id(service_id)
        if not message or len(message) > 63:
            raise InvalidInputError("a message type has 1 to 63 characters")
        targets = self.users_of(service_id) if device_ids is None else list(device_ids)
        for d in targets:
            check_device_id(d)
        values = {str(k): str(v) for k, v in (params or {}).items()}
        t = now()
        with self.catalog.session() as s:
            for d in dict.fromkeys(targets):
                s.add(
                    DeviceMessageRow(
                        device_id=d,
                        service_id=service_id,
                        message=message,
                        text=text,
                        params=values,
                        created=t,
                        read=None,
                    )
                )
        return len(dict.fromkeys(targets))

    def queue_moved(
        self,
        service_id: str,
        *,
        cloudlet_name: str,
        host: str,
        port: int,
        encrypted: bool = False,
        instance_id: str | None = None,
        service_port: int | None = None,
        device_ids: builtins.list[str] | None = None,
    ) -> int:
        """Tell the devices using ``service_id`` that it moved to cloudlet ``cloudlet_name``
        whose API is at ``host:port`` (KD-Cloudlet's ``move-to-new-cloudlet-network``, whose
        parameters its clients read; ``instance_id``/``service_port`` say where the moved
        instance answers, when known)."""
        params = {
            "cloudlet_name": cloudlet_name,
            "cloudlet_fqdn": "",
            "cloudlet_ip": host,
            "cloudlet_port": str(int(port)),
            "cloudlet_encryption_enabled": "true" if encrypted else "false",
            "ssid": "",
        }
        if instance_id:
            params["instance_id"] = instance_id
        if service_port:
            params["service_port"] = str(int(service_port))
        text = f"this service moved to cloudlet {cloudlet_name} at {host}:{port}"
        return self.queue_message(
            service_id, text, device_ids=device_ids, message=MOVED, params=params
        )

    def take_messages(
        self, device_id: str, service_id: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        """The unread messages of a device (about one service, or all), each handed out once:
        they are claimed with one UPDATE, so two concurrent polls never get the same one."""
        if not device_id or not re.match(DEVICE_ID_RE, device_id):
            return []
        claim = -float(secrets.randbelow(1 << 50) + 1)  # a unique negative mark
        cond = [DeviceMessageRow.device_id == device_id, DeviceMessageRow.read.is_(None)]
        if service_id is not None:
            cond.append(DeviceMessageRow.service_id == service_id)
        with self.catalog.session() as s:
            s.execute(update(DeviceMessageRow).where(*cond).values(read=claim))
            q = select(DeviceMessageRow).where(DeviceMessageRow.read == claim)
            rows = list(s.scalars(q.order_by(DeviceMessageRow.id)))
            out = [_message_dict(r) for r in rows]
            t = now()
            for r in rows:
                r.read = t
        return out

    def list_messages(
        self, *, device_id: str | None = None, service_id: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        """Every message (read or not), for the admin."""
        with self.catalog.session() as s:
            q = select(DeviceMessageRow).order_by(DeviceMessageRow.id)
            if device_id is not None:
                q = q.where(DeviceMessageRow.device_id == device_id)
            if service_id is not None:
                q = q.where(DeviceMessageRow.service_id == service_id)
            return [
                _message_dict(r) | {"id": r.id, "created": r.created, "read": r.read}
                for r in s.scalars(q)
            ]
