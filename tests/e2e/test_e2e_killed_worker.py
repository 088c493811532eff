"""A branch task's process SIGKILLed mid-way on the real LocalExecutor: retried and resumed from
what was recorded, or (no retries left) a loss with the task's state as the reason."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from e2e_harness import AirflowStack, AuditDB, start_run, verify_clean, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(360)]

KILL_AT = 4  # the victim is killed while calling on row-4 (rows 0-3 are recorded)
ROWS = [f"row-{n}" for n in range(10)]


def _kill_victim(stack: AirflowStack, state: Path) -> int:
    """Wait for the victim to park on row KILL_AT, then SIGKILL its task process."""
    pid_file = state / "victim.pid"
    wait_until("the victim branch to reach row-4", pid_file.exists, timeout=120)
    pid = int(pid_file.read_text())
    proc = psutil.Process(pid)
    assert stack.owns(proc), f"pid {pid} is not a task process of this deployment"
    (state / "killed").touch()  # the next call (the retry's) proceeds
    os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([proc], timeout=10)
    return pid


def _calls(state: Path) -> Counter[str]:
    return Counter(path.name.split(".")[0] for path in (state / "calls").iterdir())


def _victim_states(audit: AuditDB, run_id: str) -> list[dict]:
    return audit.all(
        "SELECT r.row_key, s.attempt, s.status, s.token_id FROM node_states s JOIN rows r "
        "ON r.run_id = s.run_id AND r.row_id = s.row_id WHERE s.run_id = :run AND s.node_id = 'victim' "
        "ORDER BY r.row_index, s.attempt",
        run=run_id,
    )


def test_killed_branch_is_retried_and_resumes_from_what_was_recorded(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack, dag_id = airflow_stack, "e2e_killed_worker"
    run_id, state = start_run(stack, dag_id)
    _kill_victim(stack, state)
    recorded_before_kill = {
        s["row_key"] for s in _victim_states(audit, audit.run_of(dag_id, run_id)["run_id"])
    }
    assert recorded_before_kill == set(ROWS[:KILL_AT]), recorded_before_kill

    seen: list[dict] = []
    final = stack.wait_run(
        dag_id, run_id, timeout=180, on_poll=lambda: seen.append(stack.task_states(dag_id, run_id))
    )
    assert final["state"] == "success", stack.task_states(dag_id, run_id)
    tis = {ti["task_id"]: ti for ti in stack.task_instances(dag_id, run_id)}
    assert tis["victim"]["try_number"] == 2 and tis["victim"]["state"] == "success"
    assert any(s.get("victim") == "up_for_retry" for s in seen), "the kill was not retried by Airflow"
    assert any(
        s.get("consensus") == "deferred" and s.get("victim") in ("up_for_retry", "running") for s in seen
    )

    run = audit.run_of(dag_id, run_id)
    states = _victim_states(audit, run["run_id"])
    # one terminal state per token at the victim node: nothing written twice
    per_token = Counter(s["token_id"] for s in states)
    assert set(per_token.values()) == {1} and len(per_token) == len(ROWS)
    assert {s["row_key"]: s["attempt"] for s in states} == {
        key: (1 if n < KILL_AT else 2) for n, key in enumerate(ROWS)
    }
    assert {s["status"] for s in states} == {"completed"}
    # rows recorded before the kill were not called again; the one being called when killed was
    calls = _calls(state)
    assert calls == Counter({key: (2 if n == KILL_AT else 1) for n, key in enumerate(ROWS)}), calls

    decisions = audit.decisions(run["run_id"])
    assert len(decisions) == len(ROWS)
    assert all(d["decision"] == "merged" and sorted(d["consumed"]) == ["quick", "victim"] for d in decisions)
    assert audit.scalar(
        "SELECT count(*) FROM token_outcomes WHERE run_id = :run AND is_terminal AND outcome = 'coalesced'",
        run=run["run_id"],
    ) == 2 * len(ROWS)
    verify_clean(stack, audit, "--run-id", run["run_id"])


def test_killed_branch_without_retries_is_a_loss_with_its_task_state_before_the_deadline(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack, dag_id = airflow_stack, "e2e_killed_no_retry"
    run_id, state = start_run(stack, dag_id)
    _kill_victim(stack, state)
    killed_at = time.monotonic()

    wait_until(
        "the coalesce to decide after the kill",
        lambda: stack.task_states(dag_id, run_id).get("consensus") in ("success", "failed"),
        timeout=120,
    )
    decided_after = time.monotonic() - killed_at
    tis = {ti["task_id"]: ti for ti in stack.task_instances(dag_id, run_id)}
    assert tis["victim"]["state"] == "failed" and tis["victim"]["try_number"] == 1
    assert tis["consensus"]["state"] == "success"
    assert decided_after < 90, f"decided {decided_after:.0f}s after the kill"

    run = audit.run_of(dag_id, run_id)
    deadline = run["completed_at"] + timedelta(minutes=10)
    decisions = audit.decisions(run["run_id"])
    assert [d["key"] for d in decisions] == ROWS
    for n, d in enumerate(decisions):
        assert d["decision"] == "merged", d
        assert d["decided_at"] < deadline - timedelta(minutes=8), "decided at the loss, not the deadline"
        if n < KILL_AT:
            assert sorted(d["consumed"]) == ["quick", "victim"] and d["missing_json"] == {}
        else:
            assert d["consumed"] == ["quick"]
            assert d["missing_json"] == {"victim": "branch_task_failed"}
    lost = audit.all(
        "SELECT o.outcome, o.reason, count(*) AS n FROM token_outcomes o "
        "JOIN tokens t ON t.token_id = o.token_id "
        "WHERE o.run_id = :run AND t.branch_name = 'victim' AND o.is_terminal GROUP BY o.outcome, o.reason",
        run=run["run_id"],
    )
    assert {(o["outcome"], o["reason"]): o["n"] for o in lost} == {
        ("coalesced", None): KILL_AT,
        ("lost", "branch_task_failed"): len(ROWS) - KILL_AT,
    }
    # It waited deferred and was resumed by the trigger (how many times depends on when the kill
    # lands against the trigger's polls; what matters is above: decided at the loss).
    events = stack.task_log_events(dag_id, run_id, "consensus")
    assert any(e.startswith("Pausing task as DEFERRED") for e in events), events
    assert any("resumed by the trigger" in e for e in events), events
    final = stack.wait_run(dag_id, run_id, timeout=60)
    # Airflow judges a DAG run by its leaves: the coalesce decided every row and succeeded.
    assert final["state"] == "success"
    verify_clean(stack, audit, "--run-id", run["run_id"])
