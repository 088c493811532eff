"""BranchOperator: run one branch's callable over its tokens, row by row, recording every result."""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowTaskTerminated, AirflowTaskTimeout

from airflow_elspeth import topology
from airflow_elspeth.audit.read.work import WorkItem, branch_work, decided_in_chunk, decided_rows
from airflow_elspeth.audit.store import AuditStore, NodeResult
from airflow_elspeth.core.canonical import hash_value
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
from airflow_elspeth.operators.fork import ForkOperator, fork_ref

RowCallable = Callable[[dict[str, Any]], "dict[str, Any] | None"]
MESSAGE_LIMIT = 2000


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
    :param batch_size: rows written per transaction (at most).
    :param flush_seconds: longest a finished row waits before it is written; a result only
        arrives at the coalesce once written.
    :param audit_conn_id: the audit store connection (see ForkOperator).
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
        batch_size: int = 500,
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
        self.audit_conn_id = audit_conn_id
        self._executing_thread: int | None = None  # the thread running execute(), for on_kill

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
            delivering=bool(coalesces) and self.is_last_step(),
        )
        pool = _WorkerPool(self._process_job, self.concurrency, f"elspeth-{self.branch}", clock)
        try:
            for chunk in chunks:
                work = branch_work(
                    store.engine, run_id, self.task_id, self.branch, chunk, previous, coalesces=coalesces
                )
                writer.start_chunk(chunk, work.tokens_total)
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
        """Process one chunk on the pool, writing results as they finish.

        The callable runs on worker threads so that finished rows are written while a slow row is
        still running: a result becomes an arrival only once it is written. Rows decided meanwhile
        (``writer.decided``, refreshed at every write) are not started.
        """
        todo = iter(items)
        skipped: list[str] = []

        def refill() -> None:
            while pool.pending < 2 * self.concurrency:
                item = next(todo, None)
                if item is None:
                    return
                if item.row_id in writer.decided:
                    skipped.append(item.token_id)
                else:
                    pool.submit(_Job(item, chunk))

        refill()
        while pool.pending:
            done = pool.next(timeout=self.flush_seconds)
            if done is None:
                writer.flush(when_due=True)
                continue
            if done.error is not None:
                raise done.error  # sys.exit, KeyboardInterrupt... in the callable end the task
            if done.result is not None:
                writer.keep([done.result])
            pool.taken()
            writer.flush(when_due=True)
            refill()
        writer.flush()
        writer.skip(skipped)

    def _flush_on_exit(
        self, exc: BaseException, pool: _WorkerPool, writer: _ResultWriter, clock: Callable[[], datetime]
    ) -> None:
        """Write the rows finished before the task ended; at a timeout, the running rows as losses.

        Rows still running at any other exit stay unwritten (the coalesce records the task's loss,
        a retry processes them again). A failure to write is logged: ``exc`` is what ends the task.
        """
        finished, running = pool.close()
        writer.keep(done.result for done in finished if done.result is not None)
        if isinstance(exc, AirflowTaskTimeout):
            now = clock()
            writer.keep(self._timed_out(job, started, now) for job, started in running)
        try:
            writer.flush(ending=True)
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

    def _process_job(self, job: _Job, clock: Callable[[], datetime]) -> NodeResult:
        return self._process_one(job.item, job.chunk, clock)

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
                    output_hash, body = hash_value(dict(output), what=f"output for row {item.row_key!r}")
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


@dataclass(frozen=True)
class _Done:
    """A finished job: its result, or what the callable raised past ``except Exception``."""

    job: _Job
    result: NodeResult | None
    error: BaseException | None = None


