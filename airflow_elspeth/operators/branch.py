"""BranchOperator: run one branch's callable over its tokens, row by row, recording every result."""

from __future__ import annotations

import functools
import json
import math
import reprlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowTaskTerminated, AirflowTaskTimeout

from airflow_elspeth import topology
from airflow_elspeth.audit.dml import TRANSIENT_ERRORS
from airflow_elspeth.audit.read.work import WorkItem, branch_work, decided_in_chunk, decisions_in_chunk
from airflow_elspeth.audit.store import AuditStore, NodeResult
from airflow_elspeth.core.canonical import PayloadLimit, hash_value, payload_size
from airflow_elspeth.core.contract import Contract, Violation, contract_of
from airflow_elspeth.core.vocabulary import (
    CONTRACT_VIOLATION,
    TERMINAL_NODE_STATUSES,
    DecisionStatus,
    NodeStatus,
    NodeType,
    late_reason,
)
from airflow_elspeth.exceptions import BranchFailureThresholdError, ElspethConfigError, ForkRunMissing
from airflow_elspeth.hooks.audit import ElspethAuditHook
from airflow_elspeth.operators.fork import ForkOperator, fork_ref, row_limit

RowCallable = Callable[[dict[str, Any]], "dict[str, Any] | None"]
MESSAGE_LIMIT = 2000
# An offending value is kept whole up to MESSAGE_LIMIT bytes of canonical JSON, found by a walk that
# stops there; past it, its repr is cut, built by a reprlib that elides deep and long containers
# (at most 10 items a level, 3 levels), so neither serialises a huge or shared-reference value whole.
_SHOWN_LIMIT = PayloadLimit(MESSAGE_LIMIT, "the longest value kept whole")
_shown = reprlib.Repr()
_shown.maxlevel = 3
_shown.maxlist = _shown.maxtuple = _shown.maxdict = _shown.maxset = _shown.maxfrozenset = 10
# Long enough that the cut below keeps the first MESSAGE_LIMIT characters of a long text's repr.
_shown.maxstring = _shown.maxlong = _shown.maxother = 2 * MESSAGE_LIMIT + 3
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


