"""Opening the catalog: engine, SQLite pragmas, sessions, migrations."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from cloudlet.catalog.models import SettingRow
from cloudlet.config import Paths

DB_FILE = "cloudlet.db"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"

_migrate_lock = threading.Lock()


def now() -> float:
    return time.time()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (API listings) go on while one writer commits; NORMAL sync is durable
    # across a process kill (only an OS crash may lose the last commits, never corrupt).
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(db_path: Path) -> Engine:
    engine = create_engine(
        f"sqlite:///{db_path}",
        connect_args={"check_same_thread": False, "timeout": 10},
        pool_size=8,
        max_overflow=8,
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (Alembic, configured in code)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", str(engine.url))
    with _migrate_lock, engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Catalog:
    """One data dir's database. Thread-safe: each caller takes its own short session."""

    def __init__(self, paths: Paths, *, run_migrations: bool = True) -> None:
        self.paths = paths
        self.path = paths.home / DB_FILE
        self.engine = make_engine(self.path)
        if run_migrations:
            migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # A connection that never writes: its PRAGMA data_version changes whenever anyone
        # (this process or another) commits, which makes cached views cheap to validate.
        self._watch = sqlite3.connect(self.path, check_same_thread=False)
        self._watch_lock = threading.Lock()

    def version(self) -> int:
        """A number that changes after every commit to the database, by any connection."""
        with self._watch_lock:
            row = self._watch.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits when the block succeeds and rolls back otherwise."""
        with self._sessions() as s, s.begin():
            yield s

    def get_setting(self, key: str, default: Any = None) -> Any:
        with self.session() as s:
            row = s.scalar(select(SettingRow).where(SettingRow.key == key))
            return default if row is None else row.value

    def set_setting(self, key: str, value: Any) -> None:
        with self.session() as s:
            s.merge(SettingRow(key=key, value=value))

    def close(self) -> None:
        with self._watch_lock:
            self._watch.close()
        self.engine.dispose()
