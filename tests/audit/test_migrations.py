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
            "token_id": "1.0:b:a",
            "run_id": "r" * 32,
            "row_id": "1.0",
            "outcome": "completed" if terminal else "not_arrived",
            "is_terminal": terminal,
            "recorded_at": now,
        }

    with audit_engine.begin() as connection:
        connection.execute(insert(schema.recorded_outcomes), [outcome(False), outcome(False), outcome(True)])
    with pytest.raises(IntegrityError), audit_engine.begin() as connection:
        connection.execute(insert(schema.recorded_outcomes), [outcome(True)])
    with audit_engine.connect() as connection:
        terminal = connection.execute(
            select(schema.recorded_outcomes.c.outcome_id).where(schema.recorded_outcomes.c.is_terminal)
        ).all()
    assert len(terminal) == 1


def test_downgrade_from_0005_to_base_removes_everything(plain_engine: Engine) -> None:
    from alembic import command

    migrate.upgrade(plain_engine, "0005")
    with plain_engine.connect() as connection:
        command.downgrade(migrate.alembic_config(connection), "base")
        connection.commit()
    assert set(inspect(plain_engine).get_table_names()) <= {migrate.VERSION_TABLE}
    assert migrate.current_revision(plain_engine) is None


def test_0006_refuses_to_downgrade_and_leaves_the_store_as_it_was(plain_engine: Engine) -> None:
    """0.1's hex ids are not kept by 0.2, so 0006 has no downgrade: asking for one says so and
    changes nothing."""
    from alembic import command

    migrate.upgrade(plain_engine)
    with plain_engine.connect() as connection:
        with pytest.raises(NotImplementedError, match="cannot be downgraded"):
            command.downgrade(migrate.alembic_config(connection), "0005")
        connection.rollback()
    assert migrate.current_revision(plain_engine) == migrate.head_revision()
    assert _schema_differences(plain_engine) == []
    assert set(schema.compat_views.tables) <= set(inspect(plain_engine).get_view_names())


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
    token is stored, the others are derived (branch token -> source token, merged token -> the branch
    tokens its decision consumed). On the store 0.1 wrote (``fixtures/store_0_1``, at 0005): the
    downgrade writes the derived links back, naming tokens of the same row, and 0005 removes them."""
    import json

    from alembic import command
    from fixtures.store_0_1.load import load_store_0_1

    load_store_0_1(plain_engine)

    def links() -> set[tuple[str, str, int]]:
        with plain_engine.connect() as connection:
            return {
                (a, b, c)
                for a, b, c in connection.execute(
                    text("SELECT token_id, parent_token_id, ordinal FROM token_parents")
                )
            }

    nested = links()
    with plain_engine.connect() as connection:
        tokens = {
            token_id: (row_id, kind, branch)
            for token_id, row_id, kind, branch in connection.execute(
                text("SELECT token_id, row_id, token_kind, branch_name FROM tokens")
            )
        }
        branches = {
            run_id: json.loads(branches_json)
            for run_id, branches_json in connection.execute(text("SELECT run_id, branches_json FROM runs"))
        }
        consumed = {
            merged: json.loads(names)
            for merged, names in connection.execute(
                text(
                    "SELECT merged_token_id, consumed FROM coalesce_decisions"
                    " WHERE merged_token_id IS NOT NULL"
                )
            )
        }
        run_of = dict(connection.execute(text("SELECT token_id, run_id FROM tokens")).all())
    assert nested and all(tokens[parent][1] == "merged" for _, parent, _ in nested)

    with plain_engine.connect() as connection:
        command.downgrade(migrate.alembic_config(connection), "0004")
        connection.commit()
    derived = links() - nested
    expected_count = sum(kind == "branch" for _, kind, _ in tokens.values()) + sum(
        map(len, consumed.values())
    )
    assert len(derived) == expected_count
    for child, parent, ordinal in derived:
        row, kind, branch = tokens[child]
        parent_row, parent_kind, parent_branch = tokens[parent]  # a token the store holds
        assert parent_row == row
        if kind == "branch":
            assert parent_kind == "source" and ordinal == branches[run_of[child]].index(branch)
        else:
            assert kind == "merged" and parent_kind == "branch"
            assert consumed[child][ordinal] == parent_branch
    migrate.upgrade(plain_engine, "0005")
    assert links() == nested
