"""When a branch's results become visible, and when it notices decided rows: BranchOperator.execute
called directly (fake context, SQLite audit store), its callable held on latches, so every
assertion is about order (what is visible while another row is still running), not about speed.
Waits for an expected event poll the audit store and return as soon as it happens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from airflow.sdk import DAG
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from airflow_elspeth import BranchOperator, CoalesceSensor, ForkOperator
from airflow_elspeth.audit.coalesce import coalesce_pass
from airflow_elspeth.audit.read.work import decided_in_chunk, decisions_in_chunk
from airflow_elspeth.audit.store import AuditStore
from airflow_elspeth.operators.fork import AUDIT_RUN_XCOM_KEY
from airflow_elspeth.runtime import branch as branch_runtime
from airflow_elspeth.triggers.coalesce import CoalesceTrigger

from .support import WAIT, in_thread, skipped, states, wait_for
from .support import completed_fork as fork_written

DAG_ID, AIRFLOW_RUN = "latency_dag", "manual__latency"
BRANCHES = ["fast", "slow"]
ROWS = 6


def _identity(row: dict[str, Any]) -> dict[str, Any]:
    return dict(row)


class FakeTI:
    dag_id, run_id, try_number = DAG_ID, AIRFLOW_RUN, 1

    def __init__(self, ref: dict[str, Any]) -> None:
        self.ref = ref

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        return self.ref if (task_ids, key) == ("fork", AUDIT_RUN_XCOM_KEY) else None


def completed_fork(store: AuditStore) -> dict[str, Any]:
    """The fork's XCom reference to a completed audit run of ROWS rows."""
    run_id = fork_written(store, dag_id=DAG_ID, airflow_run_id=AIRFLOW_RUN, branches=BRANCHES, rows=ROWS)
    return {"audit_run_id": run_id, "chunks_total": 1}


def build(callables: dict[str, Callable[[dict[str, Any]], Any]], **branch: Any) -> dict[str, Any]:
    with DAG(DAG_ID, schedule=None, start_date=datetime(2026, 1, 1)):
        fork = ForkOperator(task_id="fork", rows=[{"id": "r0"}], branches=BRANCHES, row_key="id")
        steps = {
            b: BranchOperator(task_id=b, fork=fork, branch=b, python_callable=callables[b], **branch)
            for b in BRANCHES
        }
        sensor = CoalesceSensor(task_id="coalesce", fork=fork, policy="first", timeout=3600)
        fork >> list(steps.values()) >> sensor
    return {**steps, "coalesce": sensor}


class Latched:
    """A callable whose rows in ``held`` block until released; records the rows it was called for."""

    def __init__(self, held: set[str]) -> None:
        self.held = held
        self.release = threading.Event()
        self.called: list[str] = []

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        self.called.append(row["id"])
        if row["id"] in self.held and not self.release.wait(WAIT):
            raise TimeoutError("never released")
        return {"seen": row["id"]}


def execute_in_thread(task: BranchOperator, ref: dict[str, Any], running: list[threading.Thread]) -> dict:
    return in_thread(lambda: task.execute({"ti": FakeTI(ref)}), running)  # type: ignore[arg-type]


def test_a_finished_result_is_written_while_another_row_still_runs(
    store: AuditStore, running: list[threading.Thread]
) -> None:
    """Neither a full batch nor ``flush_seconds`` is waited for: the result that is ready is written
    as soon as the writer is free, so a result can never turn late by waiting in the buffer."""
    ref = completed_fork(store)
    run_id = ref["audit_run_id"]
    slow = Latched(held={"r1"})
    tasks = build({"fast": _identity, "slow": slow}, concurrency=2, flush_seconds=3600, batch_size=500)
    outcome = execute_in_thread(tasks["slow"], ref, running)
    # r0 returned at once; r1 is held: r0 must be in the store while r1's callable has not returned
    wait_for("r0 written while r1 runs", lambda: states(store, run_id, "slow").get("r0") == "completed")
    assert "r1" not in states(store, run_id, "slow")
    slow.release.set()
    running[0].join(WAIT)
    assert "error" not in outcome, outcome
    assert states(store, run_id, "slow") == {f"r{i}": "completed" for i in range(ROWS)}
    # every result's event time is after its callable returned, and before the task ended
    with store.engine.connect() as conn:
        bad = conn.execute(
            text("SELECT count(*) FROM node_states WHERE run_id = :r AND recorded_at < completed_at"),
            {"r": run_id},
        ).scalar_one()
    assert bad == 0


