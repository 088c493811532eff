"""``dml.insert_tuples``, the write path of every hot insert: on PostgreSQL batches of
``PG_COPY_MIN_ROWS`` or more go through COPY, smaller ones through multi-row VALUES; on SQLite one
``executemany``. Whatever the path, the same rows are stored, conflicts are ignored with the first
of two conflicting rows kept, and the count of inserted rows is returned."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.dml import PG_COPY_MIN_ROWS, insert_tuples

AWKWARD = ["tab\there", "new\nline", "back\\slash \\N", "carriage\rreturn", "é ☃ 𝄞", "", "NULL", "\\."]
OUTCOME_COLUMNS = ("token_id", "run_id", "row_id", "outcome", "is_terminal", "reason", "recorded_at")
ROW_COLUMNS = ("run_no", "chunk", "row_no", "row_key", "source_hash", "body", "recorded_at")


@pytest.mark.parametrize("rows", [PG_COPY_MIN_ROWS + 20, 10], ids=["copy-sized", "values-sized"])
def test_every_value_is_stored_as_given_and_a_second_insert_stores_nothing(
    audit_engine: Engine, rows: int
) -> None:
    at = datetime(2026, 12, 7, 8, 30, 1, 123456, tzinfo=timezone(timedelta(hours=2)))
    values = [
        (
            f"t{n:04d}",
            "r" * 32,
            f"1.{n}",
            "late",
            n % 2 == 0,
            AWKWARD[n % len(AWKWARD)] if n % 5 else None,
            at,
        )
        for n in range(rows)
    ]

    def source_rows(body: str | None) -> list[tuple[object, ...]]:
        return [(1, 0, n, v[0], f"{n:064x}", body or v[5] or "-", at) for n, v in enumerate(values)]

    with audit_engine.begin() as conn:
        assert insert_tuples(conn, t.recorded_outcomes, OUTCOME_COLUMNS, values) == rows
        assert insert_tuples(conn, t.source_rows, ROW_COLUMNS, source_rows(None)) == rows
    with audit_engine.begin() as conn:
        assert insert_tuples(conn, t.source_rows, ROW_COLUMNS, source_rows("other")) == 0
    o = t.recorded_outcomes.c
    with audit_engine.connect() as conn:
        stored = conn.execute(
            select(
                o.token_id, o.run_id, o.row_id, o.outcome, o.is_terminal, o.reason, o.recorded_at
            ).order_by(o.token_id)
        ).all()
        bodies = dict(conn.execute(select(t.source_rows.c.row_key, t.source_rows.c.body)).all())
    assert [tuple(row) for row in stored] == [(*v[:6], at.astimezone(timezone.utc)) for v in values]
    assert bodies == {v[0]: v[5] or "-" for v in values}


@pytest.mark.parametrize("rows", [PG_COPY_MIN_ROWS + 20, 10], ids=["copy-sized", "values-sized"])
def test_of_two_conflicting_rows_the_first_is_kept_within_a_batch_and_across_batches(
    audit_engine: Engine, rows: int
) -> None:
    """Two terminal outcomes of one token: the partial unique index keeps the first written, in the
    batch's order; a second batch in the same transaction neither repeats the first nor wins."""
    at = datetime.now(timezone.utc)
    batch = [(f"t{n:04d}", "r" * 32, f"1.{n}", "first", True, None, at) for n in range(rows)]
    batch.insert(1, ("t0000", "r" * 32, "1.0", "second", True, None, at))
    with audit_engine.begin() as conn:
        assert insert_tuples(conn, t.recorded_outcomes, OUTCOME_COLUMNS, batch) == rows
        again = [(f"t{n:04d}", "r" * 32, f"1.{n}", "third", True, None, at) for n in range(rows)]
        assert insert_tuples(conn, t.recorded_outcomes, OUTCOME_COLUMNS, again) == 0
    o = t.recorded_outcomes.c
    with audit_engine.connect() as conn:
        outcomes = conn.execute(select(o.outcome, o.token_id)).all()
    assert len(outcomes) == rows and {outcome for outcome, _ in outcomes} == {"first"}
