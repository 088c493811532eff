"""ForkOperator: split rows into one token per (row, branch) and record them in the audit store."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context, XComArg, conf
from airflow.sdk.exceptions import AirflowFailException, AirflowTaskTerminated

from airflow_elspeth import metrics
from airflow_elspeth.audit.read.rows import iter_merged_rows
from airflow_elspeth.audit.store import AuditStore, ForkRow, RunIdentity, duplicate_key_error
from airflow_elspeth.config_errors import in_task, names_task
from airflow_elspeth.core.canonical import PayloadLimit, row_key_text
from airflow_elspeth.core.config import validate_branches
from airflow_elspeth.core.vocabulary import bad_row_run_reason, fork_error_run_reason
from airflow_elspeth.exceptions import ElspethConfigError, ForkInputError, PayloadError
from airflow_elspeth.hooks.audit import ElspethAuditHook

# The audit run reference is pushed under its own key: the return value is the list of chunk numbers,
# because Airflow maps (``.expand``) only over a task's return value, with its length recorded at push.
AUDIT_RUN_XCOM_KEY = "audit_run"


def fork_ref(ti: Any, fork_task_id: str) -> dict[str, Any] | None:
    """The audit run reference a fork pushed in this DAG run (None until the fork has completed)."""
    ref = ti.xcom_pull(task_ids=fork_task_id, key=AUDIT_RUN_XCOM_KEY)
    return dict(ref) if ref else None


# Rows the fork writes per transaction, in whole chunks: fewer SQLite commits (WAL syncs and
# checkpoints), still atomic per chunk; the validated rows of one write are held in memory. A write
# also ends at the first chunk boundary past FORK_CHARS_PER_WRITE characters of canonical JSON, so
# large rows do not multiply that memory by the rows a write could hold (5,000 x max_row_bytes).
FORK_ROWS_PER_WRITE = 5_000
FORK_CHARS_PER_WRITE = 64 * 1024 * 1024


def default_chunk_size() -> int:
    return conf.getint("elspeth", "chunk_size", fallback=1000)


MAX_ROW_BYTES_OPTION = "[elspeth] max_row_bytes"
# 1 MiB: records are rarely beyond kilobytes, and a task holds a write's worth of rows in memory
# (a branch step up to ``batch_size`` results, 1,000 by default; the fork whole chunks), so this
# limit times those rows bounds what input of any shape can make a task hold.
DEFAULT_MAX_ROW_BYTES = 1024 * 1024


def row_limit() -> PayloadLimit:
    """The largest source row or branch output, as canonical JSON: ``[elspeth] max_row_bytes``.

    :raises ElspethConfigError: for a value that is not a positive integer (Airflow's own
        ``AirflowConfigException`` for one that is not an integer).
    """
    return PayloadLimit(
        conf.getint("elspeth", "max_row_bytes", fallback=DEFAULT_MAX_ROW_BYTES), MAX_ROW_BYTES_OPTION
    )


class ForkOperator(BaseOperator):
    """Fork rows into one token per (row, branch), recorded in the audit store.

    Each execution (try) of the fork is one audit run; re-running only downstream tasks continues it,
    re-running the fork starts a new one linked to the old. XCom ``audit_run`` is a small reference
    to the audit run (read it with :func:`fork_ref`); the return value is the list of chunk numbers
    (``fork.chunks``, what mapped branches expand over); the rows themselves stay in the audit store.

    :param rows: a list of dicts, an ``XComArg`` resolving to one (or to a coalesce summary, to fork
        that coalesce's merged rows with their lineage), or a callable returning an iterable of dicts
        (streamed in chunks, never fully materialised).
    :param branches: the branch names: at least two, unique, kept verbatim.
    :param row_key: the column holding each row's stable key; rows are keyed by position if omitted.
    :param chunk_size: rows per chunk (one transaction each, one mapped branch task each);
        default ``[elspeth] chunk_size``.
    :param audit_conn_id: the audit store connection; default ``[elspeth] audit_conn_id``, then
        ``elspeth_audit_default``, then an embedded SQLite file under ``$AIRFLOW_HOME``. The fork's
        branch steps, coalesces and their finalizers use the same store: they inherit it (naming
        another one is an error at DAG parse time).
    """

    ui_color = "#e8d4f7"
    _elspeth_role = "fork"

    @names_task
    def __init__(
        self,
        *,
        rows: Sequence[Mapping[str, Any]] | XComArg | Callable[[], Iterable[Mapping[str, Any]]],
        branches: Sequence[str],
        row_key: str | None = None,
        chunk_size: int | None = None,
        audit_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.branches = list(validate_branches(branches))
        # The audit run reference this try pushed (for OpenLineage, read in the same process).
        self._pushed_ref: dict[str, Any] | None = None
        self._executing_thread: int | None = None  # the thread running execute(), for on_kill
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ElspethConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if row_key is not None and (not isinstance(row_key, str) or not row_key):
            raise ElspethConfigError(f"row_key must be a column name, got {row_key!r}")
        if not (isinstance(rows, (list, tuple, XComArg)) or callable(rows)):
            raise ElspethConfigError(
                "rows must be a list of dicts, an XComArg or a callable returning rows, "
                f"got {type(rows).__name__}"
            )
        if isinstance(rows, (list, tuple)):
            _check_literal_rows(rows, row_key)
        self.rows = rows
        self.row_key = row_key
        self.chunk_size = chunk_size
        self.audit_conn_id = audit_conn_id
        # ``rows`` is not templated (Jinja must not touch row values), so wire an XComArg's upstream
        # here. Only then: a literal list is never searched for XComArgs (nothing would resolve
        # them), so a large or deeply nested one costs nothing here and cannot overflow the stack.
        if isinstance(rows, XComArg):
            XComArg.apply_upstream_relationship(self, rows)

    @property
    def chunks(self) -> XComArg:
        """The fork's chunk numbers, for ``BranchOperator.partial(...).expand(chunk=fork.chunks)``.

        This is the return value: Airflow refuses to map over an XCom with a custom key, and sizes
        the expansion by the length of the return value.
        """
        return XComArg(self)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage run facet ``elspeth_fork`` (airflow_elspeth/openlineage_facets.py)."""
        from airflow_elspeth.openlineage_facets import fork_lineage

        return fork_lineage(self._pushed_ref)

    def on_kill(self) -> None:
        """On SIGTERM the Airflow task runner calls this from its signal handler, then lets the task
        run on: raising here ends ``execute`` (a slow or endless source included), which closes the
        audit run failed ``interrupted:AirflowTaskTerminated``. Once: closing it is not interrupted.
        """
        if self._executing_thread is not None and self._executing_thread == threading.get_ident():
            self._executing_thread = None
            raise AirflowTaskTerminated(f"{self.task_id}: terminated (SIGTERM) while forking rows")

    def execute(self, context: Context) -> list[int]:
        self._executing_thread = threading.get_ident()
        try:
            with in_task(self):  # a bad [elspeth] setting or audit connection names DAG and task
                return self._execute(context)
        finally:
            self._executing_thread = None

    def _execute(self, context: Context) -> list[int]:
        limit = row_limit()  # a bad setting fails the task before an audit run exists
        store = ElspethAuditHook(audit_conn_id=self.audit_conn_id).get_store()
        chunk_size = self.chunk_size or default_chunk_size()
        ti, dag_run = context["ti"], context["dag_run"]
        identity = RunIdentity(
            dag_id=ti.dag_id,
            airflow_run_id=ti.run_id,
            fork_task_id=self.task_id,
            try_number=ti.try_number,
            clear_number=getattr(dag_run, "clear_number", 0) or 0,
            run_type=_enum_text(getattr(dag_run, "run_type", None)),
            logical_date=context.get("logical_date"),
        )
        run_id = store.begin_run(
            identity,
            branches=self.branches,
            chunk_size=chunk_size,
            config={"branches": self.branches, "row_key": self.row_key, "chunk_size": chunk_size},
        )
        rows_total = chunks_total = 0
        pushed = False
        # From here on every way out but success closes the audit run: a fork try that did not
        # complete leaves no half-written rows or tokens (and no run "running") behind.
        try:
            # Whole chunks, several per transaction (FORK_ROWS_PER_WRITE rows at most, one chunk at least).
            per_write = max(1, FORK_ROWS_PER_WRITE // chunk_size) * chunk_size
            batch: list[ForkRow] = []
            batch_chars = 0

            def write() -> None:
                nonlocal rows_total, chunks_total, batch_chars
                chunks = [
                    (chunks_total + i, batch[start : start + chunk_size])
                    for i, start in enumerate(range(0, len(batch), chunk_size))
                ]
                store.write_fork_chunks(run_id, self.branches, chunks)
                rows_total += len(batch)
                chunks_total += len(chunks)
                batch.clear()
                batch_chars = 0

            try:
                for row in self._validated_rows(context, batch, limit):
                    batch.append(row)
                    batch_chars += len(row.payload_body)
                    if len(batch) == per_write or (
                        batch_chars >= FORK_CHARS_PER_WRITE and len(batch) % chunk_size == 0
                    ):
                        write()
                if batch:
                    write()
            except ForkInputError:
                # The first bad row is the one named: an unwritten row whose key an earlier write
                # stored (found only by writing it) may come before the row that failed validation.
                duplicate = store.stored_duplicate(run_id, batch) if batch else None
                if duplicate is not None:
                    raise duplicate_key_error(duplicate.row_key, duplicate.row_index) from None
                raise
            # Pushed before the run completes: once complete_run has committed, nothing is left
            # that can fail and leave a completed run behind a failed fork.
            pushed = True
            self._pushed_ref = {
                "audit_run_id": run_id,
                "fork": self.task_id,
                "branches": self.branches,
                "rows_total": rows_total,
                "chunks_total": chunks_total,
                "chunk_size": chunk_size,
            }
            ti.xcom_push(key=AUDIT_RUN_XCOM_KEY, value=self._pushed_ref)
            store.complete_run(run_id, rows_total=rows_total, chunks_total=chunks_total)
        except ForkInputError as err:
            if self._close_failed_run(store, run_id, bad_row_run_reason(str(err)), err, context, pushed):
                outcome = f"nothing of audit run {run_id} was kept"
            else:
                outcome = f"audit run {run_id} could not be marked failed (see the log)"
            raise AirflowFailException(f"{self.task_id}: {err}; {outcome}") from err
        except BaseException as err:  # retried by Airflow (or the task ends): re-raised unchanged
            self._close_failed_run(store, run_id, fork_error_run_reason(err), err, context, pushed)
            raise
        metrics.fork_rows(rows_total, {"dag_id": ti.dag_id, "task_id": self.task_id})
        self.log.info(
            "Forked %d rows into %d chunks x %d branches (audit run %s)",
            rows_total,
            chunks_total,
            len(self.branches),
            run_id,
        )
        return list(range(chunks_total))

    def _close_failed_run(
        self,
        store: AuditStore,
        run_id: str,
        reason: str,
        error: BaseException,
        context: Context,
        pushed: bool,
    ) -> bool:
        """Mark the audit run failed and remove its partial rows; True when that was recorded.

        Raises nothing but what interrupts it (the caller re-raises the original error): when the
        audit store is unreachable the run stays ``running`` until this fork runs again (its next
        try's ``begin_run`` closes earlier tries).
        """
        self._executing_thread = None  # a SIGTERM now does not interrupt closing the run
        if pushed:
            _delete_audit_run_xcom(context, self.log)
        try:
            store.fail_run(run_id, reason)
        except Exception:
            self.log.exception(
                "Could not mark audit run %s failed after %s; the fork's next try closes it",
                run_id,
                type(error).__name__,
            )
            return False
        self.log.error("Audit run %s failed (%s); nothing of it was kept", run_id, reason)
        return True

    def _source(self, context: Context) -> Iterator[tuple[Any, str | None]]:
        """(row, parent token) pairs; the parent links a nested fork to the upstream merged row."""
        rows: Any = self.rows
        if isinstance(rows, XComArg):
            rows = rows.resolve(context)
        elif callable(rows):
            rows = rows()
        if isinstance(rows, Mapping) and "audit_run_id" in rows and "coalesce" in rows:
            engine = ElspethAuditHook(audit_conn_id=self.audit_conn_id).get_engine()
            for item in iter_merged_rows(engine, rows["audit_run_id"], rows["coalesce"], with_lineage=True):
                yield item["row"], item["merged_token_id"]
            return
        if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
            raise ForkInputError(f"rows must be an iterable of dicts, got {type(rows).__name__}")
        for row in rows:
            yield row, None

    def _validated_rows(
        self, context: Context, batch: Sequence[ForkRow], limit: PayloadLimit
    ) -> Iterator[ForkRow]:
        """Validate and hash rows in order; the first bad row stops the fork with its key named.

        A row over ``limit`` as canonical JSON (or nested too deeply) is found by a walk that stops
        at the limit, before the row is serialised. A duplicate key within one write (``batch``, the
        rows the caller has not written yet: empty when a write begins) is caught here; one of an
        earlier write by the store when this write is stored (the rows' unique key): memory does
        not grow with the row count.
        """
        pending: set[str] = set()
        for index, (row, parent) in enumerate(self._source(context)):
            if not batch:
                pending.clear()
            key = _key_of(row, index, self.row_key)
            if key in pending:
                raise duplicate_key_error(key, index)
            pending.add(key)
            try:
                yield ForkRow.from_row(key, index, row, parent, limit=limit)
            except PayloadError as err:
                raise ForkInputError(str(err)) from err


def _key_of(row: Any, index: int, row_key: str | None) -> str:
    """The key of the row at ``index`` (its position when there is no ``row_key``).

    :raises ForkInputError: the row is not a JSON object, or has no usable key.
    """
    if not isinstance(row, Mapping):
        raise ForkInputError(f"row at index {index} is not a JSON object (got {type(row).__name__})")
    if row_key is None:
        return str(index)
    if row.get(row_key) is None:  # a null key is no key
        raise ForkInputError(f"row at index {index} has no row_key column {row_key!r} (missing or null)")
    try:
        return row_key_text(row[row_key])
    except PayloadError as err:
        raise ForkInputError(f"row at index {index}: {err}") from err


def _check_literal_rows(rows: Sequence[Any], row_key: str | None) -> None:
    """Rows given in the DAG file are checked when it is parsed, as ``execute`` would check them:
    each a JSON object with a key, no key twice. (Their size and values are checked at run time,
    against ``[elspeth] max_row_bytes`` of the worker.)

    :raises ElspethConfigError: naming ``rows`` and the index of the first bad row.
    """
    seen: set[str] = set()
    for index, row in enumerate(rows):
        try:
            key = _key_of(row, index, row_key)
        except ForkInputError as err:
            raise ElspethConfigError(f"rows: {err}") from None
        if key in seen:
            raise ElspethConfigError(f"rows: {duplicate_key_error(key, index)}")
        seen.add(key)


def _delete_audit_run_xcom(context: Context, log: Any) -> None:
    """Take back the ``audit_run`` XCom of a try that failed after pushing it (best effort)."""
    ti = context["ti"]
    try:
        from airflow.sdk.execution_time.xcom import XCom

        XCom.delete(
            key=AUDIT_RUN_XCOM_KEY,
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=ti.run_id,
            map_index=ti.map_index,
        )
    except Exception:
        log.exception("Could not delete the %r XCom of the failed fork try", AUDIT_RUN_XCOM_KEY)


def _enum_text(value: Any) -> str | None:
    """``DagRunType.BACKFILL`` -> ``"backfill"``: store an enum's value, not its repr."""
    if value is None:
        return None
    return str(getattr(value, "value", value))
