"""The audit store on SQLite and PostgreSQL: idempotent writes, database-enforced invariants,
payload validation and bounded memory on a 100k-row run."""

from __future__ import annotations

import math
import multiprocessing
import tracemalloc
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.exc import IntegrityError

from airflow_elspeth.audit import ids
from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.dml import insert_ignore, insert_tuples
from airflow_elspeth.audit.model import run_number
from airflow_elspeth.audit.read.rows import iter_source_rows
from airflow_elspeth.audit.store import (
    AuditStore,
    ForkRow,
    RunIdentity,
    outcome_row,
)
from airflow_elspeth.core.vocabulary import NodeStatus
from airflow_elspeth.exceptions import PayloadError

BRANCHES = ["left", "right"]
LOSS_COLUMNS = ("run_id", "node_id", "chunk", "branch_name", "task_state", "observed_at")
CHUNK = 1000


def identity(run: str = "run-1", try_number: int = 1) -> RunIdentity:
    return RunIdentity(dag_id="dag", airflow_run_id=run, fork_task_id="fork", try_number=try_number)


def fork_rows(start: int, count: int) -> list[ForkRow]:
    return [ForkRow.from_row(f"k{i}", i, {"id": f"k{i}", "value": i}) for i in range(start, start + count)]


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (t.runs, t.rows, t.tokens, t.token_parents, t.token_outcomes, t.payloads)
        }


def write_one_chunk(url: str) -> None:
    """Run in a separate process: begin the run and write chunk 0 (the same data every time)."""
    from airflow_elspeth.audit.engine import engine_for_url

    store = AuditStore(engine_for_url(url))
    run_id = store.begin_run(identity(), branches=BRANCHES, chunk_size=CHUNK, config={"b": BRANCHES})
    store.write_fork_chunk(run_id, BRANCHES, 0, fork_rows(0, 500))


def test_same_chunk_twice_is_stored_once(audit_engine: Engine) -> None:
    store = AuditStore(audit_engine)
    run_id = store.begin_run(identity(), branches=BRANCHES, chunk_size=CHUNK, config={"b": BRANCHES})
    store.write_fork_chunk(run_id, BRANCHES, 0, fork_rows(0, 200))
    once = counts(audit_engine)
    assert store.begin_run(identity(), branches=BRANCHES, chunk_size=CHUNK, config={"b": BRANCHES}) == run_id
    store.write_fork_chunk(run_id, BRANCHES, 0, fork_rows(0, 200))
    assert counts(audit_engine) == once
    assert once["rows"] == 200 and once["tokens"] == 200 * 3 and once["token_outcomes"] == 200


