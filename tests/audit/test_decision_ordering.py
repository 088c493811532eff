"""A decision never contradicts its stored log, and a coalesce that ended closes what it left open.

The pass decides each chunk in a transaction ordered against that chunk's branch writers (an
exclusive advisory lock against shared ones on PostgreSQL, the write lock on SQLite). These tests
hold a branch writer's commit open across the deadline, after it stamped its events, and check that
the decision waits for it and agrees with a replay of the stored log; then the resolution of rows a
coalesce left undecided (``coalesce_task_<state>``) and its supersession by a later try.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any
from unittest import mock

import pytest
from sqlalchemy import Engine, event, select

from airflow_elspeth.audit import coalesce as coalesce_module
from airflow_elspeth.audit import ids
from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.coalesce import coalesce_pass, supersede_resolutions, waiting_poll
from airflow_elspeth.audit.dml import db_now
from airflow_elspeth.audit.engine import create_audit_engine
from airflow_elspeth.audit.log import read_chunk_log, row_events
from airflow_elspeth.audit.model import CoalesceSpec, load_run, run_number
from airflow_elspeth.audit.read.work import branch_work, decided_in_chunk, decisions_in_chunk
from airflow_elspeth.audit.store import (
    AuditStore,
    ForkRow,
    NodeResult,
    RunIdentity,
)
from airflow_elspeth.core.canonical import hash_value
from airflow_elspeth.core.config import coalesce_config
from airflow_elspeth.core.policy import replay
from airflow_elspeth.core.vocabulary import NodeStatus, NodeType

BRANCHES = ("a", "b")
STEPS = {"a": "ask_a", "b": "ask_b"}
WAIT = 60.0  # an upper bound for any wait on another thread; never reached when things work


def spec(timeout: float, policy: str = "require_all") -> CoalesceSpec:
    config = coalesce_config(branches=list(BRANCHES), policy=policy, timeout=timeout)
    return CoalesceSpec(
        node_id="join", config=config, delivering=STEPS, mapped=dict.fromkeys(BRANCHES, False)
    )


def fork(store: AuditStore, rows: int = 3) -> str:
    run_id = store.begin_run(
        RunIdentity(dag_id="dag", airflow_run_id="r1", fork_task_id="fork", try_number=1),
        branches=BRANCHES,
        chunk_size=1000,
        config={"branches": list(BRANCHES)},
    )
    store.write_fork_chunk(
        run_id, BRANCHES, 0, [ForkRow.from_row(f"k{i}", i, {"id": f"k{i}"}) for i in range(rows)]
    )
    store.complete_run(run_id, rows_total=rows, chunks_total=1)
    for branch, step in STEPS.items():  # as each branch task registers its step before it writes
        store.register_node(run_id, step, NodeType.BRANCH, branch, {"branch": branch, "previous_step": None})
    return run_id


def registered_fork(store: AuditStore, coalesce: CoalesceSpec) -> str:
    """A completed fork with its coalesce registered, as the sensor registers it before its first
    pass (the decisions' policy is read from it)."""
    run_id = fork(store)
    store.register_node(run_id, coalesce.node_id, NodeType.COALESCE, None, coalesce.as_dict())
    return run_id


def row_of(engine: Engine, run_id: str, i: int) -> str:
    """The audit row id of source row ``k<i>`` (its index in the fork's input is ``i``)."""
    with engine.connect() as conn:
        return ids.row_id(run_number(conn, run_id), i)


def token_of(engine: Engine, run_id: str, i: int, branch: str) -> str:
    """The branch token id of source row ``k<i>`` on ``branch``."""
    return ids.branch_token_id(row_of(engine, run_id, i), branch)


def arrivals(store: AuditStore, run_id: str, branch: str, rows: range) -> list[NodeResult]:
    now = datetime.now(timezone.utc)
    results = []
    for i in rows:
        row_id = row_of(store.engine, run_id, i)
        digest, body = hash_value({"answer": f"{branch}{i}"}, what="output")
        results.append(
            NodeResult(
                token_id=ids.branch_token_id(row_id, branch),
                row_id=row_id,
                chunk=0,
                status=NodeStatus.COMPLETED,
                started_at=now,
                completed_at=now,
                output_hash=digest,
                output_body=body,
            )
        )
    return results


def deliver(store: AuditStore, run_id: str, branch: str, rows: range, total: int = 3) -> None:
    store.write_branch_results(
        run_id, STEPS[branch], 1, arrivals(store, run_id, branch, rows), chunk_tokens={0: total}
    )


def decisions(engine: Engine, run_id: str) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {
            d["row_key"]: dict(d)
            for d in conn.execute(select(t.coalesce_decisions).where(t.coalesce_decisions.c.run_id == run_id))
            .mappings()
            .all()
        }


def assert_decisions_replay(engine: Engine, coalesce: CoalesceSpec, run_id: str) -> None:
    """Every stored policy decision is what a replay of the row's stored log, as of now, says."""
    with engine.connect() as conn:
        run = load_run(conn, run_id)
        assert run is not None and run.completed_at is not None
        now = db_now(conn)
        _, states, losses = read_chunk_log(conn, coalesce, run_id, 0, undecided_only=False)
        stored = conn.execute(select(t.coalesce_decisions).where(t.coalesce_decisions.c.run_id == run_id))
        for d in stored.mappings():
            events = row_events(coalesce, states.get(d["row_id"], {}), losses)
            expected = replay(
                coalesce.config, events, deadline=run.completed_at + coalesce.config.timeout, now=now
            )
            assert (d["decision"], d["failure_reason"]) == (
                expected.status.value,
                expected.failure_reason.value if expected.failure_reason else None,
            ), f"row {d['row_key']}: stored {d['decision']}/{d['failure_reason']}, replayed {expected}"
            assert d["decided_at"] == expected.decided_at


class HeldCommit:
    """Holds a writer's transaction open just before it commits: its events are stamped, not visible."""

    def __init__(self, engine: Engine) -> None:
        self.stamped = threading.Event()
        self.release = threading.Event()
        event.listen(engine, "before_cursor_execute", self._hold)

    def _hold(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The progress upsert is the writer's last statement, after its node states are inserted.
        if statement.lstrip().upper().startswith("INSERT INTO CHUNK_PROGRESS") and not self.stamped.is_set():
            self.stamped.set()
            assert self.release.wait(WAIT), "the test never released the held commit"


class LockAttempt:
    """Signals when the pass asks for its ordering lock on the chunk."""

    def __init__(self, engine: Engine) -> None:
        self.asked = threading.Event()
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "pg_advisory_xact_lock(" in statement or statement.strip().upper() == "BEGIN IMMEDIATE":
            self.asked.set()


def run_in_thread(target: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["value"] = target(*args)
        except BaseException as err:  # handed to the test thread, which re-raises it
            outcome["error"] = err

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


def joined(thread: threading.Thread, outcome: dict[str, Any]) -> Any:
    thread.join(WAIT)
    assert not thread.is_alive(), "thread did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def later(engine: Engine) -> datetime:
    """A moment after everything written so far (by the audit clock)."""
    with engine.connect() as conn:
        return db_now(conn) + timedelta(milliseconds=1)


def wait_for_audit_clock(engine: Engine, moment: datetime) -> None:
    """Wait (on the database's own clock) until ``moment`` has passed."""
    done = threading.Event()
    while not done.is_set():
        with engine.connect() as conn:
            if db_now(conn) > moment:
                return
        done.wait(0.05)


@pytest.fixture
def second_engine(audit_url: str, audit_engine: Engine) -> Iterator[Engine]:
    """Another engine on the same database: a writer in another process, as far as the store knows."""
    engine = create_audit_engine(audit_url)
    yield engine
    engine.dispose()


def test_a_commit_held_across_the_deadline_is_seen_by_the_decision(
    audit_engine: Engine, second_engine: Engine
) -> None:
    store = AuditStore(audit_engine)
    coalesce = spec(timeout=3.0)
    run_id = registered_fork(store, coalesce)
    deliver(store, run_id, "a", range(3))
    held = HeldCommit(second_engine)
    writer = run_in_thread(deliver, AuditStore(second_engine), run_id, "b", range(3))
    assert held.stamped.wait(WAIT)
    with audit_engine.connect() as conn:
        run = load_run(conn, run_id)
        assert run is not None and run.completed_at is not None
        deadline = run.completed_at + coalesce.config.timeout
        stamped_before_deadline = db_now(conn) < deadline
    assert stamped_before_deadline, "premise: b's events are stamped before the deadline"

    wait_for_audit_clock(audit_engine, deadline)
    lock = LockAttempt(audit_engine)
    deciding = run_in_thread(coalesce_pass, store, coalesce, run_id, {})
    assert lock.asked.wait(WAIT)  # the pass reached the chunk while b's commit is still held
    held.release.set()
    joined(*writer)
    result = joined(*deciding)

    assert result.done
    stored = decisions(audit_engine, run_id)
    assert {d["decision"] for d in stored.values()} == {"merged"}  # b arrived before the deadline
    assert all(d["decided_at"] < deadline for d in stored.values())
    assert_decisions_replay(audit_engine, coalesce, run_id)


def test_a_write_stamped_after_a_decision_is_late_not_rewritten(
    audit_engine: Engine, second_engine: Engine
) -> None:
    store = AuditStore(audit_engine)
    coalesce = spec(timeout=1.0)
    run_id = registered_fork(store, coalesce)
    deliver(store, run_id, "a", range(3))
    with audit_engine.connect() as conn:
        run = load_run(conn, run_id)
        assert run is not None and run.completed_at is not None
    wait_for_audit_clock(audit_engine, run.completed_at + coalesce.config.timeout)
    assert coalesce_pass(store, coalesce, run_id, {}).done  # incomplete at the deadline
    deliver(AuditStore(second_engine), run_id, "b", range(3))

    stored = decisions(audit_engine, run_id)
    assert {(d["decision"], d["failure_reason"]) for d in stored.values()} == {
        ("failed", "incomplete_branches")
    }
    assert_decisions_replay(audit_engine, coalesce, run_id)  # b's arrivals replay as late
    with audit_engine.connect() as conn:
        outcomes = conn.execute(
            select(t.token_outcomes.c.outcome).where(
                t.token_outcomes.c.run_id == run_id,
                t.token_outcomes.c.is_terminal,
                t.token_outcomes.c.token_id.in_([token_of(audit_engine, run_id, i, "b") for i in range(3)]),
            )
        ).scalars()
        assert set(outcomes) == {"not_arrived"}


def terminal_outcomes(engine: Engine, run_id: str) -> dict[str, list[tuple[str, str | None]]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(t.token_outcomes.c.token_id, t.token_outcomes.c.outcome, t.token_outcomes.c.reason).where(
                t.token_outcomes.c.run_id == run_id, t.token_outcomes.c.is_terminal
            )
        ).all()
    found: dict[str, list[tuple[str, str | None]]] = {}
    for token_id, outcome, reason in rows:
        found.setdefault(token_id, []).append((outcome, reason))
    return found


def test_an_ended_coalesce_resolves_what_it_left_and_a_later_try_decides_afresh(audit_engine: Engine) -> None:
    store = AuditStore(audit_engine)
    coalesce = spec(timeout=600.0)  # the deadline is far: nothing would decide these rows by itself
    run_id = registered_fork(store, coalesce)
    deliver(store, run_id, "a", range(3))
    deliver(store, run_id, "b", range(1))  # k0 can merge; k1 and k2 wait for b
    assert not coalesce_pass(store, coalesce, run_id, {"ask_a": "success", "ask_b": "running"}).done
    with audit_engine.connect() as conn:
        running_try_started = db_now(conn)  # a try that started before its end was resolved

    # The coalesce task ended (killed, no retries left): its finalizer's pass closes every row.
    result = coalesce_pass(
        store, coalesce, run_id, {"ask_a": "success", "ask_b": "running"}, ended_state="failed"
    )
    assert result.done
    stored = decisions(audit_engine, run_id)
    assert stored["k0"]["decision"] == "merged"
    for key in ("k1", "k2"):
        d = stored[key]
        assert (d["decision"], d["failure_reason"]) == ("failed", "coalesce_task_failed")
        assert json.loads(d["missing_json"]) == {"b": "not_arrived"}
        details = json.loads(d["details_json"])
        assert details["arrived"] == ["a"] and details["coalesce_task_state"] == "failed"
    outcomes = terminal_outcomes(audit_engine, run_id)
    branch_tokens = [token_of(audit_engine, run_id, i, b) for i in range(3) for b in BRANCHES]
    assert all(len(outcomes.get(token, [])) == 1 for token in branch_tokens), outcomes

    # The try that was marked ended while it still ran must not undo its own end's resolution.
    assert supersede_resolutions(store, coalesce, run_id, before=running_try_started) == 0
    # A person clears the coalesce: its new try reopens the resolved rows and decides them afresh.
    assert supersede_resolutions(store, coalesce, run_id, before=later(audit_engine)) == 2
    deliver(store, run_id, "b", range(1, 3))
    assert coalesce_pass(store, coalesce, run_id, {"ask_a": "success", "ask_b": "success"}).done
    stored = decisions(audit_engine, run_id)
    assert {key: d["decision"] for key, d in stored.items()} == dict.fromkeys(("k0", "k1", "k2"), "merged")
    outcomes = terminal_outcomes(audit_engine, run_id)
    assert all(len(outcomes.get(token, [])) == 1 for token in branch_tokens), outcomes
    with audit_engine.connect() as conn:
        superseded = conn.execute(select(t.superseded_decisions)).mappings().all()
        kept = conn.execute(
            select(t.token_outcomes.c.reason).where(
                t.token_outcomes.c.run_id == run_id, t.token_outcomes.c.superseded_at.is_not(None)
            )
        ).scalars()
        assert sorted(kept) == sorted(["coalesce_task_failed"] * 2 + ["branch_task_running"] * 2)
    assert sorted(d["row_key"] for d in superseded) == ["k1", "k2"]
    assert {d["failure_reason"] for d in superseded} == {"coalesce_task_failed"}
    assert (
        supersede_resolutions(store, coalesce, run_id, before=later(audit_engine)) == 0
    )  # policy decisions are never reopened


def test_a_branch_still_answers_rows_a_resolution_closed_so_a_later_try_can_merge_them(
    audit_engine: Engine,
) -> None:
    """A resolution closes a row because its coalesce task ended, not because of its data: a branch
    that reaches the row still processes it (its answer is late for now), so when a person clears
    the coalesce its new try has every branch's answer and merges the row. Had the branch skipped
    it, that try could only fail it."""
    store = AuditStore(audit_engine)
    coalesce = spec(timeout=600.0)
    run_id = registered_fork(store, coalesce)
    deliver(store, run_id, "a", range(3))
    deliver(store, run_id, "b", range(1))
    running = {"ask_a": "success", "ask_b": "running"}
    assert coalesce_pass(store, coalesce, run_id, running, ended_state="failed").done
    k0 = row_of(audit_engine, run_id, 0)

    work = branch_work(audit_engine, run_id, STEPS["b"], "b", 0, None, coalesces=["join"])
    assert sorted(item.row_key for item in work.items) == ["k1", "k2"]  # k0 is done
    assert work.decided_tokens == ()
    assert decisions_in_chunk(audit_engine, run_id, 0, coalesces=["join"]) == {k0: "merged"}
    assert decided_in_chunk(audit_engine, run_id, 0, coalesces=["join"]) == {k0}

    # After the resolution, written as the delivering step writes: late for now.
    store.write_branch_results(
        run_id,
        STEPS["b"],
        1,
        arrivals(store, run_id, "b", range(1, 3)),
        chunk_tokens={0: 3},
        delivering_to=["join"],
    )
    branch_tokens = [token_of(audit_engine, run_id, i, b) for i in range(3) for b in BRANCHES]
    outcomes = terminal_outcomes(audit_engine, run_id)
    assert {token: len(outcomes.get(token, [])) for token in branch_tokens} == dict.fromkeys(branch_tokens, 1)
    late = [outcomes[token_of(audit_engine, run_id, i, "b")] for i in (1, 2)]
    assert late == [[("late", "late_arrival_after_failure")]] * 2
    assert supersede_resolutions(store, coalesce, run_id, before=later(audit_engine)) == 2
    assert coalesce_pass(store, coalesce, run_id, {"ask_a": "success", "ask_b": "success"}).done
    stored = decisions(audit_engine, run_id)
    assert {key: d["decision"] for key, d in stored.items()} == dict.fromkeys(("k0", "k1", "k2"), "merged")
    outcomes = terminal_outcomes(audit_engine, run_id)
    assert {token: len(outcomes.get(token, [])) for token in branch_tokens} == dict.fromkeys(branch_tokens, 1)
    assert_decisions_replay(audit_engine, coalesce, run_id)


def test_a_resolution_never_overrides_what_the_policy_can_decide(audit_engine: Engine) -> None:
    store = AuditStore(audit_engine)
    coalesce = spec(timeout=1.0, policy="first")
    run_id = registered_fork(store, coalesce)
    deliver(store, run_id, "a", range(1))
    with audit_engine.connect() as conn:
        run = load_run(conn, run_id)
        assert run is not None and run.completed_at is not None
    wait_for_audit_clock(
        audit_engine, run.completed_at + coalesce.config.timeout + timedelta(milliseconds=10)
    )
    assert coalesce_pass(store, coalesce, run_id, {}, ended_state="failed").done
    stored = decisions(audit_engine, run_id)
    # past the deadline every row is decidable: the policy decides, nothing is "resolved"
    assert stored["k0"]["decision"] == "merged"
    assert {stored[k]["failure_reason"] for k in ("k1", "k2")} == {"first_timeout_no_arrivals"}
    assert_decisions_replay(audit_engine, coalesce, run_id)


def test_the_waiting_poll_says_when_a_pass_would_do_something(audit_engine: Engine) -> None:
    """``waiting_poll`` (the trigger's poll, what the benchmarks time) agrees with the pass it stands
    for: progress that decides nothing does not wake it, and is not replayed again until it changes."""
    store = AuditStore(audit_engine)
    coalesce = spec(timeout=600.0)
    run_id = registered_fork(store, coalesce)
    running = {"ask_a": "running", "ask_b": "running"}
    undecidable: dict[int, str] = {}
    assert waiting_poll(audit_engine, coalesce, run_id, running, undecidable).reason is None
    coalesce_pass(store, coalesce, run_id, running)  # the sensor's first pass: nothing to decide

    deliver(store, run_id, "a", range(3))  # require_all: one branch decides nothing
    found = waiting_poll(audit_engine, coalesce, run_id, running, undecidable)
    assert found.reason is None and found.deadline is not None and found.now is not None
    assert undecidable  # replayed once and remembered ...
    with mock.patch.object(coalesce_module, "decide_chunk", wraps=coalesce_module.decide_chunk) as replays:
        assert waiting_poll(audit_engine, coalesce, run_id, running, undecidable).reason is None
    assert replays.call_count == 0  # ... so not replayed while nothing changed

    deliver(store, run_id, "b", range(1))  # k0 can merge now
    assert (
        waiting_poll(audit_engine, coalesce, run_id, running, undecidable).reason
        == "rows to decide in chunk 0"
    )
    # b's task ended owing k1 and k2: only a pass records that loss, so the poll wakes the task.
    ended = {"ask_a": "success", "ask_b": "failed"}
    assert waiting_poll(audit_engine, coalesce, run_id, ended).reason == "branch task ended: ['ask_b=failed']"
    assert coalesce_pass(store, coalesce, run_id, ended).done
    assert waiting_poll(audit_engine, coalesce, run_id, ended).reason == "every row decided"
    assert waiting_poll(audit_engine, coalesce, "no-such-run", ended).reason == "audit run missing"


# --------------------------------------------------------------------------------------------------
# Fencing: a branch task Airflow declared ended (marked failed by a person, failed by a heartbeat
# timeout) may still be running and write. Whatever it writes after the pass recorded its loss is
# late, never an arrival that changes what a decision saw.

ENDED_B = {"ask_a": "success", "ask_b": "failed"}


def branch_outcomes(engine: Engine, run_id: str, branch: str) -> list[list[tuple[str, str | None]]]:
    outcomes = terminal_outcomes(engine, run_id)
    return [outcomes.get(token_of(engine, run_id, i, branch), []) for i in range(3)]


def assert_told_late(engine: Engine, coalesce: CoalesceSpec, run_id: str, late: str) -> None:
    """The summary and the rows filter tell b's late writes as the token outcomes do: late."""
    from airflow_elspeth.audit.read.decisions import RowFilter, coalesce_summary, decision_rows

    summary = coalesce_summary(engine, coalesce, run_id)
    assert summary["missing_branches"]["b"] == {"rows": 3, "reasons": {late: 3}}
    assert summary["late_arrivals"] == 3
    for max_in_list in (100, 0):  # the IN-list path and the JSON-function path
        for reason, rows in ((late, 3), ("branch_task_failed", 0)):
            flt = RowFilter(decision=None, branch="b", branch_reason=reason)
            found = decision_rows(engine, run_id, "join", flt, max_in_list=max_in_list)
            assert (found.total, len(found.rows)) == (rows, rows), (reason, max_in_list)
            assert all(row.missing["b"] == late for row in found.rows)


def assert_verified(engine: Engine, run_id: str) -> None:
    from airflow_elspeth.audit.read.records import AuditRun
    from airflow_elspeth.audit.read.verify import verify_run

    with engine.connect() as conn:
        run = conn.execute(select(t.runs).where(t.runs.c.run_id == run_id)).mappings().one()
    assert verify_run(engine, AuditRun.from_row(run)) == []


def write_as_delivering_step(store: AuditStore, run_id: str, branch: str, status: NodeStatus) -> None:
    """The branch's answers for every row, as its delivering step writes them (a ``discarded`` one
    is what a writer that read the decision first writes)."""
    results = arrivals(store, run_id, branch, range(3))
    if status is NodeStatus.DISCARDED:
        results = [
            NodeResult(**{**r.__dict__, "status": status, "context": {"late": "late_arrival_after_failure"}})
            for r in results
        ]
    store.write_branch_results(run_id, STEPS[branch], 1, results, chunk_tokens={0: 3}, delivering_to=["join"])


@pytest.mark.parametrize("status", [NodeStatus.COMPLETED, NodeStatus.DISCARDED])
def test_what_an_ended_task_writes_after_its_loss_is_late(audit_engine: Engine, status: NodeStatus) -> None:
    store = AuditStore(audit_engine)
    coalesce = spec(timeout=600.0)
    run_id = registered_fork(store, coalesce)
    deliver(store, run_id, "a", range(3))
    assert coalesce_pass(store, coalesce, run_id, ENDED_B).done  # require_all: b's task loss fails them

    write_as_delivering_step(store, run_id, "b", status)  # the process Airflow declared dead writes

    stored = decisions(audit_engine, run_id)
    assert {(d["decision"], d["failure_reason"]) for d in stored.values()} == {("failed", "branch_lost")}
    assert [json.loads(d["missing_json"]) for d in stored.values()] == [{"b": "branch_task_failed"}] * 3
    assert_decisions_replay(audit_engine, coalesce, run_id)
    assert branch_outcomes(audit_engine, run_id, "b") == [[("late", "late_arrival_after_failure")]] * 3
    assert branch_outcomes(audit_engine, run_id, "a") == [[("row_failed", "branch_lost")]] * 3
    assert_verified(audit_engine, run_id)
    assert_told_late(audit_engine, coalesce, run_id, "late_arrival_after_failure")
    # explain: the replay agrees, and shows b's write beside the log as late
    from airflow_elspeth.audit.read.lineage import explain_row

    [explained] = explain_row(audit_engine, run_id, "k0").replays
    assert explained.agrees
    assert [(e.branch, e.kind) for e in explained.replayed.events] == [("a", "arrival"), ("b", "loss")]
    assert [(e.branch, e.kind) for e in explained.replayed.late_writes] == [("b", "arrival")]


def test_a_write_committed_before_the_loss_is_the_branchs_arrival(audit_engine: Engine) -> None:
    store = AuditStore(audit_engine)
    coalesce = spec(timeout=600.0)
    run_id = registered_fork(store, coalesce)
    deliver(store, run_id, "a", range(3))
    write_as_delivering_step(store, run_id, "b", NodeStatus.COMPLETED)
    assert coalesce_pass(store, coalesce, run_id, ENDED_B).done  # b answered before it was declared ended

    assert {d["decision"] for d in decisions(audit_engine, run_id).values()} == {"merged"}
    assert branch_outcomes(audit_engine, run_id, "b") == [[("coalesced", None)]] * 3
    assert_decisions_replay(audit_engine, coalesce, run_id)
    assert_verified(audit_engine, run_id)


def test_a_write_held_across_the_loss_is_seen_by_the_decision(
    audit_engine: Engine, second_engine: Engine
) -> None:
    """The ended task stamped its answers before the pass came to record its loss, and its commit
    is held: the pass waits for it, so the answers are arrivals and the loss comes after them."""
    store = AuditStore(audit_engine)
    coalesce = spec(timeout=600.0)
    run_id = registered_fork(store, coalesce)
    deliver(store, run_id, "a", range(3))
    held = HeldCommit(second_engine)
    writer = run_in_thread(
        write_as_delivering_step, AuditStore(second_engine), run_id, "b", NodeStatus.COMPLETED
    )
    assert held.stamped.wait(WAIT)
    lock = LockAttempt(audit_engine)
    deciding = run_in_thread(coalesce_pass, store, coalesce, run_id, ENDED_B)
    assert lock.asked.wait(WAIT)
    held.release.set()
    joined(*writer)
    assert joined(*deciding).done

    assert {d["decision"] for d in decisions(audit_engine, run_id).values()} == {"merged"}
    with audit_engine.connect() as conn:
        observed = conn.execute(
            select(t.branch_task_losses.c.observed_at).where(t.branch_task_losses.c.node_id == "ask_b")
        ).scalar_one()
        stamped = set(
            conn.execute(
                select(t.node_states.c.recorded_at).where(t.node_states.c.node_id == "ask_b")
            ).scalars()
        )
    assert max(stamped) < observed
    assert_decisions_replay(audit_engine, coalesce, run_id)
    assert_verified(audit_engine, run_id)


def test_a_fenced_write_never_counts_for_a_row_still_open(audit_engine: Engine) -> None:
    """``first``: b's task loss leaves the rows open; b's dead process then answers, and a answers
    after it. The rows merge with a alone: b's answer came from a task already counted as gone."""
    store = AuditStore(audit_engine)
    coalesce = spec(timeout=600.0, policy="first")
    run_id = registered_fork(store, coalesce)
    assert not coalesce_pass(store, coalesce, run_id, {"ask_a": "running", "ask_b": "failed"}).done
    write_as_delivering_step(store, run_id, "b", NodeStatus.COMPLETED)
    assert not coalesce_pass(store, coalesce, run_id, {"ask_a": "running", "ask_b": "failed"}).done
    deliver(store, run_id, "a", range(3))
    assert coalesce_pass(store, coalesce, run_id, {"ask_a": "success", "ask_b": "failed"}).done

    stored = decisions(audit_engine, run_id)
    assert [(d["decision"], json.loads(d["consumed"])) for d in stored.values()] == [("merged", ["a"])] * 3
    assert branch_outcomes(audit_engine, run_id, "b") == [[("late", "late_arrival_after_merge")]] * 3
    assert_decisions_replay(audit_engine, coalesce, run_id)
    assert_verified(audit_engine, run_id)
    assert_told_late(audit_engine, coalesce, run_id, "late_arrival_after_merge")


def registered_by_0_1(store: AuditStore, coalesce: CoalesceSpec) -> str:
    """A completed fork whose coalesce 0.1 registered: its stored spec has no ``fenced`` key."""
    run_id = fork(store)
    config = {k: v for k, v in coalesce.as_dict().items() if k != "fenced"}
    store.register_node(run_id, coalesce.node_id, NodeType.COALESCE, None, config)
    return run_id


def test_a_0_1_decision_taken_at_a_loss_then_contradicted_by_a_late_write_verifies(
    audit_engine: Engine,
) -> None:
    """What 0.1 left when a branch marked failed kept writing: the decision at its task's loss, the
    write after it. 0.1's own verify replayed the write as an arrival and disagreed; the decision is
    now replayed from the log as its pass could see it, and agrees, nothing rewritten."""
    store = AuditStore(audit_engine)
    as_0_1 = replace(spec(timeout=600.0), fenced=False)
    run_id = registered_by_0_1(store, as_0_1)
    deliver(store, run_id, "a", range(3))
    assert coalesce_pass(store, as_0_1, run_id, ENDED_B).done
    deliver(store, run_id, "b", range(3))  # 0.1's writer: no outcome of a task's loss relabelled

    assert {d["failure_reason"] for d in decisions(audit_engine, run_id).values()} == {"branch_lost"}
    assert branch_outcomes(audit_engine, run_id, "b") == [[("lost", "branch_task_failed")]] * 3
    assert_verified(audit_engine, run_id)
    from airflow_elspeth.audit.read.lineage import explain_row

    [explained] = explain_row(audit_engine, run_id, "k0").replays
    assert explained.agrees
    assert [(e.branch, e.kind) for e in explained.replayed.late_writes] == [("b", "arrival")]


def test_a_0_1_decision_that_counted_a_write_after_a_loss_verifies_as_it_was_made(
    audit_engine: Engine,
) -> None:
    """0.1 counted an ended task's write, made after its loss and before the decision, as an
    arrival. That decision stands as made (downstream tasks used it) and replays the same."""
    store = AuditStore(audit_engine)
    as_0_1 = replace(spec(timeout=600.0, policy="first"), fenced=False)
    run_id = registered_by_0_1(store, as_0_1)
    assert not coalesce_pass(store, as_0_1, run_id, {"ask_a": "running", "ask_b": "failed"}).done
    deliver(store, run_id, "b", range(3))
    assert coalesce_pass(store, as_0_1, run_id, {"ask_a": "running", "ask_b": "failed"}).done

    stored = decisions(audit_engine, run_id)
    assert [(d["decision"], json.loads(d["consumed"])) for d in stored.values()] == [("merged", ["b"])] * 3
    assert_verified(audit_engine, run_id)
