"""Writes to the audit store: one row per event, set-based, chunked, idempotent (one transaction
per chunk).

Every event is keyed by (run number, node, chunk, row number, attempt), and every insert ignores
rows that already exist, so a retried or concurrent writer stores nothing twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, literal, or_, select, true, update
from sqlalchemy.dialects import postgresql, sqlite

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.dml import (
    bind_value,
    db_now,
    insert_ignore,
    insert_tuples,
    ordered_write,
    refresh_statistics,
    upsert,
)
from airflow_elspeth.audit.ids import branch_token_id, row_id, row_numbers
from airflow_elspeth.audit.log import loss_reason
from airflow_elspeth.audit.model import run_number
from airflow_elspeth.core.canonical import PayloadLimit, derive_id, hash_value
from airflow_elspeth.core.errors import recorded_error_fingerprint
from airflow_elspeth.core.vocabulary import (
    ARRIVAL_NODE_STATUSES,
    BRANCH_TASK_PREFIX,
    NOT_JOINED,
    SKIPPED_DECIDED,
    TERMINAL_NODE_STATUSES,
    DecisionStatus,
    NodeStatus,
    NodeType,
    RunStatus,
    TokenOutcome,
    late_reason,
    missing_outcome,
    superseded_try_run_reason,
)
from airflow_elspeth.exceptions import ForkInputError

# Kept only for tests/unit/test_operator_units.py and tests/e2e/test_coalesce_trigger.py, which
# still import it from here; new code uses core.vocabulary.NodeStatus.
COMPLETED = NodeStatus.COMPLETED


# Column orders of the tuples the hot paths build (dml.insert_tuples).
SOURCE_ROW_COLUMNS = (
    "run_no",
    "chunk",
    "row_no",
    "row_key",
    "source_hash",
    "body",
    "parent_token_id",
    "recorded_at",
)
STEP_RESULT_COLUMNS = (
    "run_no",
    "node_id",
    "chunk",
    "row_no",
    "attempt",
    "status",
    "input_hash",
    "output_hash",
    "output_body",
    "error_json",
    "context_json",
    "started_at",
    "completed_at",
    "duration_ms",
    "recorded_at",  # last: set inside the writing transaction
)
DECISION_COLUMNS = (
    "run_no",
    "node_id",
    "chunk",
    "row_no",
    "decision",
    "failure_reason",
    "details_json",
    "consumed",
    "missing_json",
    "late_json",
    "collisions_json",
    "merged_hash",
    "merged_body",
    "decided_at",
    "wait_ms",
    "wait_from_first_arrival_ms",
    "recorded_at",
)


# One encoder for every call: json.dumps with options builds a new JSONEncoder each time.
_encode = json.JSONEncoder(separators=(",", ":"), sort_keys=True, default=str).encode


def dumps(value: Any) -> str:
    """Compact JSON for the *_json columns (not canonical: these are not hashed)."""
    return _encode(value)


@dataclass(frozen=True)
class RunIdentity:
    """What identifies an audit run: one execution (try) of a fork task in one DAG run."""

    dag_id: str
    airflow_run_id: str
    fork_task_id: str
    try_number: int
    clear_number: int = 0
    run_type: str | None = None
    logical_date: datetime | None = None

    @property
    def run_id(self) -> str:
        return derive_id(self.dag_id, self.airflow_run_id, self.fork_task_id, self.try_number)


@dataclass(frozen=True)
class ForkRow:
    """One validated input row, ready to write."""

    row_key: str
    row_index: int
    payload_hash: str
    payload_body: str
    parent_token_id: str | None = None  # the merged token of an upstream coalesce (nested forks)

    @classmethod
    def from_row(
        cls,
        row_key: str,
        row_index: int,
        row: Mapping[str, Any],
        parent_token_id: str | None = None,
        *,
        limit: PayloadLimit | None = None,
    ) -> ForkRow:
        """Hash a row as canonical JSON.

        :param limit: the largest row allowed (checked before the row is serialised).
        :raises PayloadLimitExceeded: naming the row key and the limit, for a row over ``limit``.
        :raises PayloadError: naming the row key, for NaN/Infinity or values JSON cannot hold.
        """
        payload_hash, body = hash_value(dict(row), what=f"row {row_key!r}", limit=limit)
        return cls(row_key, row_index, payload_hash, body, parent_token_id)


@dataclass(frozen=True)
class NodeResult:
    """The outcome of one branch token at one branch step."""

    token_id: str
    row_id: str
    chunk: int
    status: str
    started_at: datetime
    completed_at: datetime
    input_hash: str | None = None
    output_hash: str | None = None
    output_body: str | None = None  # canonical JSON of the output row
    error: Mapping[str, Any] | None = None
    context: Mapping[str, Any] | None = None


@dataclass
class DecisionWrite:
    """Everything one row's decision writes; a chunk of these commits atomically.

    :param decision: the ``decisions`` row (:data:`DECISION_COLUMNS`).
    :param outcomes: the branch outcomes the decision does not imply (``recorded_outcomes`` rows).
    """

    row_id: str
    row_key: str
    chunk: int
    decision: dict[str, Any]
    outcomes: list[dict[str, Any]] = field(default_factory=list)


class AuditStore:
    """Writes of the fork, branch and coalesce shells."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def clock(self) -> Callable[[], datetime]:
        """A cheap clock that follows the audit database's: this machine's, offset once."""
        with self.engine.connect() as conn:
            offset = db_now(conn) - datetime.now(timezone.utc)
        return lambda: datetime.now(timezone.utc) + offset

    # -- runs and nodes -------------------------------------------------------------------------

    def begin_run(
        self,
        identity: RunIdentity,
        *,
        branches: Sequence[str],
        chunk_size: int,
        config: Mapping[str, Any],
    ) -> str:
        """Record the audit run of this fork try (idempotent) and link the run it re-does."""
        run_id = identity.run_id
        config_hash, config_json = hash_value(dict(config), what="fork configuration")
        with self.engine.begin() as conn:
            previous = conn.execute(
                select(t.runs.c.run_id)
                .where(
                    t.runs.c.dag_id == identity.dag_id,
                    t.runs.c.airflow_run_id == identity.airflow_run_id,
                    t.runs.c.fork_task_id == identity.fork_task_id,
                    t.runs.c.try_number < identity.try_number,
                )
                .order_by(t.runs.c.try_number.desc())
                .limit(1)
            ).scalar()
            # An earlier try still "running" died without closing its run (killed, or a failure
            # this code could not catch): it never will complete, so it is closed now.
            stale = _stale_runs(
                conn,
                t.runs.c.dag_id == identity.dag_id,
                t.runs.c.airflow_run_id == identity.airflow_run_id,
                t.runs.c.fork_task_id == identity.fork_task_id,
                t.runs.c.try_number < identity.try_number,
            )
            for stale_run in stale:
                self._fail_run(
                    conn,
                    stale_run,
                    superseded_try_run_reason(identity.try_number),
                    stale=True,
                )
            _insert_numbered_run(
                conn,
                {
                    "run_id": run_id,
                    "dag_id": identity.dag_id,
                    "airflow_run_id": identity.airflow_run_id,
                    "fork_task_id": identity.fork_task_id,
                    "try_number": identity.try_number,
                    "clear_number": identity.clear_number,
                    "run_type": identity.run_type,
                    "logical_date": identity.logical_date,
                    "started_at": db_now(conn),
                    "status": RunStatus.RUNNING,
                    "config_hash": config_hash,
                    "previous_run_id": previous,
                    "chunk_size": chunk_size,
                    "branches_json": dumps(list(branches)),
                },
            )
            self._register_node(
                conn, run_id, identity.fork_task_id, NodeType.FORK, None, config_json, config_hash
            )
        return run_id

    def register_node(
        self, run_id: str, node_id: str, node_type: str, branch: str | None, config: Mapping[str, Any]
    ) -> None:
        config_hash, config_json = hash_value(dict(config), what=f"configuration of {node_id}")
        with self.engine.begin() as conn:
            self._register_node(conn, run_id, node_id, node_type, branch, config_json, config_hash)

    @staticmethod
    def _register_node(
        conn: Connection,
        run_id: str,
        node_id: str,
        node_type: str,
        branch: str | None,
        config_json: str,
        config_hash: str,
    ) -> None:
        insert_ignore(
            conn,
            t.nodes,
            [
                {
                    "run_id": run_id,
                    "node_id": node_id,
                    "task_id": node_id,
                    "node_type": node_type,
                    "branch_name": branch,
                    "config_json": config_json,
                    "config_hash": config_hash,
                }
            ],
        )

    def complete_run(self, run_id: str, *, rows_total: int, chunks_total: int) -> datetime:
        """Mark the fork complete; its completion time starts every coalesce deadline."""
        with self.engine.begin() as conn:
            # Before the run completes: the branches' and the coalesce's reads need these plans.
            refresh_statistics(conn, [t.source_rows])
            now = db_now(conn)
            conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id, t.runs.c.status == RunStatus.RUNNING)
                .values(
                    status=RunStatus.COMPLETED,
                    completed_at=now,
                    rows_total=rows_total,
                    chunks_total=chunks_total,
                )
            )
            completed_at: datetime = conn.execute(
                select(t.runs.c.completed_at).where(t.runs.c.run_id == run_id)
            ).scalar_one()
            return completed_at

    def fail_run(self, run_id: str, reason: str) -> None:
        """Mark a fork try that did not complete failed, saying why, and remove its partial rows.

        A run that never completed has no deadline and no decisions: keeping half of its rows
        would leave tokens no coalesce will ever decide. Payloads are content-addressed and may be
        shared with other runs, so they stay. A run already completed or failed is left as it is.
        """
        with self.engine.begin() as conn:
            self._fail_run(conn, run_id, reason)

    def close_stale_runs(self, dag_id: str, airflow_run_id: str, fork_task_id: str, reason: str) -> list[str]:
        """Fail every audit run a fork task left open once that task has ended without succeeding."""
        with self.engine.begin() as conn:
            stale = _stale_runs(
                conn,
                t.runs.c.dag_id == dag_id,
                t.runs.c.airflow_run_id == airflow_run_id,
                t.runs.c.fork_task_id == fork_task_id,
            )
            for run_id in stale:
                self._fail_run(conn, run_id, reason, stale=True)
        return stale

    @staticmethod
    def _fail_run(conn: Connection, run_id: str, reason: str, *, stale: bool = False) -> None:
        """Fail a ``running`` run (or, with ``stale``, one :func:`_stale_runs` found) and drop its rows."""
        closable = [RunStatus.RUNNING, RunStatus.COMPLETED] if stale else [RunStatus.RUNNING]
        closed = conn.execute(
            update(t.runs)
            .where(t.runs.c.run_id == run_id, t.runs.c.status.in_(closable))
            .values(
                status=RunStatus.FAILED, status_reason=reason[:2000], completed_at=db_now(conn), rows_total=0
            )
        ).rowcount
        if not closed:
            return
        run_no = run_number(conn, run_id)
        for event_table in (t.step_results, t.decisions, t.source_rows):
            conn.execute(event_table.delete().where(event_table.c.run_no == run_no))
        for table in (t.recorded_outcomes, t.chunk_progress):
            conn.execute(table.delete().where(table.c.run_id == run_id))

    # -- fork -------------------------------------------------------------------------------------

    def stored_duplicate(self, run_id: str, rows: Sequence[ForkRow]) -> ForkRow | None:
        """The first of ``rows`` (not written yet) whose key an earlier write of the run stored."""
        with self.engine.connect() as conn:
            return _stored_duplicate(conn, run_number(conn, run_id), rows)

    def write_fork_chunk(
        self, run_id: str, branches: Sequence[str], chunk: int, rows: Sequence[ForkRow]
    ) -> None:
        """The chunk's source rows (their tokens are implied), in one transaction."""
        self.write_fork_chunks(run_id, branches, [(chunk, rows)])

    def write_fork_chunks(
        self, run_id: str, branches: Sequence[str], chunks: Sequence[tuple[int, Sequence[ForkRow]]]
    ) -> None:
        """:meth:`write_fork_chunk` of several chunks in one transaction: whole chunks or nothing.

        A commit costs SQLite a WAL sync and often a checkpoint: a few chunks per commit write the
        index pages they share once.

        :raises ForkInputError: a row's key was stored by an earlier write (the rows' unique key
            finds it, so the fork keeps nothing per row in memory); nothing of this write is kept.
        """
        with self.engine.begin() as conn:
            run_no = run_number(conn, run_id)
            # One timestamp for the chunks, converted once for the database (not per row).
            now = bind_value(conn, t.source_rows.c.recorded_at, db_now(conn))
            row_values = [
                (
                    run_no,
                    chunk,
                    row.row_index,
                    row.row_key,
                    row.payload_hash,
                    row.payload_body,
                    row.parent_token_id,
                    now,
                )
                for chunk, rows in chunks
                for row in rows
            ]
            if insert_tuples(
                conn, t.source_rows, SOURCE_ROW_COLUMNS, row_values, bound=["recorded_at"]
            ) < len(row_values):
                # Keys stored already: by another row (a duplicate), or by this very write retried
                # (the same rows at the same indexes, which is no error).
                duplicate = _stored_duplicate(conn, run_no, [row for _, rows in chunks for row in rows])
                if duplicate is not None:
                    raise duplicate_key_error(duplicate.row_key, duplicate.row_index)

    # -- branches ---------------------------------------------------------------------------------

    def write_branch_results(
        self,
        run_id: str,
        node_id: str,
        attempt: int,
        results: Sequence[NodeResult],
        *,
        chunk_tokens: Mapping[int, int],
        final_step: bool = False,
        delivering_to: Sequence[str] = (),
    ) -> None:
        """Node states and output payloads of one batch, and the chunks' progress, atomically.

        :param chunk_tokens: tokens of this branch per chunk touched (the progress denominator).
        :param final_step: this is the last step of a branch that no coalesce joins: each token
            ends here, so its terminal outcome is written with its state (outcome ``completed``
            with reason ``not_joined``, or ``lost`` with the loss reason).
        :param delivering_to: the coalesces this step delivers to (none: it delivers to none): a
            ``discarded`` result (its row was decided before it was written) is a late arrival, and
            its token's ``not_arrived`` outcome becomes ``late`` (the reason in the result's
            context, ``late``).
        """
        states = []
        for result in results:
            run_no, row_no = row_numbers(result.row_id)
            states.append(
                (
                    run_no,
                    node_id,
                    result.chunk,
                    row_no,
                    attempt,
                    result.status,
                    result.input_hash,
                    result.output_hash,
                    result.output_body if result.output_hash is not None else None,
                    dumps(result.error) if result.error is not None else None,
                    dumps(result.context) if result.context is not None else None,
                    result.started_at,
                    result.completed_at,
                    int((result.completed_at - result.started_at).total_seconds() * 1000),
                )
            )
        with ordered_write(self.engine, run_id, chunk_tokens, decider=False) as conn:
            recorded_at = db_now(conn)  # the event time: read under the ordering lock
            run_no = run_number(conn, run_id)
            stamp = bind_value(conn, t.step_results.c.recorded_at, recorded_at)
            insert_tuples(
                conn,
                t.step_results,
                STEP_RESULT_COLUMNS,
                [(*state, stamp) for state in states],
                bound=["recorded_at"],
            )
            if final_step:
                insert_ignore(
                    conn, t.recorded_outcomes, [not_joined_outcome(run_id, r, recorded_at) for r in results]
                )
            if delivering_to:
                # Every arrival whose token a decision already ended not_arrived is late: discarded
                # ones say so; one written just after a decision its writer had not seen yet too.
                # Only rows decided by now can have such an outcome (one indexed read per chunk).
                decided = decided_row_ids(conn, run_no, delivering_to, list(chunk_tokens))
                late: dict[str, str | None] = {
                    r.token_id: (str(r.context["late"]) if r.context and r.context.get("late") else None)
                    for r in results
                    if r.status in ARRIVAL_NODE_STATUSES and r.row_id in decided
                }
                replace_not_arrived(conn, run_id, late, recorded_at, after_task_loss=True)
            self._refresh_progress(conn, run_id, run_no, node_id, chunk_tokens, recorded_at)

    def record_skipped(
        self, run_id: str, node_id: str, chunk_tokens: Mapping[int, int], token_ids: Sequence[str]
    ) -> int:
        """A branch step skipped these tokens: every coalesce consuming it had decided their rows.

        Their ``not_arrived`` outcomes (the decision's) become ``skipped`` (``skipped_decided``); a
        token with any other terminal outcome keeps it. Returns how many outcomes were replaced.
        """
        if not token_ids:
            return 0
        with ordered_write(self.engine, run_id, chunk_tokens, decider=False) as conn:
            now = db_now(conn)
            replaced = replace_not_arrived(conn, run_id, dict.fromkeys(token_ids, SKIPPED_DECIDED), now)
            # Moves the read cache.
            self._refresh_progress(conn, run_id, run_number(conn, run_id), node_id, chunk_tokens, now)
            return replaced

    def abort_attempt_errors(
        self, run_id: str, node_id: str, attempt: int, chunk_tokens: Mapping[int, int]
    ) -> None:
        """A try that fails on its failure threshold leaves its row errors for the next try.

        At the last step of an unjoined branch those errors also ended their tokens: those outcomes
        are superseded (kept, no longer terminal), so the next try's outcome is the terminal one.
        """
        sr = t.step_results.c
        with ordered_write(self.engine, run_id, chunk_tokens, decider=False) as conn:
            now = db_now(conn)
            run_no = run_number(conn, run_id)
            aborted = and_(
                sr.run_no == run_no,
                sr.node_id == node_id,
                sr.attempt == attempt,
                sr.status == NodeStatus.FAILED,
            )
            branch = conn.execute(
                select(t.nodes.c.branch_name).where(t.nodes.c.run_id == run_id, t.nodes.c.node_id == node_id)
            ).scalar_one()
            tokens = [
                branch_token_id(row_id(run_no, row_no), branch)
                for row_no in conn.execute(select(sr.row_no).where(aborted)).scalars()
            ]
            ro = t.recorded_outcomes.c
            for start in range(0, len(tokens), 500):
                conn.execute(
                    update(t.recorded_outcomes)
                    .where(
                        ro.run_id == run_id,
                        ro.is_terminal,
                        ro.join_group_id.is_(None),
                        ro.reason != NOT_JOINED,
                        ro.token_id.in_(tokens[start : start + 500]),
                    )
                    .values(is_terminal=False, superseded_at=now)
                )
            conn.execute(update(t.step_results).where(aborted).values(status=NodeStatus.ABORTED))
            self._refresh_progress(conn, run_id, run_no, node_id, chunk_tokens, now)

    @staticmethod
    def _refresh_progress(
        conn: Connection,
        run_id: str,
        run_no: int,
        node_id: str,
        chunk_tokens: Mapping[int, int],
        now: datetime,
    ) -> None:
        if not chunk_tokens:
            return
        sr = t.step_results.c
        done: dict[int, int] = dict(
            conn.execute(
                select(sr.chunk, func.count(func.distinct(sr.row_no)))
                .where(
                    sr.run_no == run_no,
                    sr.node_id == node_id,
                    sr.chunk.in_(list(chunk_tokens)),
                    sr.status.in_(TERMINAL_NODE_STATUSES),
                )
                .group_by(sr.chunk)
            ).all()
        )
        progress = {chunk: (done.get(chunk, 0), total) for chunk, total in chunk_tokens.items()}
        set_progress(conn, run_id, node_id, progress, now)