def test_same_chunk_from_two_processes_at_once_is_stored_once(audit_engine: Engine, audit_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=write_one_chunk, args=(audit_url,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    found = counts(audit_engine)
    assert found["runs"] == 1
    assert found["rows"] == 500
    assert found["tokens"] == 500 * (1 + len(BRANCHES))
    assert found["token_parents"] == 0  # a branch token's parent is derived, not stored
    assert found["token_outcomes"] == 500


def test_a_second_terminal_outcome_is_rejected_by_the_database(audit_engine: Engine) -> None:
    store = AuditStore(audit_engine)
    run_id = store.begin_run(identity(), branches=BRANCHES, chunk_size=CHUNK, config={})
    store.write_fork_chunk(run_id, BRANCHES, 0, fork_rows(0, 1))
    with audit_engine.connect() as conn:
        row = ids.row_id(run_number(conn, run_id), 0)
    token = ids.branch_token_id(row, "left")
    now = datetime.now(timezone.utc)
    with audit_engine.begin() as conn:
        conn.execute(insert(t.recorded_outcomes), [outcome_row(token, run_id, row, "not_arrived", None, now)])
        # Non-terminal records may repeat; they are history, not the outcome.
        conn.execute(
            insert(t.recorded_outcomes),
            [outcome_row(token, run_id, row, "late", "late_arrival_after_merge", now, terminal=False)] * 2,
        )
    with pytest.raises(IntegrityError), audit_engine.begin() as conn:
        # A plain INSERT, bypassing every check in Python: only the unique index can stop it.
        conn.execute(insert(t.recorded_outcomes), [outcome_row(token, run_id, row, "lost", "dropped", now)])
    with audit_engine.connect() as conn:
        terminal = conn.execute(
            select(t.token_outcomes.c.outcome).where(
                t.token_outcomes.c.token_id == token, t.token_outcomes.c.is_terminal
            )
        ).scalars()
        assert list(terminal) == ["not_arrived"]


def test_one_decision_per_row_and_one_result_per_attempt_are_enforced(audit_engine: Engine) -> None:
    """The event tables' keys: one result per (row, step, attempt), one decision per (coalesce, row)."""
    now = datetime.now(timezone.utc)
    result = {
        "run_no": 1,
        "node_id": "node",
        "chunk": 0,
        "row_no": 0,
        "attempt": 1,
        "status": NodeStatus.COMPLETED,
        "started_at": now,
        "recorded_at": now,
    }
    decision = {
        "run_no": 1,
        "node_id": "coalesce",
        "chunk": 0,
        "row_no": 0,
        "decision": "merged",
        "details_json": "{}",
        "consumed": "[]",
        "missing_json": "{}",
        "late_json": "[]",
        "decided_at": now,
        "recorded_at": now,
    }
    with audit_engine.begin() as conn:
        conn.execute(insert(t.step_results), [result, {**result, "attempt": 2}])
        conn.execute(insert(t.decisions), [decision, {**decision, "node_id": "other"}])
    with pytest.raises(IntegrityError), audit_engine.begin() as conn:
        conn.execute(insert(t.step_results), [{**result, "status": NodeStatus.FAILED}])
    with pytest.raises(IntegrityError), audit_engine.begin() as conn:
        conn.execute(insert(t.decisions), [{**decision, "decision": "failed"}])
    with audit_engine.connect() as conn:
        assert conn.execute(select(t.step_results.c.status)).scalars().all() == [NodeStatus.COMPLETED] * 2
        assert conn.execute(select(t.decisions.c.decision)).scalars().all() == ["merged"] * 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_payload_with_nan_or_infinity_is_rejected_naming_the_row(bad: float) -> None:
    with pytest.raises(PayloadError, match="row 'order-17'"):
        ForkRow.from_row("order-17", 17, {"id": "order-17", "amount": bad})


def _write_and_read(engine: Engine, rows_total: int, run: str) -> tuple[int, int]:
    """Fork ``rows_total`` rows chunk by chunk, then stream them back; peak bytes of each phase."""
    store = AuditStore(engine)
    tracemalloc.start()
    run_id = store.begin_run(identity(run), branches=BRANCHES, chunk_size=CHUNK, config={})
    for chunk, start in enumerate(range(0, rows_total, CHUNK)):
        store.write_fork_chunk(run_id, BRANCHES, chunk, fork_rows(start, min(CHUNK, rows_total - start)))
    store.complete_run(run_id, rows_total=rows_total, chunks_total=math.ceil(rows_total / CHUNK))
    _, write_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    read = 0
    for index, (row_key, row) in enumerate(iter_source_rows(engine, run_id)):
        assert row_key == f"k{index}" and row["value"] == index
        read += 1
    _, read_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert read == rows_total
    return write_peak, read_peak


@pytest.mark.timeout(600)
def test_ten_times_the_rows_write_and_read_in_the_same_memory(audit_engine: Engine, audit_url: str) -> None:
    small_write, small_read = _write_and_read(audit_engine, 1_000, "small")
    big_write, big_read = _write_and_read(audit_engine, 10_000, "big")
    backend = audit_url.split(":", 1)[0]
    print(
        f"\n[{backend}] peak Python memory (tracemalloc): chunked write 1k rows "
        f"{small_write / 2**20:.1f} MiB, "
        f"10k rows {big_write / 2**20:.1f} MiB; streaming read 1k {small_read / 2**20:.1f} MiB, "
        f"10k {big_read / 2**20:.1f} MiB"
    )
    # Ten times the rows (one chunk, then ten), about the same memory: bounded by the chunk, not the run.
    assert big_write < 1.5 * small_write + 2 * 2**20
    assert big_read < 1.5 * small_read + 2 * 2**20
    assert counts(audit_engine)["rows"] == 11_000


# ---- the raw write path (dml.insert_tuples) stores what a SQLAlchemy insert stores


def test_raw_inserts_store_what_sqlalchemy_stores(audit_engine: Engine) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2)))
    row = {
        "token_id": "raw",
        "run_id": "r",
        "row_id": "1.0",
        "outcome": "not_arrived",
        "is_terminal": True,
        "reason": None,
        "error_hash": None,
        "join_group_id": None,
        "recorded_at": at,
    }
    with audit_engine.begin() as conn:
        # The second terminal outcome of the same token is ignored (the partial unique index).
        insert_ignore(conn, t.recorded_outcomes, [row, {**row, "outcome": "lost"}])
        conn.execute(insert(t.recorded_outcomes).values({**row, "token_id": "core"}))
        stored = conn.exec_driver_sql(
            "SELECT token_id, outcome, is_terminal, recorded_at FROM recorded_outcomes ORDER BY token_id"
        ).all()
        read_back = conn.execute(select(t.recorded_outcomes.c.recorded_at)).scalars().all()
    assert [s[0] for s in stored] == ["core", "raw"]
    assert stored[0][1:] == stored[1][1:]
    assert read_back == [at.astimezone(timezone.utc)] * 2


