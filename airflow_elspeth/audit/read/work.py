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

from sqlalchemy import Connection, Engine, and_, func, or_, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.model import payload_bodies
from airflow_elspeth.core.vocabulary import (
    ARRIVAL_NODE_STATUSES,
    COALESCE_TASK_PREFIX,
    TERMINAL_NODE_STATUSES,
    TokenKind,
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
    tk, r, ns, cd = t.tokens.c, t.rows.c, t.node_states.c, t.coalesce_decisions.c
    with engine.connect() as conn:
        tokens = conn.execute(
            select(tk.token_id, tk.row_id, r.row_key, r.payload_ref)
            .select_from(t.tokens.join(t.rows, and_(r.run_id == tk.run_id, r.row_id == tk.row_id)))
            .where(
                tk.run_id == run_id,
                tk.chunk == chunk,
                tk.branch_name == branch,
                tk.token_kind == TokenKind.BRANCH,
            )
            .order_by(r.row_index)
        ).all()
        done = set(
            conn.execute(
                select(ns.token_id).where(
                    ns.run_id == run_id,
                    ns.node_id == node_id,
                    ns.chunk == chunk,
                    ns.status.in_(_TERMINAL),
                )
            ).scalars()
        )
        decided = set(_decided_by_all(conn, run_id, coalesces, cd.chunk == chunk))
        upstream: dict[str, tuple[str, str | None, str | None]] = {}
        if previous_node is not None:
            for token_id, status, output_ref, error_json in conn.execute(
                select(ns.token_id, ns.status, ns.output_ref, ns.error_json)
                .where(
                    ns.run_id == run_id,
                    ns.node_id == previous_node,
                    ns.chunk == chunk,
                    ns.status.in_(_TERMINAL),
                )
                .order_by(ns.completed_at)
            ):
                upstream.setdefault(token_id, (status, output_ref, error_json))
        pending = [
            tok
            for tok in tokens
            if tok.token_id not in done
            and tok.row_id not in decided
            and (previous_node is None or tok.token_id in upstream)
        ]
        refs = set()
        for tok in pending:
            if previous_node is None:
                refs.add(tok.payload_ref)
            elif upstream[tok.token_id][1]:
                refs.add(upstream[tok.token_id][1])
        bodies = payload_bodies(conn, refs)
    items = []
    for tok in pending:
        if previous_node is None:
            items.append(
                WorkItem(tok.token_id, tok.row_id, tok.row_key, tok.payload_ref, bodies[tok.payload_ref])
            )
            continue
        status, output_ref, error_json = upstream[tok.token_id]
        if status in ARRIVAL_NODE_STATUSES and output_ref:
            items.append(WorkItem(tok.token_id, tok.row_id, tok.row_key, output_ref, bodies[output_ref]))
        else:
            error = json.loads(error_json) if error_json else None
            items.append(
                WorkItem(tok.token_id, tok.row_id, tok.row_key, output_ref or "", None, status, error)
            )
    return ChunkWork(
        items=items,
        tokens_total=len(tokens),
        already_done=sum(1 for tok in tokens if tok.token_id in done),
        already_decided=sum(1 for tok in tokens if tok.row_id in decided and tok.token_id not in done),
        decided_tokens=tuple(
            tok.token_id
            for tok in tokens
            if tok.row_id in decided
            and tok.token_id not in done
            and (previous_node is None or tok.token_id in upstream)
        ),
    )


def _decided_by_all(conn: Connection, run_id: str, coalesces: Sequence[str], *where: Any) -> dict[str, str]:
    """row_id -> decision of the rows that every coalesce in ``coalesces`` has decided by its policy
    (a resolution is not such a decision: see the module's docstring).

    The decision is "failed" when any of them failed the row. No coalesces: nothing is decided.
    """
    nodes = sorted(set(coalesces))
    if not nodes:
        return {}
    cd = t.coalesce_decisions.c
    return dict(
        conn.execute(
            select(cd.row_id, func.min(cd.decision))
            .where(
                cd.run_id == run_id,
                cd.node_id.in_(nodes),
                or_(cd.failure_reason.is_(None), ~cd.failure_reason.like(COALESCE_TASK_PREFIX + "%")),
                *where,
            )
            .group_by(cd.row_id)
            .having(func.count(func.distinct(cd.node_id)) == len(nodes))
        ).all()
    )


def decisions_in_chunk(
    engine: Engine, run_id: str, chunk: int, *, coalesces: Sequence[str]
) -> dict[str, str]:
    """row_id -> decision ('merged', or 'failed' if any failed it) of the rows of one chunk that
    every coalesce in ``coalesces`` has decided by its policy (one indexed range read)."""
    with engine.connect() as conn:
        return _decided_by_all(conn, run_id, coalesces, t.coalesce_decisions.c.chunk == chunk)


def decided_in_chunk(engine: Engine, run_id: str, chunk: int, *, coalesces: Sequence[str]) -> set[str]:
    """The rows of one chunk that every coalesce in ``coalesces`` has decided by its policy: what a
    branch re-reads while it works, to skip rows it has not started."""
    return set(decisions_in_chunk(engine, run_id, chunk, coalesces=coalesces))
