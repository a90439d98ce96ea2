"""API tokens: random 32-byte url-safe secrets, kept only as SHA-256 digests with a role.

A token is printed once, when it is made; the catalog cannot give it back. ``admin`` tokens may
do everything; ``device`` tokens (mobile clients) may read, and start/stop/leave instances.
Lookups are cached in memory (a token check is on every request) and the cache is dropped on
every change made through this store.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from cloudlet.catalog.db import Catalog, now
from cloudlet.catalog.models import TokenRow
from cloudlet.errors import InvalidInputError, NotFoundError
from cloudlet.util.fs import atomic_write_bytes
from cloudlet.util.names import check_name

ROLES = ("admin", "device")
ADMIN_TOKEN_FILE = "admin-token"
_CACHE_TTL = 5.0  # seconds a revocation made by another process may take to be seen


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's id and role."""

    token_id: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _row_dict(r: TokenRow) -> dict[str, Any]:
    return {
        "id": r.id,
        "role": r.role,
        "name": r.name,
        "created": r.created,
        "expires": r.expires,
        "revoked": r.revoked,
    }


class TokenStore:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._cache: dict[str, tuple[Principal | None, float]] = {}

    def create(
        self, role: str, *, name: str = "", expires_in: float | None = None
    ) -> dict[str, Any]:
        """Make a token; the result holds the token itself, which is never shown again."""
        if role not in ROLES:
            raise InvalidInputError(f"unknown role {role!r}", hint="use admin or device")
        if name:
            check_name(name, "token name")
        if expires_in is not None and expires_in <= 0:
            raise InvalidInputError("a token's lifetime must be positive")
        token = secrets.token_urlsafe(32)
        t = now()
        row = TokenRow(
            id=secrets.token_hex(6),
            hash=token_hash(token),
            role=role,
            name=name,
            created=t,
            expires=t + expires_in if expires_in else None,
            revoked=False,
        )
        with self.catalog.session() as s:
            s.add(row)
        self._cache.clear()
        return _row_dict(row) | {"token": token}

    def list(self) -> list[dict[str, Any]]:
        with self.catalog.session() as s:
            return [_row_dict(r) for r in s.scalars(select(TokenRow).order_by(TokenRow.created))]

    def revoke(self, token_id: str) -> dict[str, Any]:
        with self.catalog.session() as s:
            row = s.get(TokenRow, token_id)
            if row is None:
                raise NotFoundError(f"no token {token_id!r}", hint="see `cloudlet token list`")
            row.revoked = True
            d = _row_dict(row)
        self._cache.clear()
        return d

    def count(self) -> int:
        with self.catalog.session() as s:
            return len(list(s.scalars(select(TokenRow.id))))

    def check(self, token: str) -> Principal | None:
        """The principal for ``token``, or None if it is unknown, revoked or expired."""
        h = token_hash(token)
        t = time.monotonic()
        hit = self._cache.get(h)
        if hit is not None and t - hit[1] < _CACHE_TTL:
            return hit[0]
        with self.catalog.session() as s:
            row = s.scalar(select(TokenRow).where(TokenRow.hash == h))
            p = None
            if row is not None and not row.revoked and (row.expires is None or row.expires > now()):
                p = Principal(row.id, row.role)
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[h] = (p, t)
        return p

    def ensure_admin(self) -> dict[str, Any] | None:
        """At first start (no token at all), make an admin token and keep it for the local CLI.

        Written to ``<home>/admin-token`` (mode 0600) so ``cloudlet`` commands on this host can
        talk to the server; returned so the caller can print it once. None if tokens exist.
        """
        if self.count():
            return None
        made = self.create("admin", name="first-admin")
        path = self.catalog.paths.home / ADMIN_TOKEN_FILE
        old = os.umask(0o077)
        try:
            atomic_write_bytes(path, (made["token"] + "\n").encode())
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        return made | {"file": str(path)}
