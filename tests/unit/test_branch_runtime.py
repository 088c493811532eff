"""The branch runtime on its own, without Airflow: the worker pool and the group-commit writer over a
real SQLite audit store, with row processors held on latches, so every assertion is about order
(what is written, skipped or running while another row still runs), never about speed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from airflow_elspeth.audit.coalesce import coalesce_pass
from airflow_elspeth.audit.model import CoalesceSpec
from airflow_elspeth.audit.read.work import WorkItem, branch_work
from airflow_elspeth.audit.store import AuditStore, NodeResult
from airflow_elspeth.core.canonical import hash_value
from airflow_elspeth.core.config import coalesce_config
from airflow_elspeth.core.vocabulary import NodeStatus, NodeType
from airflow_elspeth.exceptions import BranchFailureThresholdError
from airflow_elspeth.runtime import branch as branch_runtime
from airflow_elspeth.runtime.branch import (
    BranchRuntime,
    Clock,
    ResultWriter,
    StepRun,
    StepSettings,
    StepTally,
    WorkerPool,
    row_result,
)

from .support import WAIT, completed_fork, in_thread, skipped, states, wait_for

BRANCHES = ("fast", "slow")
ROWS = 6
JOIN = "join"
LOG = logging.getLogger(__name__)


def settings(node: str = "slow", **changed: Any) -> StepSettings:
    values: dict[str, Any] = {
        "node_id": node,
        "branch": node,
        "concurrency": 1,
        "batch_size": 1000,
        "flush_seconds": 3600.0,  # never the reason a row waits here
        "max_failed_rows": None,
        "max_failed_rate": None,
        "min_rows_for_rate": 100,
    }
    return StepSettings(**{**values, **changed})


def step_run(run_id: str) -> StepRun:
    """The last step of its branch, delivering to coalesce ``join``."""
    return StepRun(
        run_id=run_id,
        attempt=1,
        previous_step=None,
        coalesces=(JOIN,),
        final_step=False,
        delivering_to=(JOIN,),
    )


def forked(store: AuditStore) -> str:
    """A completed fork of ROWS rows, its branch steps registered."""
    run_id = completed_fork(
        store, dag_id="runtime_dag", airflow_run_id="manual__1", branches=BRANCHES, rows=ROWS
    )
    for branch in BRANCHES:
        store.register_node(run_id, branch, NodeType.BRANCH, branch, {"branch": branch})
    return run_id


def items(store: AuditStore, run_id: str, node: str = "slow") -> list[WorkItem]:
    return branch_work(store.engine, run_id, node, node, 0, None, coalesces=[JOIN]).items


def answer(item: WorkItem, chunk: int, clock: Clock) -> NodeResult:
    """A row processed: completed with an output."""
    now = clock()
    digest, body = hash_value({"seen": item.row_key}, what="output")
    return row_result(
        item,
        chunk,
        status=NodeStatus.COMPLETED,
        started_at=now,
        completed_at=now,
        output_hash=digest,
        output_body=body,
    )


def failure(item: WorkItem, chunk: int, clock: Clock) -> NodeResult:
    """A row whose callable raised: failed."""
    now = clock()
    return row_result(
        item,
        chunk,
        status=NodeStatus.FAILED,
        started_at=now,
        completed_at=now,
        error={"type": "ValueError", "message": "no"},
    )


class Held:
    """A row processor whose rows in ``held`` block until released; records the rows it ran."""

    def __init__(self, *held: str, raising: dict[str, BaseException] | None = None) -> None:
        self.held = set(held)
        self.raising = raising or {}
        self.release = threading.Event()
        self.called: list[str] = []

    def __call__(self, item: WorkItem, chunk: int, clock: Clock) -> NodeResult:
        self.called.append(item.row_key)
        if item.row_key in self.raising:
            raise self.raising[item.row_key]
        if item.row_key in self.held and not self.release.wait(WAIT):
            raise TimeoutError("never released")
        return answer(item, chunk, clock)


class RecordingStore(AuditStore):
    """The real audit store, recording the row keys of every write of results; ``fail_with``
    makes the next writes raise instead."""

    def __init__(self, store: AuditStore, run_id: str) -> None:
        super().__init__(store.engine)
        self._keys = {item.row_id: item.row_key for item in items(store, run_id)}
        self.writes: list[list[str]] = []
        self.fail_with: list[BaseException] = []

    def write_branch_results(
        self, run_id: str, node_id: str, attempt: int, results: Sequence[NodeResult], **kw: Any
    ) -> None:
        if self.fail_with:
            raise self.fail_with.pop(0)
        super().write_branch_results(run_id, node_id, attempt, results, **kw)
        self.writes.append([self._keys[r.row_id] for r in results])


def test_results_finished_during_a_write_go_together_into_the_next_one_at_most_batch_size(
    store: AuditStore,
) -> None:
    """Group commit: what is buffered when the writer is free is written at once, in batches of at
    most ``batch_size``, in the order the results were kept."""
    run_id = forked(store)
    recording = RecordingStore(store, run_id)
    todo = items(store, run_id)
    writer = ResultWriter(recording, settings(batch_size=4), step_run(run_id), LOG)
    writer.start_chunk(0, ROWS, todo)
    clock = store.clock()
    writer.keep(answer(item, 0, clock) for item in todo)  # six results kept before the writer runs
    writer.start()
    try:
        writer.drain()
    finally:
        writer.stop()
    assert recording.writes == [["r0", "r1", "r2", "r3"], ["r4", "r5"]]
    assert states(store, run_id, "slow") == {f"r{i}": "completed" for i in range(ROWS)}
    assert writer.counts[NodeStatus.COMPLETED] == ROWS


def test_a_result_is_written_while_another_row_still_runs_and_no_write_exceeds_batch_size(
    store: AuditStore, running: list[threading.Thread]
) -> None:
    run_id = forked(store)
    recording = RecordingStore(store, run_id)
    held = Held("r1")
    runtime = BranchRuntime(
        recording, settings(concurrency=3, batch_size=2), step_run(run_id), held, LOG, store.clock()
    )
    outcome = in_thread(lambda: runtime.run([0]), running)
    wait_for("r0 written while r1 runs", lambda: states(store, run_id, "slow").get("r0") == "completed")
    assert "r1" not in states(store, run_id, "slow")
    held.release.set()
    running[0].join(WAIT)
    assert "error" not in outcome, outcome
    assert outcome["returned"] == {"completed": ROWS, "resumed_done": 0}
    assert all(len(write) <= 2 for write in recording.writes), recording.writes
    assert sorted(key for write in recording.writes for key in write) == [f"r{i}" for i in range(ROWS)]


def test_rows_decided_meanwhile_are_skipped_not_run_and_a_late_result_is_discarded(
    store: AuditStore, running: list[threading.Thread]
) -> None:
    """Policy ``first``: the fast branch's arrivals decide every row while the slow step runs r0.
    The rows it has not started are recorded skipped while r0 still runs, and never run; r0's result,
    written after its row's decision, is kept as discarded."""
    run_id = forked(store)
    held = Held("r0")
    runtime = BranchRuntime(store, settings(), step_run(run_id), held, LOG, store.clock())
    outcome = in_thread(lambda: runtime.run([0]), running)
    wait_for("slow to start r0", lambda: held.called == ["r0"])
    fast = ResultWriter(store, settings("fast"), step_run(run_id), LOG)
    fast.start_chunk(0, ROWS, items(store, run_id, "fast"))
    clock = store.clock()
    fast.keep(answer(item, 0, clock) for item in items(store, run_id, "fast"))
    fast.flush()
    config = coalesce_config(branches=list(BRANCHES), policy="first", timeout=3600)
    spec = CoalesceSpec(
        node_id=JOIN,
        config=config,
        delivering={b: b for b in BRANCHES},
        mapped=dict.fromkeys(BRANCHES, False),
    )
    store.register_node(run_id, JOIN, NodeType.COALESCE, None, spec.as_dict())
    assert coalesce_pass(store, spec, run_id, {"fast": "success", "slow": "running"}).newly_decided == ROWS
    not_started = {f"r{i}" for i in range(1, ROWS)}
    wait_for("the rows not started recorded skipped", lambda: skipped(store, run_id, "slow") == not_started)
    assert held.called == ["r0"]
    held.release.set()
    running[0].join(WAIT)
    assert "error" not in outcome, outcome
    assert held.called == ["r0"]
    assert outcome["returned"] == {"discarded": 1, "skipped_decided": ROWS - 1, "resumed_done": 0}
    assert states(store, run_id, "slow") == {"r0": "discarded"}
    assert runtime.tally() == StepTally(late=1, skipped=ROWS - 1)  # what its metrics report