def test_raw_inserts_refuse_naive_timestamps(audit_engine: Engine) -> None:
    with pytest.raises(ValueError, match="naive datetime"), audit_engine.begin() as conn:
        insert_tuples(
            conn, t.branch_task_losses, LOSS_COLUMNS, [("r", "n", 0, "b", "failed", datetime(2026, 1, 1))]
        )


def test_raw_inserts_page_large_batches_and_stay_idempotent(audit_engine: Engine) -> None:
    now = datetime.now(timezone.utc)
    columns = ("run_no", "chunk", "row_no", "row_key", "source_hash", "body", "recorded_at")
    # More than one PostgreSQL page of VALUES (and COPY-sized).
    rows = [(1, i // CHUNK, i, f"k{i}", f"{i:064x}", f'{{"i":{i}}}', now) for i in range(2_500)]
    inserted = []
    for _ in range(2):
        with audit_engine.begin() as conn:
            inserted.append(insert_tuples(conn, t.source_rows, columns, rows))
    assert inserted == [2_500, 0]
    with audit_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t.source_rows)).scalar_one() == 2_500


def test_a_plain_postgresql_url_opens_a_working_store(pg_url: str) -> None:
    """``postgresql://`` (SQLAlchemy's default driver, psycopg 3) works as ``postgresql+psycopg2://``:
    the store migrates, writes a chunk idempotently and reads it back."""
    from sqlalchemy.engine import make_url

    from airflow_elspeth.audit.engine import dispose_engine, engine_for_url

    url = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    engine = engine_for_url(url)
    try:
        assert engine.dialect.driver == "psycopg"
        store = AuditStore(engine)
        run_id = store.begin_run(identity(), branches=BRANCHES, chunk_size=CHUNK, config={"b": BRANCHES})
        store.write_fork_chunk(run_id, BRANCHES, 0, fork_rows(0, 50))
        store.write_fork_chunk(run_id, BRANCHES, 0, fork_rows(0, 50))
        assert [key for key, _ in iter_source_rows(engine, run_id)] == [f"k{i}" for i in range(50)]
    finally:
        dispose_engine(url)
