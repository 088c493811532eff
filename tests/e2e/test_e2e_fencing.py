"""Declared ended means fenced (issue 18), on the real scheduler and triggerer: a branch task that
Airflow ended while its process runs on writes after the coalesce recorded the task's loss and
decided. The decision stands (``require_all``: failed, ``branch_lost``), the late answer is kept and
labelled late, and the trail verifies: ``verify`` exits 0, every branch token has one terminal
outcome, ``explain`` says the replay agrees with the stored decision.

Two ways a try is declared ended while its process runs on:

* a person marks it failed through the REST API while the coalesce waits deferred, or rescheduling;
* its process is paused (SIGSTOP of the task process and its supervisor) and the scheduler fails it
  by its heartbeat timeout; the process is resumed after the decision.

In production the process learns that its try ended at its supervisor's next heartbeat (every 5 s)
and is then terminated, so whether it writes between the decision and that heartbeat is a race
(the 0.1 replay got it wrong whenever the process won). The tests make the interleaving certain:
``slow`` holds a row (tests/e2e/dags/e2e_fencing.py) until the coalesce has decided, and its
supervisor stays paused until that row's answer is recorded.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from e2e_harness import (
    REPO,
    AirflowStack,
    AuditDB,
    assert_closed,
    branch_token_outcomes,
    scheduler_settings,
    set_task_state,
    start_run,
    task_instance,
    task_process,
    task_supervisor,
    wait_task_process_gone,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(360)]

ROWS = [f"row-{n}" for n in range(6)]
HOLD_AT = 2  # dags/e2e_fencing.py: slow answers rows 0-1, then holds row 2 until "release"
HELD = ROWS[HOLD_AT]
BRANCHES = ("quick", "slow")
# The decisions: rows 0-1 merged before slow's try ended, the rest failed on its loss.
DECIDED = {
    **{key: ("merged", None) for key in ROWS[:HOLD_AT]},
    **{key: ("failed", "branch_lost") for key in ROWS[HOLD_AT:]},
}
# The paused test's scheduler: a try without a heartbeat for 20 s is failed (Airflow's default is
# 300 s), looked for every 2 s. Only for that test: other tests' tasks must not be failed by a slow
# heartbeat on a loaded machine.
HEARTBEAT_TIMEOUT = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
}


def _decided(audit: AuditDB, audit_run: str) -> dict[str, tuple[str, str | None]]:
    return {d["key"]: (d["decision"], d["failure_reason"]) for d in audit.decisions(audit_run)}


def _holding(
    stack: AirflowStack, audit: AuditDB, dag_id: str, run_id: str, state: Path
) -> tuple[str, dict[str, Any]]:
    """Wait until the coalesce merged rows 0-1 and slow holds row 2, mid-chunk; returns the audit
    run and slow's (running) task instance."""
    audit_run = wait_until(
        f"the audit run of {dag_id}/{run_id}", lambda: audit.run_of(dag_id, run_id), timeout=180
    )["run_id"]
    holding = state / "holding"
    wait_until(f"slow to hold {HELD}", holding.exists, timeout=180)
    # The task imported the provider of this checkout (PYTHONPATH reaches the task processes).
    imported = Path(holding.read_text())
    assert imported.is_relative_to(REPO), f"the task ran {imported}, not this checkout ({REPO})"
    wait_until(
        "the coalesce to merge the rows slow answered",
        lambda: _decided(audit, audit_run) == {key: DECIDED[key] for key in ROWS[:HOLD_AT]},
        timeout=120,
    )
    slow = task_instance(stack, dag_id, run_id, "slow")
    assert slow["state"] == "running", slow
    return audit_run, slow


def _wait_decided_on_loss(audit: AuditDB, audit_run: str) -> datetime:
    """Wait until the coalesce recorded slow's loss and decided the rest on it; returns when the
    loss was recorded (the audit clock)."""
    wait_until(
        f"the coalesce to decide rows {HELD} onwards on slow's loss",
        lambda: _decided(audit, audit_run) == DECIDED,
        timeout=180,
    )
    loss = audit.one(
        "SELECT task_state, observed_at FROM branch_task_losses WHERE run_id = :r AND node_id = 'slow'",
        r=audit_run,
    )
    assert loss["task_state"] == "failed", loss
    return loss["observed_at"]


def _wait_late_write(audit: AuditDB, audit_run: str, lost_at: datetime) -> dict[str, Any]:
    """Wait until slow's answer for the held row is recorded after its loss; returns that node state."""

    def written() -> dict[str, Any] | None:
        states = audit.all(
            "SELECT s.status, s.attempt, s.recorded_at FROM node_states s JOIN rows r "
            "ON r.run_id = s.run_id AND r.row_id = s.row_id "
            "WHERE s.run_id = :r AND s.node_id = 'slow' AND r.row_key = :key",
            r=audit_run,
            key=HELD,
        )
        return states[0] if states else None

    state = wait_until(f"slow to write {HELD}", written, timeout=120)
    assert state["recorded_at"] > lost_at, (state, lost_at)
    return state


