"""The fault matrix on the real deployment: the coalesce killed (with and without retries), marked
failed by a person, the audit database unreachable, a branch commit held across the deadline, a
fork whose source breaks, and the example DAGs run repeatedly.

Each case ends with the same closing checks (:func:`e2e_harness.assert_closed`): no audit run left
``running``, every branch token with exactly one terminal outcome, and ``airflow-elspeth verify``
clean for the audit run. Waits are on states (task instances, audit rows, the audit clock), never on
wall-clock durations.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from typing import Any

import psycopg2
import pytest
from e2e_harness import (
    VENV_BIN,
    AirflowStack,
    AuditDB,
    E2EError,
    assert_closed,
    audit_db_unreachable,
    branch_token_outcomes,
    clear_tasks,
    copy_audit_db,
    kill_task,
    set_task_state,
    start_run,
    task_instance,
    verify_clean,
    wait_task_process_gone,
    wait_until,
    xcom_value,
)
from sqlalchemy import text

from airflow_elspeth.core.vocabulary import FailureReason
from airflow_elspeth.operators.fork import FORK_ROWS_PER_WRITE

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(480)]

WAIT_ROWS = [f"row-{n}" for n in range(10)]
HOLD_AT = 4  # dags/e2e_faults.py: slow delivers rows 0-3, then waits for "release"
RESOLVED = "coalesce_task_failed"


def note(message: str) -> None:
    """Observations for the report (shown with ``-s``)."""
    print(f"FAULTS: {message}")


def _audit_run(audit: AuditDB, dag_id: str, run_id: str) -> dict[str, Any]:
    return wait_until(
        f"the audit run of {dag_id}/{run_id}", lambda: audit.run_of(dag_id, run_id), timeout=180
    )


def _merged_count(audit: AuditDB, run_id: str) -> int:
    return int(
        audit.scalar(
            "SELECT count(*) FROM coalesce_decisions WHERE run_id = :r AND decision = 'merged'", r=run_id
        )
    )


def _wait_first_rows_merged(audit: AuditDB, dag_id: str, run_id: str) -> dict[str, Any]:
    """The coalesce merged rows 0-3 (slow delivered them) and is waiting for the rest."""

    def merged() -> dict[str, Any] | None:
        run = audit.run_of(dag_id, run_id)
        return run if _merged_count(audit, run["run_id"]) == HOLD_AT else None

    return wait_until("the coalesce to merge rows 0-3 and wait for the rest", merged, timeout=180)


def _ti(stack: AirflowStack, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    return task_instance(stack, dag_id, run_id, task_id)


def _wait_ti(
    stack: AirflowStack, dag_id: str, run_id: str, task_id: str, check: Any, what: str, timeout: float = 180
) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        ti = _ti(stack, dag_id, run_id, task_id)
        return ti if check(ti) else None

    return wait_until(f"{task_id} {what}", ready, timeout=timeout)


def _resolutions(audit: AuditDB, run_id: str) -> int:
    return int(
        audit.scalar(
            "SELECT count(*) FROM coalesce_decisions "
            "WHERE run_id = :r AND failure_reason LIKE 'coalesce_task_%'",
            r=run_id,
        )
    )


def _superseded(audit: AuditDB, run_id: str) -> list[dict[str, Any]]:
    return audit.all(
        "SELECT s.*, r.row_key AS key FROM superseded_decisions s JOIN rows r "
        "ON r.run_id = s.run_id AND r.row_id = s.row_id WHERE s.run_id = :r ORDER BY r.row_index",
        r=run_id,
    )


def _assert_all_merged(decisions: list[dict[str, Any]], keys: list[str], branches: list[str]) -> None:
    assert [d["key"] for d in decisions] == keys
    for d in decisions:
        assert d["decision"] == "merged" and d["failure_reason"] is None, d
        assert sorted(d["consumed"]) == sorted(branches), d


def _assert_resolved_at_hold(decisions: list[dict[str, Any]]) -> None:
    """Rows 0-3 merged by the policy, rows 4-9 resolved when the coalesce ended (slow never came)."""
    assert [d["key"] for d in decisions] == WAIT_ROWS
    for n, d in enumerate(decisions):
        if n < HOLD_AT:
            assert d["decision"] == "merged" and d["failure_reason"] is None, d
            assert sorted(d["consumed"]) == ["quick", "slow"]
        else:
            assert d["decision"] == "failed" and d["failure_reason"] == RESOLVED, d
            assert d["missing_json"] == {"slow": "not_arrived"}, d
            assert d["details_json"].get("coalesce_task_state") == "failed", d


def _assert_resolution_outcomes(
    audit: AuditDB, run_id: str, slow_states: dict[str, str] | None = None
) -> None:
    """Each token's terminal outcome after the resolution. ``slow_states`` (row key -> the slow
    step's node state), once that step has ended: a resolved row is still processed (a resolution is
    not a decision a branch skips: a clear of the coalesce would reopen it), so its answer is late;
    without it, still not arrived."""
    tokens = branch_token_outcomes(audit, run_id)
    assert len(tokens) == 2 * len(WAIT_ROWS) and {t["terminal"] for t in tokens} == {1}, tokens
    by_row = {(t["row_key"], t["branch_name"]): (t["outcome"], t["reason"]) for t in tokens}
    for n, key in enumerate(WAIT_ROWS):
        if n < HOLD_AT:
            assert by_row[(key, "quick")] == by_row[(key, "slow")] == ("coalesced", None)
            continue
        assert by_row[(key, "quick")] == ("row_failed", RESOLVED), by_row[(key, "quick")]
        if slow_states is None:
            expected = ("not_arrived", "branch_task_running")
        else:
            assert slow_states.get(key) == "completed", (key, slow_states)
            expected = ("late", "late_arrival_after_failure")
        assert by_row[(key, "slow")] == expected, (key, by_row[(key, "slow")], slow_states)


# -- 1. the coalesce SIGKILLed while it waits, with retries ----------------------------------------------


def test_coalesce_killed_mid_wait_resumes_on_its_retry(airflow_stack: AirflowStack, audit: AuditDB) -> None:
    stack, dag_id = airflow_stack, "e2e_faults_coalesce_killed"
    run_id, state = start_run(stack, dag_id)
    run = _wait_first_rows_merged(audit, dag_id, run_id)
    killed = kill_task(stack, dag_id, run_id, "join")
    assert killed["try_number"] == 1
    retry = _wait_ti(
        stack,
        dag_id,
        run_id,
        "join",
        lambda ti: ti["try_number"] == 2 and ti["state"] == "running",
        "to run its second try",
    )
    assert retry["max_tries"] >= 2, retry  # the coalesce's default retries
    (state / "release").touch()
    final = stack.wait_run(dag_id, run_id, timeout=240)
    states = stack.task_states(dag_id, run_id)
    assert final["state"] == "success", states
    assert states == {
        "fork": "success",
        "quick": "success",
        "slow": "success",
        "join": "success",
        "join_finalize": "success",
    }
    assert _ti(stack, dag_id, run_id, "join")["try_number"] == 2

    audit_run = run["run_id"]
    _assert_all_merged(audit.decisions(audit_run), WAIT_ROWS, ["quick", "slow"])
    assert _resolutions(audit, audit_run) == 0
    assert _superseded(audit, audit_run) == []
    summary = xcom_value(stack, dag_id, run_id, "join_finalize", "coalesce_summary")
    assert summary["coalesce_task_state"] == "success" and summary["rows_resolved_by_finalizer"] == 0
    assert summary["rows_merged"] == len(WAIT_ROWS) and summary["rows_failed"] == 0
    assert_closed(stack, audit, dag_id, run_id, rows=len(WAIT_ROWS), branches=2)

    # -- verify is not blind: the same data with one decision removed (its row undecided, and its
    # branch tokens, whose outcome the merged decision implied, without one) ---------------------------
    copy_url = copy_audit_db(stack)
    copy = AuditDB(copy_url)
    try:
        with copy.engine.begin() as conn:
            deleted = conn.execute(
                text(
                    "DELETE FROM decisions WHERE run_no = (SELECT run_no FROM runs WHERE run_id = :r)"
                    " AND row_no = (SELECT row_index FROM rows WHERE run_id = :r AND row_key = 'row-7')"
                ),
                {"r": audit_run},
            ).rowcount
        assert deleted == 1
    finally:
        copy.dispose()
    done = stack.run(
        [str(VENV_BIN / "airflow-elspeth"), "--url", copy_url, "verify", "--json", "--run-id", audit_run],
        check=False,
    )
    assert done.returncode != 0, done.stdout[-2000:]
    checks = {f["check"] for f in json.loads(done.stdout)["findings"]}
    note(f"case 1: verify on the corrupted copy exited {done.returncode} with {sorted(checks)}")
    assert {"tokens_without_outcome", "rows_undecided"} <= checks, done.stdout[-3000:]
    verify_clean(stack, audit, "--run-id", audit_run)  # the original is untouched


# -- 2. the coalesce SIGKILLed without retries: resolved, then cleared and decided afresh --------------


def test_coalesce_killed_without_retries_is_resolved_then_cleared_and_decided_afresh(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack, dag_id = airflow_stack, "e2e_faults_coalesce_killed_no_retry"
    run_id, state = start_run(stack, dag_id)
    try:
        run = _wait_first_rows_merged(audit, dag_id, run_id)
        audit_run = run["run_id"]
        kill_task(stack, dag_id, run_id, "join")
        join = _wait_ti(stack, dag_id, run_id, "join", lambda ti: ti["state"] == "failed", "to fail")
        assert join["try_number"] == 1
        _wait_ti(
            stack, dag_id, run_id, "join_finalize", lambda ti: ti["state"] == "success", "to close the rows"
        )
        assert _ti(stack, dag_id, run_id, "slow")["state"] == "running"  # still held back

        _assert_resolved_at_hold(audit.decisions(audit_run))
        _assert_resolution_outcomes(audit, audit_run)
        summary = xcom_value(stack, dag_id, run_id, "join_finalize", "coalesce_summary")
        assert summary["coalesce_task_state"] == "failed", summary
        assert summary["rows_resolved_by_finalizer"] == len(WAIT_ROWS) - HOLD_AT, summary
        assert (summary["rows_merged"], summary["rows_failed"]) == (HOLD_AT, len(WAIT_ROWS) - HOLD_AT)
        assert audit.one("SELECT status FROM runs WHERE run_id = :r", r=audit_run)["status"] == "completed"
        verify_clean(stack, audit, "--run-id", audit_run)  # resolved: no limbo although slow still runs

        # -- a person clears the coalesce (and so its teardown): the rows are decided afresh ---------
        cleared = clear_tasks(stack, dag_id, run_id, ["join"], include_downstream=True)
        assert {ti["task_id"] for ti in cleared} >= {"join", "join_finalize"}, cleared
        wait_until(
            "the new coalesce try to supersede the resolutions",
            lambda: (
                len(_superseded(audit, audit_run)) == len(WAIT_ROWS) - HOLD_AT
                and _resolutions(audit, audit_run) == 0
            ),
            timeout=180,
        )
        (state / "release").touch()
        final = stack.wait_run(dag_id, run_id, timeout=240)
    finally:
        (state / "release").touch()
    states = stack.task_states(dag_id, run_id)
    assert final["state"] == "success", states
    assert states == {
        "fork": "success",
        "quick": "success",
        "slow": "success",
        "join": "success",
        "join_finalize": "success",
    }
    assert _ti(stack, dag_id, run_id, "join")["try_number"] == 2

    _assert_all_merged(audit.decisions(audit_run), WAIT_ROWS, ["quick", "slow"])
    superseded = _superseded(audit, audit_run)
    assert [s["key"] for s in superseded] == WAIT_ROWS[HOLD_AT:]
    assert {(s["decision"], s["failure_reason"]) for s in superseded} == {("failed", RESOLVED)}
    tokens = branch_token_outcomes(audit, audit_run)
    assert {t["terminal"] for t in tokens} == {1}
    assert {(t["outcome"], t["reason"]) for t in tokens} == {("coalesced", None)}
    # the earlier outcomes stay, no longer terminal, marked superseded
    assert {t["row_key"]: t["superseded"] for t in tokens if t["superseded"]} == dict.fromkeys(
        WAIT_ROWS[HOLD_AT:], 1
    )
    assert audit.scalar(
        "SELECT count(*) FROM token_outcomes o JOIN tokens t ON t.token_id = o.token_id "
        "WHERE o.run_id = :r AND t.token_kind = 'branch' AND NOT o.is_terminal "
        "AND o.superseded_at IS NOT NULL",
        r=audit_run,
    ) == 2 * (len(WAIT_ROWS) - HOLD_AT)
    summary = xcom_value(stack, dag_id, run_id, "join_finalize", "coalesce_summary")
    assert summary["coalesce_task_state"] == "success" and summary["rows_resolved_by_finalizer"] == 0
    assert_closed(stack, audit, dag_id, run_id, rows=len(WAIT_ROWS), branches=2)


# -- 3. the coalesce marked failed by a person while it waits ------------------------------------------


def test_coalesce_marked_failed_by_a_person_is_resolved(airflow_stack: AirflowStack, audit: AuditDB) -> None:
    stack, dag_id = airflow_stack, "e2e_faults_coalesce_marked_failed"
    run_id, state = start_run(stack, dag_id)
    try:
        run = _wait_first_rows_merged(audit, dag_id, run_id)
        audit_run = run["run_id"]
        waiting = _wait_ti(stack, dag_id, run_id, "join", lambda ti: ti["state"] == "running", "to wait")
        set_task_state(stack, dag_id, run_id, "join", "failed")
        marked_at = time.monotonic()
        _wait_ti(
            stack, dag_id, run_id, "join_finalize", lambda ti: ti["state"] == "success", "to close the rows"
        )
        join = _ti(stack, dag_id, run_id, "join")
        assert (join["state"], join["try_number"]) == ("failed", 1), join
        _assert_resolved_at_hold(audit.decisions(audit_run))
        _assert_resolution_outcomes(audit, audit_run)
        summary = xcom_value(stack, dag_id, run_id, "join_finalize", "coalesce_summary")
        assert summary["coalesce_task_state"] == "failed"
        assert summary["rows_resolved_by_finalizer"] == len(WAIT_ROWS) - HOLD_AT
        (state / "release").touch()
        final = stack.wait_run(dag_id, run_id, timeout=240)
    finally:
        (state / "release").touch()
    # The try marked failed may still be running (Airflow stops it at its next heartbeat): the end
    # state is the one once it is gone.
    wait_task_process_gone(stack, waiting)
    note(
        f"case 3: the marked-failed try's process was gone {time.monotonic() - marked_at:.1f}s after the mark"
    )
    states = stack.task_states(dag_id, run_id)
    note(f"case 3: DAG run {final['state']}, tasks {states}")
    assert states["slow"] == "success" and states["join"] == "failed" and states["join_finalize"] == "success"
    # The person's "failed" is final: the finalizer's resolutions stand, whatever arrives later.
    decisions = audit.decisions(audit_run)
    superseded = _superseded(audit, audit_run)
    compact = [(d["key"], d["decision"], d["failure_reason"], str(d["recorded_at"])) for d in decisions]
    trail = (
        f"decisions {compact}; "
        f"superseded {[(s['key'], s['failure_reason'], str(s['superseded_at'])) for s in superseded]}; "
        f"join try 1 log: {stack.task_log_events(dag_id, run_id, 'join')[-6:]}"
    )
    note(f"case 3: {trail}")
    assert not superseded, f"the resolutions of the marked-failed coalesce were reopened: {trail}"
    _assert_resolved_at_hold(decisions)
    # slow answers every row: those after the resolution are late (it does not skip resolved rows)
    slow = {
        s["row_key"]: s["status"]
        for s in audit.all(
            "SELECT r.row_key, s.status FROM node_states s JOIN rows r "
            "ON r.run_id = s.run_id AND r.row_id = s.row_id WHERE s.run_id = :r AND s.node_id = 'slow'",
            r=audit_run,
        )
    }
    assert {k: slow[k] for k in WAIT_ROWS[:HOLD_AT]} == dict.fromkeys(WAIT_ROWS[:HOLD_AT], "completed")
    assert {slow.get(k) for k in WAIT_ROWS[HOLD_AT:]} == {"completed"}, slow
    _assert_resolution_outcomes(audit, audit_run, slow_states=slow)
    assert_closed(stack, audit, dag_id, run_id, rows=len(WAIT_ROWS), branches=2)


# -- 4. the audit database unreachable during the branches and during the wait --------------------------

OUTAGE_SECONDS = 10
OUTAGE_ROWS = [f"row-{n}" for n in range(24)]


def _outage(stack: AirflowStack, what: str) -> None:
    with audit_db_unreachable(stack):
        note(f"case 4: audit DB unreachable ({what})")
        time.sleep(OUTAGE_SECONDS)  # the fault's length, not an assertion


def test_audit_db_unreachable_during_branches_and_the_wait(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack, dag_id = airflow_stack, "e2e_faults_audit_outage"
    run_id, state = start_run(stack, dag_id)
    try:
        run = _audit_run(audit, dag_id, run_id)
        audit_run = run["run_id"]
        wait_until(
            "steady to be writing rows",
            lambda: (
                audit.scalar(
                    "SELECT count(*) FROM node_states WHERE run_id = :r AND node_id = 'steady'", r=audit_run
                )
                >= 3
            ),
            timeout=180,
        )
        _outage(stack, "while steady writes")
        wait_until(
            "quick and steady to finish after the outage",
            lambda: all(
                stack.task_states(dag_id, run_id).get(task) == "success" for task in ("quick", "steady")
            ),
            timeout=300,
            interval=1,
        )
        states = stack.task_states(dag_id, run_id)
        assert states["gated"] == "running", states
        assert states["join_poke"] == "running" and states["join_deferred"] in ("deferred", "running"), states
        _outage(stack, "while the coalesces wait")
        (state / "release").touch()
        final = stack.wait_run(dag_id, run_id, timeout=300)
    finally:
        (state / "release").touch()
    states = stack.task_states(dag_id, run_id)
    assert final["state"] == "success", states
    assert set(states.values()) == {"success"}, states
    tries = {task: _ti(stack, dag_id, run_id, task)["try_number"] for task in states}
    note(f"case 4: tries {tries}")
    assert tries["join_poke"] == tries["join_deferred"] == 1, tries  # unreachable is "not yet"

    for coalesce in ("join_poke", "join_deferred"):
        decisions = [d for d in audit.decisions(audit_run) if d["node_id"] == coalesce]
        _assert_all_merged(decisions, OUTAGE_ROWS, ["quick", "steady", "gated"])
        summary = xcom_value(stack, dag_id, run_id, f"{coalesce}_finalize", "coalesce_summary")
        assert summary["rows_resolved_by_finalizer"] == 0, summary
    assert _resolutions(audit, audit_run) == 0 and _superseded(audit, audit_run) == []
    tokens = branch_token_outcomes(audit, audit_run)
    assert len(tokens) == 3 * len(OUTAGE_ROWS)
    assert {t["terminal"] for t in tokens} == {1} and {t["outcome"] for t in tokens} == {"coalesced"}
    steady_states = audit.all(
        "SELECT token_id, count(*) AS n FROM node_states WHERE run_id = :r AND node_id = 'steady' "
        "GROUP BY token_id",
        r=audit_run,
    )
    assert len(steady_states) == len(OUTAGE_ROWS) and {s["n"] for s in steady_states} == {1}

    # the outage was felt where it should be
    poke_events = stack.task_log_events(dag_id, run_id, "join_poke")
    unreachable = [e for e in poke_events if "audit store is unreachable" in e]
    assert unreachable, poke_events[-30:]
    task_dir = stack.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / "task_id=join_deferred"
    deferred_logs = {p.name: p.read_text(errors="replace") for p in sorted(task_dir.iterdir())}
    deferred_logs["triggerer.log"] = (stack.proc_dir / "triggerer.log").read_text(errors="replace")
    trigger_noticed = sorted(
        name for name, text in deferred_logs.items() if "coalesce join_deferred: poll failed" in text
    )
    note(f"case 4: join_deferred logs {sorted(deferred_logs)}")
    note(
        f"case 4: join_poke logged {len(unreachable)} unreachable polls; "
        f"trigger noticed the outage: {trigger_noticed}"
    )
    assert trigger_noticed, "the deferred coalesce's trigger never saw the outage"
    for attempt in range(1, tries["steady"]):
        events = stack.task_log_events(dag_id, run_id, "steady", attempt)
        failed = [e for e in events if "failed" in e.lower() or "error" in e.lower()]
        note(f"case 4: steady try {attempt}: {failed[-2:]}")
    assert_closed(stack, audit, dag_id, run_id, rows=len(OUTAGE_ROWS), branches=3)


# -- 5. a branch commit held across the deadline ---------------------------------------------------------

HELD_ROWS = [f"row-{n:02d}" for n in range(60)]
HELD_DEADLINE = timedelta(seconds=40)


def _audit_clock(audit: AuditDB) -> datetime:
    return audit.scalar("SELECT clock_timestamp() AS now")


def test_branch_commit_held_across_the_deadline_is_seen_or_late_never_both(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack, dag_id = airflow_stack, "e2e_faults_held_commit"
    run_id, _ = start_run(stack, dag_id)

    def fork_completed() -> dict[str, Any] | None:
        run = audit.run_of(dag_id, run_id)
        return run if run["completed_at"] is not None else None

    run = wait_until("the fork to complete", fork_completed, timeout=180)
    audit_run = run["run_id"]
    deadline = run["completed_at"] + HELD_DEADLINE
    wait_until(
        "slow to be writing",
        lambda: (
            audit.scalar(
                "SELECT count(*) FROM node_states WHERE run_id = :r AND node_id = 'slow'", r=audit_run
            )
            >= 1
        ),
        timeout=120,
    )
    wait_until(
        "the audit clock to reach 6 s before the deadline",
        lambda: _audit_clock(audit) >= deadline - timedelta(seconds=6),
        timeout=120,
        interval=0.1,
    )
    pg = stack.pg
    locker = psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, dbname=stack.audit_db)
    waiting: dict[int, str] = {}
    try:
        with locker.cursor() as cursor:

            def waiters() -> dict[int, str]:
                # Backends waiting for chunk_progress, and whether each holds a shared chunk advisory
                # lock: a branch writer in the middle of its ordered write (the coalesce takes the
                # exclusive one, and reads chunk_progress before it).
                cursor.execute(
                    "SELECT a.pid, left(a.query, 60), a.state, EXISTS (SELECT 1 FROM pg_locks h "
                    "WHERE h.pid = a.pid AND h.locktype = 'advisory' AND h.mode = 'ShareLock' "
                    "AND h.granted) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.relation = 'chunk_progress'::regclass AND NOT l.granted"
                )
                return {
                    pid: f"{'branch writer' if writer else 'reader'} ({backend_state}: {query})"
                    for pid, query, backend_state, writer in cursor.fetchall()
                }

            def clock() -> datetime:
                cursor.execute("SELECT clock_timestamp()")
                now: datetime = cursor.fetchone()[0]
                return now

            # The coalesce decides a row a second here (slow delivers one a second), each time under
            # the exclusive chunk lock: when it is the one caught waiting for the table, the branch
            # writers wait for its chunk lock instead, so release at once and lock again, until a
            # branch writer is the one held (or 1 s before the deadline: then the test fails).
            while True:
                cursor.execute("LOCK TABLE chunk_progress IN ACCESS EXCLUSIVE MODE")
                locked_at = clock()
                caught = wait_until("a writer to wait for chunk_progress", waiters, timeout=60, interval=0.05)
                waiting.update(caught)
                if any(w.startswith("branch writer") for w in caught.values()):
                    break
                locker.rollback()
                if clock() >= deadline - timedelta(seconds=1):
                    raise E2EError(f"only the coalesce was caught before the deadline: {waiting}")

            def held_long_enough() -> bool:
                waiting.update(waiters())
                writer_held = any(w.startswith("branch writer") for w in waiting.values())
                return clock() >= deadline + timedelta(seconds=4) and writer_held

            try:
                wait_until(
                    "a branch write to be held across the deadline",
                    held_long_enough,
                    timeout=120,
                    interval=0.2,
                )
            except Exception:
                cursor.execute(
                    "SELECT a.pid, a.state, a.wait_event_type, a.wait_event, left(a.query, 120) "
                    "FROM pg_stat_activity a "
                    "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
                )
                note(f"case 5: waiters seen {waiting}; backends now {cursor.fetchall()}")
                raise
            cursor.execute("SELECT clock_timestamp()")
            released_at = cursor.fetchone()[0]
        locker.commit()
    finally:
        locker.close()
    note(
        f"case 5: lock held {locked_at.time()}..{released_at.time()} around deadline {deadline.time()}; "
        f"waiters: {sorted(waiting.values())}"
    )
    final = stack.wait_run(dag_id, run_id, timeout=240)
    assert final["state"] == "success", stack.task_states(dag_id, run_id)

    decisions = {d["key"]: d for d in audit.decisions(audit_run)}
    assert sorted(decisions) == HELD_ROWS
    assert all(d["decision"] == "merged" for d in decisions.values())
    held = audit.all(
        "SELECT r.row_key, s.status, s.recorded_at FROM node_states s JOIN rows r "
        "ON r.run_id = s.run_id AND r.row_id = s.row_id WHERE s.run_id = :r AND s.node_id = 'slow' "
        "AND s.recorded_at >= :locked AND s.recorded_at <= :released ORDER BY s.recorded_at",
        r=audit_run,
        locked=locked_at,
        released=released_at,
    )
    note(
        "case 5: held slow writes "
        + str(
            [
                (h["row_key"], h["status"], f"{(h['recorded_at'] - deadline).total_seconds():+.2f}s")
                for h in held
            ]
        )
    )
    assert held, "no slow write was stamped while the lock was held"
    for h in held:
        consumed = decisions[h["row_key"]]["consumed"]
        if h["recorded_at"] <= deadline:  # stamped before the deadline: the decision saw it
            assert "slow" in consumed, (h, decisions[h["row_key"]])
        else:  # stamped after: recorded late, not merged
            assert "slow" not in consumed, (h, decisions[h["row_key"]])
    assert any(h["recorded_at"] <= deadline for h in held), (
        "the held commit was not stamped before the deadline"
    )
    # every row: slow merged exactly when its arrival was stamped by the deadline
    slow_at = {
        s["row_key"]: s["recorded_at"]
        for s in audit.all(
            "SELECT r.row_key, s.recorded_at FROM node_states s JOIN rows r "
            "ON r.run_id = s.run_id AND r.row_id = s.row_id WHERE s.run_id = :r AND s.node_id = 'slow'",
            r=audit_run,
        )
    }
    for key, d in decisions.items():
        arrived_in_time = key in slow_at and slow_at[key] <= deadline
        assert ("slow" in d["consumed"]) == arrived_in_time, (key, d, slow_at.get(key), deadline)
    done = stack.elspeth("verify", "--json", "--run-id", audit_run)
    checks = [f["check"] for f in json.loads(done.stdout)["findings"]]
    assert "decision_replay" not in checks, done.stdout[-3000:]
    assert_closed(stack, audit, dag_id, run_id, rows=len(HELD_ROWS), branches=2)


# -- 6. the fork's source raises part-way, no retries ----------------------------------------------------


def test_fork_source_raising_part_way_keeps_nothing(airflow_stack: AirflowStack, audit: AuditDB) -> None:
    stack, dag_id = airflow_stack, "e2e_faults_fork_raises"
    run_id, state = start_run(stack, dag_id)
    try:
        run = _audit_run(audit, dag_id, run_id)
        audit_run = run["run_id"]
        wait_until(
            "the fork to write its two chunks",
            lambda: (
                audit.scalar("SELECT count(*) FROM rows WHERE run_id = :r", r=audit_run)
                == FORK_ROWS_PER_WRITE
            ),
            timeout=120,
        )
        assert audit.scalar("SELECT count(*) FROM tokens WHERE run_id = :r", r=audit_run) > 0
        (state / "raise").touch()
        final = stack.wait_run(dag_id, run_id, timeout=240)
    finally:
        (state / "raise").touch()
    states = stack.task_states(dag_id, run_id)
    note(f"case 6: DAG run {final['state']}, tasks {states}")
    assert final["state"] == "failed"
    assert states["fork"] == "failed" and _ti(stack, dag_id, run_id, "fork")["try_number"] == 1
    assert states["left"] == states["right"] == "upstream_failed", states
    assert states["join"] in ("failed", "upstream_failed"), states
    assert states["join_finalize"] == "success", states

    closed = audit.one("SELECT * FROM runs WHERE run_id = :r", r=audit_run)
    assert closed["status"] == "failed", closed
    assert closed["status_reason"].startswith("error:SourceBroke: source connection reset"), closed
    for table in ("rows", "tokens", "node_states", "token_outcomes", "coalesce_decisions", "chunk_progress"):
        assert audit.scalar(f"SELECT count(*) FROM {table} WHERE run_id = :r", r=audit_run) == 0, table
    finalizer = stack.task_log_events(dag_id, run_id, "join_finalize")
    assert any("closed audit runs left running" in e for e in finalizer), finalizer[-20:]
    assert_closed(stack, audit, dag_id, run_id, rows=0, branches=2)


# -- 7. the example DAGs, three runs each, on the real scheduler -------------------------------------

# Three runs of each of the four examples (the never-silent work ran five each, once, and found no
# failure; three keep the whole suite within its 10 minutes on two cores).
RUNS_EACH = 3
EXAMPLES = {
    # dag_id: (coalesce task, its expected state, rows, branches)
    "example_best_effort_union": ("profile", "success", 30, 3),
    "example_enrichment_require_all": ("enriched", "success", 40, 3),  # 2 failed rows, tolerated
    "example_first_mirror": ("fetched", "success", 20, 2),
    "example_llm_consensus": ("consensus", "success", 24, 3),
}
# The LLM example's deadline is 30 s after its fork completed (dags/example_llm_consensus.py): room
# for a scheduler to start its branch tasks, but on an overloaded machine it may start them later
# than that, and the coalesce then fails on its tolerated failure rate, as it would in production.
# Such a run passes only if the trail says exactly that: more failed rows than tolerated, each
# failed at the deadline.
DEADLINE_BOUND = {"example_llm_consensus": (0.25, {str(FailureReason.QUORUM_NOT_MET_AT_TIMEOUT)})}


def _deadline_failure(audit: AuditDB, dag_id: str, audit_run: str, rows: int) -> str | None:
    """Why a failed coalesce of ``dag_id`` is not explained by its deadline (None if it is)."""
    if dag_id not in DEADLINE_BOUND:
        return "no seconds deadline"
    tolerated, reasons = DEADLINE_BOUND[dag_id]
    failed = audit.all(
        "SELECT row_key, failure_reason FROM coalesce_decisions WHERE run_id = :r AND decision = 'failed'",
        r=audit_run,
    )
    if len(failed) <= tolerated * rows:
        return f"{len(failed)} failed rows are within the tolerated rate"
    other = [d for d in failed if d["failure_reason"] not in reasons]
    return f"rows failed for other reasons: {other}" if other else None


@pytest.mark.timeout(1800)
def test_example_dags_three_runs_each_without_a_coalesce_failure(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack = airflow_stack
    for dag_id in EXAMPLES:
        stack.wait_dag(dag_id)
        stack.unpause(dag_id)
    # max_active_runs=3 (tests/e2e/dags/e2e_faults_examples.py): every run side by side.
    runs = {dag_id: [stack.trigger(dag_id) for _ in range(RUNS_EACH)] for dag_id in EXAMPLES}

    def all_ended() -> bool:
        return all(
            stack.dag_run(dag_id, run_id)["state"] in ("success", "failed")
            for dag_id, run_ids in runs.items()
            for run_id in run_ids
        )

    wait_until("every example run to end", all_ended, timeout=1500, interval=3)

    problems = []
    for dag_id, (coalesce, expected, rows, branches) in EXAMPLES.items():
        for run_id in runs[dag_id]:
            dag_run = stack.dag_run(dag_id, run_id)
            tis = {ti["task_id"]: ti for ti in stack.task_instances(dag_id, run_id) if ti["map_index"] < 0}
            took = (
                datetime.fromisoformat(dag_run["end_date"]) - datetime.fromisoformat(dag_run["start_date"])
            ).total_seconds()
            found = (dag_run["state"], tis[coalesce]["state"], tis[coalesce]["try_number"])
            note(
                f"case 7: {dag_id} {run_id}: run {found[0]}, {coalesce} {found[1]} "
                f"try {found[2]}, {took:.0f}s"
            )
            audit_runs = audit.all(
                "SELECT run_id, status FROM runs WHERE dag_id = :d AND airflow_run_id = :r",
                d=dag_id,
                r=run_id,
            )
            if [r["status"] for r in audit_runs] != ["completed"]:
                problems.append((dag_id, run_id, "audit runs", audit_runs))
                continue
            audit_run = audit_runs[0]["run_id"]
            if found == ("failed", "failed", 1):
                unexplained = _deadline_failure(audit, dag_id, audit_run, rows)
                if unexplained:
                    problems.append((dag_id, run_id, found, unexplained))
                    continue
                note(f"case 7: {dag_id} {run_id}: the coalesce failed at its deadline (machine load)")
            elif found != ("success", expected, 1):
                problems.append((dag_id, run_id, found))
                continue
            if tis[f"{coalesce}_finalize"]["state"] != "success":
                problems.append((dag_id, run_id, "finalize", tis[f"{coalesce}_finalize"]["state"]))
                continue
            summary = xcom_value(stack, dag_id, run_id, f"{coalesce}_finalize", "coalesce_summary")
            if summary["rows_resolved_by_finalizer"] != 0:
                problems.append((dag_id, run_id, "rows resolved by the finalizer", summary))
            tokens = branch_token_outcomes(audit, audit_run)
            if len(tokens) != rows * branches or {t["terminal"] for t in tokens} != {1}:
                problems.append(
                    (dag_id, run_id, "token outcomes", len(tokens), {t["terminal"] for t in tokens})
                )
    assert not problems, problems
    for dag_id in EXAMPLES:
        verify_clean(stack, audit, "--dag-id", dag_id)
