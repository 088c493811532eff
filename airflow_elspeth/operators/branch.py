"""BranchOperator: run one branch's callable over its tokens, row by row, recording every result."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException

from airflow_elspeth.audit.queries import WorkItem, branch_work, decided_in_chunk, decided_rows
from airflow_elspeth.audit.store import COMPLETED, DISCARDED, DROPPED, FAILED, AuditStore, NodeResult
from airflow_elspeth.core.canonical import hash_value
from airflow_elspeth.core.config import ElspethConfigError
from airflow_elspeth.hooks.audit import ElspethAuditHook
from airflow_elspeth.operators.fork import ForkOperator, fork_ref

RowCallable = Callable[[dict[str, Any]], "dict[str, Any] | None"]


class BranchFailureThresholdError(AirflowException):
    """Too many rows failed: a systematic error fails the task (and its retry tries them again)."""


class BranchOperator(BaseOperator):
    """Process one branch's tokens: ``python_callable(row) -> dict | None`` for every row.

    A dict is the branch output (an arrival at the coalesce when this is the branch's last step);
    ``None`` drops the row on this branch; an exception, after ``row_retries``, is a loss
    ``error:<ExceptionType>`` with its message in the audit trail. A retried task skips tokens it
    already finished, and rows the coalesce already decided are skipped.

    Chain several steps of one branch (``fork >> step1 >> step2 >> coalesce``): each step takes the
    previous step's output, and a row the previous step lost stays lost with the same reason.

    :param fork: the ForkOperator whose tokens this branch processes.
    :param branch: the branch name (one of ``fork.branches``).
    :param python_callable: called once per row with a copy of the row (or the previous step's output).
    :param chunk: process only this chunk; set by ``.partial(...).expand(chunk=fork.chunks)``.
    :param row_retries: extra calls after an exception before the row is lost.
    :param row_retry_delay: seconds between those calls.
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

    def __init__(
        self,
        *,
        fork: ForkOperator,
        branch: str,
        python_callable: RowCallable,
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
        _check_int("row_retries", row_retries, minimum=0)
        _check_int("concurrency", concurrency, minimum=1)
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("min_rows_for_rate", min_rows_for_rate, minimum=1)
        if (
            isinstance(flush_seconds, bool)
            or not isinstance(flush_seconds, (int, float))
            or flush_seconds <= 0
        ):
            raise ElspethConfigError(f"flush_seconds must be a positive number, got {flush_seconds!r}")
        if max_failed_rows is not None:
            _check_int("max_failed_rows", max_failed_rows, minimum=0)
        if max_failed_rate is not None and not (
            isinstance(max_failed_rate, (int, float)) and 0 <= max_failed_rate < 1
        ):
            raise ElspethConfigError(f"max_failed_rate must be in [0, 1), got {max_failed_rate!r}")
        self.fork_task_id = fork.task_id
        self.branch = branch
        self.python_callable = python_callable
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

    def previous_step(self) -> str | None:
        """The task id of this branch's previous step, if this step follows another BranchOperator."""
        steps = [
            task.task_id
            for task in self.upstream_list
            if isinstance(task, BranchOperator)
            and task.branch == self.branch
            and task.fork_task_id == self.fork_task_id
        ]
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
        from airflow_elspeth.sensors.coalesce import CoalesceSensor

        found: set[str] = set()
        seen: set[str] = set()
        stack: list[Any] = [self]
        while stack:
            for task in stack.pop().downstream_list:
                if task.task_id in seen:
                    continue
                seen.add(task.task_id)
                if isinstance(task, CoalesceSensor):
                    if task.fork_task_id == self.fork_task_id and self.branch in task.coalesce.branches:
                        found.add(task.task_id)
                elif _step_of(task) == (self.fork_task_id, self.branch):
                    stack.append(task)
        return sorted(found)

    def execute(self, context: Context) -> dict[str, Any]:
        ti = context["ti"]
        ref = fork_ref(ti, self.fork_task_id)
        if not ref:
            raise AirflowException(f"fork {self.fork_task_id!r} has no audit run for this DAG run")
        run_id = ref["audit_run_id"]
        store = AuditStore(ElspethAuditHook(audit_conn_id=self.audit_conn_id).get_engine())
        previous = self.previous_step()
        store.register_node(
            run_id,
            self.task_id,
            "branch",
            self.branch,
            {
                "branch": self.branch,
                "previous_step": previous,
                "callable": _callable_name(self.python_callable),
            },
        )
        chunks = [self.chunk] if self.chunk is not None else list(range(ref["chunks_total"]))
        clock = store.clock()
        writer = _ResultWriter(self, store, run_id, ti.try_number, self.consuming_coalesces())
        for chunk in chunks:
            work = branch_work(
                store.engine, run_id, self.task_id, self.branch, chunk, previous, coalesces=writer.coalesces
            )
            writer.start_chunk(chunk, work.tokens_total)
            writer.counts["resumed_done"] += work.already_done
            writer.counts["skipped_decided"] += work.already_decided
            for result in self._results(work.items, chunk, clock, writer.decided):
                if result is None:
                    writer.flush(when_due=True)
                else:
                    writer.add(result)
            writer.flush()
        summary = {"branch": self.branch, "audit_run_id": run_id, "chunks": chunks, **dict(writer.counts)}
        self.log.info("Branch %s: %s", self.branch, summary)
        return summary

    def _results(
        self, items: list[WorkItem], chunk: int, clock: Callable[[], datetime], decided: set[str]
    ) -> Iterator[NodeResult | None]:
        """Results in completion order, with ``None`` whenever ``flush_seconds`` pass without one.

        The callable runs on worker threads so that finished rows are written while a slow row is
        still running: a result becomes an arrival only once it is written. Rows decided meanwhile
        (``decided``, refreshed at every write) are not started.
        """
        queue = iter(items)
        with ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix=f"elspeth-{self.branch}"
        ) as pool:
            running: set[Future[NodeResult]] = set()

            def refill() -> None:
                while len(running) < 2 * self.concurrency:
                    item = next(queue, None)
                    if item is None:
                        return
                    if item.row_id in decided:
                        continue
                    running.add(pool.submit(self._process_one, item, chunk, clock))

            refill()
            while running:
                done, _ = wait(running, timeout=self.flush_seconds, return_when=FIRST_COMPLETED)
                if not done:
                    yield None
                for future in done:
                    running.discard(future)
                    yield future.result()
                refill()

    def _process_one(self, item: WorkItem, chunk: int, clock: Callable[[], datetime]) -> NodeResult:
        started = clock()
        base = {
            "token_id": item.token_id,
            "row_id": item.row_id,
            "chunk": chunk,
            "input_hash": item.input_hash,
        }
        if item.input_row is None:  # lost at the previous step: stays lost, with the same reason
            status = item.upstream_status or DROPPED
            error = (
                {**(item.upstream_error or {}), "lost_at_previous_step": True} if status == FAILED else None
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
                output_hash = body = None
                if output is not None:
                    output_hash, body = hash_value(dict(output), what=f"output for row {item.row_key!r}")
                break
            except Exception as err:  # the user callable failing on a row is data: recorded as a loss
                if attempts <= self.row_retries:
                    if self.row_retry_delay:
                        time.sleep(self.row_retry_delay)
                    continue
                error = {"type": type(err).__name__, "message": str(err)[:2000], "attempts": attempts}
                return NodeResult(
                    **base,
                    status=FAILED,
                    started_at=started,
                    completed_at=clock(),
                    error=error,
                    context={"attempts": attempts},
                )
        return NodeResult(
            **base,
            status=COMPLETED if output is not None else DROPPED,
            started_at=started,
            completed_at=clock(),
            output_hash=output_hash,
            output_body=body,
            context={"attempts": attempts} if attempts > 1 else None,
        )


class _ResultWriter:
    """Buffers a branch task's results and writes them a batch at a time.

    A batch is written when it reaches ``batch_size`` rows or when its oldest result has waited
    ``flush_seconds``; each write checks which rows were decided meanwhile (their results are kept,
    marked discarded) and the failure threshold.
    """

    def __init__(
        self, task: BranchOperator, store: AuditStore, run_id: str, attempt: int, coalesces: list[str]
    ) -> None:
        self.task = task
        self.coalesces = coalesces
        self.store = store
        self.run_id = run_id
        self.attempt = attempt
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.decided: set[str] = set()
        self.buffer: list[NodeResult] = []
        self.oldest = 0.0
        self.chunk = 0
        self.tokens_total = 0

    def start_chunk(self, chunk: int, tokens_total: int) -> None:
        self.chunk, self.tokens_total = chunk, tokens_total

    def add(self, result: NodeResult) -> None:
        if not self.buffer:
            self.oldest = time.monotonic()
        self.buffer.append(result)
        self.flush(when_due=True)

    def flush(self, *, when_due: bool = False) -> None:
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
        self.buffer = []
        self.store.write_branch_results(
            self.run_id,
            self.task.task_id,
            self.attempt,
            results,
            chunk_tokens={self.chunk: self.tokens_total},
        )
        self.decided.update(
            decided_in_chunk(self.store.engine, self.run_id, self.chunk, coalesces=self.coalesces)
        )
        self.counts.update(r.status for r in results)
        self.errors.update(str((r.error or {}).get("type")) for r in results if r.status == FAILED)
        self._check_threshold()

    def _check_threshold(self) -> None:
        task, counts = self.task, self.counts
        processed = sum(counts[s] for s in (COMPLETED, DROPPED, FAILED, DISCARDED))
        failed = counts[FAILED]
        over_count = task.max_failed_rows is not None and failed > task.max_failed_rows
        over_rate = (
            task.max_failed_rate is not None
            and processed >= task.min_rows_for_rate
            and failed / processed > task.max_failed_rate
        )
        if not (over_count or over_rate):
            return
        self.store.abort_attempt_errors(
            self.run_id, task.task_id, self.attempt, {self.chunk: self.tokens_total}
        )
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


def _step_of(task: Any) -> tuple[str, str] | None:
    """(fork task id, branch) of a BranchOperator, mapped or not."""
    if isinstance(task, BranchOperator):
        return task.fork_task_id, task.branch
    if getattr(task, "operator_class", None) is BranchOperator:
        fork, branch = task.partial_kwargs.get("fork"), task.partial_kwargs.get("branch")
        return getattr(fork, "task_id", fork), branch
    return None


def _discard_if_decided(result: NodeResult, decided: Mapping[str, str]) -> NodeResult:
    """Work on a row decided meanwhile is kept, marked discarded: it can only arrive late."""
    if result.row_id not in decided or result.status != COMPLETED:
        return result
    late = "late_arrival_after_merge" if decided[result.row_id] == "merged" else "late_arrival_after_failure"
    return NodeResult(
        **{**result.__dict__, "status": DISCARDED, "context": {**(result.context or {}), "late": late}}
    )


def _callable_name(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ElspethConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