def _resume(procs: list[psutil.Process]) -> None:
    """SIGCONT whatever the test paused (a stopped process would ignore the deployment's SIGTERM)."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.resume()


def _assert_fenced(
    stack: AirflowStack, audit: AuditDB, dag_id: str, run_id: str, audit_run: str, late: dict[str, Any]
) -> None:
    """The end state: the decisions as they were taken, the late answer kept and labelled late,
    every token one terminal outcome, ``verify`` clean, ``explain`` agreeing with the replay."""
    states = stack.task_states(dag_id, run_id)
    # slow stays failed; the coalesce fails on the rows failed (over its tolerance, 0) and its
    # finalizer finds nothing open.
    assert (states["slow"], states["join"], states["join_finalize"]) == ("failed", "failed", "success"), (
        states
    )
    assert _decided(audit, audit_run) == DECIDED
    missing = {d["key"]: d["missing_json"] for d in audit.decisions(audit_run) if d["decision"] == "failed"}
    assert missing == {key: {"slow": "branch_task_failed"} for key in ROWS[HOLD_AT:]}, missing
    assert (late["status"], late["attempt"]) == ("discarded", 1), late

    assert_closed(stack, audit, dag_id, run_id, rows=len(ROWS), branches=len(BRANCHES))

    explained = stack.elspeth("explain", HELD, "--run-id", audit_run)
    assert explained.returncode == 0, explained.stderr[-2000:]
    assert "replay agrees with the stored decision" in explained.stdout, explained.stdout
    assert "DISAGREES" not in explained.stdout, explained.stdout
    # ... and shows the late answer beside the replayed log, in which slow's event is its loss.
    (replay,) = json.loads(stack.elspeth("explain", "--json", HELD, "--run-id", audit_run).stdout)["replays"]
    shown = replay["replayed"]
    assert replay["agrees"] and shown["decision"] == "failed", replay
    assert [(e["kind"], e["reason"]) for e in shown["events"] if e["branch"] == "slow"] == [
        ("loss", "branch_task_failed")
    ], shown
    late_writes = [(w["branch"], datetime.fromisoformat(w["at"])) for w in shown["late_writes"]]
    assert late_writes == [("slow", late["recorded_at"])], shown

    outcomes = {
        (t["row_key"], t["branch_name"]): (t["outcome"], t["reason"])
        for t in branch_token_outcomes(audit, audit_run)
    }
    expected: dict[tuple[str, str], tuple[str, str | None]] = {}
    for n, key in enumerate(ROWS):
        if n < HOLD_AT:
            expected[(key, "quick")] = expected[(key, "slow")] = ("coalesced", None)
        else:
            expected[(key, "quick")] = ("row_failed", "branch_lost")
            expected[(key, "slow")] = ("lost", "branch_task_failed")
    expected[(HELD, "slow")] = ("late", "late_arrival_after_failure")
    assert outcomes == expected, outcomes


# -- 1. a running branch marked failed through the REST API --------------------------------------------


@pytest.mark.parametrize("mode", ["deferrable", "reschedule"])
def test_branch_marked_failed_while_running_writes_late_and_the_decision_stands(
    airflow_stack: AirflowStack, audit: AuditDB, mode: str
) -> None:
    stack, dag_id = airflow_stack, f"e2e_fencing_marked_{mode}"
    run_id, state = start_run(stack, dag_id)
    paused: list[psutil.Process] = []
    try:
        audit_run, slow = _holding(stack, audit, dag_id, run_id, state)
        # Its supervisor paused, the task learns that its try ended only once the test lets it.
        supervisor = task_supervisor(stack, task_process(stack, slow))
        supervisor.suspend()
        paused.append(supervisor)
        set_task_state(stack, dag_id, run_id, "slow", "failed")
        lost_at = _wait_decided_on_loss(audit, audit_run)
        (state / "release").touch()
        late = _wait_late_write(audit, audit_run, lost_at)
        _resume(paused)  # the next heartbeat tells it the try ended: it is terminated
    finally:
        (state / "release").touch()
        _resume(paused)
    wait_task_process_gone(stack, slow)
    stack.wait_run(dag_id, run_id, timeout=180)
    _assert_fenced(stack, audit, dag_id, run_id, audit_run, late)


# -- 2. a paused branch failed by the heartbeat timeout, resumed after the decision ---------------------


def test_paused_branch_failed_by_heartbeat_timeout_writes_late_when_resumed(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack, dag_id = airflow_stack, "e2e_fencing_paused"
    with scheduler_settings(stack, HEARTBEAT_TIMEOUT):
        run_id, state = start_run(stack, dag_id)
        paused: list[psutil.Process] = []
        try:
            audit_run, slow = _holding(stack, audit, dag_id, run_id, state)
            process = task_process(stack, slow)
            supervisor = task_supervisor(stack, process)
            for proc in (process, supervisor):
                proc.suspend()
                paused.append(proc)
            wait_until(
                "the scheduler to fail slow by its heartbeat timeout",
                lambda: task_instance(stack, dag_id, run_id, "slow")["state"] == "failed",
                timeout=120,
            )
            timed_out = stack.api(
                "GET", f"/api/v2/eventLogs?dag_id={dag_id}&task_id=slow&event=heartbeat%20timeout"
            )["event_logs"]
            assert [e["run_id"] for e in timed_out] == [run_id], timed_out
            lost_at = _wait_decided_on_loss(audit, audit_run)
            # The held row's callable answers as soon as the process runs again; the supervisor
            # stays paused until that answer is recorded (resumed together, it races the write).
            (state / "release").touch()
            process.resume()
            late = _wait_late_write(audit, audit_run, lost_at)
            supervisor.resume()
        finally:
            (state / "release").touch()
            _resume(paused)
        wait_task_process_gone(stack, slow)
        stack.wait_run(dag_id, run_id, timeout=180)
    _assert_fenced(stack, audit, dag_id, run_id, audit_run, late)
