"""One label per event, whatever the waiting mode; every headline count is the sum of its table.

A few scenarios (a branch that answers after its row was decided, one that hangs past the deadline,
a coalesce that decides before a slow branch reached its rows) run with the coalesce in reschedule
mode and deferrable (under ``dag.test()`` a deferrable coalesce reschedules itself). In each mode
the audit trail must pass the oracle (tests/integration/checks.py), the summary in XCom, a fresh
summary, the UI overview and ``airflow-elspeth report`` must add up, and the two modes must tell
the same story: the same decisions, the same missing-branch reasons and the same token outcomes.
"""

from __future__ import annotations

import json
import runpy
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from airflow_elspeth import cli
from airflow_elspeth.audit.engine import engine_for_url
from airflow_elspeth.audit.read.decisions import coalesce_overview, coalesce_summary
from airflow_elspeth.audit.read.records import CoalesceOverview
from airflow_elspeth.audit.read.runs import audit_runs, coalesce_spec, pick_audit_run
from airflow_elspeth.core.vocabulary import LATE_REASONS, SKIPPED_DECIDED, ReasonKind, reason_kind

from .checks import (
    check_coalesce,
    check_counts_add_up,
    check_run_integrity,
    check_summary,
    only_run,
    q,
    xcom,
)
from .support import DAGS_DIR

pytestmark = pytest.mark.integration


# The DAG file, run as dag.test() parses it (its DAGs built too, which costs a few ms each).
L = SimpleNamespace(**runpy.run_path(str(DAGS_DIR / "elspeth_it_labels_dags.py")))


def assert_overview_matches(overview: CoalesceOverview, summary: dict[str, Any]) -> None:
    """The UI overview's counts and matrix are the summary's."""
    for key in ("rows_total", "rows_merged", "rows_failed", "rows_undecided", "late_arrivals"):
        assert getattr(overview, key) == summary[key], key
    matrix = overview.missing_matrix
    cells = {b: {r: cell.rows for r, cell in matrix.cells[b].items() if cell.rows} for b in matrix.branches}
    assert cells == {b: info["reasons"] for b, info in summary["missing_branches"].items()}
    assert matrix.branch_totals == {b: info["rows"] for b, info in summary["missing_branches"].items()}
    late_total = sum(n for r, n in matrix.reason_totals.items() if reason_kind(r) is ReasonKind.LATE)
    assert late_total == overview.late_arrivals


def labels(engine: Any, run_id: str) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(row key, branch) -> the branch token's terminal (outcome, reason)."""
    return {
        (row["row_key"], row["branch_name"]): (row["outcome"], row["reason"])
        for row in q(
            engine,
            "SELECT r.row_key, t.branch_name, o.outcome, o.reason FROM token_outcomes o"
            " JOIN tokens t ON t.token_id = o.token_id"
            " JOIN rows r ON r.run_id = t.run_id AND r.row_id = t.row_id"
            " WHERE o.run_id = :r AND o.is_terminal AND t.token_kind = 'branch'",
            r=run_id,
        )
    }


def run_mode(scenario: str, mode: str, audit_url: str, run_dag: Any) -> dict[str, Any]:
    dag = L.M.build_dag(L.SPECS[L.variant(scenario, mode)])
    dag_run = run_dag(dag, audit_url)
    engine = engine_for_url(audit_url)
    run = only_run(engine, dag_run)
    check_run_integrity(engine, run["run_id"])
    view = check_coalesce(engine, run)
    pushed = xcom(dag_run, "coalesce", "coalesce_summary")
    assert pushed is not None
    check_counts_add_up(pushed)
    fresh = coalesce_summary(engine, coalesce_spec(engine, run["run_id"], "coalesce"), run["run_id"])
    check_counts_add_up(fresh)
    check_summary(fresh, view)
    audit_run = pick_audit_run(audit_runs(engine, dag_run.dag_id, dag_run.run_id), audit_run_id=run["run_id"])
    assert audit_run is not None
    overview = coalesce_overview(engine, audit_run, "coalesce")
    assert_overview_matches(overview, fresh)
    report = CliRunner().invoke(cli.main, ["--url", audit_url, "report", "--run-id", run["run_id"], "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.output)[0]["summary"]["missing_branches"] == fresh["missing_branches"]
    text = CliRunner().invoke(
        cli.main, ["--url", audit_url, "report", "--run-id", run["run_id"]], env={"COLUMNS": "80"}
    )
    assert text.exit_code == 0 and "…" not in text.output, text.output
    return {
        "decisions": view.per_row(),
        "missing": fresh["missing_branches"],
        "late_arrivals": fresh["late_arrivals"],
        "labels": labels(engine, run["run_id"]),
        "outcomes": view.outcomes,
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", L.LABEL_SCENARIOS)
def test_labels_are_the_same_in_every_mode(scenario: str, sqlite_url: str, run_dag: Any) -> None:
    # On SQLite only: the mode is what differs here; the same reads run on PostgreSQL in
    # test_a_branch_that_reaches_decided_rows_skips_them and in test_policies' PostgreSQL subset.
    seen = {mode: run_mode(scenario, mode, sqlite_url, run_dag) for mode in L.MODES}
    reschedule, deferrable = seen["reschedule"], seen["deferrable"]
    assert reschedule["decisions"] == deferrable["decisions"]
    # A branch that reached a decided row answers late; one that reached it after its decision was
    # visible skips it: two events, two labels, which of them happens depends on when the branch
    # ran. Otherwise every label is the same in both modes.
    assert normalised_missing(reschedule["missing"]) == normalised_missing(deferrable["missing"])
    assert normalised_labels(reschedule["labels"]) == normalised_labels(deferrable["labels"])
    for seen_mode in (reschedule, deferrable):
        for (row_key, branch), (outcome, reason) in seen_mode["labels"].items():
            # Never the decision-time placeholder for a branch that has since done something.
            if outcome == "not_arrived":
                assert reason and reason.startswith("branch_task_"), (row_key, branch, reason)
            if outcome == "skipped":
                assert reason == "skipped_decided", (row_key, branch, reason)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", L.MODES)
def test_a_branch_that_reaches_decided_rows_skips_them(mode: str, audit_url: str, run_dag: Any) -> None:
    """``first`` merges each row at its first arrival; the other two branches reach rows already
    decided (and skip them) or answer late, depending on when dag.test() runs them. Whichever
    they do, the labels say it, the oracle agrees and the counts add up (checked by run_mode)."""
    seen = run_mode(L.ORDER_DEPENDENT, mode, audit_url, run_dag)
    assert set(seen["decisions"].values()) == {"merged"}
    for (row_key, branch), (outcome, reason) in seen["labels"].items():
        assert (outcome, reason) in (
            ("coalesced", None),
            ("skipped", "skipped_decided"),
            ("late", "late_arrival_after_merge"),
        ), (row_key, branch, outcome, reason)


AFTER_DECISION = "after_decision"


def normalised_missing(missing: dict[str, Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for branch, info in missing.items():
        reasons = out.setdefault(branch, {})
        for reason, n in info["reasons"].items():
            key = AFTER_DECISION if reason in (*LATE_REASONS, SKIPPED_DECIDED) else reason
            reasons[key] = reasons.get(key, 0) + n
    return out


def normalised_labels(found: dict[tuple[str, str], tuple[str, str | None]]) -> dict[tuple[str, str], Any]:
    return {
        key: AFTER_DECISION if outcome in ("late", "skipped") else (outcome, reason)
        for key, (outcome, reason) in found.items()
    }
