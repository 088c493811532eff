"""ElspethAuditHook: from an Airflow Connection (or nothing at all) to the audit store's Engine.

Where the audit store lives, first match wins:

1. the ``audit_conn_id`` given to the hook (operators pass theirs through);
2. ``[elspeth] audit_conn_id`` in the Airflow configuration (``AIRFLOW__ELSPETH__AUDIT_CONN_ID``);
3. the connection ``elspeth_audit_default``, if it exists;
4. the embedded SQLite file ``$AIRFLOW_HOME/elspeth_audit.db`` (nothing to configure; fine for one
   machine, use PostgreSQL when tasks run on several workers).

A connection named in 1 or 2 must exist: a typo never silently falls back to the embedded file.
Step 3 cannot be as strict: the Task SDK reports a connection it failed to fetch (e.g. the API
server briefly unreachable) exactly like a missing one, so a deployment with several workers
should name its connection in ``[elspeth] audit_conn_id`` rather than rely on the default id.

A connection of type ``elspeth`` holds either a complete SQLAlchemy URL in its extra
``sqlalchemy_url``, or host/port/login/password/schema (schema = database name) plus an optional
extra ``drivername`` (default ``postgresql+psycopg2``) and optional extra ``query`` (a JSON object
of URL query parameters, e.g. ``{"sslmode": "require"}``). A plain ``postgres`` connection works too.
A connection of the type's former name ``elspeth_audit`` still works, with a warning once per process:
Airflow writes a connection's type as its URI scheme, where ``_`` is not allowed (RFC 3986), and warns
so on every lookup of such a connection (``airflow.models.connection``), in every task, trigger and
``airflow-elspeth`` command; ``elspeth`` has neither ``_`` nor ``-`` (which Airflow turns into ``_``
when it reads a URI back), so it reads back as itself.

The Engine itself (per-backend settings, SQLite pragmas, the per-process cache per URL and the
schema upgrade on first use) comes from ``airflow_elspeth.audit.engine``, which needs no Airflow;
this module only finds the URL.

Connections are looked up through the Task SDK (``BaseHook.get_connection``), i.e. secrets backends,
environment variables or the API server - never by querying the Airflow metadata database.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from sqlalchemy import Engine, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from airflow_elspeth.audit import migrate
from airflow_elspeth.audit.engine import create_audit_engine, engine_for_url
from airflow_elspeth.audit.model import CoalesceSpec
from airflow_elspeth.audit.service import CoalesceService
from airflow_elspeth.audit.store import AuditStore
from airflow_elspeth.exceptions import ElspethConfigError

CONN_TYPE = "elspeth"
# The connection type of 0.1 (see the module's docstring): read as CONN_TYPE, with a warning.
LEGACY_CONN_TYPE = "elspeth_audit"
DEFAULT_CONN_ID = "elspeth_audit_default"
CONFIG_SECTION = "elspeth"
EMBEDDED_DB_FILENAME = "elspeth_audit.db"
DEFAULT_DRIVERNAME = "postgresql+psycopg2"

# Connection types whose host/port/login/password/schema describe a PostgreSQL database.
_POSTGRES_CONN_TYPES = frozenset({CONN_TYPE, LEGACY_CONN_TYPE, "postgres", "postgresql"})

log = logging.getLogger(__name__)

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


def embedded_database_path() -> Path:
    """``$AIRFLOW_HOME/elspeth_audit.db``, with AIRFLOW_HOME resolved the way Airflow does."""
    from airflow.configuration import get_airflow_home

    return Path(get_airflow_home()) / EMBEDDED_DB_FILENAME


def embedded_database_url() -> URL:
    return URL.create("sqlite", database=str(embedded_database_path()))


@functools.cache
def _warn_legacy_type(conn_id: str) -> None:
    """Say once per process and connection that its type is the former ``elspeth_audit``."""
    log.warning(
        "Connection %r has the type %r, the former name of %r: Airflow warns on every lookup of it "
        "that connection schemes shall not contain '_'. It works as it is; give it the type %r to end "
        'both warnings (README, "The audit store").',
        conn_id,
        LEGACY_CONN_TYPE,
        CONN_TYPE,
        CONN_TYPE,
    )


def url_from_connection(conn: Any) -> URL:
    """The SQLAlchemy URL described by an Airflow Connection (never ``Connection.get_uri()``).

    :raises ElspethConfigError: naming the connection and what it lacks.
    """
    extra = conn.extra_dejson
    conn_type = conn.conn_type or CONN_TYPE
    if conn_type == LEGACY_CONN_TYPE:
        _warn_legacy_type(conn.conn_id)

    def extra_value(name: str) -> Any:
        # The connection form may store custom fields bare or prefixed with the connection type.
        value = extra.get(name)
        if value in (None, ""):
            value = extra.get(f"extra__{conn_type}__{name}")
        return None if value == "" else value

    raw_url = extra_value("sqlalchemy_url")
    if raw_url:
        try:
            return make_url(str(raw_url).strip())
        except ArgumentError as err:  # its message does not repeat the URL, which holds a password
            raise ElspethConfigError(f"connection {conn.conn_id!r}: extra 'sqlalchemy_url': {err}") from err
    drivername = extra_value("drivername")
    if drivername is None:
        if conn_type not in _POSTGRES_CONN_TYPES:
            raise ElspethConfigError(
                f"connection {conn.conn_id!r} of type {conn_type!r}: give the extra 'sqlalchemy_url' "
                f"or 'drivername' (or use a connection of type {CONN_TYPE!r})"
            )
        drivername = DEFAULT_DRIVERNAME
    query = extra_value("query") or {}
    if not isinstance(query, dict):
        raise ElspethConfigError(f"connection {conn.conn_id!r}: extra 'query' must be a JSON object")
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

    :param audit_conn_id: id of an ``elspeth`` (or ``postgres``) connection. When omitted:
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

    def get_store(self) -> AuditStore:
        """The audit store's writer (the fork and the branch steps write through it)."""
        return AuditStore(self.get_engine())

    def get_coalesce_service(self, spec: CoalesceSpec, *, upgrade: bool = True) -> CoalesceService:
        """Everything one coalesce does with this store (its sensor, trigger and finalizer).

        :param spec: the coalesce.
        :param upgrade: migrate the schema on the engine's first use; the triggerer never does.
        """
        return CoalesceService(engine_for_url(self.get_url(), upgrade=upgrade), spec)

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
