"""The read-only report queries behind the pages, on SQLite and PostgreSQL (their SQL differs:
julianday/date_part for the chart, json_each/jsonb for the branch filter fallback)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest

from airflow_elspeth.audit import schema
from airflow_elspeth.audit.read import decisions, lineage, runs, tasks
from airflow_elspeth.audit.read.cache import clear_cache
from airflow_elspeth.audit.read.decisions import coalesce_summary
from airflow_elspeth.audit.read.records import BranchStepView, DecisionRecord
from airflow_elspeth.audit.read.runs import coalesce_spec
from airflow_elspeth.core import vocabulary
from airflow_elspeth.core.config import coalesce_config
from airflow_elspeth.exceptions import NotFound
from airflow_elspeth.plugins.series import coalesce_page_overview

from .audit_data import Arrive, BuiltRun, build_run, consensus_behaviour


def consensus_with_late_writes(index: int, row: dict[str, Any], branch: str) -> Any:
    if branch == "gemini" and index % 8 == 1:
        return Arrive(30, {"label": "invoice"}, after_decision=True)
    return consensus_behaviour(index, row, branch)


@pytest.fixture
def built(audit_engine: Any) -> BuiltRun:
    clear_cache()
    return build_run(
        audit_engine,
        dag_id="d",
        airflow_run_id="r",
        rows=[{"id": f"doc-{i:03d}", "n": i} for i in range(24)],
        row_key="id",
        branches=["gpt", "claude", "gemini"],
        behaviour=consensus_with_late_writes,
        chunk_size=10,
    )


def test_reports_agree_with_the_summary_and_the_replay(audit_engine: Any, built: BuiltRun) -> None:
    found = runs.audit_runs(audit_engine, "d", "r")
    run = runs.pick_audit_run(found, coalesce="consensus")
    assert run is not None and run.audit_run_id == built.run_id and run.chunks_total == 3

    overview = coalesce_page_overview(audit_engine, run, "consensus")
    summary = coalesce_summary(
        audit_engine, coalesce_spec(audit_engine, built.run_id, "consensus"), built.run_id
    )
    for key in ("rows_total", "rows_merged", "rows_failed", "late_arrivals", "failure_reasons"):
        assert getattr(overview, key) == summary[key], key
    assert overview.rows_failed > 0 and overview.late_after_write == 3

    # The chart counts every arrival once, and every decision.
    series = overview.arrivals
    assert series["branches"]["gpt"]["total"] == 24
    assert series["branches"]["claude"]["total"] == 12
    assert series["branches"]["gemini"]["total"] == 24 - 2  # rows 6 and 16 are dropped
    assert sum(d["total"] for d in series["decisions"].values()) == 24
    assert series["branches"]["gemini"]["last_s"] > series["timeout_s"]  # late arrivals after the deadline
    for data in series["branches"].values():
        assert data["points"] == sorted(data["points"]) and data["points"][-1] == data["total"]

    # Filters: the IN-list path and the JSON-function path (the dialect's own) return the same rows.
    for flt in [
        decisions.RowFilter(decision=None, branch="gemini"),
        decisions.RowFilter(decision=None, branch="claude", branch_reason="error:RateLimitError"),
        decisions.RowFilter(decision="failed", branch="gemini", branch_reason="late_arrival_after_failure"),
        decisions.RowFilter(decision="merged", branch="gemini", branch_reason="late_arrival_after_merge"),
    ]:
        fast = decisions.decision_rows(audit_engine, built.run_id, "consensus", flt, limit=100)
        json_path = decisions.decision_rows(
            audit_engine, built.run_id, "consensus", flt, limit=100, max_in_list=0
        )
        assert fast.rows == json_path.rows and fast.total == len(fast.rows) > 0, flt
        assert all(
            row.missing[flt.branch] == (flt.branch_reason or row.missing[flt.branch]) for row in fast.rows
        )

    late = decisions.late_arrivals(audit_engine, run, "consensus", limit=100)
    recorded = sum(len(r.late_arrivals) for r in late.rows)
    assert recorded + late.after_write_total == overview.late_arrivals
    assert all(
        a.after_decision_s is not None and a.after_decision_s > 0 for r in late.rows for a in r.late_arrivals
    )
    assert {a["row_key"] for a in late.after_write} == {"doc-001", "doc-009", "doc-017"}

    # Every row's recorded decision is what a replay of its event log gives.
    for offset in (0, 12):
        page = decisions.decision_rows(
            audit_engine,
            built.run_id,
            "consensus",
            decisions.RowFilter(decision=None),
            limit=12,
            offset=offset,
        )
        for row in page.rows:
            view = lineage.row_view(audit_engine, run, row.row_key)
            decision = view.decisions[0]
            assert decision.replay is not None and decision.replay["agrees"], (row.row_key, decision.replay)
            assert decision.explanation is not None
            assert decision.explanation.startswith("Merged" if row.decision == "merged" else "Failed")

    stats = tasks.task_view(audit_engine, found, "ask_1")
    assert isinstance(stats, BranchStepView)
    assert stats.kind == "branch" and stats.by_status == {"completed": 12, "failed": 12}


def test_unknown_things_are_not_found(audit_engine: Any, built: BuiltRun) -> None:
    run = runs.pick_audit_run(runs.audit_runs(audit_engine, "d", "r"))
    assert run is not None
    with pytest.raises(NotFound):
        runs.coalesce_spec(audit_engine, built.run_id, "nope")
    with pytest.raises(NotFound):
        runs.coalesce_spec(audit_engine, built.run_id, "ask_0")  # a branch step, not a coalesce
    with pytest.raises(NotFound):
        lineage.row_view(audit_engine, run, "no-such-row")
    assert runs.pick_audit_run(runs.audit_runs(audit_engine, "d", "r"), audit_run_id="x" * 32) is None
    assert runs.audit_runs(audit_engine, "other", "r") == []
    assert tasks.task_view(audit_engine, [run], "publish").kind is None


def test_explanations_in_words() -> None:
    config = coalesce_config(branches=["a", "b"], policy="require_all", merge="union", timeout=60)
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    stored = {c.name: None for c in schema.coalesce_decisions.c} | {
        "node_id": "c",
        "decision": "failed",
        "failure_reason": "branch_lost",
        "consumed": "[]",
        "missing_json": json.dumps({"b": "dropped"}),
        "late_json": "[]",
        "details_json": json.dumps({"arrived": ["a"], "lost": {"b": "dropped"}}),
        "decided_at": at,
    }
    text = lineage.explain_decision(DecisionRecord.from_row(stored), config, None)
    assert text.startswith("Failed when the deciding event arrived under require_all (2 of 2)")
    assert "b dropped the row (the callable returned None)." in text
    assert (
        vocabulary.missing_reason_text("branch_task_failed")
        == "its task ended failed before delivering the row"
    )
    assert vocabulary.reason_kind("late_arrival_after_merge") == "late"


def test_every_reason_kind_has_its_own_matrix_shade() -> None:
    """A matrix cell's colour tells its kind apart: a skip of a decided row is not shaded as waiting."""
    from airflow_elspeth.plugins.app import shade

    colours = {shade(kind.value, 1, 1).rsplit(",", 1)[0] for kind in vocabulary.ReasonKind}
    assert len(colours) == len(vocabulary.ReasonKind)
    assert shade("skipped", 1, 4) != shade("skipped", 4, 4)  # stronger with its share of the rows
