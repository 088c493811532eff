"""A coalesce that dies leaves nothing undecided: its finalizer teardown closes every row, and a
person clearing the coalesce gets the rows decided afresh (the earlier resolutions kept, superseded).

The coalesce's first try raises (no retries) before its pass or half way through it; the finalizer
then decides what the policy can and fails what it cannot with ``coalesce_task_failed``. Which of
the two a row gets depends on whether its branches had run when the finalizer did, so the checks
are the invariants: every row decided, a resolution only where the log could not decide, every
token one terminal outcome, the summary in the finalizer's XCom.
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_elspeth.audit.engine import engine_for_url

from .checks import check_coalesce, check_run_integrity, only_run, q, ti_states, ti_try_numbers, xcom
from .support import dag_module

pytestmark = pytest.mark.integration

M = dag_module()
FAULTS = ["before_pass", "mid_pass"]


def check_closed(engine: Any, dag_run: Any) -> tuple[Any, dict[str, Any]]:
    run = only_run(engine, dag_run)
    assert run["status"] == "completed", run
    check_run_integrity(engine, run["run_id"])  # every token exactly one terminal outcome
    view = check_coalesce(engine, run)  # every row decided; decisions replay, resolutions were undecidable
    summary = xcom(dag_run, "coalesce_finalize", "coalesce_summary")
    assert summary is not None, ti_states(dag_run)
    assert summary["rows_merged"] + summary["rows_failed"] == summary["rows_total"] == M.ROW_COUNT
    return view, summary


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_dead_coalesce_leaves_no_row_undecided_and_a_clear_decides_afresh(
    fault: str, audit_url: str, run_dag: Any, rerun: Any
) -> None:
    spec = M.SCENARIOS[f"elspeth_it_coalesce_dies_{fault}"]
    dag = M.build_dag(spec)
    dag_run = run_dag(dag, audit_url)
    engine = engine_for_url(audit_url)

    states = ti_states(dag_run)
    assert states["coalesce"] == "failed" and states["coalesce_finalize"] == "success", states
    assert dag_run.state == "failed"  # the teardown does not hide the coalesce's failure
    view, summary = check_closed(engine, dag_run)
    assert summary["coalesce_task_state"] == "failed"
    resolved = {k for k, d in view.decisions.items() if d["failure_reason"] == "coalesce_task_failed"}
    assert summary["failure_reasons"].get("coalesce_task_failed", 0) == len(resolved)

    # The natural reaction: clear the coalesce. Its new try reopens what the finalizer resolved.
    dag_run = rerun(dag, dag_run, ["coalesce"], audit_url, downstream=True)
    assert ti_try_numbers(dag_run)["coalesce"] == 2
    assert ti_states(dag_run)["coalesce"] == "success"
    view, summary = check_closed(engine, dag_run)
    assert not any(d["failure_reason"] == "coalesce_task_failed" for d in view.decisions.values())
    assert summary["rows_merged"] == M.ROW_COUNT - 1  # c errors on r1: require_all fails it
    superseded = q(engine, "SELECT row_key, failure_reason FROM superseded_decisions")
    assert {d["row_key"] for d in superseded} == resolved
    assert {d["failure_reason"] for d in superseded} <= {"coalesce_task_failed"}
