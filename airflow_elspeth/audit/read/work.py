"""What a branch step still has to do: the tokens of a chunk it has not finished, with their input
rows, and which rows every coalesce joining its branch has already decided (a result for those could
only arrive late). Read by ``BranchOperator``; nothing here writes.

A ``coalesce_task_<state>`` resolution does not count as decided here: it closes a row because its
coalesce task ended, and a later try of that coalesce reopens it (``audit.coalesce`` supersession).
A branch that skipped such rows would leave that try nothing to decide them with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, or_, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.ids import branch_token_id, row_id
from airflow_elspeth.audit.model import run_number
from airflow_elspeth.core.vocabulary import (
    ARRIVAL_NODE_STATUSES,
    COALESCE_TASK_PREFIX,
    TERMINAL_NODE_STATUSES,
)

_TERMINAL = [s.value for s in TERMINAL_NODE_STATUSES]


@dataclass(frozen=True)
class WorkItem:
    """One branch token a branch step still has to process."""

    token_id: str
    row_id: str
    row_key: str
    input_hash: str
    input_row: dict[str, Any] | None  # None when the previous step lost the row
    upstream_status: str | None = None
    upstream_error: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChunkWork:
    items: list[WorkItem]
    tokens_total: int
    already_done: int
    already_decided: int
    # The tokens of rows already decided by every consuming coalesce, not done here: skipped.
    decided_tokens: tuple[str, ...] = ()


def branch_work(
    engine: Engine,
    run_id: str,
    node_id: str,
    branch: str,
    chunk: int,
    previous_node: str | None,
    *,
    coalesces: Sequence[str],
) -> ChunkWork:
    """The tokens of one chunk a branch step still has to process, with their input rows.

    Skips tokens this step already finished (a retried task resumes) and rows every coalesce
    joining this branch (``coalesces``) has already decided (their result could only arrive late).
    A row decided by another coalesce of the same fork is still needed by these.
    """
    sr, st = t.source_rows.c, t.step_results.c
    with engine.connect() as conn:
        run_no = run_number(conn, run_id)
        # (row id, row key, the row's body, its hash): every row of the chunk has this branch's token.
        rows = [
            (row_id(run_no, row_no), row_key, body, source_hash)
            for row_no, row_key, body, source_hash in conn.execute(
                select(sr.row_no, sr.row_key, sr.body, sr.source_hash)
                .where(sr.run_no == run_no, sr.chunk == chunk)
                .order_by(sr.row_no)
            )
        ]
        done = {
            row_id(run_no, row_no)
            for row_no in conn.execute(
                select(st.row_no).where(
                    st.run_no == run_no,
                    st.node_id == node_id,
                    st.chunk == chunk,
                    st.status.in_(_TERMINAL),
                )
            ).scalars()
        }
        decided = set(_decided_by_all(conn, run_id, coalesces, chunk=chunk))
        # The previous step's first terminal result of each row: (status, output hash, body, error).
        upstream: dict[str, tuple[str, str | None, str | None, str | None]] = {}
        if previous_node is not None:
            for row_no, status, output_hash, output_body, error_json in conn.execute(
                select(st.row_no, st.status, st.output_hash, st.output_body, st.error_json)
                .where(
                    st.run_no == run_no,
                    st.node_id == previous_node,
                    st.chunk == chunk,
                    st.status.in_(_TERMINAL),
                )
                .order_by(st.completed_at)
            ):
                upstream.setdefault(row_id(run_no, row_no), (status, output_hash, output_body, error_json))
    pending = [
        row
        for row in rows
        if row[0] not in done and row[0] not in decided and (previous_node is None or row[0] in upstream)
    ]
    items = []
    for row, row_key, body, source_hash in pending:
        token = branch_token_id(row, branch)
        if previous_node is None:
            items.append(WorkItem(token, row, row_key, source_hash, json.loads(body)))
            continue
        status, output_hash, output_body, error_json = upstream[row]
        if status in ARRIVAL_NODE_STATUSES and output_hash and output_body is not None:
            items.append(WorkItem(token, row, row_key, output_hash, json.loads(output_body)))
        else:
            error = json.loads(error_json) if error_json else None
            items.append(WorkItem(token, row, row_key, output_hash or "", None, status, error))
    return ChunkWork(
        items=items,
        tokens_total=len(rows),
        already_done=sum(1 for row in rows if row[0] in done),
        already_decided=sum(1 for row in rows if row[0] in decided and row[0] not in done),
        decided_tokens=tuple(
            branch_token_id(row[0], branch)
            for row in rows
            if row[0] in decided and row[0] not in done and (previous_node is None or row[0] in upstream)
        ),
    )


def _decided_by_all(conn: Connection, run_id: str, coalesces: Sequence[str], *, chunk: int) -> dict[str, str]:
    """row_id -> decision of the rows of one chunk that every coalesce in ``coalesces`` has decided
    by its policy (a resolution is not such a decision: see the module's docstring).

    The decision is "failed" when any of them failed the row. No coalesces: nothing is decided.
    """
    nodes = sorted(set(coalesces))
    if not nodes:
        return {}
    d = t.decisions.c
    run_no = run_number(conn, run_id)
    return {
        row_id(run_no, row_no): decision
        for row_no, decision in conn.execute(
            select(d.row_no, func.min(d.decision))
            .where(
                d.run_no == run_no,
                d.node_id.in_(nodes),
                d.chunk == chunk,
                or_(d.failure_reason.is_(None), ~d.failure_reason.like(COALESCE_TASK_PREFIX + "%")),
            )
            .group_by(d.row_no)
            .having(func.count(func.distinct(d.node_id)) == len(nodes))
        )
    }


def decisions_in_chunk(
    engine: Engine, run_id: str, chunk: int, *, coalesces: Sequence[str]
) -> dict[str, str]:
    """row_id -> decision ('merged', or 'failed' if any failed it) of the rows of one chunk that
    every coalesce in ``coalesces`` has decided by its policy (one indexed range read)."""
    with engine.connect() as conn:
        return _decided_by_all(conn, run_id, coalesces, chunk=chunk)


def decided_in_chunk(engine: Engine, run_id: str, chunk: int, *, coalesces: Sequence[str]) -> set[str]:
    """The rows of one chunk that every coalesce in ``coalesces`` has decided by its policy: what a
    branch re-reads while it works, to skip rows it has not started."""
    return set(decisions_in_chunk(engine, run_id, chunk, coalesces=coalesces))
