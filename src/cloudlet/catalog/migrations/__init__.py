"""Alembic migrations of the catalog (configured in code by :func:`cloudlet.catalog.db.migrate`)."""