def test_too_many_failed_rows_abort_the_try_and_fail_it(store: AuditStore) -> None:
    """One result a write (``batch_size=1``): the third failure is over ``max_failed_rows=2``. The
    try's failed states become ``aborted`` (left to the next try), those written on the way out too."""
    run_id = forked(store)
    runtime = BranchRuntime(
        store, settings(batch_size=1, max_failed_rows=2), step_run(run_id), failure, LOG, store.clock()
    )
    with pytest.raises(
        BranchFailureThresholdError,
        match=r"branch 'slow': 3 of 3 rows failed, over max_failed_rows=2; most common errors: ValueError x3",
    ):
        try:
            runtime.run([0])
        except BaseException:
            runtime.flush_on_exit()  # as the operator does: a row finished meanwhile is written
            raise
        finally:
            runtime.close()
    written = states(store, run_id, "slow")
    assert {"r0", "r1", "r2"} <= written.keys()
    assert set(written.values()) == {"aborted"}
    assert runtime.tally() == StepTally()  # no loss kept: the next try processes these rows again


def test_a_write_that_fails_is_raised_to_the_caller(store: AuditStore) -> None:
    """An error that is not the database being unreachable is not retried: the run raises it."""
    run_id = forked(store)
    recording = RecordingStore(store, run_id)
    recording.fail_with = [RuntimeError("disk full")]
    runtime = BranchRuntime(recording, settings(), step_run(run_id), answer, LOG, store.clock())
    with pytest.raises(RuntimeError, match="disk full"):
        runtime.run([0])
    runtime.close()
    assert states(store, run_id, "slow") == {}


