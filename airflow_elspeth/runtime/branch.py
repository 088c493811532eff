"""A branch step's runtime, without Airflow: worker threads that run the rows of a chunk and a
writer thread that group-commits their results to the audit store.

The BranchOperator (``operators/branch.py``) builds a :class:`BranchRuntime` from its parameters
(:class:`StepSettings`), where this try writes (:class:`StepRun`), its logger and the function that
turns one row into its result (``RowProcessor``: the callable, its retries, the output contract and
size limit), and keeps what is Airflow's: the task context, XCom, signals and ``on_kill``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from airflow_elspeth.audit.dml import TRANSIENT_ERRORS
from airflow_elspeth.audit.log import loss_reason
from airflow_elspeth.audit.read.work import WorkItem, branch_work, decided_in_chunk, decisions_in_chunk
from airflow_elspeth.audit.store import AuditStore, NodeResult
from airflow_elspeth.core.vocabulary import (
    DROPPED,
    SKIPPED_DECIDED,
    TERMINAL_NODE_STATUSES,
    DecisionStatus,
    NodeStatus,
    late_reason,
)
from airflow_elspeth.exceptions import BranchFailureThresholdError

# How often the writer reads which rows of its chunk were decided: a row decided while the branch
# works is skipped within this (plus one query) of its decision.
DECIDED_REFRESH_SECONDS = 0.25
# How long the writer retries an audit store that is unreachable before the task fails (and Airflow
# retries it: finished rows are not done again), and its pause between attempts.
WRITE_RETRY_SECONDS = 30.0
WRITE_RETRY_PAUSE_SECONDS = 1.0
# The main thread wakes at least this often to see whether the writer thread failed.
MAIN_WAKE_SECONDS = 0.2
# At the task's end, how long to wait for a write in flight before writing the buffer anyway.
STOP_WAIT_SECONDS = 30.0

Clock = Callable[[], datetime]
# One row into its result: (the row, its chunk, the audit clock) -> the node result. Exceptions of
# the row's own callable are results (losses); one raised here ends the task.
RowProcessor = Callable[[WorkItem, int, Clock], NodeResult]
# The result of a row still running when the task ended: (the row, its chunk, started, now).
Expire = Callable[[WorkItem, int, datetime, datetime], NodeResult]


class Log(Protocol):
    """The logger the runtime writes to (the task's: a ``logging.Logger`` or Airflow's)."""

    def warning(self, msg: str, *args: Any) -> None: ...

    def exception(self, msg: str, *args: Any) -> None: ...


@dataclass(frozen=True)
class StepSettings:
    """What the runtime takes from a branch step's parameters (validated by the operator; see
    :class:`~airflow_elspeth.operators.branch.BranchOperator` for their meaning).

    :param node_id: the step's task id, its node in the audit store.
    :param branch: the branch it processes.
    :param concurrency: worker threads.
    :param batch_size: the most results one write commits; no row starts while this many wait.
    :param flush_seconds: no row starts while a result has waited this long unwritten.
    :param max_failed_rows: more failed rows than this abort the try (None: no limit).
    :param max_failed_rate: a larger fraction of failed rows aborts the try (None: no limit) ...
    :param min_rows_for_rate: ... once this many rows were processed.
    """

    node_id: str
    branch: str
    concurrency: int
    batch_size: int
    flush_seconds: float
    max_failed_rows: int | None
    max_failed_rate: float | None
    min_rows_for_rate: int


@dataclass(frozen=True)
class StepRun:
    """Where one try of a branch step reads its rows and writes their results.

    :param run_id: the fork's audit run.
    :param attempt: the task's try number (part of every node state's id).
    :param previous_step: the branch's previous step, whose outputs are the inputs; None: the fork.
    :param coalesces: the coalesces consuming the step (a row all of them decided is skipped).
    :param final_step: the last step of a branch no coalesce joins: results end their tokens.
    :param delivering_to: the coalesces this step delivers arrivals to (it is its branch's last).
    """

    run_id: str
    attempt: int
    previous_step: str | None
    coalesces: tuple[str, ...]
    final_step: bool
    delivering_to: tuple[str, ...]


@dataclass(frozen=True)
class StepTally:
    """What one try of a branch step wrote and kept: ``completed`` arrivals, ``lost`` rows per loss
    reason (``dropped``, ``error:<Type>``, ``contract:<field>``; none of the failures of a try that hit
    its failure threshold, which its retry processes again), ``late`` results (``discarded``: their
    row was decided meanwhile) and ``skipped`` rows (decided before they started)."""

    completed: int = 0
    lost: Mapping[str, int] = field(default_factory=dict)
    late: int = 0
    skipped: int = 0


def row_result(item: WorkItem, chunk: int, **fields: Any) -> NodeResult:
    """``item``'s result at this step: its token, row, chunk and input hash, and ``fields`` (status,
    times, output or error)."""
    return NodeResult(
        token_id=item.token_id, row_id=item.row_id, chunk=chunk, input_hash=item.input_hash, **fields
    )


class BranchRuntime:
    """One try of a branch step: its chunks run on a :class:`WorkerPool`, written by a
    :class:`ResultWriter`.

    :param store: the fork's audit store.
    :param settings: the step's parameters.
    :param step: where this try reads and writes.
    :param process: one row into its result, called on the worker threads.
    :param log: the task's logger.
    :param clock: the audit clock (started and completed times of the results).
    """

    def __init__(
        self,
        store: AuditStore,
        settings: StepSettings,
        step: StepRun,
        process: RowProcessor,
        log: Log,
        clock: Clock,
    ) -> None:
        self._store, self._settings, self._step = store, settings, step
        self._log, self._clock = log, clock
        self.writer = ResultWriter(store, settings, step, log)
        self.pool = WorkerPool(
            process, self.writer, settings.concurrency, f"elspeth-{settings.branch}", clock
        )

    def run(self, chunks: Iterable[int]) -> dict[str, int]:
        """Process every row of ``chunks`` still to do; returns the counts (per status,
        ``resumed_done``, ``skipped_decided``). Raises what ends the task: the writer's failure (the
        failure threshold, a write that failed) or what a worker raised past the row's callable."""
        settings, step, writer = self._settings, self._step, self.writer
        for chunk in chunks:
            work = branch_work(
                self._store.engine,
                step.run_id,
                settings.node_id,
                settings.branch,
                chunk,
                step.previous_step,
                coalesces=step.coalesces,
            )
            writer.start_chunk(chunk, work.tokens_total, work.items)
            writer.counts["resumed_done"] += work.already_done
            writer.skip(work.decided_tokens)
            self._run_chunk(work.items, chunk)
        return dict(writer.counts)

    def _run_chunk(self, items: list[WorkItem], chunk: int) -> None:
        """Process one chunk on the pool while the writer thread writes results as they finish.

        The callable runs on worker threads, which take the chunk's rows one at a time and hand each
        result to the writer, whose own thread writes it: a finished result is written while slow
        rows still run, and becomes an arrival only once written. A row decided meanwhile is not
        started (``writer.claim``, checked by the worker just before it calls the callable), and the
        writer records it skipped. No row passes through the main thread, which only waits.
        """
        self.writer.start()
        try:
            self.pool.run(items, chunk)
            self.writer.drain()
        finally:
            self.writer.stop()

    def flush_on_exit(self, expire: Expire | None = None) -> None:
        """The task is ending on an exception: write the rows finished before it ended, and with
        ``expire`` (a timeout) the running rows as the results it gives them.

        Rows still running otherwise stay unwritten (the coalesce records the task's loss, a retry
        processes them again). A failure to write is logged: the exception ending the task is the
        caller's to raise.
        """
        running = self.pool.close()  # every finished result is in the writer's buffer
        self.writer.stop()  # its batch in flight is written or left in the buffer, never half
        if expire is not None:
            now = self._clock()
            self.writer.keep(expire(job.item, job.chunk, started, now) for job, started in running)
        try:
            self.writer.flush()
        except Exception:
            self._log.exception(
                "Branch %s: could not write the rows finished before the task ended", self._settings.branch
            )

    def close(self) -> None:
        """Stop the pool (idempotent): no row starts any more; a busy worker is abandoned."""
        self.pool.close()

    def tally(self) -> StepTally:
        """What this try wrote and kept so far (its metrics: ``airflow_elspeth.metrics.branch_try``)."""
        counts = self.writer.counts
        return StepTally(
            completed=counts[NodeStatus.COMPLETED],
            lost=dict(sorted(self.writer.lost.items())),
            late=counts[NodeStatus.DISCARDED],
            skipped=counts[SKIPPED_DECIDED],
        )


