"""CoalesceTrigger with the Task SDK mocked (no Airflow processes): serialisation, when it fires and
when it does not, its deadline, its cost. In addition to the e2e tests on the real triggerer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from unittest import mock

import pytest
from sqlalchemy import Engine, text

from airflow_elspeth.audit import coalesce as pass_module
from airflow_elspeth.audit import service as service_module
from airflow_elspeth.audit.coalesce import coalesce_pass
from airflow_elspeth.audit.ids import branch_token_id, row_id
from airflow_elspeth.audit.model import CoalesceSpec, run_number
from airflow_elspeth.audit.read.records import Finding
from airflow_elspeth.audit.store import (
    COMPLETED,
    AuditStore,
    ForkRow,
    NodeResult,
    RunIdentity,
)
from airflow_elspeth.core.canonical import hash_value
from airflow_elspeth.core.config import coalesce_config
from airflow_elspeth.triggers import coalesce as trigger_module
from airflow_elspeth.triggers.coalesce import CoalesceTrigger

DAG_ID, AIRFLOW_RUN = "dag", "manual__1"
BRANCHES = ["left", "right"]
ROWS = 6
# The longest a test waits for an event it expects (it returns as soon as the event comes): generous,
# so that a slow or loaded machine only makes the test slower. Windows in which nothing may happen
# stay short: a slow machine cannot produce an event that should not exist.
EVENT_WAIT = 120.0


def make_spec(policy: str = "require_all", timeout: float = 600.0, *, mapped: bool = False) -> CoalesceSpec:
    config = coalesce_config(
        branches=BRANCHES,
        policy=policy,
        merge="union",
        timeout=timedelta(seconds=timeout),
        quorum=1 if policy == "quorum" else None,
    )
    return CoalesceSpec(
        node_id="consensus",
        config=config,
        delivering={b: f"ask_{b}" for b in BRANCHES},
        mapped=dict.fromkeys(BRANCHES, mapped),
    )


def fork(engine: Engine, *, chunk_size: int = ROWS, complete: bool = True) -> str:
    store = AuditStore(engine)
    run_id = store.begin_run(
        RunIdentity(dag_id=DAG_ID, airflow_run_id=AIRFLOW_RUN, fork_task_id="fork", try_number=1),
        branches=BRANCHES,
        chunk_size=chunk_size,
        config={"branches": BRANCHES},
    )
    for chunk, start in enumerate(range(0, ROWS, chunk_size)):
        rows = []
        for index in range(start, min(ROWS, start + chunk_size)):
            digest, body = hash_value({"id": f"k{index}", "n": index}, what="row")
            rows.append(ForkRow(row_key=f"k{index}", row_index=index, payload_hash=digest, payload_body=body))
        store.write_fork_chunk(run_id, BRANCHES, chunk, rows)
    if complete:
        store.complete_run(run_id, rows_total=ROWS, chunks_total=-(-ROWS // chunk_size))
    return run_id


def deliver(
    engine: Engine, run_id: str, branch: str, *, chunk_size: int = ROWS, rows: range = range(ROWS)
) -> None:
    """Every row of ``rows`` (default all) of ``branch`` arrives at its delivering node."""
    store = AuditStore(engine)
    now = datetime.now(timezone.utc)
    with engine.connect() as conn:
        run_no = run_number(conn, run_id)
    results = []
    for index in rows:
        row = row_id(run_no, index)
        digest, body = hash_value({branch: index}, what="output")
        results.append(
            NodeResult(
                token_id=branch_token_id(row, branch),
                row_id=row,
                chunk=index // chunk_size,
                status=COMPLETED,
                started_at=now,
                completed_at=now,
                output_hash=digest,
                output_body=body,
            )
        )
    chunks = {r.chunk for r in results}
    store.write_branch_results(
        run_id,
        f"ask_{branch}",
        1,
        results,
        chunk_tokens={c: min(chunk_size, ROWS - c * chunk_size) for c in chunks},
    )


def decisions(engine: Engine, run_id: str) -> dict[int, str]:
    """Row index -> decision of the rows decided so far."""
    with engine.connect() as conn:
        found = conn.execute(
            text("SELECT row_key, decision FROM coalesce_decisions WHERE run_id = :r"), {"r": run_id}
        ).all()
    return {int(key[1:]): decision for key, decision in found}


async def until_written(
    trigger: CoalesceTrigger, engine: Engine, run_id: str, rows: int
) -> dict[str, Any] | None:
    """Run the trigger until ``rows`` decisions are written; its event, if it fired meanwhile."""
    events: list[dict[str, Any]] = []

    async def take() -> None:
        async for event in trigger.run():
            events.append(dict(event.payload))
            return

    task = asyncio.create_task(take())
    started = time.monotonic()
    while len(decisions(engine, run_id)) < rows and not task.done():
        assert time.monotonic() - started < EVENT_WAIT, "the trigger never wrote the decisions"
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return events[0] if events else None


class FakeTaskSDK:
    """``RuntimeTaskInstance.get_task_states`` answering from a dict, recording every call
    (``respond``, which a test may replace with a slower one)."""

    def __init__(self, states: dict[str, str] | None = None) -> None:
        self.states: dict[str, str] = dict(states or {})
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.respond(*args, **kw)

    def respond(
        self, dag_id: str, task_ids: list[str] | None = None, run_ids: list[str] | None = None, **kw: Any
    ) -> Any:
        self.calls.append({"dag_id": dag_id, "task_ids": list(task_ids or []), "run_ids": run_ids})
        found = {
            key: state
            for key, state in self.states.items()
            if any(key == task_id or key.startswith(f"{task_id}_") for task_id in task_ids or [])
        }
        return {AIRFLOW_RUN: found}


@pytest.fixture
def sdk() -> Iterator[FakeTaskSDK]:
    fake = FakeTaskSDK({"ask_left": "running", "ask_right": "running", "fork": "success"})
    with mock.patch(
        "airflow.sdk.execution_time.task_runner.RuntimeTaskInstance.get_task_states", side_effect=fake
    ):
        yield fake


@pytest.fixture
def store_url(audit_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The audit DB as the connection ``elspeth_audit_default`` (what the triggerer resolves)."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_ELSPETH_AUDIT_DEFAULT",
        json.dumps({"conn_type": "elspeth", "extra": {"sqlalchemy_url": audit_url}}),
    )
    monkeypatch.setattr(trigger_module, "MIN_DEFERRAL_SECONDS", 0.0)
    return audit_url


def new_trigger(
    spec: CoalesceSpec, run_id: str | None, poll: float = 0.2, fork_wait_until: datetime | None = None
) -> CoalesceTrigger:
    return CoalesceTrigger(
        spec=spec.as_dict(),
        run_id=run_id,
        dag_id=DAG_ID,
        airflow_run_id=AIRFLOW_RUN,
        poll_interval=poll,
        fork_task_id="fork",
        fork_wait_until=fork_wait_until,
    )


async def first_event(trigger: CoalesceTrigger, timeout: float) -> dict[str, Any] | None:
    """The trigger's first event payload, or None when it stays quiet for ``timeout`` seconds."""

    async def take() -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise AssertionError("trigger ended without an event")

    try:
        return await asyncio.wait_for(take(), timeout)
    except asyncio.TimeoutError:
        return None


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def sensor_pass(engine: Engine, spec: CoalesceSpec, run_id: str, states: dict[str, str]) -> None:
    """What the sensor does before deferring: one pass, which records the signatures it evaluated."""
    coalesce_pass(AuditStore(engine), spec, run_id, states)


