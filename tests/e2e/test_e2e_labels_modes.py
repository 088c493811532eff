"""One label per event in every waiting mode of the coalesce, on the real scheduler, triggerer and
LocalExecutor: poke, reschedule and deferrable runs of the same DAG (tests/e2e/dags/e2e_labels_modes.py,
events ordered by files) record the same outcome and reason for every branch token, and the same
summary: a decided row's late answer is a late arrival, a branch that reaches decided rows skips them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_harness import AirflowStack, AuditDB, verify_clean, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(600)]

MODES = ("poke", "reschedule", "deferrable")
ROWS = [f"row-{n}" for n in range(6)]
EXPECTED_LABELS = {
    **{(key, "fast"): ("coalesced", None) for key in ROWS},
    **{(key, "late"): ("late", "late_arrival_after_merge") for key in ROWS},
    **{(key, "skipper"): ("skipped", "skipped_decided") for key in ROWS},
}


def dag_id(mode: str) -> str:
    return f"e2e_labels__{mode}"


@pytest.fixture
def audit(airflow_stack: AirflowStack) -> Iterator[AuditDB]:
    db = AuditDB(airflow_stack.audit_url)
    yield db
    db.dispose()


def _labels(audit: AuditDB, run_id: str) -> dict[tuple[str, str], tuple[str, str | None]]:
    return {
        (row["row_key"], row["branch_name"]): (row["outcome"], row["reason"])
        for row in audit.all(
            "SELECT r.row_key, t.branch_name, o.outcome, o.reason FROM token_outcomes o"
            " JOIN tokens t ON t.token_id = o.token_id"
            " JOIN rows r ON r.run_id = t.run_id AND r.row_id = t.row_id"
            " WHERE o.run_id = :r AND o.is_terminal AND t.token_kind = 'branch'",
            r=run_id,
        )
    }


def test_the_same_events_have_the_same_labels_in_every_waiting_mode(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack = airflow_stack
    for mode in MODES:
        stack.wait_dag(dag_id(mode))
        stack.unpause(dag_id(mode))
    runs = {mode: stack.trigger(dag_id(mode)) for mode in MODES}
    audit_runs: dict[str, str] = {}
    for mode, run_id in runs.items():
        found = wait_until(
            f"{mode}: the fork to complete its audit run",
            lambda mode=mode, run_id=run_id: audit.all(
                "SELECT run_id FROM runs WHERE dag_id = :d AND airflow_run_id = :r AND status = 'completed'",
                d=dag_id(mode),
                r=run_id,
            ),
            timeout=240,
        )
        audit_runs[mode] = found[0]["run_id"]
    for mode, audit_run in audit_runs.items():
        wait_until(
            f"{mode}: every row decided with fast",
            lambda audit_run=audit_run: (
                audit.scalar("SELECT count(*) FROM coalesce_decisions WHERE run_id = :r", r=audit_run)
                == len(ROWS)
            ),
            timeout=240,
        )
        release = stack.state_dir / dag_id(mode) / "release"
        release.parent.mkdir(parents=True, exist_ok=True)
        release.touch()

    summaries: dict[str, Any] = {}
    for mode, run_id in runs.items():
        final = stack.wait_run(dag_id(mode), run_id, timeout=300)
        states = stack.task_states(dag_id(mode), run_id)
        assert final["state"] == "success", (mode, states)
        assert states["join"] == states["join_finalize"] == "success", (mode, states)
        assert _labels(audit, audit_runs[mode]) == EXPECTED_LABELS, mode
        done = stack.elspeth("report", "--json", "--no-airflow-states", "--run-id", audit_runs[mode])
        assert done.returncode == 0, done.stderr[-3000:]
        summaries[mode] = json.loads(done.stdout)[0]["summary"]
        verify_clean(stack, audit, "--run-id", audit_runs[mode])

    for mode, summary in summaries.items():
        assert (summary["rows_merged"], summary["rows_failed"], summary["rows_undecided"]) == (6, 0, 0), mode
        assert summary["late_arrivals"] == len(ROWS), mode
        assert summary["missing_branches"] == {
            "late": {"rows": 6, "reasons": {"late_arrival_after_merge": 6}},
            "skipper": {"rows": 6, "reasons": {"skipped_decided": 6}},
        }, mode