def duplicate_key_error(row_key: str, row_index: int) -> ForkInputError:
    return ForkInputError(f"duplicate row key {row_key!r} (row at index {row_index})")


def _stored_duplicate(conn: Connection, run_no: int, rows: Sequence[ForkRow]) -> ForkRow | None:
    """The first of ``rows`` whose key is stored for another row index of the run."""
    sr = t.source_rows.c
    for start in range(0, len(rows), 500):
        part = rows[start : start + 500]
        stored = dict(
            conn.execute(
                select(sr.row_key, sr.row_no).where(
                    sr.run_no == run_no, sr.row_key.in_([row.row_key for row in part])
                )
            ).all()
        )
        for row in part:
            if stored.get(row.row_key, row.row_index) != row.row_index:
                return row
    return None


def _stale_runs(conn: Connection, *where: Any) -> list[str]:
    """Runs of a fork try that will never be decided: still ``running``, or ``completed`` by a fork
    task that then failed (e.g. its return value could not be pushed) with no decision made."""
    decided = select(t.decisions.c.run_no).where(t.decisions.c.run_no == t.runs.c.run_no)
    return list(
        conn.execute(
            select(t.runs.c.run_id).where(
                *where,
                (t.runs.c.status == RunStatus.RUNNING)
                | ((t.runs.c.status == RunStatus.COMPLETED) & ~decided.exists()),
            )
        ).scalars()
    )


