"""The coalesce summary reads a whole audit run without nested-loop joins on PostgreSQL.

A run's rows are new to PostgreSQL's statistics until autovacuum analyzes them; planned on those
estimates, the summary's joins became nested loops that took 8-13 s over 5,000 rows instead of
0.03 s (audit/read/decisions.py, ``whole_run_reads``). Durations are not asserted here: every
statement the summary runs is checked to run with ``enable_nestloop`` off, read from the same
database session.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, event

from airflow_elspeth.audit.coalesce import coalesce_pass
from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.model import CoalesceSpec
from airflow_elspeth.audit.read.decisions import coalesce_summary
from airflow_elspeth.audit.store import AuditStore, ForkRow, RunIdentity
from airflow_elspeth.core.config import coalesce_config

pytestmark = pytest.mark.postgres


def _decided_run(engine: Engine) -> tuple[CoalesceSpec, str]:
    store = AuditStore(engine)
    branches = ("a", "b")
    run_id = store.begin_run(
        RunIdentity(dag_id="d", airflow_run_id="r", fork_task_id="fork", try_number=1),
        branches=branches,
        chunk_size=100,
        config={"branches": list(branches)},
    )
    store.write_fork_chunk(
        run_id, branches, 0, [ForkRow.from_row(f"k{i}", i, {"id": f"k{i}"}) for i in range(3)]
    )
    store.complete_run(run_id, rows_total=3, chunks_total=1)
    spec = CoalesceSpec(
        node_id="join",
        config=coalesce_config(branches=list(branches), policy="require_all", timeout=600),
        delivering={"a": "ask_a", "b": "ask_b"},
        mapped={"a": False, "b": False},
    )
    store.register_node(run_id, "join", "coalesce", None, spec.as_dict())
    # Both branch tasks ended without delivering: every row is decided (failed) by this pass.
    assert coalesce_pass(store, spec, run_id, {"ask_a": "failed", "ask_b": "failed"}).done
    return spec, run_id


def test_the_summary_never_plans_a_nested_loop_on_postgresql(pg_url: str) -> None:
    engine = engine_for_url(pg_url)
    spec, run_id = _decided_run(engine)
    seen: list[tuple[str, str]] = []

    def setting(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            probe = cursor.connection.cursor()
            try:
                probe.execute("SHOW enable_nestloop")
                seen.append((statement.split()[1], probe.fetchone()[0]))
            finally:
                probe.close()

    event.listen(engine, "before_cursor_execute", setting)
    try:
        summary = coalesce_summary(engine, spec, run_id)
    finally:
        event.remove(engine, "before_cursor_execute", setting)
    assert summary["rows_failed"] == 3
    assert len(seen) >= 3, seen  # the summary's grouped reads were observed
    assert {value for _, value in seen} == {"off"}, seen
    # The setting is local to the summary's transaction: the next reader plans as usual.
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW enable_nestloop").scalar() == "on"
