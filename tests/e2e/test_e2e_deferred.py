"""The deferrable coalesce on the real scheduler + triggerer: deferred while the branches run (no
worker slot, no pool slot), and deciding at its deadline although a branch hangs, which then skips
the rows decided while it hangs; ended at ``fork_wait_timeout`` when its fork has not completed; and
never blocking the triggerer's event loop (the last test reads the triggerer's log)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta

import pytest
from e2e_harness import AirflowStack, AuditDB, task_log_tail, verify_clean, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(420)]

DAG_ID = "e2e_deferred_deadline"
BRANCHES = ("fast", "steady", "hung")
DEADLINE = timedelta(seconds=25)


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment.replace("Z", "+00:00"))


def test_deferred_without_a_slot_while_branches_run_then_decides_at_the_deadline(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack = airflow_stack
    stack.set_pool("e2e_slots", 3, "e2e: exactly the three branches")
    stack.wait_dag(DAG_ID)
    stack.unpause(DAG_ID)
    state_dir = stack.state_dir / DAG_ID
    state_dir.mkdir(parents=True, exist_ok=True)
    run_id = stack.trigger(DAG_ID)

    observations: list[dict] = []

    def coalesce_ended() -> bool:
        states = stack.task_states(DAG_ID, run_id)
        pool = stack.api("GET", "/api/v2/pools/e2e_slots")
        observations.append({"at": time.monotonic(), "states": states, "pool": pool})
        return states.get("consensus") in ("success", "failed", "skipped")

    wait_until("the coalesce to decide while 'hung' hangs", coalesce_ended, timeout=150, interval=0.5)

    # -- it waited deferred, holding no slot, while every branch was running ----------------------
    deferred_while_branches_ran = [
        o
        for o in observations
        if o["states"].get("consensus") == "deferred"
        and all(o["states"].get(b) == "running" for b in BRANCHES)
    ]
    assert deferred_while_branches_ran, (
        "never saw the coalesce deferred while all branches ran; states seen: "
        f"{[o['states'] for o in observations[::4]]}"
    )
    full = [o for o in deferred_while_branches_ran if o["pool"]["running_slots"] == 3]
    assert full, f"pool never full while deferred: {[o['pool'] for o in deferred_while_branches_ran]}"
    assert all(o["pool"]["open_slots"] == 0 for o in full)  # the coalesce could not have had a slot
    ran_states = {o["states"].get("consensus") for o in observations}
    assert "deferred" in ran_states

    # -- it decided at the deadline, 'hung' still running -----------------------------------------
    tis = {ti["task_id"]: ti for ti in stack.task_instances(DAG_ID, run_id)}
    assert tis["consensus"]["state"] == "success", tis["consensus"]
    assert tis["hung"]["state"] == "running"
    assert tis["fast"]["state"] == tis["steady"]["state"] == "success"
    run = audit.run_of(DAG_ID, run_id)
    deadline = run["completed_at"] + DEADLINE
    ended = _parse(tis["consensus"]["end_date"])
    assert ended >= deadline, f"coalesce ended {ended} before the deadline {deadline}"
    assert ended - deadline < timedelta(seconds=30), f"coalesce ended {ended - deadline} after the deadline"

    decisions = audit.decisions(run["run_id"])
    assert [d["key"] for d in decisions] == [f"row-{n}" for n in range(6)]
    for d in decisions:
        assert d["decision"] == "merged", d
        assert sorted(d["consumed"]) == ["fast", "steady"]
        assert d["missing_json"] == {"hung": "not_arrived"}
        assert d["details_json"]["branch_task_states"] == {"hung": "running"}
        assert d["decided_at"] == deadline, "a deadline decision is timed at the deadline"

    def outcomes() -> dict[tuple[str, str], int]:
        found = audit.all(
            "SELECT t.branch_name, o.outcome, count(*) AS n FROM token_outcomes o JOIN tokens t "
            "ON t.token_id = o.token_id WHERE o.run_id = :run AND t.token_kind = 'branch' "
            "AND o.is_terminal GROUP BY t.branch_name, o.outcome ORDER BY 1",
            run=run["run_id"],
        )
        return {(o["branch_name"], o["outcome"]): o["n"] for o in found}

    # 'hung', still blocked on its first row, skips the five others once the trigger decided them
    # (the branch reads its chunk's decisions every 0.25 s; the trigger writes them at the deadline)
    wait_until(
        "'hung' to skip the rows decided while it hangs",
        lambda: ("hung", "skipped") in outcomes(),
        timeout=30,
    )
    wait_until("all five", lambda: outcomes().get(("hung", "skipped")) == 5, timeout=30)
    assert outcomes() == {
        ("fast", "coalesced"): 6,
        ("steady", "coalesced"): 6,
        ("hung", "not_arrived"): 1,
        ("hung", "skipped"): 5,
    }
    merged = audit.all(
        "SELECT p.body FROM tokens t JOIN node_states s ON s.token_id = t.token_id "
        "JOIN payloads p ON p.hash = s.output_ref WHERE t.run_id = :run AND t.token_kind = 'merged'",
        run=run["run_id"],
    )
    assert len(merged) == 6 and all('"fast"' in m["body"] and '"steady"' in m["body"] for m in merged)

    # -- released, 'hung' delivers its first row late: recorded, never merged; the run ends clean --
    (state_dir / "release").touch()
    final = stack.wait_run(DAG_ID, run_id, timeout=120)
    assert final["state"] == "success"
    hung_states = audit.all(
        "SELECT status, count(*) AS n FROM node_states "
        "WHERE run_id = :run AND node_id = 'hung' GROUP BY status",
        run=run["run_id"],
    )
    assert {s["status"]: s["n"] for s in hung_states} == {"discarded": 1}
    assert outcomes()[("hung", "late")] == 1
    assert audit.scalar("SELECT count(*) FROM coalesce_decisions WHERE run_id = :run", run=run["run_id"]) == 6
    verify_clean(stack, audit, "--run-id", run["run_id"])


FORK_WAIT_DAG = "e2e_deferred_fork_wait"
# How far before a trigger's first log line (after its last) a blocked-loop warning is still its.
STALL_LOG_SLACK = timedelta(seconds=2)


def test_deferred_before_a_fork_that_does_not_complete_it_ends_at_fork_wait_timeout(
    airflow_stack: AirflowStack, audit: AuditDB
) -> None:
    stack = airflow_stack
    stack.wait_dag(FORK_WAIT_DAG)
    stack.unpause(FORK_WAIT_DAG)
    state_dir = stack.state_dir / FORK_WAIT_DAG
    state_dir.mkdir(parents=True, exist_ok=True)
    run_id = stack.trigger(FORK_WAIT_DAG)
    try:
        seen: set[str | None] = set()

        def coalesce_ended() -> bool:
            states = stack.task_states(FORK_WAIT_DAG, run_id)
            seen.add(states.get("consensus"))
            assert states.get("fork") in (None, "scheduled", "queued"), states  # held behind the gate
            return states.get("consensus") in ("success", "failed", "skipped", "up_for_retry")

        wait_until("the coalesce to give up waiting for its fork", coalesce_ended, timeout=150)
    finally:
        (state_dir / "release").touch()
    assert "deferred" in seen, seen
    consensus = {ti["task_id"]: ti for ti in stack.task_instances(FORK_WAIT_DAG, run_id)}["consensus"]
    assert (consensus["state"], consensus["try_number"]) == ("failed", 1), consensus  # no retry
    log = task_log_tail(
        stack.home
        / "logs"
        / f"dag_id={FORK_WAIT_DAG}"
        / f"run_id={run_id}"
        / "task_id=consensus"
        / "attempt=1.log",
        200,
    )
    # the trigger woke it at fork_wait_timeout; the resumed task ended as a reschedule-mode poke does
    assert "resumed by the trigger (fork fork has not completed by" in log, log
    assert (
        "AirflowSensorTimeout: consensus: fork 'fork' did not complete within fork_wait_timeout (0:00:20)"
        in log
    ), log
    waited = _parse(consensus["end_date"]) - _parse(consensus["start_date"])
    assert timedelta(seconds=20) <= waited < timedelta(minutes=10), waited

    # released, the fork completes; the finalizer closes what the coalesce will never decide
    final = stack.wait_run(FORK_WAIT_DAG, run_id, timeout=180)
    assert final["state"] == "failed"
    states = stack.task_states(FORK_WAIT_DAG, run_id)
    assert states["consensus_finalize"] == states["fork"] == "success", states
    run = audit.run_of(FORK_WAIT_DAG, run_id)
    assert len(audit.decisions(run["run_id"])) == len(range(4))
    verify_clean(stack, audit, "--run-id", run["run_id"])


def _log_moment(line: str) -> datetime:
    """The timestamp a triggerer or task log line starts with (``2026-01-01T00:00:00.000000Z ...``)."""
    return _parse(line.split()[0])


def test_the_triggerer_loop_was_never_blocked_while_a_coalesce_trigger_ran(
    airflow_stack: AirflowStack,
) -> None:
    """Across the deferred coalesces this deployment ran so far (this module's, and those of any
    module that ran before it on it; this test runs last in the module), the triggerer never logged
    its event loop deadlocked (no word from the loop for ``runner_health_check_threshold``), nor
    blocked (beyond ``[triggerer] blocked_main_thread_warning_threshold``, 1 s in this suite:
    e2e_harness.py says why) while one of their triggers was being created or running; a stall
    outside every trigger's lifetime is the machine's, not ours."""
    lifetimes = []
    for path in (airflow_stack.home / "logs").glob("dag_id=*/**/*.trigger.*.log"):
        lines = [
            json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.startswith("{")
        ]
        # a stall is logged when it ends: one caused by creating the trigger precedes its first line
        lifetimes.append(
            (
                _parse(lines[0]["timestamp"]) - STALL_LOG_SLACK,
                _parse(lines[-1]["timestamp"]) + STALL_LOG_SLACK,
            )
        )
    assert lifetimes, "no trigger ran"
    log = (airflow_stack.proc_dir / "triggerer.log").read_text(errors="replace").splitlines()
    deadlocked = [line for line in log if "appears deadlocked" in line]
    blocked = [line for line in log if "async thread was blocked" in line]
    ours = [line for line in blocked if any(start <= _log_moment(line) <= end for start, end in lifetimes)]
    assert deadlocked + ours == [], "\n".join(deadlocked + ours)
