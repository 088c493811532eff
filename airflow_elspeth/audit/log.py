"""A row's event log as the store holds it: what the coalesce pass decides from and what ``verify``,
``explain`` and the row page replay.

:func:`read_chunk_log` reads a chunk's branch states at their delivering steps and its branch tasks'
recorded losses; :func:`row_events` turns one row's into the events the core replays (a task's
loss fences what it wrote afterwards, :func:`late_writes`); :func:`collision_check` gives the
replay the collisions of merging the stored outputs. One reading for the writer and every reader,
so a replay can only agree with the decision. SQL and the core, no Airflow.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.model import WHOLE_TASK, CoalesceSpec, payload_bodies
from airflow_elspeth.core.config import CoalesceConfig
from airflow_elspeth.core.merge import merge_outputs
from airflow_elspeth.core.policy import BranchEvent, CollisionCheck, EventKind
from airflow_elspeth.core.vocabulary import (
    ARRIVAL_NODE_STATUSES,
    DROPPED,
    TERMINAL_NODE_STATUSES,
    NodeStatus,
    branch_task_reason,
    failed_state_reason,
)


def loss_reason(status: str, error: Mapping[str, Any] | None) -> str:
    """The loss reason of a terminal node state that is not an arrival."""
    if status == NodeStatus.DROPPED:
        return DROPPED
    if status == NodeStatus.FAILED:
        return failed_state_reason(error)
    raise ValueError(f"node state {status!r} is not a loss")


@dataclass(frozen=True)
class TokenState:
    token_id: str
    branch: str
    status: str
    at: datetime  # when the state became visible (node_states.recorded_at): the event time
    output_ref: str | None
    error: Mapping[str, Any] | None


def read_chunk_log(
    conn: Connection,
    spec: CoalesceSpec,
    run_id: str,
    chunk: int,
    *,
    undecided_only: bool,
    row_ids: list[str] | None = None,
) -> tuple[list[tuple[str, str, int]], dict[str, dict[str, TokenState]], dict[str, tuple[str, datetime]]]:
    """One chunk's rows, their branch states at the delivering nodes, and whole-task losses.

    :returns: (rows as (row_id, row_key, row_index)), {row_id: {branch: first terminal state}},
        {branch: (task state, observed_at)} for the chunk.
    """
    r = t.rows.c
    query = select(r.row_id, r.row_key, r.row_index).where(r.run_id == run_id, r.chunk == chunk)
    decided_ids: set[str] = set()
    if undecided_only:
        # One indexed range read of this chunk's decisions (ix run_id, node_id, chunk), filtered here:
        # a correlated NOT EXISTS lets PostgreSQL, on tables not analysed yet, scan every decision of
        # the run once per row of the chunk (quadratic in the run size).
        cd = t.coalesce_decisions.c
        decided_ids = set(
            conn.execute(
                select(cd.row_id).where(cd.run_id == run_id, cd.node_id == spec.node_id, cd.chunk == chunk)
            ).scalars()
        )
    if row_ids is not None:
        query = query.where(r.row_id.in_(row_ids))
    rows = [tuple(row) for row in conn.execute(query.order_by(r.row_index)) if row[0] not in decided_ids]
    branch_of = {node: branch for branch, node in spec.delivering.items()}
    ns = t.node_states.c
    states: dict[str, dict[str, TokenState]] = defaultdict(dict)
    for token_id, row_id, node_id, status, recorded_at, output_ref, error_json in conn.execute(
        select(ns.token_id, ns.row_id, ns.node_id, ns.status, ns.recorded_at, ns.output_ref, ns.error_json)
        .where(
            ns.run_id == run_id,
            ns.node_id.in_(list(branch_of)),
            ns.chunk == chunk,
            ns.status.in_(TERMINAL_NODE_STATUSES),
            *([ns.row_id.in_(row_ids)] if row_ids is not None else []),
        )
        .order_by(ns.recorded_at)
    ):
        branch = branch_of[node_id]
        if branch not in states[row_id]:
            error = json.loads(error_json) if error_json else None
            states[row_id][branch] = TokenState(token_id, branch, status, recorded_at, output_ref, error)
    tl = t.branch_task_losses.c
    losses: dict[str, tuple[str, datetime]] = {}
    for node_id, loss_chunk, state, observed_at in conn.execute(
        select(tl.node_id, tl.chunk, tl.task_state, tl.observed_at).where(
            tl.run_id == run_id,
            tl.node_id.in_(list(branch_of)),
            tl.chunk.in_([chunk, WHOLE_TASK]),
        )
    ):
        branch = branch_of[node_id]
        if branch not in losses or loss_chunk == chunk:
            losses[branch] = (state, observed_at)
    return rows, states, losses


def row_events(
    spec: CoalesceSpec,
    states: Mapping[str, TokenState],
    losses: Mapping[str, tuple[str, datetime]],
    *,
    as_of: datetime | None = None,
) -> list[BranchEvent]:
    """A row's event log: each branch's earliest event, its state at the delivering node or its
    task's recorded loss.

    A task's loss fences what that task writes afterwards: Airflow declared it ended (failed by a
    person, by a heartbeat timeout, ...) and the pass recorded that under the exclusive ordering
    lock, so a state stamped later came from a writer already counted as gone. It is kept and read
    as late (:func:`late_writes`), never as the branch's event, so no later write can change what a
    decision made at the loss saw. A state stamped before the loss (a commit the pass waited for)
    is the branch's event, as it was when the pass read it.

    :param as_of: for a coalesce registered by 0.1 (``spec.fenced`` false), the moment its decision
        was recorded: 0.1 preferred a branch's state over its task's loss, as far as the pass could
        see it then, and its decisions are replayed that way.
    """
    events = []
    for branch in spec.config.branches:
        state = states.get(branch)
        loss = losses.get(branch)
        if state is not None and _state_counts(spec, state, loss, as_of):
            events.append(_state_event(branch, state))
        elif loss is not None:
            task_state, observed_at = loss
            events.append(BranchEvent(branch, observed_at, EventKind.LOSS, branch_task_reason(task_state)))
    return events


def late_writes(
    spec: CoalesceSpec,
    states: Mapping[str, TokenState],
    losses: Mapping[str, tuple[str, datetime]],
    *,
    as_of: datetime | None = None,
) -> list[BranchEvent]:
    """The states of a row that :func:`row_events` leaves out (written after their task's recorded
    loss), as the events they would have been: what ``explain`` and the row page show as late."""
    return [
        _state_event(branch, state)
        for branch, state in states.items()
        if not _state_counts(spec, state, losses.get(branch), as_of)
    ]


def _state_counts(
    spec: CoalesceSpec, state: TokenState, loss: tuple[str, datetime] | None, as_of: datetime | None
) -> bool:
    """Whether a branch's state, rather than its task's loss, is the branch's event."""
    if loss is None:
        return True
    if spec.fenced:
        return state.at <= loss[1]
    return as_of is None or state.at <= as_of


