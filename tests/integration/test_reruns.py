"""Retries and re-runs: a branch task crashing half way is retried and resumes, writing nothing
twice; clearing only the coalesce re-reports the same decisions; re-running the fork starts a new
audit run and leaves the old one intact."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_elspeth.audit.engine import engine_for_url

from .checks import (
    audit_runs,
    check_coalesce,
    check_run_integrity,
    check_summary,
    q,
    snapshot,
    ti_states,
    ti_try_numbers,
    xcom,
)
from .support import dag_module
from .test_policies import verify_run

pytestmark = pytest.mark.integration

M = dag_module()
ALL_ROWS = [M.row_key(n) for n in range(M.ROW_COUNT)]


def calls_of(dag_id: str, task_id: str) -> list[tuple[str, int | None]]:
    return [(row, try_number) for d, t, row, try_number in M.CALLS if d == dag_id and t == task_id]


def branch_states(engine: Any, run_id: str, node_id: str) -> list[dict[str, Any]]:
    return q(
        engine,
        "SELECT r.row_key, s.attempt, s.status FROM node_states s JOIN rows r"
        " ON r.run_id = s.run_id AND r.row_id = s.row_id"
        " WHERE s.run_id = :r AND s.node_id = :n ORDER BY s.attempt, r.row_index",
        r=run_id,
        n=node_id,
    )


@pytest.mark.timeout(180)
def test_branch_crashing_half_way_is_retried_and_resumes(audit_url: str, run_dag: Any) -> None:
    """Try 1 of ask_b dies on r4 (SystemExit, after r0..r3 were written in batches of 2); try 2
    processes only r4 and r5, and every (token, node) keeps a single terminal state."""
    spec = M.SCENARIOS["elspeth_it_retry_crash"]
    M.CALLS[:] = [c for c in M.CALLS if c[0] != spec.dag_id]
    dag_run = run_dag(M.build_dag(spec), audit_url)
    engine = engine_for_url(audit_url)
    view, _summary, states = verify_run(engine, dag_run, spec)

    assert states["ask_b"] == "success" and ti_try_numbers(dag_run)["ask_b"] == 2
    assert view.per_row() == dict.fromkeys(ALL_ROWS, "merged")
    calls = calls_of(spec.dag_id, "ask_b")
    # Try 1 called r0..r4 (and maybe r5, already queued on the worker thread when r4 crashed).
    assert [row for row, n in calls if n == 1][:5] == ["r0", "r1", "r2", "r3", "r4"], calls
    assert [row for row, n in calls if n == 2] == ["r4", "r5"], calls  # resumed, r0..r3 not redone
    written = branch_states(engine, view.run_id, "ask_b")
    assert [(s["row_key"], s["attempt"], s["status"]) for s in written] == [
        ("r0", 1, "completed"),
        ("r1", 1, "completed"),
        ("r2", 1, "completed"),
        ("r3", 1, "completed"),
        ("r4", 2, "completed"),
        ("r5", 2, "completed"),
    ]


@pytest.mark.timeout(180)
def test_branch_failing_its_threshold_is_retried_and_redoes_the_aborted_rows(
    audit_url: str, run_dag: Any
) -> None:
    """Try 1 of ask_b fails every row (max_failed_rows=0 fails the task after the first batch; its
    row errors are marked aborted, not losses); try 2 processes every row again."""
    spec = M.SCENARIOS["elspeth_it_retry_threshold"]
    M.CALLS[:] = [c for c in M.CALLS if c[0] != spec.dag_id]
    dag_run = run_dag(M.build_dag(spec), audit_url)
    engine = engine_for_url(audit_url)
    view, summary, states = verify_run(engine, dag_run, spec)

    assert states["ask_b"] == "success" and ti_try_numbers(dag_run)["ask_b"] == 2
    assert view.per_row() == dict.fromkeys(ALL_ROWS, "merged")
    assert summary["missing_branches"] == {}
    written = branch_states(engine, view.run_id, "ask_b")
    first = [(s["row_key"], s["status"]) for s in written if s["attempt"] == 1]
    second = [(s["row_key"], s["status"]) for s in written if s["attempt"] == 2]
    assert first and all(status == "aborted" for _, status in first), first
    assert second == [(key, "completed") for key in ALL_ROWS]


@pytest.mark.timeout(180)
def test_clearing_only_the_coalesce_re_reports_the_same_decisions(
    audit_url: str, run_dag: Any, rerun: Any
) -> None:
    spec = M.SCENARIOS["elspeth_it_rerun"]
    dag = M.build_dag(spec)
    dag_run = run_dag(dag, audit_url)
    engine = engine_for_url(audit_url)
    view, summary, _states = verify_run(engine, dag_run, spec)
    assert view.per_row() == {**dict.fromkeys(ALL_ROWS, "merged"), "r3": "branch_lost"}
    before = snapshot(engine, view.run_id)

    dag_run = rerun(dag, dag_run, ["coalesce"], audit_url, downstream=True, first=("coalesce",))

    assert dag_run.clear_number == 1
    tries = ti_try_numbers(dag_run)
    assert tries["coalesce"] == 2 and tries["fork"] == 1 and tries["ask_a"] == 1
    assert ti_states(dag_run)["coalesce"] == "success"
    again = xcom(dag_run, "coalesce", "coalesce_summary")
    assert again == summary
    assert xcom(dag_run, "coalesce") == summary
    assert xcom(dag_run, "publish") == xcom_published(engine, view)
    assert len(audit_runs(engine, dag_run.dag_id, dag_run.run_id)) == 1
    assert snapshot(engine, view.run_id) == before  # nothing re-decided, nothing rewritten


@pytest.mark.timeout(180)
def test_re_running_a_branch_continues_the_same_audit_run(audit_url: str, run_dag: Any, rerun: Any) -> None:
    """Clearing a branch task (and its downstream coalesce) re-runs it in the same audit run: every
    token is already done, so it processes nothing, and the coalesce re-reports the same decisions."""
    spec = M.SCENARIOS["elspeth_it_rerun"]
    dag = M.build_dag(spec)
    dag_run = run_dag(dag, audit_url)
    engine = engine_for_url(audit_url)
    view, summary, _states = verify_run(engine, dag_run, spec)
    before = snapshot(engine, view.run_id)
    M.CALLS[:] = [c for c in M.CALLS if c[0] != spec.dag_id]

    dag_run = rerun(dag, dag_run, ["ask_a"], audit_url, downstream=True, first=("coalesce",))

    assert ti_try_numbers(dag_run)["ask_a"] == 2 and ti_states(dag_run)["ask_a"] == "success"
    assert calls_of(spec.dag_id, "ask_a") == []
    result = xcom(dag_run, "ask_a")
    assert result["audit_run_id"] == view.run_id and result["resumed_done"] == M.ROW_COUNT
    assert len(audit_runs(engine, dag_run.dag_id, dag_run.run_id)) == 1
    assert xcom(dag_run, "coalesce", "coalesce_summary") == summary
    assert snapshot(engine, view.run_id) == before


def xcom_published(engine: Any, view: Any) -> list[dict[str, Any]]:
    from airflow_elspeth.audit.read.rows import iter_merged_rows

    return list(iter_merged_rows(engine, view.run_id, view.node_id))


@pytest.mark.timeout(180)
def test_re_running_the_fork_starts_a_new_audit_run_and_keeps_the_old_one(
    audit_url: str, run_dag: Any, rerun: Any
) -> None:
    spec = M.SCENARIOS["elspeth_it_rerun"]
    dag = M.build_dag(spec)
    dag_run = run_dag(dag, audit_url)
    engine = engine_for_url(audit_url)
    old_view, old_summary, _ = verify_run(engine, dag_run, spec)
    before = snapshot(engine, old_view.run_id)

    # The coalesce polls before the fork runs again (as it would on a real scheduler, where it starts
    # with the fork's downstream tasks): the fork's XCom still names the old audit run then.
    dag_run = rerun(dag, dag_run, ["fork"], audit_url, downstream=True, first=("coalesce",))

    states = ti_states(dag_run)
    assert states["coalesce"] == "success", states
    assert ti_try_numbers(dag_run)["fork"] == 2
    runs = audit_runs(engine, dag_run.dag_id, dag_run.run_id)
    assert [(r["try_number"], r["status"]) for r in runs] == [(1, "completed"), (2, "completed")]
    old, new = runs
    assert old["run_id"] == old_view.run_id and new["run_id"] != old["run_id"]
    assert new["previous_run_id"] == old["run_id"]
    assert new["clear_number"] == 1
    # The old audit run is untouched: same rows, tokens, states, outcomes, decisions.
    assert snapshot(engine, old["run_id"]) == before
    # The new one is complete and consistent on its own, and it is what the coalesce reported.
    check_run_integrity(engine, new["run_id"])
    new_view = check_coalesce(engine, new)
    summary = xcom(dag_run, "coalesce", "coalesce_summary")
    assert summary["audit_run_id"] == new["run_id"]
    check_summary(summary, new_view)
    assert new_view.per_row() == old_view.per_row()
    for key in ("rows_total", "rows_merged", "rows_failed", "failure_reasons"):
        assert summary[key] == old_summary[key], key
    assert xcom(dag_run, "publish") == xcom_published(engine, new_view)