class BranchOperator(BaseOperator):
    """Process one branch's tokens: ``python_callable(row) -> dict | None`` for every row.

    A dict is the branch output (an arrival at the coalesce when this is the branch's last step);
    ``None`` drops the row on this branch; an exception, after ``row_retries``, is a loss
    ``error:<ExceptionType>`` with its message in the audit trail. A retried task skips tokens it
    already finished, and rows the coalesce already decided are skipped.

    Chain several steps of one branch (``fork >> step1 >> step2 >> coalesce``): each step takes the
    previous step's output, and a row the previous step lost stays lost with the same reason. At the
    last step of a branch that no coalesce joins, each token's terminal outcome is written with its
    result (``completed``/``not_joined``, or ``lost`` with the reason).

    Whatever ends the task (an exception, ``sys.exit``, ``KeyboardInterrupt``, SIGTERM,
    ``execution_timeout``), the rows already finished are written first. At ``execution_timeout``
    the rows whose callable is still running are losses ``error:AirflowTaskTimeout``; the callable
    runs on daemon threads, so a hung call does not keep the task alive.

    :param fork: the ForkOperator whose tokens this branch processes.
    :param branch: the branch name (one of ``fork.branches``).
    :param python_callable: called once per row with a copy of the row (or the previous step's output).
    :param output_fields: the step's output contract, ``{field: type}``: every output must have each
        field, of that type (``str``, ``int``, ``float``, ``bool``, ``dict``, ``list``, ``None``, a tuple
        or union of them: ``int | None``; ``bool`` is no ``int``, ``float`` takes ``int``; other fields
        pass). An output that breaks it is a loss ``contract:<field>`` (no row retry: the callable
        answered), with the offending value in the trail. Plain Python types rather than a JSON
        Schema or a pydantic model: DAG files are Python, nothing new to install, and the outputs
        are JSON objects, whose kinds these are. A ``merge="union"`` coalesce refuses, at parse
        time, branches declaring one field with different types; see ``airflow_elspeth/core/contract.py``.
    :param may_drop: the callable may return None (drop rows); a ``require_all`` coalesce fed by this
        step gets a parse-time warning (every dropped row fails it).
    :param chunk: process only this chunk; set by ``.partial(...).expand(chunk=fork.chunks)``.
    :param row_retries: extra calls after an exception before the row is lost.
    :param row_retry_delay: seconds between those calls (a finite number >= 0).
    :param max_failed_rows: fail the task (not only the rows) when more rows than this fail.
    :param max_failed_rate: fail the task when more than this fraction of rows fail, once at
        least ``min_rows_for_rate`` rows were processed.
    :param min_rows_for_rate: rows to process before ``max_failed_rate`` is judged.
    :param concurrency: threads calling ``python_callable`` at once (for I/O-bound callables).
    :param batch_size: rows written per transaction (at most; by default a chunk's worth). Results
        are written as soon as the write before them committed (a result only arrives at the
        coalesce once written); no new row starts while this many are unwritten.
    :param flush_seconds: no new row starts while a finished one has waited this long unwritten
        (the audit store is slower than the callable: the wait must not grow).
    :param audit_conn_id: leave unset: the step uses its fork's audit store (the fork's
        ``audit_conn_id``, or the default store when the fork names none). Naming another one is an
        error at DAG parse time (``TopologyError``, naming both tasks and both connection ids).
    """

    ui_color = "#d4e8f7"
    _elspeth_role = "branch"

    def __init__(
        self,
        *,
        fork: ForkOperator,
        branch: str,
        python_callable: RowCallable,
        output_fields: Mapping[str, Any] | None = None,
        may_drop: bool = False,
        chunk: int | None = None,
        row_retries: int = 0,
        row_retry_delay: float = 0.0,
        max_failed_rows: int | None = None,
        max_failed_rate: float | None = None,
        min_rows_for_rate: int = 100,
        concurrency: int = 1,
        batch_size: int = 1000,
        flush_seconds: float = 1.0,
        audit_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(fork, ForkOperator):
            raise ElspethConfigError(f"fork must be a ForkOperator, got {type(fork).__name__}")
        if branch not in fork.branches:
            raise ElspethConfigError(
                f"branch {branch!r} is not a branch of fork {fork.task_id!r} ({fork.branches!r})"
            )
        if not callable(python_callable):
            raise ElspethConfigError(f"python_callable must be callable, got {python_callable!r}")
        if not isinstance(may_drop, bool):
            raise ElspethConfigError(f"may_drop must be True or False, got {may_drop!r}")
        self.contract: Contract | None = (
            contract_of(output_fields, param=f"{kwargs.get('task_id')}: output_fields")
            if output_fields is not None
            else None
        )
        _check_int("row_retries", row_retries, minimum=0)
        _check_number("row_retry_delay", row_retry_delay, positive=False)
        _check_int("concurrency", concurrency, minimum=1)
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("min_rows_for_rate", min_rows_for_rate, minimum=1)
        _check_number("flush_seconds", flush_seconds, positive=True)
        if max_failed_rows is not None:
            _check_int("max_failed_rows", max_failed_rows, minimum=0)
        if max_failed_rate is not None and not (
            isinstance(max_failed_rate, (int, float))
            and not isinstance(max_failed_rate, bool)
            and 0 <= max_failed_rate < 1
        ):
            raise ElspethConfigError(f"max_failed_rate must be in [0, 1), got {max_failed_rate!r}")
        self.fork_task_id = fork.task_id
        self.branch = branch
        self.python_callable = python_callable
        self.output_fields = dict(output_fields) if output_fields is not None else None
        self.may_drop = may_drop
        self.chunk = chunk
        self.row_retries = row_retries
        self.row_retry_delay = row_retry_delay
        self.max_failed_rows = max_failed_rows
        self.max_failed_rate = max_failed_rate
        self.min_rows_for_rate = min_rows_for_rate
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.audit_conn_id = topology.fork_store(self, audit_conn_id, fork)
        self._executing_thread: int | None = None  # the thread running execute(), for on_kill
        self._row_limit: PayloadLimit | None = None  # [elspeth] max_row_bytes, read by execute

    def previous_step(self) -> str | None:
        """The task id of this branch's previous step, if this step follows another step of it."""
        steps = topology.previous_steps(self)
        if len(steps) > 1:
            raise ElspethConfigError(
                f"{self.task_id}: several previous steps for branch {self.branch!r}: {steps}"
            )
        return steps[0] if steps else None

    def consuming_coalesces(self) -> list[str]:
        """The coalesces that join this branch downstream of this step (through later steps).

        A row is skipped only once all of them decided it: another coalesce of the same fork that
        does not join this branch, or joins it too but decided first, does not make it unneeded.
        """
        return topology.consuming_coalesces(self)

    def is_last_step(self) -> bool:
        """True when no later step of the same fork and branch follows this one."""
        return topology.is_last_step(self)

    def on_kill(self) -> None:
        """On SIGTERM the Airflow task runner calls this from its signal handler, then lets the task
        run on until it is killed: raising here ends ``execute``, which writes the finished rows.

        Called after ``execute`` ended (e.g. on ``execution_timeout``), it does nothing.
        """
        if self._executing_thread is not None and self._executing_thread == threading.get_ident():
            self._executing_thread = None  # once: the flush that follows is not interrupted again
            raise AirflowTaskTerminated(f"{self.task_id}: terminated (SIGTERM) while processing rows")

    def execute(self, context: Context) -> dict[str, Any]:
        self._executing_thread = threading.get_ident()
        try:
            return self._execute(context)
        finally:
            self._executing_thread = None

    def _execute(self, context: Context) -> dict[str, Any]:
        self._row_limit = row_limit()  # a bad setting fails the task before any row runs
        ti = context["ti"]
        ref = fork_ref(ti, self.fork_task_id)
        if not ref:
            raise ForkRunMissing(f"fork {self.fork_task_id!r} has no audit run for this DAG run")
        run_id = ref["audit_run_id"]
        store = AuditStore(ElspethAuditHook(audit_conn_id=self.audit_conn_id).get_engine())
        previous = self.previous_step()
        coalesces = self.consuming_coalesces()
        final_step = not coalesces and self.is_last_step()
        store.register_node(
            run_id,
            self.task_id,
            NodeType.BRANCH,
            self.branch,
            {
                "branch": self.branch,
                "previous_step": previous,
                "callable": _callable_name(self.python_callable),
                "output_fields": self.contract.as_dict() if self.contract is not None else None,
                "may_drop": self.may_drop,
            },
        )
        chunks = [self.chunk] if self.chunk is not None else list(range(ref["chunks_total"]))
        clock = store.clock()
        writer = _ResultWriter(
            self,
            store,
            run_id,
            ti.try_number,
            coalesces,
            final_step=final_step,
            delivering_to=coalesces if self.is_last_step() else (),
        )
        pool = _WorkerPool(
            functools.partial(self._process_job, writer),
            writer,
            self.concurrency,
            f"elspeth-{self.branch}",
            clock,
        )
        try:
            for chunk in chunks:
                work = branch_work(
                    store.engine, run_id, self.task_id, self.branch, chunk, previous, coalesces=coalesces
                )
                writer.start_chunk(chunk, work.tokens_total, work.items)
                writer.counts["resumed_done"] += work.already_done
                writer.skip(work.decided_tokens)
                self._run_chunk(pool, work.items, chunk, writer)
        except BaseException as exc:  # only to write what is finished: always re-raised
            self._executing_thread = None  # a SIGTERM now does not interrupt that write
            self._flush_on_exit(exc, pool, writer, clock)
            raise
        finally:
            pool.close()
        summary = {"branch": self.branch, "audit_run_id": run_id, "chunks": chunks, **dict(writer.counts)}
        self.log.info("Branch %s: %s", self.branch, summary)
        return summary

    def _run_chunk(self, pool: _WorkerPool, items: list[WorkItem], chunk: int, writer: _ResultWriter) -> None:
        """Process one chunk on the pool while the writer thread writes results as they finish.

        The callable runs on worker threads, which take the chunk's rows one at a time and hand each
        result to the writer, whose own thread writes it: a finished result is written while slow
        rows still run, and becomes an arrival only once written. A row decided meanwhile is not
        started (``writer.claim``, checked by the worker just before it calls the callable), and the
        writer records it skipped. No row passes through the main thread, which only waits.
        """
        writer.start()
        try:
            pool.run(items, chunk)
            writer.drain()
        finally:
            writer.stop()

    def _flush_on_exit(
        self, exc: BaseException, pool: _WorkerPool, writer: _ResultWriter, clock: Callable[[], datetime]
    ) -> None:
        """Write the rows finished before the task ended; at a timeout, the running rows as losses.

        Rows still running at any other exit stay unwritten (the coalesce records the task's loss,
        a retry processes them again). A failure to write is logged: ``exc`` is what ends the task.
        """
        running = pool.close()  # every finished result is in the writer's buffer
        writer.stop()  # its batch in flight is written or left in the buffer, never half
        if isinstance(exc, AirflowTaskTimeout):
            now = clock()
            writer.keep(self._timed_out(job, started, now) for job, started in running)
        try:
            writer.flush()
        except Exception:
            self.log.exception(
                "Branch %s: could not write the rows finished before the task ended", self.branch
            )

    def _timed_out(self, job: _Job, started: datetime, now: datetime) -> NodeResult:
        item = job.item
        return NodeResult(
            token_id=item.token_id,
            row_id=item.row_id,
            chunk=job.chunk,
            input_hash=item.input_hash,
            status=NodeStatus.FAILED,
            started_at=started,
            completed_at=now,
            error={
                "type": AirflowTaskTimeout.__name__,
                "message": f"execution_timeout {self.execution_timeout} expired while the callable ran",
            },
        )

    def _process_job(
        self, writer: _ResultWriter, job: _Job, clock: Callable[[], datetime]
    ) -> NodeResult | None:
        """The job's result, or None when its row was decided before it started (not run)."""
        writer.wait_for_room()  # backpressure: the writer is behind (raises its failure)
        if not writer.claim(job.item):
            return None
        return self._process_one(job.item, job.chunk, clock)

    def _output_limit(self) -> PayloadLimit:
        """The largest output allowed (``[elspeth] max_row_bytes``), as ``execute`` read it."""
        if self._row_limit is None:  # _process_one called on its own (unit tests)
            self._row_limit = row_limit()
        return self._row_limit

    def _process_one(self, item: WorkItem, chunk: int, clock: Callable[[], datetime]) -> NodeResult:
        started = clock()
        base: dict[str, Any] = {
            "token_id": item.token_id,
            "row_id": item.row_id,
            "chunk": chunk,
            "input_hash": item.input_hash,
        }
        if item.input_row is None:  # lost at the previous step: stays lost, with the same reason
            status = item.upstream_status or NodeStatus.DROPPED
            error = (
                {**(item.upstream_error or {}), "lost_at_previous_step": True}
                if status == NodeStatus.FAILED
                else None
            )
            return NodeResult(**base, status=status, started_at=started, completed_at=clock(), error=error)
        attempts = 0
        while True:
            attempts += 1
            try:
                output = self.python_callable(dict(item.input_row))
                if output is not None and not isinstance(output, Mapping):
                    raise TypeError(
                        f"python_callable must return a dict or None, got {type(output).__name__}"
                    )
                violation = None
                if output is not None and self.contract is not None:
                    violation = self.contract.violation(output)
                output_hash = body = None
                if output is not None and violation is None:
                    output_hash, body = hash_value(
                        dict(output), what=f"output for row {item.row_key!r}", limit=self._output_limit()
                    )
                break
            except Exception as err:  # the user callable failing on a row is data: recorded as a loss
                if attempts <= self.row_retries:
                    if self.row_retry_delay:
                        time.sleep(self.row_retry_delay)
                    continue
                error = {"type": _type_name(err), "message": _message(err), "attempts": attempts}
                return NodeResult(
                    **base,
                    status=NodeStatus.FAILED,
                    started_at=started,
                    completed_at=clock(),
                    error=error,
                    context={"attempts": attempts},
                )
        if violation is not None:
            return NodeResult(
                **base,
                status=NodeStatus.FAILED,
                started_at=started,
                completed_at=clock(),
                error=_contract_error(violation),
                context={"attempts": attempts} if attempts > 1 else None,
            )
        return NodeResult(
            **base,
            status=NodeStatus.COMPLETED if output is not None else NodeStatus.DROPPED,
            started_at=started,
            completed_at=clock(),
            output_hash=output_hash,
            output_body=body,
            context={"attempts": attempts} if attempts > 1 else None,
        )


@dataclass(frozen=True, eq=False)
class _Job:
    """One row to process (compared and hashed by identity)."""

    item: WorkItem
    chunk: int


class _WorkerPool:
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
        self,
        fn: Callable[[_Job, Callable[[], datetime]], NodeResult | None],
        writer: _ResultWriter,
        workers: int,
        name: str,
        clock: Callable[[], datetime],
    ) -> None:
        self._fn = fn
        self._writer = writer
        self._clock = clock
        # Reentrant: a signal can leave the main thread holding it, and close() runs after that.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._running: dict[_Job, datetime] = {}
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

    def close(self) -> list[tuple[_Job, datetime]]:
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
                    job = _Job(item, chunk)
                    self._running[job] = self._clock()
                try:
                    result = self._fn(job, self._clock)
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