# -- serialisation ----------------------------------------------------------------------------------


def test_serializes_and_reinstantiates_through_the_triggerer_encoding() -> None:
    from airflow.models.trigger import Trigger
    from airflow.serialization.decoders import smart_decode_trigger_kwargs

    original = new_trigger(
        make_spec("quorum"), "run-1", poll=7.5, fork_wait_until=datetime(2026, 1, 1, 6, tzinfo=timezone.utc)
    )
    classpath, kwargs = original.serialize()
    assert classpath == "airflow_elspeth.triggers.coalesce.CoalesceTrigger"
    # the triggerer's path: encrypted at defer time, decrypted and decoded in the trigger runner
    stored = Trigger._decrypt_kwargs(Trigger.encrypt_kwargs(kwargs))
    decoded = {k: smart_decode_trigger_kwargs(v) for k, v in stored.items()}
    again = CoalesceTrigger(**decoded)
    assert again.serialize() == (classpath, kwargs)
    assert CoalesceSpec.from_dict(again.spec) == make_spec("quorum")
    # the Task SDK's DeferTask message carries the kwargs through serde as well
    from airflow.sdk.serde import deserialize, serialize

    assert CoalesceTrigger(**deserialize(serialize(kwargs))).serialize() == (classpath, kwargs)
    # before its fork completed, it is serialised without an audit run
    waiting = new_trigger(make_spec(), None)
    assert CoalesceTrigger(**waiting.serialize()[1]).serialize() == waiting.serialize()
    # one deferred by a release without fork_wait_until comes back from its stored kwargs
    stored_by_0_1 = {k: v for k, v in kwargs.items() if k != "fork_wait_until"}
    assert CoalesceTrigger(**stored_by_0_1).fork_wait_until is None


