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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.ids import branch_token_id, row_id, row_numbers
from airflow_elspeth.audit.model import WHOLE_TASK, CoalesceSpec, run_number
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
    at: datetime  # when the state became visible (step_results.recorded_at): the event time
    output_ref: str | None  # the output's hash
    error: Mapping[str, Any] | None
    output_body: str | None = None  # the output's canonical JSON, read with the result


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
    run_no = run_number(conn, run_id)
    sr = t.source_rows.c
    row_nos = [row_numbers(row)[1] for row in row_ids] if row_ids is not None else None
    query = select(sr.row_no, sr.row_key).where(sr.run_no == run_no, sr.chunk == chunk)
    decided: set[int] = set()
    if undecided_only:
        d = t.decisions.c
        decided = set(
            conn.execute(
                select(d.row_no).where(d.run_no == run_no, d.node_id == spec.node_id, d.chunk == chunk)
            ).scalars()
        )
    if row_nos is not None:
        query = query.where(sr.row_no.in_(row_nos))
    rows = [
        (row_id(run_no, row_no), row_key, row_no)
        for row_no, row_key in conn.execute(query.order_by(sr.row_no))
        if row_no not in decided
    ]
    branch_of = {node: branch for branch, node in spec.delivering.items()}
    st = t.step_results.c
    states: dict[str, dict[str, TokenState]] = defaultdict(dict)
    for row_no, node_id, status, recorded_at, output_hash, output_body, error_json in conn.execute(
        select(
            st.row_no, st.node_id, st.status, st.recorded_at, st.output_hash, st.output_body, st.error_json
        )
        .where(
            st.run_no == run_no,
            st.node_id.in_(list(branch_of)),
            st.chunk == chunk,
            st.status.in_(TERMINAL_NODE_STATUSES),
            *([st.row_no.in_(row_nos)] if row_nos is not None else []),
        )
        .order_by(st.recorded_at)
    ):
        branch = branch_of[node_id]
        row = row_id(run_no, row_no)
        if branch not in states[row]:
            error = json.loads(error_json) if error_json else None
            token = branch_token_id(row, branch)
            states[row][branch] = TokenState(
                token, branch, status, recorded_at, output_hash, error, output_body
            )
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


def arrival_bodies(config: CoalesceConfig, states: Mapping[str, Mapping[str, TokenState]]) -> dict[str, Any]:
    """The outputs of the given rows' arrivals (payload hash -> output) when the decision depends
    on them (``on_collision="fail_row"``), else nothing."""
    if not config.fails_on_collision:
        return {}
    return output_bodies(state for row in states.values() for state in row.values())


def output_bodies(states: Iterable[TokenState]) -> dict[str, Any]:
    """Output hash -> the output row, of the given states that have an output."""
    return {
        state.output_ref: json.loads(state.output_body)
        for state in states
        if state.output_ref is not None and state.output_body is not None
    }


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
