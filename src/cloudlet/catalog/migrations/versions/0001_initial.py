"""Initial schema: overlays, services, instances and their users, operations, tokens, settings.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "overlays",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(63)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("base_id", sa.String(64)),
        sa.Column("info", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_index("ix_overlays_state", "overlays", ["state"])
    op.create_table(
        "services",
        sa.Column("service_id", sa.String(200), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("base", sa.String(63), nullable=False),
        sa.Column("overlay_id", sa.String(32), sa.ForeignKey("overlays.id", ondelete="RESTRICT")),
        sa.Column("guest_ports", sa.JSON, nullable=False),
        sa.Column("memory_min_mib", sa.Integer, nullable=False),
        sa.Column("memory_ideal_mib", sa.Integer, nullable=False),
        sa.Column("cpus", sa.Integer, nullable=False),
        sa.Column("max_users", sa.Integer, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_index("ix_services_base", "services", ["base"])
    op.create_index("ix_services_overlay_id", "services", ["overlay_id"])
    op.create_table(
        "instances",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column(
            "service_id",
            sa.String(200),
            sa.ForeignKey("services.service_id", ondelete="RESTRICT"),
            nullable=False,
        ),
        sa.Column("vm_id", sa.String(32)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("max_users", sa.Integer, nullable=False),
        sa.Column("endpoints", sa.JSON, nullable=False),
        sa.Column("start_kind", sa.String(16)),
        sa.Column("operation_id", sa.String(32)),
        sa.Column("timings", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("ready_at", sa.Float),
        sa.Column("last_active", sa.Float, nullable=False),
        sa.Column("stopped_at", sa.Float),
    )
    op.create_index("ix_instances_service_id", "instances", ["service_id"])
    op.create_index("ix_instances_state", "instances", ["state"])
    op.create_table(
        "instance_users",
        sa.Column(
            "instance_id",
            sa.String(16),
            sa.ForeignKey("instances.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("user", sa.String(128), primary_key=True),
        sa.Column("joined", sa.Float, nullable=False),
    )
    op.create_table(
        "operations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("target", sa.String(255)),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("result", sa.JSON),
        sa.Column("error", sa.JSON),
        sa.Column("temp_paths", sa.JSON, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
        sa.Column("finished", sa.Float),
    )
    op.create_index("ix_operations_state", "operations", ["state"])
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("expires", sa.Float),
        sa.Column("revoked", sa.Boolean, nullable=False),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(63), primary_key=True),
        sa.Column("value", sa.JSON),
    )


def downgrade() -> None:
    for t in ("settings", "tokens", "operations", "instance_users", "instances", "services"):
        op.drop_table(t)
    op.drop_table("overlays")