def write_decisions(
    conn: Connection,
    run_id: str,
    node_id: str,
    chunk: int,
    writes: Sequence[DecisionWrite],
    *,
    rows_total: int,
    signature: str,
) -> int:
    """One chunk's decisions, inside the pass's transaction; returns how many rows of it are decided."""
    insert_ignore(conn, t.recorded_outcomes, [o for w in writes for o in w.outcomes])
    insert_ignore(conn, t.decisions, [w.decision for w in writes])
    decided = decided_in_chunk_count(conn, run_id, node_id, chunk)
    set_progress(conn, run_id, node_id, {chunk: (decided, rows_total)}, db_now(conn), signature)
    return decided


def decided_row_ids(conn: Connection, run_no: int, nodes: Sequence[str], chunks: Sequence[int]) -> set[str]:
    """The rows of these chunks (of run number ``run_no``) that any of these coalesce nodes has decided."""
    d = t.decisions.c
    return {
        row_id(run_no, row_no)
        for row_no in conn.execute(
            select(d.row_no).where(d.run_no == run_no, d.node_id.in_(list(nodes)), d.chunk.in_(list(chunks)))
        ).scalars()
    }


def decided_in_chunk_count(conn: Connection, run_id: str, node_id: str, chunk: int) -> int:
    """How many rows of one chunk a coalesce node has decided (its progress numerator)."""
    d = t.decisions.c
    return int(
        conn.execute(
            select(func.count())
            .select_from(t.decisions)
            .where(d.run_no == run_number(conn, run_id), d.node_id == node_id, d.chunk == chunk)
        ).scalar_one()
    )