class _WorkerPool:
    """Daemon threads running ``fn(job, clock)``, never joined.

    ``concurrent.futures`` joins its threads on shutdown and at interpreter exit, so a hung
    callable would keep the task alive past its ``execution_timeout``. Here :meth:`close` only
    stops the pool: idle workers end, a busy one is abandoned and ends with the process.

    Every job is not started, running, or finished, and one lock guards the moves between those,
    so :meth:`close` sees each job in exactly one of them. A finished job stays in the pool until
    the caller, having buffered its result, calls :meth:`taken`: an exception raised in between
    (a signal) cannot lose it.
    """

    def __init__(
        self,
        fn: Callable[[_Job, Callable[[], datetime]], NodeResult],
        workers: int,
        name: str,
        clock: Callable[[], datetime],
    ) -> None:
        self._fn = fn
        self._clock = clock
        self._todo: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # Reentrant: a signal can leave the main thread holding it, and close() runs after that.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._running: dict[_Job, datetime] = {}
        self._finished: deque[_Done] = deque()
        self._stopped = False  # no job starts any more
        self._closed = False
        self._workers: list[threading.Thread] = []
        self._size = workers
        self._name = name
        self.pending = 0  # submitted and not yet taken (main thread only)

    def submit(self, job: _Job) -> None:
        if len(self._workers) < self._size:
            worker = threading.Thread(
                target=self._work, name=f"{self._name}_{len(self._workers)}", daemon=True
            )
            worker.start()
            self._workers.append(worker)
        self.pending += 1
        self._todo.put(job)

    def next(self, timeout: float) -> _Done | None:
        """The oldest finished job (still in the pool), or None if none finishes within ``timeout``."""
        with self._changed:
            if not self._finished:
                self._changed.wait(timeout)
            return self._finished[0] if self._finished else None

    def taken(self) -> None:
        """The job :meth:`next` returned is dealt with: remove it."""
        with self._lock:
            self._finished.popleft()
        self.pending -= 1

    def close(self) -> tuple[list[_Done], list[tuple[_Job, datetime]]]:
        """Stop the pool; returns the jobs finished but not taken, and the running ones."""
        with self._lock:
            if self._closed:
                return [], []
            self._closed = self._stopped = True
            finished, running = list(self._finished), list(self._running.items())
            self._finished.clear()
        for _ in self._workers:
            self._todo.put(None)  # wakes the idle workers, which then end
        return finished, running

    def _work(self) -> None:
        while True:
            job = self._todo.get()
            with self._lock:
                if job is None or self._stopped:
                    return
                self._running[job] = self._clock()
            try:
                done = _Done(job, self._fn(job, self._clock))
            except BaseException as err:  # handed to the main thread, which re-raises it
                done = _Done(job, None, err)
            with self._lock:
                del self._running[job]
                if done.error is not None:
                    self._stopped = True  # the task is ending: no new row starts
                if not self._closed:
                    self._finished.append(done)
                    self._changed.notify()


class _ResultWriter:
    """Buffers a branch task's results and writes them a batch at a time.

    A batch is written when it reaches ``batch_size`` rows or when its oldest result has waited
    ``flush_seconds``; each write checks which rows were decided meanwhile (their results are kept,
    marked discarded) and the failure threshold. A batch leaves the buffer only once written (a
    write interrupted by the task ending is done again: writes are idempotent).
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
        delivering: bool = False,
    ) -> None:
        self.task = task
        self.coalesces = coalesces
        self.final_step = final_step
        self.delivering = delivering
        self.store = store
        self.run_id = run_id
        self.attempt = attempt
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.decided: set[str] = set()
        self.buffer: list[NodeResult] = []
        self.buffered: set[str] = set()  # the buffer's token ids
        self.oldest = 0.0
        self.chunk = 0
        self.tokens_total = 0
        self.aborted = False

    def start_chunk(self, chunk: int, tokens_total: int) -> None:
        self.chunk, self.tokens_total = chunk, tokens_total

    def skip(self, token_ids: Iterable[str]) -> None:
        """Record tokens of this chunk not processed because their rows were already decided."""
        tokens = list(token_ids)
        if tokens:
            self.store.record_skipped(self.run_id, self.task.task_id, {self.chunk: self.tokens_total}, tokens)
            self.counts["skipped_decided"] += len(tokens)

    def keep(self, results: Iterable[NodeResult]) -> None:
        """Buffer results without writing them yet (a token already buffered is kept once)."""
        for result in results:
            if result.token_id in self.buffered:
                continue
            if not self.buffer:
                self.oldest = time.monotonic()
            self.buffer.append(result)
            self.buffered.add(result.token_id)

    def flush(self, *, when_due: bool = False, ending: bool = False) -> None:
        """Write the buffer (``when_due``: only if it is full or old enough).

        :param ending: the task is ending on an exception: the threshold is still applied (its
            error is the caller's to log), and after an abort the rows failed since are aborted too.
        """
        if not self.buffer:
            return
        due = (
            len(self.buffer) >= self.task.batch_size
            or time.monotonic() - self.oldest >= self.task.flush_seconds
        )
        if when_due and not due:
            return
        decided = decided_rows(
            self.store.engine, self.run_id, [r.row_id for r in self.buffer], coalesces=self.coalesces
        )
        results = [_discard_if_decided(r, decided) for r in self.buffer]
        self.store.write_branch_results(
            self.run_id,
            self.task.task_id,
            self.attempt,
            results,
            chunk_tokens={self.chunk: self.tokens_total},
            final_step=self.final_step,
            delivering=self.delivering,
        )
        self.buffer, self.buffered = [], set()
        self.counts.update(str(r.status) for r in results)
        self.errors.update(str((r.error or {}).get("type")) for r in results if r.status == NodeStatus.FAILED)
        if ending and self.aborted:
            self._abort()
            return
        if not ending:
            self.decided.update(
                decided_in_chunk(self.store.engine, self.run_id, self.chunk, coalesces=self.coalesces)
            )
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
        keep_whole = len(json.dumps(shown, allow_nan=False)) <= MESSAGE_LIMIT
    except (TypeError, ValueError):  # not JSON (a date, a NaN, a set...): its repr stands in
        keep_whole = False
    if not keep_whole:
        try:
            shown = repr(shown)[:MESSAGE_LIMIT]
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
