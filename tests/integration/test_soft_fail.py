"""``CoalesceSensor(soft_fail=True)`` ends skipped where it would fail, and records everything first.

``dag.test()`` runs of tests/integration/dags/elspeth_it_soft_fail_dags.py, on SQLite and PostgreSQL,
in the reschedule and the deferrable mode:

* rows failing beyond the tolerance: the coalesce ends ``skipped`` with ``soft_fail=True`` and
  ``failed`` without it; either way every row's decision is written, the summary is in XCom, the
  finalizer leaves the decisions as they were (no ``coalesce_task_skipped`` resolution), and
  ``verify`` finds nothing;
* the fork fails (a duplicate row key), so the coalesce can never run its pass: it fails, or with
  ``soft_fail=True`` is skipped, as an Airflow sensor is; the audit run is closed failed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from airflow_elspeth import cli
from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.read.records import AuditRun, Finding
from airflow_elspeth.audit.read.verify import verify_run
from airflow_elspeth.exceptions import ElspethConfigError

from .checks import check_coalesce, check_run_integrity, check_summary, only_run, q, ti_states, xcom
from .dags import elspeth_it_soft_fail_dags as D

pytestmark = pytest.mark.integration


def in_every_mode(test: Any) -> Any:
    """Run ``test(soft_fail, deferrable, ...)`` with soft_fail on and off, in both waiting modes."""
    test = pytest.mark.parametrize("deferrable", [False, True], ids=["reschedule", "deferrable"])(test)
    test = pytest.mark.parametrize("soft_fail", [True, False], ids=["soft_fail", "no_soft_fail"])(test)
    return pytest.mark.timeout(240)(test)


def verify_findings(engine: Any, dag_run: Any, run: dict[str, Any]) -> list[Finding]:
    """``airflow-elspeth verify``'s findings for the run, with the DAG run's task states."""
    states = {(dag_run.dag_id, dag_run.run_id, task): state for task, state in ti_states(dag_run).items()}
    return verify_run(engine, AuditRun.from_row(run), task_states=states)


def run_scenario(
    run_dag: Any, audit_url: str, *, soft_fail: bool, deferrable: bool, bad_rows: bool
) -> tuple[Any, Any, dict[str, str]]:
    """Run one scenario; the coalesce ended skipped with soft_fail, failed without, and its
    finalizer succeeded. Returns the DagRun, the audit engine and the task states."""
    dag = D.build_dag(D.SCENARIOS[D.dag_id(soft_fail, deferrable, bad_rows)])
    dag_run = run_dag(dag, audit_url)
    states = ti_states(dag_run)
    assert states["coalesce"] == ("skipped" if soft_fail else "failed"), states
    assert states["coalesce_finalize"] == "success", states
    return dag_run, engine_for_url(audit_url), states


@in_every_mode
def test_rows_failed_beyond_the_tolerance_skip_with_soft_fail_and_fail_without(
    soft_fail: bool, deferrable: bool, audit_url: str, run_dag: Any
) -> None:
    dag_run, engine, states = run_scenario(
        run_dag, audit_url, soft_fail=soft_fail, deferrable=deferrable, bad_rows=False
    )
    assert states["publish"] in ("skipped", "upstream_failed"), states

    # Every decision recorded before the task ended, and the summary pushed.
    run = only_run(engine, dag_run)
    check_run_integrity(engine, run["run_id"])
    view = check_coalesce(engine, run)
    failed = sorted(k for k, d in view.decisions.items() if d["decision"] == "failed")
    assert failed == [f"r{n}" for n in D.FAILING_ROWS]
    assert {view.decisions[k]["failure_reason"] for k in failed} == {"branch_lost"}
    summary = xcom(dag_run, "coalesce", "coalesce_summary")
    assert summary is not None
    assert (summary["rows_total"], summary["rows_merged"], summary["rows_failed"]) == (D.ROW_COUNT, 4, 2)
    assert summary["failure_reasons"] == {"branch_lost": 2}
    check_summary(summary, view)

    # The finalizer saw a coalesce that had decided every row: nothing resolved, nothing overwritten.
    final = xcom(dag_run, "coalesce_finalize", "coalesce_summary")
    assert final is not None
    assert final["coalesce_task_state"] == states["coalesce"]
    assert final["rows_resolved_by_finalizer"] == 0
    assert (final["rows_merged"], final["rows_failed"]) == (4, 2)
    resolutions = q(
        engine,
        "SELECT row_key FROM coalesce_decisions WHERE run_id = :r AND failure_reason LIKE 'coalesce_task_%'",
        r=run["run_id"],
    )
    assert resolutions == []
    assert q(engine, "SELECT COUNT(*) AS n FROM superseded_decisions")[0]["n"] == 0

    assert verify_findings(engine, dag_run, run) == []

    # The report reads the coalesce task's state from Airflow's metadata DB, as the UI index does.
    report = CliRunner().invoke(
        cli.main, ["--url", audit_url, "report", "--airflow-states", "--json", "--run-id", run["run_id"]]
    )
    assert report.exit_code == 0, report.output
    assert [item["coalesce_task_state"] for item in json.loads(report.output)] == [states["coalesce"]]
    text = CliRunner().invoke(
        cli.main, ["--url", audit_url, "report", "--airflow-states", "--run-id", run["run_id"]]
    )
    assert f"coalesce task {states['coalesce']}" in text.output, text.output


@in_every_mode
def test_a_coalesce_whose_fork_failed_is_skipped_with_soft_fail(
    soft_fail: bool, deferrable: bool, audit_url: str, run_dag: Any
) -> None:
    dag_run, engine, states = run_scenario(
        run_dag, audit_url, soft_fail=soft_fail, deferrable=deferrable, bad_rows=True
    )
    assert states["fork"] == "failed", states
    # Airflow's meaning of soft_fail: the skip spreads downstream, so no leaf failed and the DAG run
    # succeeds although its fork failed (the audit run says it failed, and why).
    assert dag_run.state == ("success" if soft_fail else "failed")

    run = only_run(engine, dag_run)
    assert run["status"] == "failed" and run["status_reason"].startswith("bad_row: duplicate row key"), run
    assert q(engine, "SELECT COUNT(*) AS n FROM coalesce_decisions WHERE run_id = :r", r=run["run_id"]) == [
        {"n": 0}
    ]
    assert verify_findings(engine, dag_run, run) == []


def test_on_failure_is_gone_and_names_soft_fail() -> None:
    from datetime import datetime

    from airflow.sdk import DAG

    from airflow_elspeth import CoalesceSensor, ForkOperator

    with DAG("elspeth_on_failure_removed", schedule=None, start_date=datetime(2026, 1, 1)):
        fork = ForkOperator(task_id="fork", rows=[], branches=["a", "b"])
        with pytest.raises(ElspethConfigError, match=r"on_failure was removed .*soft_fail=True"):
            CoalesceSensor(task_id="coalesce", fork=fork, policy="require_all", on_failure="skip")