def set_progress(
    conn: Connection,
    run_id: str,
    node_id: str,
    progress: Mapping[int, tuple[int, int]],
    now: datetime,
    signature: str | None = None,
) -> None:
    """Upsert a node's ``chunk_progress`` rows: {chunk: (rows done, rows total)}.

    :param signature: for a coalesce node, the branch progress its decisions were evaluated against.
    """
    upsert(
        conn,
        t.chunk_progress,
        [
            {
                "run_id": run_id,
                "node_id": node_id,
                "chunk": chunk,
                "rows_done": done,
                "rows_total": total,
                "seen_signature": signature,
                "updated_at": now,
            }
            for chunk, (done, total) in progress.items()
        ],
        update=["rows_done", "rows_total", "seen_signature", "updated_at"],
    )


def outcome_row(
    token_id: str,
    run_id: str,
    row: str,
    outcome: str,
    reason: str | None,
    at: datetime,
    *,
    join_group: str | None = None,
    terminal: bool = True,
    error_hash: str | None = None,
) -> dict[str, Any]:
    return {
        "token_id": token_id,
        "run_id": run_id,
        "row_id": row,
        "outcome": outcome,
        "is_terminal": terminal,
        "reason": reason,
        "error_hash": error_hash,
        "join_group_id": join_group,
        "recorded_at": at,
    }


