"""ForkOperator: split rows into one token per (row, branch) and record them in the audit store."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context, XComArg, conf
from airflow.sdk.exceptions import AirflowFailException

from airflow_elspeth.audit.dml import batched
from airflow_elspeth.audit.queries import iter_merged_rows
from airflow_elspeth.audit.store import AuditStore, ForkRow, RunIdentity
from airflow_elspeth.core.canonical import PayloadError, row_key_text
from airflow_elspeth.core.config import ElspethConfigError, validate_branches
from airflow_elspeth.hooks.audit import ElspethAuditHook

# The audit run reference is pushed under its own key: the return value is the list of chunk numbers,
# because Airflow maps (``.expand``) only over a task's return value, with its length recorded at push.
AUDIT_RUN_XCOM_KEY = "audit_run"


class ForkInputError(ValueError):
    """A row the fork cannot take (not a JSON object, no key, duplicate key, NaN/Infinity)."""


def fork_ref(ti: Any, fork_task_id: str) -> dict[str, Any] | None:
    """The audit run reference a fork pushed in this DAG run (None until the fork has completed)."""
    ref = ti.xcom_pull(task_ids=fork_task_id, key=AUDIT_RUN_XCOM_KEY)
    return dict(ref) if ref else None


def default_chunk_size() -> int:
    return conf.getint("elspeth", "chunk_size", fallback=1000)


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
        ``elspeth_audit_default``, then an embedded SQLite file under ``$AIRFLOW_HOME``.
    """

    ui_color = "#e8d4f7"

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
        self.rows = rows
        self.row_key = row_key
        self.chunk_size = chunk_size
        self.audit_conn_id = audit_conn_id
        # ``rows`` is not templated (Jinja must not touch row values), so wire XComArg upstreams here.
        XComArg.apply_upstream_relationship(self, rows)

    @property
    def chunks(self) -> XComArg:
        """The fork's chunk numbers, for ``BranchOperator.partial(...).expand(chunk=fork.chunks)``.

        This is the return value: Airflow refuses to map over an XCom with a custom key, and sizes
        the expansion by the length of the return value.
        """
        return XComArg(self)

    def execute(self, context: Context) -> dict[str, Any]:
        store = AuditStore(ElspethAuditHook(audit_conn_id=self.audit_conn_id).get_engine())
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
        try:
            rows = self._validated_rows(context, chunk_size, lambda key: store.row_key_exists(run_id, key))
            for chunk, batch in enumerate(batched(rows, chunk_size)):
                store.write_fork_chunk(run_id, self.branches, chunk, batch)
                rows_total += len(batch)
                chunks_total = chunk + 1
        except ForkInputError as err:
            store.fail_run(run_id)
            raise AirflowFailException(
                f"{self.task_id}: {err}; nothing of audit run {run_id} was kept"
            ) from err
        store.complete_run(run_id, rows_total=rows_total, chunks_total=chunks_total)
        self.log.info(
            "Forked %d rows into %d chunks x %d branches (audit run %s)",
            rows_total,
            chunks_total,
            len(self.branches),
            run_id,
        )
        ti.xcom_push(
            key=AUDIT_RUN_XCOM_KEY,
            value={
                "audit_run_id": run_id,
                "fork": self.task_id,
                "branches": self.branches,
                "rows_total": rows_total,
                "chunks_total": chunks_total,
                "chunk_size": chunk_size,
            },
        )
        return list(range(chunks_total))

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
        self, context: Context, chunk_size: int, is_written: Callable[[str], bool]
    ) -> Iterator[ForkRow]:
        """Validate and hash rows in order; the first bad row stops the fork with its key named.

        Duplicate keys are caught with an 8-byte digest per key (a few dozen bytes a row, not the
        keys themselves); a digest match is confirmed against the current chunk or the store.
        """
        seen: set[bytes] = set()
        chunk_keys: set[str] = set()
        for index, (row, parent) in enumerate(self._source(context)):
            if index % chunk_size == 0:
                chunk_keys.clear()
            if not isinstance(row, Mapping):
                raise ForkInputError(f"row at index {index} is not a JSON object (got {type(row).__name__})")
            if self.row_key is None:
                key = str(index)
            elif self.row_key not in row:
                raise ForkInputError(f"row at index {index} has no row_key column {self.row_key!r}")
            else:
                try:
                    key = row_key_text(row[self.row_key])
                except PayloadError as err:
                    raise ForkInputError(f"row at index {index}: {err}") from err
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            if digest in seen and (key in chunk_keys or is_written(key)):
                raise ForkInputError(f"duplicate row key {key!r} (row at index {index})")
            seen.add(digest)
            chunk_keys.add(key)
            try:
                yield ForkRow.from_row(key, index, row, parent)
            except PayloadError as err:
                raise ForkInputError(str(err)) from err


def _enum_text(value: Any) -> str | None:
    """``DagRunType.BACKFILL`` -> ``"backfill"``: store an enum's value, not its repr."""
    if value is None:
        return None
    return str(getattr(value, "value", value))
