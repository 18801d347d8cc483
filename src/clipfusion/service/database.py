"""The inspection database: the engine (SQLite in WAL mode as the embedded default, or any
SQLAlchemy URL such as PostgreSQL), sessions, and the Alembic migrations run at start-up."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from clipfusion.errors import ClipfusionError

MIGRATIONS = Path(__file__).with_name("migrations")


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    # WAL: readers never block the writer; busy_timeout: writers of several models wait, not fail
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL mode, a busy timeout and foreign keys on every connection."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, pool_pre_ping=True)
    except Exception as exc:  # an unknown dialect or a missing driver: the user's URL to fix
        raise ClipfusionError(f"cannot use the database {url!r}: {exc}") from None


# PostgreSQL advisory lock held while migrating: several services (or `clipfusion db upgrade`) starting against
# one database take turns instead of racing to create the same tables.  Any fixed 64-bit number will do.
MIGRATION_LOCK = 0x636C6970_66757331


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (creating it on an empty database); on PostgreSQL
    under an advisory lock, released when the transaction ends."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def current_revision(engine: Engine) -> str | None:
    """The schema's Alembic revision (None: an empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
