"""The server's catalog: SQLAlchemy models and sessions over ``<home>/cloudlet.db`` (SQLite, WAL).

Blobs (overlays, base VMs, VM directories) stay in the data dir; the catalog holds what refers
to them and their states. The schema is owned by the Alembic migrations in ``migrations/``, run
programmatically when a catalog is opened, so an installed package needs no ``alembic.ini``.
"""

from cloudlet.catalog.db import Catalog, now
from cloudlet.catalog.models import (
    InstanceRow,
    InstanceUserRow,
    OperationRow,
    OverlayRow,
    ServiceRow,
    SettingRow,
    TokenRow,
)

__all__ = [
    "Catalog",
    "InstanceRow",
    "InstanceUserRow",
    "OperationRow",
    "OverlayRow",
    "ServiceRow",
    "SettingRow",
    "TokenRow",
    "now",
]
