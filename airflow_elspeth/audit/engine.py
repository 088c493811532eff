"""The audit store's SQLAlchemy Engines: per-backend settings, a per-process cache, first-use migration.

SQLAlchemy only: nothing here imports Airflow, so the CLI (``airflow-elspeth --url ...``), the tests
and the benchmarks reach the audit store without loading it. Turning an Airflow Connection (or the
embedded SQLite default under ``$AIRFLOW_HOME``) into a URL is the hook's job
(:class:`airflow_elspeth.hooks.audit.ElspethAuditHook`), which then calls :func:`engine_for_url`.

Engines are cached per process and per URL. The first use of a URL in a process brings its schema
up to date (``airflow_elspeth.audit.migrate.upgrade``: idempotent, concurrency-safe, and a single
read of the version table when already at head). Operators who prefer to migrate explicitly (e.g.
before a deployment, with a privileged role) can run ``airflow-elspeth db upgrade``; workers then
find the schema at head and change nothing.

SQLite files get ``busy_timeout`` (:data:`SQLITE_BUSY_TIMEOUT_MS`), ``foreign_keys = ON`` and WAL
on every connection; PostgreSQL gets ``pool_pre_ping`` and batched ``executemany``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from airflow_elspeth.audit import migrate

SQLITE_BUSY_TIMEOUT_MS = 30_000

_engines: dict[str, Engine] = {}
_upgraded: set[str] = set()
_lock = threading.RLock()


def _url_key(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching a fresh file to WAL needs a lock other processes may hold.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # Readers never block the writer and vice versa; persistent for the file once set.
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def create_audit_engine(url: str | URL, **kwargs: Any) -> Engine:
    """A new (uncached) Engine with the audit store's per-backend settings; no migration."""
    url = make_url(url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if backend == "postgresql":
        if url.get_driver_name() == "psycopg2":
            # SQLAlchemy 2.1 does not batch INSERT ... ON CONFLICT without RETURNING (insertmanyvalues
            # is off for post-values clauses): psycopg2's executemany is then one round trip per row.
            # values_plus_batch sends them through psycopg2.extras.execute_batch (100 rows a round
            # trip). psycopg 3 (a plain postgresql:// URL) pipelines executemany itself and has no
            # such option.
            kwargs.setdefault("executemany_mode", "values_plus_batch")
        return create_engine(url, pool_pre_ping=True, **kwargs)
    raise ValueError(
        f"the Elspeth audit store runs on sqlite or postgresql, not {backend!r} "
        f"({url.render_as_string(hide_password=True)})"
    )


def engine_for_url(url: str | URL, *, upgrade: bool = True) -> Engine:
    """The process-wide Engine for ``url`` (created on first use), its schema brought to head.

    Usable without any Airflow connection (tests, ``airflow-elspeth --url``). With
    ``upgrade=False`` the schema is left as it is (e.g. ``airflow-elspeth db current``).
    """
    url = make_url(url)
    key = _url_key(url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = create_audit_engine(url)
            _engines[key] = engine
        if upgrade and key not in _upgraded:
            migrate.upgrade(engine)
            _upgraded.add(key)
        return engine


def dispose_engine(url: str | URL) -> None:
    """Close and forget the cached Engine for ``url`` (tests; before dropping a database)."""
    key = _url_key(make_url(url))
    with _lock:
        engine = _engines.pop(key, None)
        _upgraded.discard(key)
    if engine is not None:
        engine.dispose()


def dispose_all_engines() -> None:
    """Close and forget every cached Engine of this process."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
        _upgraded.clear()
    for engine in engines:
        engine.dispose()


def _reset_after_fork() -> None:
    # A forked worker must not share its parent's pooled connections (SQLAlchemy's documented
    # recipe: dispose(close=False) drops them without closing the parent's sockets), nor inherit a
    # lock some other parent thread held at fork time.
    global _lock
    _lock = threading.RLock()
    for engine in _engines.values():
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