def replace_not_arrived(
    conn: Connection,
    run_id: str,
    reasons: Mapping[str, str | None],
    at: datetime,
    *,
    after_task_loss: bool = False,
) -> int:
    """What became of branch tokens their row's decision saw as ``not_arrived``: each token (key)
    whose terminal outcome is ``not_arrived`` gets the outcome of its reason (``late`` for a late
    arrival, ``skipped`` for ``skipped_decided``; None: a late arrival after the row's decision,
    ``failed`` if any coalesce failed it), in the same join group; the ``not_arrived`` outcome is
    kept, superseded at ``at``. Returns how many outcomes were replaced.

    :param after_task_loss: the tokens arrived (a late arrival): a token the decision saw lost to
        its task's end (``lost``, ``branch_task_<state>``) is replaced too, since what its task wrote
        after that end is late (``audit.log.row_events``).
    """
    to, d = t.recorded_outcomes.c, t.decisions.c
    replaceable = to.outcome == TokenOutcome.NOT_ARRIVED
    if after_task_loss:
        task_loss = and_(to.outcome == TokenOutcome.LOST, to.reason.startswith(BRANCH_TASK_PREFIX))
        replaceable = or_(replaceable, task_loss)
    tokens = sorted(reasons)
    replaced = 0
    for start in range(0, len(tokens), 500):
        found = conn.execute(
            select(to.outcome_id, to.token_id, to.join_group_id, to.row_id).where(
                to.run_id == run_id,
                to.is_terminal,
                replaceable,
                to.token_id.in_(tokens[start : start + 500]),
            )
        ).all()
        if not found:
            continue
        unknown = sorted({row_numbers(f.row_id) for f in found if reasons[f.token_id] is None})
        decided: dict[str, str] = {}
        if unknown:
            decided = {
                row_id(run_no, row_no): decision
                for run_no, row_no, decision in conn.execute(
                    select(d.run_no, d.row_no, func.min(d.decision))
                    .where(
                        d.run_no == unknown[0][0],
                        d.row_no.in_([row_no for _, row_no in unknown]),
                    )
                    .group_by(d.run_no, d.row_no)
                )
            }
        chosen = {
            f.token_id: reasons[f.token_id] or late_reason(DecisionStatus(decided.get(f.row_id, "failed")))
            for f in found
        }
        conn.execute(
            update(t.recorded_outcomes)
            .where(to.outcome_id.in_([f.outcome_id for f in found]))
            .values(is_terminal=False, superseded_at=at)
        )
        insert_ignore(
            conn,
            t.recorded_outcomes,
            [
                outcome_row(
                    f.token_id,
                    run_id,
                    f.row_id,
                    missing_outcome(chosen[f.token_id]),
                    chosen[f.token_id],
                    at,
                    join_group=f.join_group_id,
                )
                for f in found
            ],
        )
        replaced += len(found)
    return replaced


