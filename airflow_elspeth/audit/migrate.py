"""Schema migrations of the audit store, run programmatically through Alembic.

The migration scripts ship inside the package (``airflow_elspeth/audit/migrations``); no
``alembic.ini`` is needed. The version is kept in a table of its own, ``elspeth_alembic_version``,
so the audit store can share a database (or a schema) with anything else that uses Alembic.

``upgrade`` is safe to call from many processes at once (every worker of a fresh deployment
does so on its first use of the store):

* PostgreSQL: the whole upgrade runs in one transaction holding ``pg_advisory_xact_lock``, so a
  second process waits, then finds the database at head and does nothing. DDL is transactional,
  so a failed upgrade leaves nothing behind.
* SQLite: the whole upgrade runs in one ``BEGIN IMMEDIATE`` transaction, which takes the
  database's write lock up front; a second process waits for it (``busy_timeout``) and then
  finds the database at head. SQLite DDL is transactional too.

When the database is already at the requested revision, ``upgrade`` only reads the version
table and takes no lock.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from airflow_elspeth.audit.dml import MIGRATION_LOCK_KEY, immediate_transaction
from airflow_elspeth.audit.legacy import convert_legacy, has_legacy

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "elspeth_alembic_version"


_HEAD_ALIASES = frozenset({"head", "heads"})


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic ``Config`` for the packaged migrations, built without any ini file.

    ``connection`` (used by ``upgrade``) is handed to ``env.py`` through ``Config.attributes``;
    ``url`` is only for callers that want Alembic to open its own connection.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("version_table", VERSION_TABLE)
    if url is not None:
        # ConfigParser interpolation: a literal '%' in a URL (escaped password) must be doubled.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The revision the packaged migrations lead to."""
    head = script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships at least one revision
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def _current_heads(connection: Connection) -> set[str]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return set(context.get_current_heads())


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def _target_revisions(revision: str) -> set[str]:
    script = script_directory()
    if revision in _HEAD_ALIASES:
        return set(script.get_heads())
    return {rev.revision for rev in script.get_revisions(revision) if rev is not None}


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the audit schema of ``engine``'s database up to ``revision`` (idempotent), then
    convert what a store written by 0.1 left in legacy tables (``audit.legacy``, in batches)."""
    target = _target_revisions(revision)
    with engine.connect() as connection:
        at_target = _current_heads(connection) == target
        legacy_left = has_legacy(connection)
        connection.rollback()
    if at_target:
        if legacy_left:
            convert_legacy(engine)
        return

    dialect = engine.dialect.name
    with engine.connect() as connection:
        if dialect == "postgresql":
            _upgrade_postgresql(connection, revision)
        elif dialect == "sqlite":
            _upgrade_sqlite(connection, revision)
        else:
            raise NotImplementedError(f"audit store supports sqlite and postgresql, not {dialect}")
    with engine.connect() as connection:
        legacy_left = has_legacy(connection)
        connection.rollback()
    if legacy_left:
        convert_legacy(engine)


def _upgrade_postgresql(connection: Connection, revision: str) -> None:
    # The advisory lock is held until this transaction ends; everything Alembic does (DDL and the
    # version table) runs inside the same transaction, so waiters see either nothing or all of it.
    try:
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        command.upgrade(alembic_config(connection), revision)
        connection.commit()
    except BaseException:
        connection.rollback()
        raise


def _upgrade_sqlite(connection: Connection, revision: str) -> None:
    foreign_keys_on = bool(connection.exec_driver_sql("PRAGMA foreign_keys").scalar())
    connection.rollback()
    # Foreign keys can only be switched outside a transaction; schema changes that rebuild tables
    # (Alembic batch mode) must run with them off, and are checked before commit instead.
    if foreign_keys_on:
        connection.exec_driver_sql("PRAGMA foreign_keys = OFF")
        connection.commit()
    try:
        with immediate_transaction(connection):
            command.upgrade(alembic_config(connection), revision)
            violations = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if violations:
                raise RuntimeError(f"migration left foreign key violations: {violations[:10]!r}")
    finally:
        if foreign_keys_on:
            connection.exec_driver_sql("PRAGMA foreign_keys = ON")
            connection.commit()