def test_needs_the_run_or_the_fork() -> None:
    with pytest.raises(ValueError, match="fork_task_id"):
        CoalesceTrigger(spec=make_spec().as_dict(), run_id=None, dag_id=DAG_ID, airflow_run_id=AIRFLOW_RUN)


# -- when it fires ----------------------------------------------------------------------------------


def test_fires_at_the_deadline_although_nothing_happens(store_url: str, sdk: FakeTaskSDK) -> None:
    from airflow_elspeth.audit.engine import engine_for_url

    engine = engine_for_url(store_url)
    spec = make_spec(timeout=3.0)
    run_id = fork(engine)
    sensor_pass(engine, spec, run_id, sdk.states)
    trigger = new_trigger(spec, run_id, poll=60.0)  # a poll interval far beyond the deadline
    started = time.monotonic()
    event = run(first_event(trigger, timeout=EVENT_WAIT))
    waited = time.monotonic() - started
    assert event is not None and event["status"] == "ready" and event["run_id"] == run_id
    assert event["reason"] == "every row decided"
    # woken by the deadline (3 s after the fork), not by the 60 s poll interval
    assert waited < 30.0
    # it decided every row at the deadline itself: the pass the task resumes with finds nothing left
    result = coalesce_pass(AuditStore(engine), spec, run_id, sdk.states)
    assert result.done and result.newly_decided == 0


def test_progress_that_decides_nothing_does_not_wake_the_task(store_url: str, sdk: FakeTaskSDK) -> None:
    from airflow_elspeth.audit.engine import engine_for_url

    engine = engine_for_url(store_url)
    spec = make_spec("require_all")
    run_id = fork(engine)
    sensor_pass(engine, spec, run_id, sdk.states)
    deliver(engine, run_id, "left")  # require_all: half the branches decide nothing
    trigger = new_trigger(spec, run_id, poll=0.1)
    assert run(first_event(trigger, timeout=4.0)) is None
    assert trigger._undecidable  # replayed once, remembered, not replayed on every poll
    with mock.patch.object(pass_module, "decide_chunk", wraps=pass_module.decide_chunk) as replays:
        assert run(first_event(trigger, timeout=1.0)) is None
    assert replays.call_count == 0

    deliver(engine, run_id, "right")
    event = run(first_event(trigger, timeout=EVENT_WAIT))
    assert event is not None and event["reason"] == "every row decided"


def test_quorum_reached_is_decided_in_the_triggerer(store_url: str, sdk: FakeTaskSDK) -> None:
    from airflow_elspeth.audit.engine import engine_for_url

    engine = engine_for_url(store_url)
    spec = make_spec("first")
    run_id = fork(engine)
    sensor_pass(engine, spec, run_id, sdk.states)
    deliver(engine, run_id, "right")
    event = run(first_event(new_trigger(spec, run_id), timeout=EVENT_WAIT))
    assert event is not None and event["reason"] == "every row decided"
    assert decisions(engine, run_id) == dict.fromkeys(range(ROWS), "merged")


