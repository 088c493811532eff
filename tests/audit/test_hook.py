"""ElspethAuditHook: where the audit store is, and how its engine is set up."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from airflow_elspeth.audit import migrate
from airflow_elspeth.audit.engine import create_audit_engine, dispose_all_engines, engine_for_url
from airflow_elspeth.exceptions import ElspethConfigError
from airflow_elspeth.hooks.audit import CONN_TYPE, LEGACY_CONN_TYPE, ElspethAuditHook, url_from_connection
from airflow_elspeth.operators.fork import DEFAULT_MAX_ROW_BYTES


def _set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> None:
    """Define an Airflow connection the way deployments do: AIRFLOW_CONN_<ID> in JSON form."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


@pytest.fixture
def airflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh AIRFLOW_HOME and no audit configuration at all."""
    home = tmp_path / "airflow_home"
    home.mkdir()
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.delenv("AIRFLOW__ELSPETH__AUDIT_CONN_ID", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT", raising=False)
    yield home
    dispose_all_engines()


def test_embedded_sqlite_default_under_airflow_home(airflow_home: Path) -> None:
    hook = ElspethAuditHook()
    engine = hook.get_engine()

    assert hook.resolved_conn_id is None
    assert make_url(str(hook.get_url())).database == str(airflow_home / "elspeth_audit.db")
    assert (airflow_home / "elspeth_audit.db").is_file()
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    # Upgraded automatically on first use.
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert "runs" in inspect(engine).get_table_names()


def test_engines_are_cached_per_url(airflow_home: Path) -> None:
    first = ElspethAuditHook().get_engine()
    assert ElspethAuditHook().get_engine() is first
    assert engine_for_url(str(ElspethAuditHook().get_url())) is first


def test_connection_with_sqlalchemy_url_extra(
    airflow_home: Path, audit_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_connection(monkeypatch, "audit_store", conn_type="elspeth", extra={"sqlalchemy_url": audit_url})

    hook = ElspethAuditHook(audit_conn_id="audit_store")
    engine = hook.get_engine()

    assert hook.resolved_conn_id == "audit_store"
    assert hook.get_url() == make_url(audit_url)
    assert migrate.current_revision(engine) == migrate.head_revision()
    assert not (airflow_home / "elspeth_audit.db").exists()


@pytest.mark.postgres
def test_connection_with_fields_and_drivername(
    airflow_home: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_url(pg_url)
    # A password full of URL metacharacters: the URL is built with URL.create, which quotes it
    # (the server trusts local connections, so any password is accepted).
    password = "p@ss:w/rd?#%&="
    _set_connection(
        monkeypatch,
        "audit_pg",
        conn_type="elspeth",
        host=url.host,
        port=url.port,
        login=url.username,
        password=password,
        schema=url.database,
        extra={"drivername": "postgresql+psycopg2"},
    )

    hook = ElspethAuditHook(audit_conn_id="audit_pg")
    built = hook.get_url()
    assert (built.drivername, built.host, built.port, built.username, built.database) == (
        "postgresql+psycopg2",
        url.host,
        url.port,
        url.username,
        url.database,
    )
    assert built.password == password
    engine = hook.get_engine()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT current_database()")).scalar() == url.database
    assert migrate.current_revision(engine) == migrate.head_revision()


def test_fields_default_to_psycopg2_and_take_query_parameters() -> None:
    from airflow.sdk import Connection

    conn = Connection(
        conn_id="x",
        conn_type="elspeth",
        host="db.example.com",
        port=5433,
        login="elspeth",
        password="secret",
        schema="audit",
        extra=json.dumps({"query": {"sslmode": "require"}}),
    )
    url = url_from_connection(conn)
    assert url.render_as_string(hide_password=False) == (
        "postgresql+psycopg2://elspeth:secret@db.example.com:5433/audit?sslmode=require"
    )


def test_the_connection_type_reads_back_as_itself_from_airflows_uri_form() -> None:
    """Airflow keeps a connection as a URI whose scheme is the type (its secrets cache, the
    connection a task is handed): ``elspeth`` has no ``_`` (Airflow warns that RFC 3986 forbids it,
    on every lookup) and no ``-`` (Airflow reads it back as ``_``)."""
    from airflow.sdk import Connection

    conn = Connection(conn_id="x", conn_type=CONN_TYPE, extra=json.dumps({"sqlalchemy_url": "sqlite://"}))
    uri = conn.get_uri()
    assert uri.startswith(f"{CONN_TYPE}://")
    assert Connection.from_uri(uri, conn_id="x").conn_type == CONN_TYPE


def test_a_connection_of_the_former_type_still_works_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from airflow.sdk import Connection

    conn = Connection(
        conn_id="legacy_audit",
        conn_type=LEGACY_CONN_TYPE,
        host="db.example.com",
        schema="audit",
        extra=json.dumps({"extra__elspeth_audit__drivername": "postgresql+psycopg"}),
    )
    with caplog.at_level(logging.WARNING, logger="airflow_elspeth.hooks.audit"):
        urls = {url_from_connection(conn).render_as_string() for _ in range(3)}
    assert urls == {"postgresql+psycopg://db.example.com/audit"}
    warned = [r.getMessage() for r in caplog.records if r.name == "airflow_elspeth.hooks.audit"]
    assert warned == [
        "Connection 'legacy_audit' has the type 'elspeth_audit', the former name of 'elspeth': Airflow "
        "warns on every lookup of it that connection schemes shall not contain '_'. It works as it is; "
        "give it the type 'elspeth' to end both warnings (README, \"The audit store\")."
    ]


def test_foreign_connection_type_needs_a_driver() -> None:
    from airflow.sdk import Connection

    conn = Connection(conn_id="x", conn_type="mysql", host="h", schema="d")
    with pytest.raises(
        ElspethConfigError, match="connection 'x' of type 'mysql': give the extra 'sqlalchemy_url'"
    ):
        url_from_connection(conn)


def test_config_audit_conn_id(
    airflow_home: Path, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_connection(
        monkeypatch, "configured_audit", conn_type="elspeth", extra={"sqlalchemy_url": sqlite_url}
    )
    # Also define the default connection: the configured id must win over it.
    other = f"sqlite:///{tmp_path / 'default.db'}"
    _set_connection(
        monkeypatch, "elspeth_audit_default", conn_type="elspeth", extra={"sqlalchemy_url": other}
    )
    monkeypatch.setenv("AIRFLOW__ELSPETH__AUDIT_CONN_ID", "configured_audit")

    hook = ElspethAuditHook()
    assert hook.resolved_conn_id == "configured_audit"
    assert hook.get_url() == make_url(sqlite_url)
    assert migrate.current_revision(hook.get_engine()) == migrate.head_revision()

    # An explicit audit_conn_id wins over the configuration.
    explicit = ElspethAuditHook(audit_conn_id="elspeth_audit_default")
    assert explicit.get_url() == make_url(other)


def test_default_connection_used_when_it_exists(
    airflow_home: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_connection(
        monkeypatch, "elspeth_audit_default", conn_type="elspeth", extra={"sqlalchemy_url": sqlite_url}
    )

    hook = ElspethAuditHook()
    assert hook.resolved_conn_id == "elspeth_audit_default"
    assert hook.get_url() == make_url(sqlite_url)


@pytest.mark.parametrize("how", ["argument", "config"])
def test_a_named_connection_that_does_not_exist_is_an_error(
    airflow_home: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    from airflow.sdk.exceptions import AirflowNotFoundException

    if how == "config":
        monkeypatch.setenv("AIRFLOW__ELSPETH__AUDIT_CONN_ID", "no_such_connection")
        hook = ElspethAuditHook()
    else:
        hook = ElspethAuditHook(audit_conn_id="no_such_connection")
    with pytest.raises(AirflowNotFoundException):
        hook.get_url()
    assert not (airflow_home / "elspeth_audit.db").exists()


def test_test_connection_reports_without_migrating(
    airflow_home: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_connection(monkeypatch, "audit_store", conn_type="elspeth", extra={"sqlalchemy_url": sqlite_url})

    ok, message = ElspethAuditHook(audit_conn_id="audit_store").test_connection()

    assert ok, message
    assert "empty database" in message
    engine = create_audit_engine(sqlite_url, poolclass=NullPool)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_connection_get_hook_builds_this_hook(
    airflow_home: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk import BaseHook

    _set_connection(monkeypatch, "audit_store", conn_type="elspeth", extra={"sqlalchemy_url": sqlite_url})
    hook = BaseHook.get_hook("audit_store")
    assert isinstance(hook, ElspethAuditHook)
    assert hook.get_url() == make_url(sqlite_url)


def test_provider_info_is_valid_and_mirrors_the_hook() -> None:
    import airflow
    import jsonschema

    from airflow_elspeth.get_provider_info import get_provider_info

    info = get_provider_info()
    schema_path = Path(airflow.__file__).parent / "provider_info.schema.json"
    jsonschema.validate(info, json.loads(schema_path.read_text()))

    assert info["package-name"] == "airflow-elspeth"
    (conn_type,) = info["connection-types"]
    assert conn_type["hook-class-name"] == "airflow_elspeth.hooks.audit.ElspethAuditHook"
    assert conn_type["connection-type"] == ElspethAuditHook.conn_type
    assert conn_type["hook-name"] == ElspethAuditHook.hook_name
    behaviour = conn_type["ui-field-behaviour"]
    hook_behaviour = ElspethAuditHook.get_ui_field_behaviour()
    assert behaviour["hidden-fields"] == hook_behaviour["hidden_fields"]
    assert behaviour["relabeling"] == hook_behaviour["relabeling"]
    assert behaviour["placeholders"] == hook_behaviour["placeholders"]
    options = info["config"]["elspeth"]["options"]
    assert options["audit_conn_id"]["default"] == ""
    assert options["chunk_size"]["default"] == "1000"
    assert options["max_row_bytes"]["default"] == str(DEFAULT_MAX_ROW_BYTES)
