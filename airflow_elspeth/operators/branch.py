"""BranchOperator: run one branch's callable over its tokens, row by row, recording every result."""

from __future__ import annotations

import functools
import json
import math
import reprlib
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowTaskTerminated, AirflowTaskTimeout

from airflow_elspeth import metrics, topology
from airflow_elspeth.audit.read.work import WorkItem
from airflow_elspeth.audit.store import NodeResult
from airflow_elspeth.config_errors import in_task, names_task
from airflow_elspeth.core.canonical import PayloadLimit, hash_value, payload_size
from airflow_elspeth.core.contract import Contract, Violation, contract_of
from airflow_elspeth.core.vocabulary import CONTRACT_VIOLATION, NodeStatus, NodeType
from airflow_elspeth.exceptions import ElspethConfigError, ForkRunMissing
from airflow_elspeth.hooks.audit import ElspethAuditHook
from airflow_elspeth.operators.fork import ForkOperator, fork_ref, row_limit
from airflow_elspeth.runtime.branch import BranchRuntime, StepRun, StepSettings, row_result

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

    @names_task
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
            contract_of(output_fields, param="output_fields") if output_fields is not None else None
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
            with in_task(self):  # a bad [elspeth] setting or audit connection names DAG and task
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
        store = ElspethAuditHook(audit_conn_id=self.audit_conn_id).get_store()
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
        step = StepRun(
            run_id=run_id,
            attempt=ti.try_number,
            previous_step=previous,
            coalesces=tuple(coalesces),
            final_step=final_step,
            delivering_to=tuple(coalesces) if self.is_last_step() else (),
        )
        runtime = BranchRuntime(store, self._settings(), step, self._process_one, self.log, store.clock())
        try:
            counts = runtime.run(chunks)
        except BaseException as exc:  # only to write what is finished: always re-raised
            self._executing_thread = None  # a SIGTERM now does not interrupt that write
            # at a timeout the rows still running are losses; at any other end a retry runs them
            runtime.flush_on_exit(self._timed_out if isinstance(exc, AirflowTaskTimeout) else None)
            raise
        finally:
            runtime.close()
            # What this try wrote and kept, also when it ends on an exception (its rows stay written).
            metrics.branch_try(
                runtime.tally(), {"dag_id": ti.dag_id, "task_id": self.task_id, "branch": self.branch}
            )
        summary = {"branch": self.branch, "audit_run_id": run_id, "chunks": chunks, **counts}
        self.log.info("Branch %s: %s", self.branch, summary)
        return summary

    def _settings(self) -> StepSettings:
        """What the runtime takes from this step's parameters."""
        return StepSettings(
            node_id=self.task_id,
            branch=self.branch,
            concurrency=self.concurrency,
            batch_size=self.batch_size,
            flush_seconds=self.flush_seconds,
            max_failed_rows=self.max_failed_rows,
            max_failed_rate=self.max_failed_rate,
            min_rows_for_rate=self.min_rows_for_rate,
        )

    def _timed_out(self, item: WorkItem, chunk: int, started: datetime, now: datetime) -> NodeResult:
        """A row still running at ``execution_timeout``: a loss ``error:AirflowTaskTimeout``."""
        return row_result(
            item,
            chunk,
            status=NodeStatus.FAILED,
            started_at=started,
            completed_at=now,
            error={
                "type": AirflowTaskTimeout.__name__,
                "message": f"execution_timeout {self.execution_timeout} expired while the callable ran",
            },
        )

    def _output_limit(self) -> PayloadLimit:
        """The largest output allowed (``[elspeth] max_row_bytes``), as ``execute`` read it."""
        if self._row_limit is None:  # _process_one called on its own (unit tests)
            self._row_limit = row_limit()
        return self._row_limit

    def _process_one(self, item: WorkItem, chunk: int, clock: Callable[[], datetime]) -> NodeResult:
        started = clock()
        result = functools.partial(row_result, item, chunk)
        if item.input_row is None:  # lost at the previous step: stays lost, with the same reason
            status = item.upstream_status or NodeStatus.DROPPED
            error = (
                {**(item.upstream_error or {}), "lost_at_previous_step": True}
                if status == NodeStatus.FAILED
                else None
            )
            return result(status=status, started_at=started, completed_at=clock(), error=error)
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
                return result(
                    status=NodeStatus.FAILED,
                    started_at=started,
                    completed_at=clock(),
                    error=error,
                    context={"attempts": attempts},
                )
        if violation is not None:
            return result(
                status=NodeStatus.FAILED,
                started_at=started,
                completed_at=clock(),
                error=_contract_error(violation),
                context={"attempts": attempts} if attempts > 1 else None,
            )
        return result(
            status=NodeStatus.COMPLETED if output is not None else NodeStatus.DROPPED,
            started_at=started,
            completed_at=clock(),
            output_hash=output_hash,
            output_body=body,
            context={"attempts": attempts} if attempts > 1 else None,
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