def test_decides_rows_while_the_task_stays_deferred(store_url: str, sdk: FakeTaskSDK) -> None:
    """Rows decidable before the others are written at once (a branch then skips them), without
    waking the task: it resumes once, when every row is decided."""
    from airflow_elspeth.audit.engine import engine_for_url

    engine = engine_for_url(store_url)
    spec = make_spec("first")
    run_id = fork(engine, chunk_size=2)
    sensor_pass(engine, spec, run_id, sdk.states)
    deliver(engine, run_id, "right", chunk_size=2, rows=range(4))  # chunks 0 and 1; chunk 2 waits
    trigger = new_trigger(spec, run_id, poll=0.1)
    # no wall-clock window needed for the decision: wait for it to be written, the trigger running
    event = run(until_written(trigger, engine, run_id, rows=4))
    assert event is None, "woke the task while a chunk was still undecided"
    assert decisions(engine, run_id) == dict.fromkeys(range(4), "merged")
    deliver(engine, run_id, "left", chunk_size=2, rows=range(4, ROWS))
    event = run(first_event(trigger, timeout=EVENT_WAIT))
    assert event is not None and event["reason"] == "every row decided"
    assert decisions(engine, run_id) == dict.fromkeys(range(ROWS), "merged")


def test_a_branch_task_that_ended_owing_tokens_wakes_it(store_url: str, sdk: FakeTaskSDK) -> None:
    from airflow_elspeth.audit.engine import engine_for_url

    engine = engine_for_url(store_url)
    spec = make_spec("require_all")
    run_id = fork(engine)
    deliver(engine, run_id, "left")
    sensor_pass(engine, spec, run_id, sdk.states)
    # left ended after delivering everything: nothing to record, stays asleep
    sdk.states["ask_left"] = "success"
    trigger = new_trigger(spec, run_id, poll=0.1)
    assert run(first_event(trigger, timeout=3.0)) is None
    # right failed owing every token: the trigger records the loss and fails the rows at once
    sdk.states["ask_right"] = "failed"
    event = run(first_event(trigger, timeout=EVENT_WAIT))
    assert event is not None and event["reason"] == "every row decided"
    assert decisions(engine, run_id) == dict.fromkeys(range(ROWS), "failed")


def test_every_row_decided(store_url: str, sdk: FakeTaskSDK) -> None:
    from airflow_elspeth.audit.engine import engine_for_url

    engine = engine_for_url(store_url)
    spec = make_spec("best_effort")
    run_id = fork(engine)
    deliver(engine, run_id, "left")
    deliver(engine, run_id, "right")
    time.sleep(2.5)  # let the deliveries settle
    assert coalesce_pass(AuditStore(engine), spec, run_id, sdk.states).done
    event = run(first_event(new_trigger(spec, run_id), timeout=EVENT_WAIT))
    assert event is not None and event["reason"] == "every row decided"


def test_deferred_before_the_fork_it_adopts_the_forks_audit_run(store_url: str, sdk: FakeTaskSDK) -> None:
    from airflow_elspeth.audit.engine import engine_for_url

    engine = engine_for_url(store_url)
    spec = make_spec("require_all")
    sdk.states["fork"] = "running"
    run_id = fork(engine, complete=False)
    trigger = new_trigger(spec, None, poll=0.1)
    assert run(first_event(trigger, timeout=1.5)) is None and trigger.run_id is None
    AuditStore(engine).complete_run(run_id, rows_total=ROWS, chunks_total=1)
    sdk.states["fork"] = "success"
    # adopts the run without waking the task: nothing is decidable yet
    assert run(first_event(trigger, timeout=2.0)) is None
    assert trigger.run_id == run_id
    sdk.states["fork"] = "failed"  # irrelevant once adopted
    deliver(engine, run_id, "left")
    deliver(engine, run_id, "right")
    event = run(first_event(trigger, timeout=EVENT_WAIT))
    assert event is not None and event["run_id"] == run_id


def test_a_fork_that_failed_wakes_it_to_fail(store_url: str, sdk: FakeTaskSDK) -> None:
    sdk.states["fork"] = "upstream_failed"
    event = run(first_event(new_trigger(make_spec(), None, poll=0.1), timeout=EVENT_WAIT))
    assert (
        event is not None and event["reason"] == "fork fork ended upstream_failed" and event["run_id"] is None
    )