def _state_event(branch: str, state: TokenState) -> BranchEvent:
    if state.status in ARRIVAL_NODE_STATUSES:
        return BranchEvent(branch, state.at, EventKind.ARRIVAL)
    return BranchEvent(branch, state.at, EventKind.LOSS, loss_reason(state.status, state.error))


def arrival_bodies(
    conn: Connection, config: CoalesceConfig, states: Mapping[str, Mapping[str, TokenState]]
) -> dict[str, Any]:
    """The outputs of the given rows' arrivals (payload hash -> output) when the decision depends
    on them (``on_collision="fail_row"``), else nothing."""
    if not config.fails_on_collision:
        return {}
    return payload_bodies(conn, {state.output_ref for row in states.values() for state in row.values()})


def collision_check(
    config: CoalesceConfig, states: Mapping[str, TokenState], bodies: Mapping[str, Any]
) -> CollisionCheck | None:
    """The collisions of merging one row's consumed outputs (``bodies``: payload hash -> output),
    for :func:`~airflow_elspeth.core.policy.replay`; None unless ``on_collision="fail_row"``."""
    if not config.fails_on_collision:
        return None

    def collisions(consumed: tuple[str, ...]) -> Mapping[str, list[str]]:
        outputs = {b: bodies[states[b].output_ref or ""] for b in consumed}
        return merge_outputs(config, consumed, outputs).collisions

    return collisions
