"""What one task of a DAG run is in the audit trail (fork, branch step or coalesce) and, for a branch
step, what it did: node states by status, errors by type, durations, and the rows its branch lost
when the task ended without delivering them. Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import Connection, Engine, func, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.ids import branch_of_token, row_numbers
from airflow_elspeth.audit.model import WHOLE_TASK, load_run, run_number
from airflow_elspeth.audit.read.events import of_source_row
from airflow_elspeth.audit.read.records import AuditRunView, BranchStepView, StepErrors, TaskEnd, TaskView
from airflow_elspeth.audit.read.sql import json_field
from airflow_elspeth.core.vocabulary import BRANCH_TASK_PREFIX, NodeStatus, NodeType, TokenOutcome


def task_view(
    engine: Engine, runs: Sequence[AuditRunView], task_id: str, map_index: int | None = None
) -> TaskView:
    """What one task of the DAG run is in the audit trail (fork, branch step or coalesce) and, for a
    branch step, what it did: node states by status, errors by type, durations.

    The newest audit run in which the task appears is used.
    """
    ordered = [*(r for r in runs if r.current), *(r for r in runs if not r.current)]
    for run in ordered:
        if run.fork_task_id == task_id:
            return TaskView(kind=NodeType.FORK.value, task_id=task_id, audit_run_id=run.audit_run_id)
        if task_id in run.coalesces:
            return TaskView(kind=NodeType.COALESCE.value, task_id=task_id, audit_run_id=run.audit_run_id)
        step = next((s for s in run.branch_steps if s.node_id == task_id), None)
        if step is not None:
            return _branch_step_stats(engine, run.audit_run_id, task_id, step.branch, map_index)
    return TaskView(kind=None, task_id=task_id, audit_run_id=None)


def _branch_step_stats(
    engine: Engine, run_id: str, node_id: str, branch: str, map_index: int | None
) -> BranchStepView:
    ns, sr = t.step_results.c, t.source_rows.c
    n = t.nodes.c
    with engine.connect() as conn:
        scope = [ns.run_no == run_number(conn, run_id), ns.node_id == node_id]
        coalesce_configs = [
            json.loads(c)
            for c in conn.execute(
                select(n.config_json).where(n.run_id == run_id, n.node_type == NodeType.COALESCE)
            ).scalars()
        ]
        mapped = any(cfg.get("mapped", {}).get(branch) for cfg in coalesce_configs)
        chunk = map_index if mapped and map_index is not None and map_index >= 0 else None
        if chunk is not None:
            scope.append(ns.chunk == chunk)
        by_status: dict[str, int] = {}
        first_started = last_completed = None
        duration_sum, duration_max = 0, None
        for status, n, started, completed, total_ms, max_ms in conn.execute(
            select(
                ns.status,
                func.count(),
                func.min(ns.started_at),
                func.max(ns.completed_at),
                func.sum(ns.duration_ms),
                func.max(ns.duration_ms),
            )
            .where(*scope)
            .group_by(ns.status)
        ):
            by_status[status] = n
            first_started = started if first_started is None else min(first_started, started)
            if completed is not None:
                last_completed = completed if last_completed is None else max(last_completed, completed)
            duration_sum += total_ms or 0
            if max_ms is not None:
                duration_max = max_ms if duration_max is None else max(duration_max, max_ms)
        # Errors by type in SQL (one grouped scan), then a few example rows of each type.
        error_type = json_field(engine, ns.error_json, "type").label("error_type")
        by_type: dict[str, tuple[int, str]] = {}
        for kind, n, message in conn.execute(
            select(error_type, func.count(), func.min(json_field(engine, ns.error_json, "message")))
            .where(*scope, ns.status == NodeStatus.FAILED.value)
            .group_by(error_type)
            .order_by(func.count().desc())
        ):
            by_type[str(kind)] = (n, message or "")
        examples: dict[str, list[str]] = {}
        for kind in list(by_type)[:20]:
            examples[kind] = list(
                conn.execute(
                    select(sr.row_key)
                    .select_from(t.step_results.join(t.source_rows, of_source_row(t.step_results)))
                    .where(
                        *scope,
                        ns.status == NodeStatus.FAILED.value,
                        json_field(engine, ns.error_json, "type") == kind,
                    )
                    .order_by(ns.chunk)
                    .limit(10)
                ).scalars()
            )
        task_ends, rows_lost = _task_end_losses(conn, run_id, node_id, branch, chunk)
    states_total = sum(by_status.values())
    feeds = [cfg["node_id"] for cfg in coalesce_configs if cfg.get("delivering", {}).get(branch) == node_id]
    return BranchStepView(
        kind=NodeType.BRANCH.value,
        task_id=node_id,
        audit_run_id=run_id,
        branch=branch,
        mapped=mapped,
        chunk=chunk,
        states_total=states_total,
        by_status=dict(sorted(by_status.items())),
        first_started_at=first_started,
        last_completed_at=last_completed,
        avg_duration_ms=duration_sum / states_total if states_total else None,
        max_duration_ms=duration_max,
        errors={
            kind: StepErrors(rows=n, message=message, row_keys=examples.get(kind, []))
            for kind, (n, message) in sorted(by_type.items(), key=lambda kv: -kv[1][0])
        },
        delivers_to=feeds,
        task_ends=task_ends,
        rows_lost_at_task_end=rows_lost,
    )


def _task_end_losses(
    conn: Connection, run_id: str, node_id: str, branch: str, chunk: int | None
) -> tuple[list[TaskEnd], int]:
    """The ends of this delivering task that the coalesce recorded (``branch_task_losses``), by task
    state: how many chunk records, first seen when; and how many of the branch's rows they lost
    (reason ``branch_task_<state>``). An intermediate step has none."""
    tl, ro = t.branch_task_losses.c, t.recorded_outcomes.c
    ends_scope = [tl.run_id == run_id, tl.node_id == node_id]
    if chunk is not None:
        ends_scope.append(tl.chunk.in_([chunk, WHOLE_TASK]))
    ends = [
        TaskEnd(task_state=state, records=n, first_seen_at=seen)
        for state, n, seen in conn.execute(
            select(tl.task_state, func.count(), func.min(tl.observed_at))
            .where(*ends_scope)
            .group_by(tl.task_state)
            .order_by(tl.task_state)
        )
    ]
    if not ends:
        return [], 0
    run = load_run(conn, run_id)
    lost = 0
    for token in conn.execute(
        select(ro.token_id).where(
            ro.run_id == run_id,
            ro.is_terminal,
            ro.outcome == TokenOutcome.LOST.value,
            ro.reason.startswith(BRANCH_TASK_PREFIX),
        )
    ).scalars():
        row, token_branch = branch_of_token(token)
        in_chunk = chunk is None or (run is not None and row_numbers(row)[1] // run.chunk_size == chunk)
        if token_branch == branch and in_chunk:
            lost += 1
    return ends, lost