def test_a_fork_not_complete_by_fork_wait_until_wakes_it(store_url: str, sdk: FakeTaskSDK) -> None:
    """The trigger keeps the sensor's fork_wait_timeout itself (the resumed task then ends as a
    reschedule-mode poke would: tests/unit/test_operator_units.py), woken by it, not by its poll."""
    sdk.states["fork"] = "running"
    until = datetime.now(timezone.utc) + timedelta(seconds=2)
    trigger = new_trigger(make_spec(), None, poll=60.0, fork_wait_until=until)
    started = time.monotonic()
    event = run(first_event(trigger, timeout=EVENT_WAIT))
    assert datetime.now(timezone.utc) >= until
    assert time.monotonic() - started < 30.0  # the wait's end woke it, not the 60 s poll interval
    assert event is not None and event["status"] == "ready" and event["run_id"] is None
    assert event["reason"] == f"fork fork has not completed by {until.isoformat()} (fork_wait_timeout)"


def test_a_fork_that_completes_in_time_is_adopted_whatever_fork_wait_until(
    store_url: str, sdk: FakeTaskSDK
) -> None:
    from airflow_elspeth.audit.engine import engine_for_url

    run_id = fork(engine_for_url(store_url))
    past = datetime.now(timezone.utc) - timedelta(seconds=1)  # succeeded: the limit no longer matters
    trigger = new_trigger(make_spec(), None, poll=0.1, fork_wait_until=past)
    assert run(first_event(trigger, timeout=1.5)) is None
    assert trigger.run_id == run_id


def test_reads_task_states_one_task_id_per_call(store_url: str, sdk: FakeTaskSDK) -> None:
    from airflow_elspeth.audit.engine import engine_for_url

    engine = engine_for_url(store_url)
    spec = make_spec("require_all", mapped=True)
    run_id = fork(engine, chunk_size=2)
    sdk.states = {
        "ask_left_0": "running",
        "ask_left_1": "success",
        "ask_right_2": "failed",
        "fork": "success",
    }
    states = run(new_trigger(spec, run_id).task_states(spec))
    assert states == {"ask_left_0": "running", "ask_left_1": "success", "ask_right_2": "failed"}
    assert [c["task_ids"] for c in sdk.calls] == [["ask_left"], ["ask_right"]]
    assert all(c["run_ids"] == [AIRFLOW_RUN] and c["dag_id"] == DAG_ID for c in sdk.calls)


def test_transient_poll_errors_are_retried_then_reported(store_url: str, sdk: FakeTaskSDK) -> None:
    from airflow_elspeth.audit.engine import engine_for_url

    engine = engine_for_url(store_url)
    spec = make_spec(timeout=600)
    run_id = fork(engine)
    sensor_pass(engine, spec, run_id, sdk.states)
    trigger = new_trigger(spec, run_id, poll=0.01)
    failures = iter([RuntimeError("db down")] * 2)
    real_poll = trigger.poll

    def flaky(*args: Any) -> Any:
        error = next(failures, None)
        if error is not None:
            raise error
        return real_poll(*args)

    with mock.patch.object(trigger, "poll", side_effect=flaky):
        assert run(first_event(trigger, timeout=1.5)) is None  # recovered, keeps waiting
    # Failing polls before the deadline (+ grace) are "not yet": no event, the task keeps waiting.
    with mock.patch.object(trigger, "poll", side_effect=RuntimeError("db down")):
        assert run(first_event(trigger, timeout=1.5)) is None
    # Once the failures outlast the deadline and the grace, the task is told.
    trigger._deadline = datetime.now(timezone.utc) - timedelta(seconds=1)
    with (
        mock.patch.object(service_module, "TRANSIENT_ERROR_GRACE", timedelta(0)),
        mock.patch.object(trigger, "poll", side_effect=RuntimeError("db down")),
    ):
        event = run(first_event(trigger, timeout=EVENT_WAIT))
    assert event is not None and event["status"] == "error" and "db down" in event["message"]


# -- cost -------------------------------------------------------------------------------------------