@dataclass(frozen=True, eq=False)
class Job:
    """One row to process (compared and hashed by identity)."""

    item: WorkItem
    chunk: int


class WorkerPool:
    """Daemon threads that take a chunk's rows one at a time and hand each result to the writer;
    never joined.

    ``concurrent.futures`` joins its threads on shutdown and at interpreter exit, so a hung
    callable would keep the task alive past its ``execution_timeout``. Here :meth:`close` only
    stops the pool: idle workers end, a busy one is abandoned and ends with the process.

    The workers pull rows themselves, so a row costs no hand-off through the main thread (that
    round trip per row was a fifth of a branch's time, benchmarks/RESULTS.md). Every row is not
    started, running, or delivered, and one lock guards the moves between those, so :meth:`close`
    sees each row in exactly one of them: a result is delivered to the writer under that lock,
    unless the pool was closed first (the row is then left to the task's retry, as an unstarted
    one is).
    """

    def __init__(
        self, process: RowProcessor, writer: ResultWriter, workers: int, name: str, clock: Clock
    ) -> None:
        """
        :param process: one row into its result, called on a worker thread.
        :param writer: where results go; its backpressure and claims decide when a row starts.
        :param workers: how many threads take rows.
        :param name: the threads' name prefix.
        :param clock: the audit clock (when each running row started).
        """
        self._process = process
        self._writer = writer
        self._clock = clock
        # Reentrant: a signal can leave the main thread holding it, and close() runs after that.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._running: dict[Job, datetime] = {}
        self._active = 0  # workers still taking rows of the current chunk
        self._error: BaseException | None = None  # what a worker raised past ``except Exception``
        self._stopped = False  # no row starts any more
        self._closed = False
        self._size = workers
        self._name = name

    def run(self, items: list[WorkItem], chunk: int) -> None:
        """Main thread: run every row of ``items``; return once all are delivered.

        Wakes every ``MAIN_WAKE_SECONDS`` (so a signal is handled) and raises the writer's failure
        or what a worker raised (``sys.exit``, ``KeyboardInterrupt``... in the callable end the task).
        """
        todo = iter(items)
        workers = min(self._size, len(items))
        with self._lock:
            self._active = workers
        for number in range(workers):
            threading.Thread(
                target=self._work, args=(todo, chunk), name=f"{self._name}_{number}", daemon=True
            ).start()
        with self._changed:
            while self._active and self._error is None:
                self._changed.wait(MAIN_WAKE_SECONDS)
                self._writer.raise_failure()
            if self._error is not None:
                raise self._error

    def close(self) -> list[tuple[Job, datetime]]:
        """Stop the pool; returns the rows running (and when each started)."""
        with self._lock:
            if self._closed:
                return []
            self._closed = self._stopped = True
            return list(self._running.items())

    def _work(self, todo: Iterator[WorkItem], chunk: int) -> None:
        try:
            while True:
                with self._lock:
                    item = None if self._stopped else next(todo, None)
                    if item is None:
                        return
                    job = Job(item, chunk)
                    self._running[job] = self._clock()
                try:
                    result = self._result(job)
                except BaseException:
                    with self._lock:
                        del self._running[job]
                    raise
                with self._lock:
                    del self._running[job]
                    if result is not None and not self._closed:
                        self._writer.keep([result])
        except BaseException as err:  # handed to the main thread, which re-raises it
            with self._lock:
                self._stopped = True  # the task is ending: no new row starts
                self._error = self._error or err
        finally:
            with self._changed:
                self._active -= 1
                self._changed.notify_all()

    def _result(self, job: Job) -> NodeResult | None:
        """The job's result, or None when its row was decided before it started (not run)."""
        self._writer.wait_for_room()  # backpressure: the writer is behind (raises its failure)
        if not self._writer.claim(job.item):
            return None
        return self._process(job.item, job.chunk, self._clock)