def not_joined_outcome(run_id: str, result: NodeResult, at: datetime) -> dict[str, Any]:
    """The terminal outcome of a token at the last step of a branch no coalesce joins."""
    if result.status in ARRIVAL_NODE_STATUSES:
        return outcome_row(result.token_id, run_id, result.row_id, TokenOutcome.COMPLETED, NOT_JOINED, at)
    return outcome_row(
        result.token_id,
        run_id,
        result.row_id,
        TokenOutcome.LOST,
        loss_reason(result.status, result.error),
        at,
        error_hash=recorded_error_fingerprint(result.error) if result.status == NodeStatus.FAILED else None,
    )


def _insert_numbered_run(conn: Connection, values: Mapping[str, Any]) -> None:
    """Insert an audit run (if its id is new) with the next free run number.

    One ``INSERT ... SELECT MAX(run_no) + 1``: SQLite runs it under its write lock; two PostgreSQL
    forks beginning at once may pick the same number, and the one whose insert the number's unique
    key ignored takes the next.
    """
    columns = [t.runs.c[name] for name in values]
    numbered = select(
        *(literal(value, type_=column.type) for value, column in zip(values.values(), columns, strict=True)),
        func.coalesce(func.max(t.runs.c.run_no), 0) + 1,
    ).where(true())  # SQLite parses ``INSERT ... SELECT ... ON CONFLICT`` only with a WHERE
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(t.runs).from_select([*values, "run_no"], numbered).on_conflict_do_nothing()
    exists = select(t.runs.c.run_id).where(t.runs.c.run_id == values["run_id"])
    while conn.execute(exists).first() is None:
        conn.execute(statement)