def test_hundreds_of_triggers_share_one_engine_and_never_block_the_event_loop(
    store_url: str, sdk: FakeTaskSDK
) -> None:
    import threading
    from collections import Counter

    from airflow_elspeth.audit import engine as hook_module

    engine = hook_module.engine_for_url(store_url)
    spec = make_spec("require_all")
    run_id = fork(engine)
    sensor_pass(engine, spec, run_id, sdk.states)
    deliver(engine, run_id, "left")
    triggers = [new_trigger(spec, run_id, poll=0.2) for _ in range(200)]
    threads: set[int] = set()
    real_poll = CoalesceTrigger.poll

    polled: Counter[int] = Counter()  # polls returned, by trigger

    in_flight = [0]  # polls running right now (in worker threads)

    def recording_poll(self: CoalesceTrigger, *args: Any) -> Any:
        threads.add(threading.get_ident())
        in_flight[0] += 1
        try:
            return real_poll(self, *args)
        finally:
            in_flight[0] -= 1
            polled[id(self)] += 1

    async def scenario() -> tuple[int, int, int]:
        lags: list[float] = []
        ticks_during_polls = [0]
        stop = asyncio.Event()

        async def ticker() -> None:  # does the loop keep running while the audit DB is read?
            while not stop.is_set():
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - before - 0.01)
                if in_flight[0]:
                    ticks_during_polls[0] += 1

        async def every_trigger_polled_twice() -> None:  # however slow the machine: no fixed window
            while len(polled) < len(triggers) or min(polled.values()) < 2 or len(lags) < 2:
                await asyncio.sleep(0.05)

        tick = asyncio.create_task(ticker())
        waiting = [asyncio.create_task(first_event(t, timeout=600.0)) for t in triggers]
        await asyncio.wait_for(every_trigger_polled_twice(), timeout=300)
        fired = sum(task.done() and task.result() is not None for task in waiting)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        stop.set()
        await tick
        return ticks_during_polls[0], fired, threading.get_ident()

    with (
        mock.patch.object(
            hook_module, "create_audit_engine", wraps=hook_module.create_audit_engine
        ) as created,
        mock.patch.object(CoalesceTrigger, "poll", recording_poll),
    ):
        ticks_during_polls, fired, loop_thread = run(scenario())
    assert fired == 0  # nothing decidable: all 200 kept waiting
    assert created.call_count == 0  # the engine of the process, already there, is reused
    assert all(t._service is not None and t._service.engine is engine for t in triggers)
    assert len(sdk.calls) >= 200 * len(BRANCHES)  # every trigger polled
    assert threads and loop_thread not in threads  # the audit DB is read off the event loop
    # the loop ran while polls were reading the audit DB (not a wall-clock budget: a loaded machine
    # makes every tick late, but a blocked loop makes none while a read is in flight)
    assert ticks_during_polls > 0


# -- failure paths of the trigger's own pass ---------------------------------------------------------


class Killed(BaseException):
    """Stands for the triggerer process dying: nothing after it runs, not even ``except Exception``."""


def scalar(engine: Engine, run_id: str, sql: str) -> Any:
    """The one value ``sql`` (parameter ``:r``, the audit run) returns."""
    with engine.connect() as conn:
        return conn.execute(text(sql), {"r": run_id}).scalar_one()


def integrity(engine: Engine, run_id: str) -> list[Finding]:
    from airflow_elspeth.audit.read.records import AuditRun
    from airflow_elspeth.audit.read.verify import verify_run

    with engine.connect() as conn:
        run_row = conn.execute(text("SELECT * FROM runs WHERE run_id = :r"), {"r": run_id}).mappings().one()
    return verify_run(engine, AuditRun.from_row(run_row))