class _ResultWriter:
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
    main thread, which ends the task (after writing what it can, :meth:`BranchOperator._flush_on_exit`).

    Every ``DECIDED_REFRESH_SECONDS`` the writer thread also reads which rows of the chunk every
    consuming coalesce has decided by its policy (one query per chunk, not per row; a resolution
    can be reopened, see :func:`~airflow_elspeth.audit.read.work.decided_in_chunk`) and records
    those not yet started as skipped; a worker :meth:`claim`-s a row before calling the callable,
    under the same lock, so a row is either run or skipped, never both.
    """

    def __init__(
        self,
        task: BranchOperator,
        store: AuditStore,
        run_id: str,
        attempt: int,
        coalesces: list[str],
        *,
        final_step: bool = False,
        delivering_to: Sequence[str] = (),
    ) -> None:
        self.task = task
        self.coalesces = coalesces
        self.final_step = final_step
        self.delivering_to = delivering_to
        self.store = store
        self.run_id = run_id
        self.attempt = attempt
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
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
            target=self._run, name=f"elspeth-{self.task.branch}-writer", daemon=True
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
            self.task.log.warning("Branch %s: the writer thread did not stop", self.task.branch)
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
            self.store.record_skipped(self.run_id, self.task.task_id, {self.chunk: self.tokens_total}, tokens)
            self.counts["skipped_decided"] += len(tokens)

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
                    len(self.buffer) >= self.task.batch_size
                    or time.monotonic() - self.oldest >= self.task.flush_seconds
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
                batch = self.buffer[: self.task.batch_size]
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
                    self.task.log.warning(
                        "Branch %s: the audit store is unreachable (%s: %s); writing again shortly",
                        self.task.branch,
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
        decided = decisions_in_chunk(self.store.engine, self.run_id, self.chunk, coalesces=self.coalesces)
        marked = [_discard_if_decided(r, decided) for r in results]
        self.store.write_branch_results(
            self.run_id,
            self.task.task_id,
            self.attempt,
            marked,
            chunk_tokens={self.chunk: self.tokens_total},
            final_step=self.final_step,
            delivering_to=self.delivering_to,
        )
        self.counts.update(str(r.status) for r in marked)
        self.errors.update(str((r.error or {}).get("type")) for r in marked if r.status == NodeStatus.FAILED)

    def _refresh_decided(self) -> None:
        """Rows of the chunk decided by every consuming coalesce's policy: those not started are
        skipped now."""
        self._next_refresh = time.monotonic() + DECIDED_REFRESH_SECONDS
        if self.coalesces:
            decided = decided_in_chunk(self.store.engine, self.run_id, self.chunk, coalesces=self.coalesces)
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
        self.store.abort_attempt_errors(
            self.run_id, self.task.task_id, self.attempt, {self.chunk: self.tokens_total}
        )

    def _check_threshold(self) -> None:
        task, counts = self.task, self.counts
        processed = sum(counts[s] for s in TERMINAL_NODE_STATUSES)
        failed = counts[NodeStatus.FAILED]
        over_count = task.max_failed_rows is not None and failed > task.max_failed_rows
        over_rate = (
            task.max_failed_rate is not None
            and processed >= task.min_rows_for_rate
            and failed / processed > task.max_failed_rate
        )
        if not (over_count or over_rate):
            return
        self._abort()
        common = ", ".join(f"{kind} x{n}" for kind, n in self.errors.most_common(3))
        limit = (
            f"max_failed_rows={task.max_failed_rows}"
            if over_count
            else f"max_failed_rate={task.max_failed_rate} (after {processed} rows)"
        )
        raise BranchFailureThresholdError(
            f"branch {task.branch!r}: {failed} of {processed} rows failed, over {limit}; "
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


def _contract_error(violation: Violation) -> dict[str, Any]:
    """The stored error of an output that broke its contract: the field, the offending value (as
    JSON when it is JSON and short, else its ``repr`` cut short) and the kinds the contract takes."""
    shown: Any = violation.value
    try:
        payload_size(shown, _SHOWN_LIMIT)
        keep_whole = len(json.dumps(shown, allow_nan=False)) <= MESSAGE_LIMIT
    except (TypeError, ValueError):  # too large, or not JSON (a date, a NaN, a set...): its repr
        keep_whole = False
    if not keep_whole:
        try:
            shown = _shown.repr(shown)[:MESSAGE_LIMIT]
        except Exception:  # a value whose repr raises is still recorded, by its type
            shown = f"<{type(shown).__name__}: repr() raised>"
    return {
        "type": CONTRACT_VIOLATION,
        "message": violation.message,
        "contract": {
            "field": violation.field,
            "value": shown,
            "expected": list(violation.expected),
            "missing": violation.missing,
        },
    }


def _type_name(err: BaseException) -> str:
    try:
        name = type(err).__name__
    except Exception:
        return "Exception"
    return name if isinstance(name, str) else "Exception"


def _message(err: BaseException) -> str:
    """The exception's message: ``str``, else ``repr``, else a placeholder (both may raise)."""
    for render in (str, repr):
        try:
            return str.__str__(render(err))[:MESSAGE_LIMIT]
        except Exception:
            continue
    return f"<{_type_name(err)}: str() and repr() raised>"


def _callable_name(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ElspethConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, *, positive: bool) -> None:
    """A finite int or float, > 0 when ``positive``, else >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        what = "a finite number > 0" if positive else "a finite number >= 0"
        raise ElspethConfigError(f"{name} must be {what}, got {value!r}")