class ResultWriter:
    """A branch task's results, written by a thread of their own as soon as they are finished.

    Group commit: the writer thread writes whatever is buffered (at most ``batch_size`` rows) as
    soon as its previous write committed, so results that finish during a write go together into
    the next one. Under load batches grow and throughput stays high; a lone result waits for at
    most the write in flight and its own. The main thread stops starting rows while the buffer is
    full (``batch_size``) or its oldest result has waited ``flush_seconds`` (:meth:`wait_for_room`),
    so a database slower than the callable cannot make the wait grow without bound.

    Each write checks which rows were decided meanwhile (their results are kept, marked discarded)
    and the failure threshold. A batch leaves the buffer only once written (a write interrupted by
    the task ending is done again: writes are idempotent). An unreachable database is retried for
    ``WRITE_RETRY_SECONDS``; then its error, like any other of the writer thread, is raised in the
    main thread, which ends the task (after writing what it can, :meth:`BranchRuntime.flush_on_exit`).

    Every ``DECIDED_REFRESH_SECONDS`` the writer thread also reads which rows of the chunk every
    consuming coalesce has decided by its policy (one query per chunk, not per row; a resolution
    can be reopened, see :func:`~airflow_elspeth.audit.read.work.decided_in_chunk`) and records
    those not yet started as skipped; a worker :meth:`claim`-s a row before calling the callable,
    under the same lock, so a row is either run or skipped, never both.
    """

    def __init__(self, store: AuditStore, settings: StepSettings, step: StepRun, log: Log) -> None:
        """
        :param store: the fork's audit store.
        :param settings: the step's parameters (batch size, wait, failure thresholds).
        :param step: where this try writes.
        :param log: the task's logger.
        """
        self.store = store
        self.settings = settings
        self.step = step
        self.log = log
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()  # kept losses written by this try, per loss reason
        self.decided: set[str] = set()
        self.buffer: list[NodeResult] = []
        self.buffered: set[str] = set()  # the buffer's token ids
        self.oldest = 0.0  # monotonic time the buffer's oldest result was kept
        self.chunk = 0
        self.tokens_total = 0
        self.aborted = False
        # Reentrant: a signal can leave the main thread holding it, and the exit path takes it again.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._unstarted: dict[str, str] = {}  # row id -> token id of the chunk's rows not yet claimed
        self._to_skip: list[str] = []  # tokens of rows found decided before they started, to record
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        self._busy = False  # the writer thread is in a round (a write, the refresh, their checks)
        self._next_refresh = 0.0

    def start_chunk(self, chunk: int, tokens_total: int, items: Iterable[WorkItem] = ()) -> None:
        with self._lock:
            self.chunk, self.tokens_total = chunk, tokens_total
            self._unstarted = {item.row_id: item.token_id for item in items}

    def start(self) -> None:
        """Start the writer thread for the current chunk (stopped by :meth:`stop`)."""
        with self._lock:
            self._stopping, self._failure = False, None
            self._next_refresh = time.monotonic() + DECIDED_REFRESH_SECONDS
        self._thread = threading.Thread(
            target=self._run, name=f"elspeth-{self.settings.branch}-writer", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the writer thread once its write in flight (if any) has ended; idempotent."""
        thread = self._thread
        if thread is None:
            return
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        thread.join(STOP_WAIT_SECONDS)
        if thread.is_alive():  # a write hung on the database: the exit flush may write it twice (idempotent)
            self.log.warning("Branch %s: the writer thread did not stop", self.settings.branch)
        self._thread = None

    def claim(self, item: WorkItem) -> bool:
        """Called by a worker before it runs ``item``: False when its row was decided (skipped)."""
        with self._lock:
            if item.row_id in self.decided:
                return False
            self._unstarted.pop(item.row_id, None)
            return True

    def skip(self, token_ids: Iterable[str]) -> None:
        """Record tokens of this chunk not processed because their rows were already decided."""
        tokens = list(token_ids)
        if tokens:
            self.store.record_skipped(
                self.step.run_id, self.settings.node_id, {self.chunk: self.tokens_total}, tokens
            )
            self.counts[SKIPPED_DECIDED] += len(tokens)

    def keep(self, results: Iterable[NodeResult]) -> None:
        """Buffer results for the writer thread (a token already buffered is kept once)."""
        with self._changed:
            for result in results:
                if result.token_id in self.buffered:
                    continue
                if not self.buffer:
                    self.oldest = time.monotonic()
                self.buffer.append(result)
                self.buffered.add(result.token_id)
            self._changed.notify_all()

    def wait_for_room(self) -> None:
        """Main thread: wait while the buffer is full or old (the writer is behind); raise its error."""
        with self._changed:
            while (
                self._failure is None
                and self.buffer
                and (
                    len(self.buffer) >= self.settings.batch_size
                    or time.monotonic() - self.oldest >= self.settings.flush_seconds
                )
            ):
                self._changed.wait(MAIN_WAKE_SECONDS)
            self.raise_failure()

    def drain(self) -> None:
        """Main thread, at the end of a chunk: wait until everything kept is written; raise its error."""
        with self._changed:
            while self._failure is None and (self.buffer or self._to_skip or self._busy):
                self._changed.wait(MAIN_WAKE_SECONDS)
            self.raise_failure()

    def raise_failure(self) -> None:
        """Raise the writer thread's failure, if it failed."""
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        """The writer thread: write what is buffered as soon as the previous write committed."""
        failing_since: float | None = None
        while True:
            with self._changed:
                while not self._stopping and not self.buffer and time.monotonic() < self._next_refresh:
                    self._changed.wait(max(0.0, self._next_refresh - time.monotonic()))
                if self._stopping:
                    return
                batch = self.buffer[: self.settings.batch_size]
                self._busy = True  # until this round's threshold check or failure is known
            try:
                if batch:
                    self._write(batch)
                if time.monotonic() >= self._next_refresh or self._to_skip:
                    self._refresh_decided()
                failing_since = None
            except TRANSIENT_ERRORS as err:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since < WRITE_RETRY_SECONDS:
                    self.log.warning(
                        "Branch %s: the audit store is unreachable (%s: %s); writing again shortly",
                        self.settings.branch,
                        type(err).__name__,
                        err,
                    )
                    with self._changed:
                        self._changed.wait(WRITE_RETRY_PAUSE_SECONDS)
                    continue
                self._fail(err)
                return
            except BaseException as err:  # handed to the main thread, which raises it
                self._fail(err)
                return
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _fail(self, err: BaseException) -> None:
        with self._changed:
            self._failure = err
            self._changed.notify_all()

    def _write(self, batch: list[NodeResult]) -> None:
        """Write ``batch`` (the buffer's head), then take it out of the buffer; check the threshold."""
        self._write_results(batch)
        with self._changed:
            del self.buffer[: len(batch)]
            self.buffered.difference_update(r.token_id for r in batch)
            if self.buffer:
                self.oldest = time.monotonic()  # the next result's wait is not known: counted from now
            self._changed.notify_all()
        self._check_threshold()

    def _write_results(self, results: list[NodeResult]) -> None:
        step = self.step
        decided = decisions_in_chunk(self.store.engine, step.run_id, self.chunk, coalesces=step.coalesces)
        marked = [_discard_if_decided(r, decided) for r in results]
        self.store.write_branch_results(
            step.run_id,
            self.settings.node_id,
            step.attempt,
            marked,
            chunk_tokens={self.chunk: self.tokens_total},
            final_step=step.final_step,
            delivering_to=step.delivering_to,
        )
        self.counts.update(str(r.status) for r in marked)
        self.lost.update(
            loss_reason(r.status, r.error)
            for r in marked
            if r.status in (NodeStatus.DROPPED, NodeStatus.FAILED)
        )
        self.errors.update(str((r.error or {}).get("type")) for r in marked if r.status == NodeStatus.FAILED)

    def _refresh_decided(self) -> None:
        """Rows of the chunk decided by every consuming coalesce's policy: those not started are
        skipped now."""
        self._next_refresh = time.monotonic() + DECIDED_REFRESH_SECONDS
        if self.step.coalesces:
            decided = decided_in_chunk(
                self.store.engine, self.step.run_id, self.chunk, coalesces=self.step.coalesces
            )
            with self._lock:
                newly = decided - self.decided
                self.decided |= newly
                self._to_skip.extend(self._unstarted.pop(row) for row in newly if row in self._unstarted)
        self._record_skips()

    def _record_skips(self) -> None:
        """Record the rows found decided before they started; they leave the list once written."""
        with self._lock:
            tokens = list(self._to_skip)
        if tokens:
            self.skip(tokens)
            with self._changed:
                del self._to_skip[: len(tokens)]
                self._changed.notify_all()

    def flush(self) -> None:
        """Main thread, the writer thread stopped, the task ending on an exception: write the buffer.

        The threshold is still applied (its error is the caller's to log), and after an abort the
        rows failed since are aborted too.
        """
        self._record_skips()
        if not self.buffer:
            return
        results = list(self.buffer)
        self._write_results(results)
        self.buffer, self.buffered = [], set()
        if self.aborted:
            self._abort()
            return
        self._check_threshold()

    def _abort(self) -> None:
        self.aborted = True
        # Every failure of this try becomes ``aborted`` and is processed again by the next try.
        self.lost = Counter({DROPPED: self.lost[DROPPED]}) if self.lost[DROPPED] else Counter()
        self.store.abort_attempt_errors(
            self.step.run_id, self.settings.node_id, self.step.attempt, {self.chunk: self.tokens_total}
        )

    def _check_threshold(self) -> None:
        settings, counts = self.settings, self.counts
        processed = sum(counts[s] for s in TERMINAL_NODE_STATUSES)
        failed = counts[NodeStatus.FAILED]
        over_count = settings.max_failed_rows is not None and failed > settings.max_failed_rows
        over_rate = (
            settings.max_failed_rate is not None
            and processed >= settings.min_rows_for_rate
            and failed / processed > settings.max_failed_rate
        )
        if not (over_count or over_rate):
            return
        self._abort()
        common = ", ".join(f"{kind} x{n}" for kind, n in self.errors.most_common(3))
        limit = (
            f"max_failed_rows={settings.max_failed_rows}"
            if over_count
            else f"max_failed_rate={settings.max_failed_rate} (after {processed} rows)"
        )
        raise BranchFailureThresholdError(
            f"branch {settings.branch!r}: {failed} of {processed} rows failed, over {limit}; "
            f"most common errors: {common}. Failing the task so the rows are retried, not lost one by one."
        )


def _discard_if_decided(result: NodeResult, decided: Mapping[str, str]) -> NodeResult:
    """Work on a row decided meanwhile is kept, marked discarded: it can only arrive late."""
    if result.row_id not in decided or result.status != NodeStatus.COMPLETED:
        return result
    late = late_reason(DecisionStatus(decided[result.row_id]))
    return NodeResult(
        **{
            **result.__dict__,
            "status": NodeStatus.DISCARDED,
            "context": {**(result.context or {}), "late": late},
        }
    )