def test_a_triggerer_killed_mid_pass_leaves_whole_chunks_and_the_next_trigger_resumes(
    store_url: str, sdk: FakeTaskSDK, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_elspeth.audit.engine import engine_for_url

    # One chunk per transaction (the pass groups PASS_ROWS_PER_WRITE rows of chunks by default), so
    # the kill falls between two commits.
    monkeypatch.setattr(pass_module, "PASS_ROWS_PER_WRITE", 1)

    engine = engine_for_url(store_url)
    spec = make_spec("require_all")
    run_id = fork(engine, chunk_size=2)
    sensor_pass(engine, spec, run_id, sdk.states)
    deliver(engine, run_id, "left", chunk_size=2)
    deliver(engine, run_id, "right", chunk_size=2)
    real_write = pass_module.write_decisions
    written: list[int] = []

    def dies_on_the_second_chunk(conn: Any, run: str, node: str, chunk: int, *args: Any, **kw: Any) -> int:
        if written:
            raise Killed  # inside the chunk's transaction, after its statements began
        written.append(chunk)
        return int(real_write(conn, run, node, chunk, *args, **kw))

    first = new_trigger(spec, run_id)
    with (
        mock.patch.object(pass_module, "write_decisions", side_effect=dies_on_the_second_chunk),
        pytest.raises(Killed),
    ):
        first.poll(make_spec("require_all"), sdk.states)
    assert decisions(engine, run_id) == {0: "merged", 1: "merged"}  # chunk 0 whole, chunk 1 nothing
    outcomes = scalar(
        engine,
        run_id,
        "SELECT count(*) FROM token_outcomes WHERE run_id = :r AND is_terminal AND join_group_id IS NOT NULL",
    )
    assert outcomes == 2 * (len(BRANCHES) + 1)  # the decisions' outcomes: chunk 0's tokens only
    event = run(first_event(new_trigger(spec, run_id), timeout=EVENT_WAIT))
    assert event is not None and event["reason"] == "every row decided"
    assert decisions(engine, run_id) == dict.fromkeys(range(ROWS), "merged")
    assert integrity(engine, run_id) == []


def test_two_trigger_instances_decide_each_row_once(store_url: str, sdk: FakeTaskSDK) -> None:
    """Triggerer failover can run the same trigger twice at once: the ordered write and the primary
    keys make the second pass over a chunk find its rows decided and write nothing."""
    from airflow_elspeth.audit.engine import engine_for_url

    engine = engine_for_url(store_url)
    spec = make_spec("require_all")
    run_id = fork(engine, chunk_size=1)
    sensor_pass(engine, spec, run_id, sdk.states)
    deliver(engine, run_id, "left", chunk_size=1)
    deliver(engine, run_id, "right", chunk_size=1)
    passes = [0]
    real_pass = service_module.coalesce_pass
    # The first pass of each trigger waits for the other's: both then write over the same undecided
    # rows at once, whatever the order the loop and the machine run them in.
    both_in_the_pass = threading.Barrier(2, timeout=EVENT_WAIT)

    def counted(*args: Any, **kw: Any) -> Any:
        passes[0] += 1
        if passes[0] <= 2:
            both_in_the_pass.wait()
        return real_pass(*args, **kw)

    async def both() -> list[dict[str, Any] | None]:
        triggers = [new_trigger(spec, run_id, poll=0.05) for _ in range(2)]
        return list(await asyncio.gather(*(first_event(t, timeout=EVENT_WAIT) for t in triggers)))

    with mock.patch.object(service_module, "coalesce_pass", side_effect=counted):
        events = run(both())
    assert [e and e["reason"] for e in events] == ["every row decided"] * 2
    assert passes[0] >= 2
    assert decisions(engine, run_id) == dict.fromkeys(range(ROWS), "merged")
    per_token = scalar(
        engine,
        run_id,
        "SELECT max(n) FROM (SELECT count(*) AS n FROM token_outcomes WHERE run_id = :r"
        " AND is_terminal GROUP BY token_id) AS counts",
    )
    assert per_token == 1
    assert integrity(engine, run_id) == []


# -- the triggerer's event loop ------------------------------------------------------------------------

# How long each blocking call of the trigger takes in the loop-lag test: long enough that one made on
# the loop's thread stalls the loop far beyond what a loaded machine's scheduling does to it, so the
# test tells "ran on the loop" from "ran off it" whatever the machine's speed. A call on the loop
# stalls it by the whole call; scheduling alone has delayed a 10 ms sleep by 0.31 s (four xdist
# workers on two cores), so the limit sits halfway.
BLOCKING_CALL = 1.5
LOOP_STALL_LIMIT = BLOCKING_CALL / 2


def test_the_trigger_never_blocks_the_event_loop(
    store_url: str, sdk: FakeTaskSDK, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deferred before its fork completed, the trigger looks up its connection, creates its engine,
    watches the fork, adopts its audit run and decides the rows on a real audit store, each of those
    calls made slow; a watchdog on the same loop measures how late its 10 ms sleeps wake."""
    from collections import Counter

    from airflow_elspeth.audit import engine as engine_module
    from airflow_elspeth.hooks.audit import ElspethAuditHook

    engine = engine_module.engine_for_url(store_url)
    spec = make_spec("require_all")
    sdk.states["fork"] = "running"
    run_id = fork(engine, complete=False)
    engine_module.dispose_engine(store_url)  # the trigger creates its engine (the test's still works)
    calls: Counter[str] = Counter()

    def slowed(name: str, call: Any) -> Any:
        def slow(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            time.sleep(BLOCKING_CALL)
            return call(*args, **kwargs)

        return slow

    lookup = ElspethAuditHook.get_connection
    monkeypatch.setattr(
        ElspethAuditHook,
        "get_connection",
        classmethod(lambda cls, conn_id: slowed("connection lookup", lookup)(conn_id)),
    )
    monkeypatch.setattr(
        engine_module, "create_audit_engine", slowed("engine creation", engine_module.create_audit_engine)
    )
    from_dict = CoalesceSpec.from_dict
    monkeypatch.setattr(CoalesceSpec, "from_dict", classmethod(lambda cls, d: slowed("spec", from_dict)(d)))
    for module, name in (
        (service_module, "newest_completed_run"),
        (service_module, "waiting_poll"),
        (service_module, "coalesce_pass"),
    ):
        monkeypatch.setattr(module, name, slowed(name, getattr(module, name)))
    sdk.respond = slowed("task states", sdk.respond)

    async def scenario() -> tuple[dict[str, Any] | None, list[float]]:
        lags: list[float] = []
        stop = asyncio.Event()

        async def watchdog() -> None:
            while not stop.is_set():
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - before - 0.01)

        async def until(done: Any, what: str) -> None:
            started = time.monotonic()
            while not done():
                assert time.monotonic() - started < EVENT_WAIT, f"never saw {what}"
                await asyncio.sleep(0.05)

        watching = asyncio.create_task(watchdog())
        trigger = new_trigger(spec, None, poll=0.1)
        event = asyncio.create_task(first_event(trigger, timeout=EVENT_WAIT))
        await until(lambda: calls["task states"] >= 2, "the trigger look at the running fork")
        # the test's own writes run in threads too: they must not stall the loop it measures
        await asyncio.to_thread(AuditStore(engine).complete_run, run_id, rows_total=ROWS, chunks_total=1)
        sdk.states["fork"] = "success"
        await until(lambda: trigger.run_id == run_id, "the trigger adopt the fork's audit run")
        for branch in BRANCHES:
            await asyncio.to_thread(deliver, engine, run_id, branch)
        fired = await event
        stop.set()
        await watching
        return fired, lags

    fired, lags = run(scenario())
    assert fired is not None and fired["reason"] == "every row decided", fired
    assert decisions(engine, run_id) == dict.fromkeys(range(ROWS), "merged")
    # every blocking call was made (slowly), and none of them on the loop
    assert set(calls) == {
        "connection lookup",
        "engine creation",
        "spec",
        "task states",
        "newest_completed_run",
        "waiting_poll",
        "coalesce_pass",
    }, calls
    assert calls["engine creation"] == 1
    worst = sorted(lags, reverse=True)[:5]
    assert max(lags) < LOOP_STALL_LIMIT, f"the event loop stalled {worst} s (calls: {dict(calls)})"


def test_the_trigger_module_imports_nothing_that_blocks() -> None:
    """The triggerer imports a trigger's module on its event loop: this one leaves the audit layer
    (SQLAlchemy, the store) to the trigger's worker threads."""
    import subprocess
    import sys

    probe = (
        "import sys, airflow.triggers.base; loaded = set(sys.modules); "
        "import airflow_elspeth.triggers.coalesce; "
        "print(sorted(m for m in set(sys.modules) - loaded if not m.startswith('airflow_elspeth.core')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == str(
        ["airflow_elspeth.exceptions", "airflow_elspeth.triggers", "airflow_elspeth.triggers.coalesce"]
    )