def test_an_unreachable_store_is_retried_then_raised_to_the_caller(
    store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(branch_runtime, "WRITE_RETRY_PAUSE_SECONDS", 0.01)
    run_id = forked(store)
    recording = RecordingStore(store, run_id)
    down = OperationalError("INSERT", {}, Exception("could not connect"))
    recording.fail_with = [down, down]
    runtime = BranchRuntime(recording, settings(), step_run(run_id), answer, LOG, store.clock())
    assert runtime.run([0])["completed"] == ROWS  # two failed writes, retried
    # past WRITE_RETRY_SECONDS the error ends the run
    monkeypatch.setattr(branch_runtime, "WRITE_RETRY_SECONDS", 0.0)
    unreachable = RecordingStore(store, run_id)
    unreachable.fail_with = [down]
    again = BranchRuntime(unreachable, settings("fast"), step_run(run_id), answer, LOG, store.clock())
    with pytest.raises(OperationalError, match="could not connect"):
        again.run([0])
    again.close()
    assert states(store, run_id, "fast") == {}


def test_close_reports_the_running_rows_and_leaves_the_others(
    store: AuditStore, running: list[threading.Thread]
) -> None:
    """Every row is not started, running or delivered: close() returns the running ones; a result
    finished after it is not delivered, and no row starts."""
    run_id = forked(store)
    writer = ResultWriter(store, settings(), step_run(run_id), LOG)  # not started: results stay buffered
    todo = items(store, run_id)[:4]
    writer.start_chunk(0, ROWS, todo)
    held = Held("r1", "r2")
    pool = WorkerPool(held, writer, 2, "test", store.clock())
    outcome = in_thread(lambda: pool.run(todo, 0), running)
    wait_for("r0 delivered, r1 and r2 running", lambda: len(held.called) == 3 and len(writer.buffer) == 1)
    busy = pool.close()
    assert sorted(job.item.row_key for job, _ in busy) == ["r1", "r2"]
    assert pool.close() == []  # once
    held.release.set()
    running[0].join(WAIT)
    assert "error" not in outcome, outcome
    assert sorted(held.called) == ["r0", "r1", "r2"]  # r3 never started
    assert [r.row_id for r in writer.buffer] == [todo[0].row_id]  # r1 and r2 finished after close()


@pytest.mark.parametrize("expire", [True, False], ids=["timeout", "other-end"])
def test_the_rows_finished_before_the_task_ended_are_written_on_the_way_out(
    store: AuditStore, running: list[threading.Thread], expire: bool
) -> None:
    """A worker raising past the row (``sys.exit`` in the callable) ends the run while r1 runs: r0's
    result is written, r1 gets the ``expire`` result when given (a timeout) and is left to the
    task's retry otherwise, and the rows not started are left to it as well."""
    run_id = forked(store)
    held = Held("r1", raising={"r2": SystemExit(3)})
    runtime = BranchRuntime(store, settings(concurrency=2), step_run(run_id), held, LOG, store.clock())

    def expired(item: WorkItem, chunk: int, started: datetime, now: datetime) -> NodeResult:
        return failure(item, chunk, lambda: now)

    with pytest.raises(SystemExit):
        try:
            runtime.run([0])
        except BaseException:
            runtime.flush_on_exit(expired if expire else None)
            raise
        finally:
            runtime.close()
    held.release.set()
    assert sorted(held.called) == ["r0", "r1", "r2"]
    assert states(store, run_id, "slow") == (
        {"r0": "completed", "r1": "failed"} if expire else {"r0": "completed"}
    )
    assert runtime.tally() == StepTally(completed=1, lost={"error:ValueError": 1} if expire else {})


def test_a_failure_to_write_on_the_way_out_is_logged_not_raised(
    store: AuditStore, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = forked(store)
    recording = RecordingStore(store, run_id)
    runtime = BranchRuntime(recording, settings(), step_run(run_id), answer, LOG, store.clock())
    runtime.writer.start_chunk(0, ROWS, items(store, run_id))
    runtime.writer.keep([answer(items(store, run_id)[0], 0, store.clock())])
    recording.fail_with = [RuntimeError("disk full")]
    with caplog.at_level(logging.ERROR, logger=__name__):
        runtime.flush_on_exit()
    assert "Branch slow: could not write the rows finished before the task ended" in caplog.text
    assert states(store, run_id, "slow") == {}