def test_rows_decided_while_the_branch_works_are_skipped_not_run(
    store: AuditStore, running: list[threading.Thread]
) -> None:
    """A deferred coalesce's trigger decides rows while the branch is busy on a held row: the rows
    it decided are recorded skipped while that row still runs (read once per chunk, not per row),
    and never called."""
    ref = completed_fork(store)
    run_id = ref["audit_run_id"]
    slow = Latched(held={"r0"})
    tasks = build({"fast": _identity, "slow": slow}, concurrency=1)
    outcome = execute_in_thread(tasks["slow"], ref, running)
    wait_for("slow to start r0", lambda: slow.called == ["r0"])
    # the fast branch delivers every row and a pass decides them all (policy first)
    assert tasks["fast"].execute({"ti": FakeTI(ref)})["completed"] == ROWS  # type: ignore[arg-type]
    # the deferred coalesce's trigger decides them in the triggerer, without the task resuming
    spec = tasks["coalesce"].spec()
    trigger = CoalesceTrigger(
        spec=spec.as_dict(), run_id=run_id, dag_id=DAG_ID, airflow_run_id=AIRFLOW_RUN, poll_interval=1
    )
    assert trigger.poll(spec, {"fast": "success", "slow": "running"}).reason == "every row decided"
    # r0 still runs; r1 was queued (2 x concurrency) and r2..r5 never handed to a worker
    wait_for(
        "the decided rows recorded skipped", lambda: skipped(store, run_id, "slow") >= {"r2", "r3", "r4"}
    )
    assert slow.called == ["r0"]
    slow.release.set()
    running[0].join(WAIT)
    assert "error" not in outcome, outcome
    assert slow.called == ["r0"]  # r1 was claimed by no worker either: its row was decided
    assert skipped(store, run_id, "slow") == {f"r{i}" for i in range(1, ROWS)}
    assert states(store, run_id, "slow") == {"r0": "discarded"}  # decided before it was written
    assert outcome["returned"]["skipped_decided"] == ROWS - 1


def test_an_audit_store_unreachable_for_a_while_is_retried_not_fatal(
    store: AuditStore, running: list[threading.Thread], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = completed_fork(store)
    run_id = ref["audit_run_id"]
    monkeypatch.setattr(branch_runtime, "WRITE_RETRY_PAUSE_SECONDS", 0.01)
    real_write = AuditStore.write_branch_results
    failures = iter([OperationalError("INSERT", {}, Exception("database is locked"))] * 3)

    def flaky(self: AuditStore, *args: Any, **kw: Any) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        real_write(self, *args, **kw)

    monkeypatch.setattr(AuditStore, "write_branch_results", flaky)
    tasks = build({"fast": _identity, "slow": _identity})
    summary = tasks["slow"].execute({"ti": FakeTI(ref)})  # type: ignore[arg-type]
    assert summary["completed"] == ROWS
    assert states(store, run_id, "slow") == {f"r{i}": "completed" for i in range(ROWS)}


def test_an_audit_store_unreachable_too_long_fails_the_task(
    store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = completed_fork(store)
    monkeypatch.setattr(branch_runtime, "WRITE_RETRY_PAUSE_SECONDS", 0.01)
    monkeypatch.setattr(branch_runtime, "WRITE_RETRY_SECONDS", 0.0)

    def down(self: AuditStore, *args: Any, **kw: Any) -> None:
        raise OperationalError("INSERT", {}, Exception("could not connect"))

    monkeypatch.setattr(AuditStore, "write_branch_results", down)
    tasks = build({"fast": _identity, "slow": _identity})
    with pytest.raises(OperationalError, match="could not connect"):
        tasks["slow"].execute({"ti": FakeTI(ref)})  # type: ignore[arg-type]


def test_a_resolution_is_not_a_reason_to_skip(store: AuditStore) -> None:
    """Rows resolved because their coalesce task ended can be reopened (a person clears the
    coalesce) and decided afresh with this branch's result: a working branch does not skip them."""
    ref = completed_fork(store)
    run_id = ref["audit_run_id"]
    tasks = build({"fast": _identity, "slow": _identity})
    spec = tasks["coalesce"].spec()
    store.register_node(run_id, "coalesce", "coalesce", None, spec.as_dict())
    resolved = coalesce_pass(store, spec, run_id, {}, ended_state="failed")
    assert resolved.done and resolved.newly_decided == ROWS
    assert decided_in_chunk(store.engine, run_id, 0, coalesces=["coalesce"]) == set()
    # nor is a result written meanwhile discarded: it is an arrival (late until a later try reopens
    # the row; tests/audit/test_decision_ordering.py follows it through)
    assert decisions_in_chunk(store.engine, run_id, 0, coalesces=["coalesce"]) == {}
