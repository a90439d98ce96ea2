"""Mobile side: the app repository, paired devices, who used which service, device messages.

Revision ID: 0002_mobile
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_mobile"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "apps",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("service_id", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("package_name", sa.String(255), nullable=False),
        sa.Column("os_name", sa.String(32), nullable=False),
        sa.Column("min_os_version", sa.String(32), nullable=False),
        sa.Column("app_version", sa.String(64), nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("file_name", sa.String(255), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("md5sum", sa.String(32), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_index("ix_apps_service_id", "apps", ["service_id"])
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("kd_key", sa.String(64), nullable=False),
        sa.Column("auth_enabled", sa.Boolean, nullable=False),
        sa.Column("auth_start", sa.Float, nullable=False),
        sa.Column("expires", sa.Float),
        sa.Column("token_id", sa.String(16)),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float),
    )
    op.create_table(
        "device_services",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("service_id", sa.String(200), primary_key=True),
        sa.Column("instance_id", sa.String(16)),
        sa.Column("last_used", sa.Float, nullable=False),
    )
    op.create_table(
        "device_messages",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("service_id", sa.String(200), nullable=False),
        sa.Column("message", sa.String(63), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("read", sa.Float),
    )
    op.create_index("ix_device_messages_device_id", "device_messages", ["device_id"])
    op.create_index("ix_device_messages_service_id", "device_messages", ["service_id"])


def downgrade() -> None:
    for t in ("device_messages", "device_services", "devices", "apps"):
        op.drop_table(t)
