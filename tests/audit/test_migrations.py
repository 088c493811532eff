"""Alembic migrations of the audit store, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import traceback
from datetime import datetime, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from airflow_elspeth.audit import migrate, schema
from airflow_elspeth.audit.engine import create_audit_engine, engine_for_url

PROCESSES = 4


def _schema_differences(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "version_table": migrate.VERSION_TABLE,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return list(compare_metadata(context, schema.metadata))


def _version_rows(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text(f"SELECT version_num FROM {migrate.VERSION_TABLE}")).scalars())


@pytest.fixture
def plain_engine(audit_url: str):  # type: ignore[no-untyped-def]
    """An uncached engine on the empty database (no auto-upgrade)."""
    engine = create_audit_engine(audit_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def test_empty_database_has_no_revision(plain_engine: Engine) -> None:
    assert migrate.current_revision(plain_engine) is None
    assert inspect(plain_engine).get_table_names() == []


def test_upgrade_to_head_yields_exactly_the_schema(plain_engine: Engine) -> None:
    migrate.upgrade(plain_engine)

    assert migrate.current_revision(plain_engine) == migrate.head_revision()
    assert _schema_differences(plain_engine) == []
    tables = set(inspect(plain_engine).get_table_names())
    assert tables == set(schema.metadata.tables) | {migrate.VERSION_TABLE}
    assert "alembic_version" not in tables


def test_upgrade_also_works_with_a_bare_engine(audit_url: str) -> None:
    # No pragmas, no pool settings: migrate must not depend on the hook's engine set-up.
    from sqlalchemy import create_engine

    engine = create_engine(audit_url, poolclass=NullPool)
    try:
        migrate.upgrade(engine)
        assert _schema_differences(engine) == []
    finally:
        engine.dispose()


def test_upgrading_twice_is_a_no_op(plain_engine: Engine) -> None:
    migrate.upgrade(plain_engine)
    statements: list[str] = []

    @event.listens_for(plain_engine, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(statement)

    migrate.upgrade(plain_engine)
    migrate.upgrade(plain_engine, migrate.head_revision())

    writes = [
        s
        for s in statements
        if s.lstrip().split(None, 1)[0].upper() in {"CREATE", "ALTER", "DROP", "INSERT", "UPDATE", "DELETE"}
    ]
    assert writes == []
    assert not any("pg_advisory" in s or "BEGIN IMMEDIATE" in s for s in statements), statements
    assert _version_rows(plain_engine) == [migrate.head_revision()]
    assert _schema_differences(plain_engine) == []


def test_terminal_outcome_index_is_partial_and_unique(audit_engine: Engine) -> None:
    now = datetime.now(timezone.utc)

    def outcome(terminal: bool) -> dict[str, Any]:
        return {
            "token_id": "t" * 32,
            "run_id": "r" * 32,
            "outcome": "completed" if terminal else "buffered",
            "is_terminal": terminal,
            "recorded_at": now,
        }

    with audit_engine.begin() as connection:
        connection.execute(insert(schema.token_outcomes), [outcome(False), outcome(False), outcome(True)])
    with pytest.raises(IntegrityError), audit_engine.begin() as connection:
        connection.execute(insert(schema.token_outcomes), [outcome(True)])
    with audit_engine.connect() as connection:
        terminal = connection.execute(
            select(schema.token_outcomes.c.outcome_id).where(schema.token_outcomes.c.is_terminal)
        ).all()
    assert len(terminal) == 1


def test_downgrade_to_base_removes_everything(plain_engine: Engine) -> None:
    from alembic import command

    migrate.upgrade(plain_engine)
    with plain_engine.connect() as connection:
        command.downgrade(migrate.alembic_config(connection), "base")
        connection.commit()
    assert set(inspect(plain_engine).get_table_names()) <= {migrate.VERSION_TABLE}
    assert migrate.current_revision(plain_engine) is None


# --------------------------------------------------------------------------------------------------
# Several processes upgrading one fresh database at once (every worker of a new deployment does).


def _upgrade_in_child(url: str, via: str, barrier: Any, results: Any) -> None:
    try:
        barrier.wait(timeout=60)
        if via == "engine_for_url":
            engine = engine_for_url(url)
        else:
            engine = create_audit_engine(url, poolclass=NullPool)
            migrate.upgrade(engine)
        revision = migrate.current_revision(engine)
        engine.dispose()
        results.put(("ok", revision))
    except BaseException:
        results.put(("error", traceback.format_exc()))
        raise


@pytest.mark.timeout(300)
@pytest.mark.parametrize("via", ["migrate.upgrade", "engine_for_url"])
def test_concurrent_upgrades_all_succeed(audit_url: str, via: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_upgrade_in_child, args=(audit_url, via, barrier, results))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=60)

    errors = [detail for status, detail in outcomes if status != "ok"]
    assert errors == []
    assert [p.exitcode for p in processes] == [0] * PROCESSES
    assert {detail for _, detail in outcomes} == {migrate.head_revision()}

    engine = create_audit_engine(audit_url, poolclass=NullPool)
    try:
        assert _version_rows(engine) == [migrate.head_revision()]
        assert _schema_differences(engine) == []
    finally:
        engine.dispose()


def test_derivable_token_parents_go_with_0005_and_its_downgrade_writes_them_back(
    plain_engine: Engine,
) -> None:
    """0.1 stored every token's parents; from 0005 only a nested fork's link to the upstream merged
    row is stored, the others are derived (branch token -> source token, merged token -> the branch
    tokens its decision consumed)."""
    from alembic import command

    from airflow_elspeth.audit.store import (
        AuditStore,
        ForkRow,
        RunIdentity,
        branch_token_id,
        merged_token_id,
        source_token_id,
    )
    from airflow_elspeth.core.canonical import derive_id

    migrate.upgrade(plain_engine)
    store = AuditStore(plain_engine)
    branches = ["a", "b"]
    run_id = store.begin_run(
        RunIdentity(dag_id="d", airflow_run_id="r", fork_task_id="fork", try_number=1),
        branches=branches,
        chunk_size=2,
        config={},
    )
    upstream = "u" * 32
    rows = [
        ForkRow.from_row("k0", 0, {"id": "k0"}, parent_token_id=upstream),
        ForkRow.from_row("k1", 1, {"id": "k1"}),
    ]
    store.write_fork_chunk(run_id, branches, 0, rows)
    row0 = derive_id(run_id, "k0")
    merged = merged_token_id(run_id, row0, "coalesce")
    now = datetime.now(timezone.utc)
    with plain_engine.begin() as connection:
        connection.execute(
            insert(schema.tokens),
            [
                {
                    "token_id": merged,
                    "run_id": run_id,
                    "row_id": row0,
                    "token_kind": "merged",
                    "chunk": 0,
                    "created_at": now,
                }
            ],
        )
        connection.execute(
            insert(schema.coalesce_decisions),
            [
                {
                    "run_id": run_id,
                    "node_id": "coalesce",
                    "row_id": row0,
                    "row_key": "k0",
                    "chunk": 0,
                    "decision": "merged",
                    "details_json": "{}",
                    "policy": "quorum",
                    "merge_strategy": "union",
                    "consumed": '["b"]',
                    "missing_json": "{}",
                    "late_json": "[]",
                    "merged_token_id": merged,
                    "decided_at": now,
                    "recorded_at": now,
                }
            ],
        )

    def links() -> set[tuple[str, str, int]]:
        with plain_engine.connect() as connection:
            return set(
                connection.execute(text("SELECT token_id, parent_token_id, ordinal FROM token_parents")).all()
            )

    nested = (source_token_id(run_id, row0), upstream, 0)
    assert links() == {nested}  # what the writers store now
    with plain_engine.connect() as connection:
        command.downgrade(migrate.alembic_config(connection), "0004")
        connection.commit()
    derived = {
        (branch_token_id(run_id, row, b), source_token_id(run_id, row), i)
        for row in (row0, derive_id(run_id, "k1"))
        for i, b in enumerate(branches)
    }
    assert links() == {nested, (merged, branch_token_id(run_id, row0, "b"), 0)} | derived
    migrate.upgrade(plain_engine)
    assert links() == {nested}
