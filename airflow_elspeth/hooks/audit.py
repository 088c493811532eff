"""ElspethAuditHook: from an Airflow Connection (or nothing at all) to the audit store's Engine.

Where the audit store lives, first match wins (DESIGN §6):

1. the ``audit_conn_id`` given to the hook (operators pass theirs through);
2. ``[elspeth] audit_conn_id`` in the Airflow configuration (``AIRFLOW__ELSPETH__AUDIT_CONN_ID``);
3. the connection ``elspeth_audit_default``, if it exists;
4. the embedded SQLite file ``$AIRFLOW_HOME/elspeth_audit.db`` (nothing to configure; fine for one
   machine, use PostgreSQL when tasks run on several workers).

A connection named in 1 or 2 must exist: a typo never silently falls back to the embedded file.
Step 3 cannot be as strict: the Task SDK reports a connection it failed to fetch (e.g. the API
server briefly unreachable) exactly like a missing one, so a deployment with several workers
should name its connection in ``[elspeth] audit_conn_id`` rather than rely on the default id.

A connection of type ``elspeth_audit`` holds either a complete SQLAlchemy URL in its extra
``sqlalchemy_url``, or host/port/login/password/schema (schema = database name) plus an optional
extra ``drivername`` (default ``postgresql+psycopg2``) and optional extra ``query`` (a JSON object
of URL query parameters, e.g. ``{"sslmode": "require"}``). A plain ``postgres`` connection works too.

Engines are cached per process and per URL. The first use of a URL in a process brings its schema
up to date (``airflow_elspeth.audit.migrate.upgrade``: idempotent, concurrency-safe, and a single
read of the version table when already at head). Operators who prefer to migrate explicitly (e.g.
before a deployment, with a privileged role) can run ``airflow-elspeth db upgrade``; workers then
find the schema at head and change nothing.

Connections are looked up through the Task SDK (``BaseHook.get_connection``), i.e. secrets backends,
environment variables or the API server - never by querying the Airflow metadata database.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from airflow_elspeth.audit import migrate

CONN_TYPE = "elspeth_audit"
DEFAULT_CONN_ID = "elspeth_audit_default"
CONFIG_SECTION = "elspeth"
EMBEDDED_DB_FILENAME = "elspeth_audit.db"
DEFAULT_DRIVERNAME = "postgresql+psycopg2"
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Connection types whose host/port/login/password/schema describe a PostgreSQL database.
_POSTGRES_CONN_TYPES = frozenset({CONN_TYPE, "postgres", "postgresql"})

UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden_fields": [],
    "relabeling": {"schema": "Database"},
    "placeholders": {
        "host": "postgres.example.com",
        "port": "5432",
        "schema": "elspeth_audit",
        "login": "elspeth",
        "sqlalchemy_url": "postgresql+psycopg2://user:password@host:5432/database (overrides the fields)",
        "drivername": DEFAULT_DRIVERNAME,
    },
}

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
        # SQLAlchemy 2.1 does not batch INSERT ... ON CONFLICT without RETURNING (insertmanyvalues is
        # off for post-values clauses): psycopg2's executemany is then one round trip per row.
        # values_plus_batch sends them through psycopg2.extras.execute_batch (100 rows a round trip).
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


def embedded_database_path() -> Path:
    """``$AIRFLOW_HOME/elspeth_audit.db``, with AIRFLOW_HOME resolved the way Airflow does."""
    from airflow.configuration import get_airflow_home

    return Path(get_airflow_home()) / EMBEDDED_DB_FILENAME


def embedded_database_url() -> URL:
    return URL.create("sqlite", database=str(embedded_database_path()))


def url_from_connection(conn: Any) -> URL:
    """The SQLAlchemy URL described by an Airflow Connection (never ``Connection.get_uri()``)."""
    extra = conn.extra_dejson
    conn_type = conn.conn_type or CONN_TYPE

    def extra_value(name: str) -> Any:
        # The connection form may store custom fields bare or prefixed with the connection type.
        value = extra.get(name)
        if value in (None, ""):
            value = extra.get(f"extra__{conn_type}__{name}")
        return None if value == "" else value

    raw_url = extra_value("sqlalchemy_url")
    if raw_url:
        return make_url(str(raw_url).strip())
    drivername = extra_value("drivername")
    if drivername is None:
        if conn_type not in _POSTGRES_CONN_TYPES:
            raise ValueError(
                f"connection {conn.conn_id!r} of type {conn_type!r}: give the extra 'sqlalchemy_url' "
                f"or 'drivername' (or use a connection of type {CONN_TYPE!r})"
            )
        drivername = DEFAULT_DRIVERNAME
    query = extra_value("query") or {}
    if not isinstance(query, dict):
        raise ValueError(f"connection {conn.conn_id!r}: extra 'query' must be a JSON object")
    return URL.create(
        str(drivername),
        username=conn.login or None,
        password=conn.password or None,
        host=conn.host or None,
        port=int(conn.port) if conn.port else None,
        database=conn.schema or None,
        query={str(k): str(v) for k, v in query.items()},
    )


def configured_conn_id() -> str | None:
    """``[elspeth] audit_conn_id`` from the Airflow configuration, or None when unset/empty."""
    from airflow.sdk import conf

    value = conf.get(CONFIG_SECTION, "audit_conn_id", fallback="")
    value = (value or "").strip()
    return value or None


class ElspethAuditHook(BaseHook):
    """Connects to the Elspeth audit store (SQLAlchemy; PostgreSQL or SQLite).

    :param audit_conn_id: id of an ``elspeth_audit`` (or ``postgres``) connection. When omitted:
        ``[elspeth] audit_conn_id``, else ``elspeth_audit_default`` if defined, else the embedded
        SQLite file ``$AIRFLOW_HOME/elspeth_audit.db``.
    """

    conn_name_attr = "audit_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = "Elspeth Audit Store"

    def __init__(self, audit_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit_conn_id = audit_conn_id or None
        self._resolved: tuple[str | None, URL] | None = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Connection form layout (also declared in get_provider_info, which Airflow 3.2+ reads)."""
        return {
            "hidden_fields": list(UI_FIELD_BEHAVIOUR["hidden_fields"]),
            "relabeling": dict(UI_FIELD_BEHAVIOUR["relabeling"]),
            "placeholders": dict(UI_FIELD_BEHAVIOUR["placeholders"]),
        }

    def _resolve(self) -> tuple[str | None, URL]:
        if self._resolved is None:
            conn_id = self.audit_conn_id or configured_conn_id()
            if conn_id is not None:
                # Named explicitly: it must exist (AirflowNotFoundException propagates).
                conn = self.get_connection(conn_id)
                self._resolved = (conn_id, url_from_connection(conn))
            else:
                try:
                    conn = self.get_connection(self.default_conn_name)
                except AirflowNotFoundException:
                    path = embedded_database_path()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._resolved = (None, embedded_database_url())
                else:
                    self._resolved = (self.default_conn_name, url_from_connection(conn))
            used, url = self._resolved
            self.log.info(
                "Elspeth audit store: %s (%s)",
                url.render_as_string(hide_password=True),
                f"connection {used}" if used else "embedded SQLite default",
            )
        return self._resolved

    @property
    def resolved_conn_id(self) -> str | None:
        """The connection id in use, or None for the embedded SQLite default."""
        return self._resolve()[0]

    def get_url(self) -> URL:
        """The SQLAlchemy URL of the audit store (contains the password; do not log it)."""
        return self._resolve()[1]

    def get_engine(self) -> Engine:
        """The process-wide Engine for this store, its schema at head."""
        return engine_for_url(self.get_url())

    def get_conn(self) -> Engine:
        return self.get_engine()

    def test_connection(self) -> tuple[bool, str]:
        """Connect and report the schema revision; never migrates (runs in the API server)."""
        try:
            engine = create_audit_engine(self.get_url(), poolclass=NullPool)
            try:
                with engine.connect() as connection:
                    connection.execute(select(1))
                revision = migrate.current_revision(engine)
            finally:
                engine.dispose()
        except Exception as exc:
            return False, str(exc)
        head = migrate.head_revision()
        if revision == head:
            return True, f"Connected; audit schema at head ({head})."
        return True, (
            f"Connected; audit schema at {revision or 'nothing (empty database)'}, head is {head}: "
            "it is upgraded on first use, or run `airflow-elspeth db upgrade`."
        )
