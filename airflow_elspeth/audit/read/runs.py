"""Which audit runs there are: the runs of a DAG run, the newest runs, the one to show, their coalesces.

An audit run is one try of a fork task; a DAG run has one per fork execution (a cleared fork starts a
new one, linked to the earlier try). Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import NoResultFound

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.model import CoalesceSpec, RunInfo, load_run
from airflow_elspeth.audit.read.records import (
    AuditRun,
    AuditRunTry,
    AuditRunView,
    BranchStep,
    DecisionCounts,
    fields_of,
)
from airflow_elspeth.core.vocabulary import DecisionStatus, NodeType, RunStatus
from airflow_elspeth.exceptions import NotFound

# Runs per IN list.
_BATCH = 500

Run = TypeVar("Run", bound=AuditRun)


@dataclass(frozen=True)
class RunSelection:
    """Which audit runs: by their ids (None: any) and a logical-date range (``since`` inclusive,
    ``until`` exclusive, aware; a run without a logical date is in no range)."""

    run_id: str | None = None
    dag_id: str | None = None
    airflow_run_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name, instant in (("since", self.since), ("until", self.until)):
            if instant is not None and instant.tzinfo is None:
                raise ValueError(f"{name} {instant.isoformat()} has no time zone")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError(f"until {self.until.isoformat()} is not after since {self.since.isoformat()}")

    def conditions(self) -> list[Any]:
        """The selection as SQL conditions on ``runs`` (the index adds its own to them)."""
        r = t.runs.c
        wanted = ((r.run_id, self.run_id), (r.dag_id, self.dag_id), (r.airflow_run_id, self.airflow_run_id))
        conditions: list[Any] = [column == value for column, value in wanted if value is not None]
        if self.since is not None:
            conditions.append(r.logical_date >= self.since)
        if self.until is not None:
            conditions.append(r.logical_date < self.until)
        return conditions


EVERY_RUN = RunSelection()


def select_runs(
    engine: Engine, selection: RunSelection = EVERY_RUN, *, limit: int | None = None
) -> list[AuditRun]:
    """Every audit run (oldest first), or only the selected ones.

    :param limit: only the newest ``limit`` of those by logical date (runs without one last, then
        the newest started), still returned oldest first; :func:`count_runs` says how many matched.
    """
    r = t.runs.c
    query = select(t.runs).where(*selection.conditions())
    if limit is not None:
        newest = (
            query.order_by(r.logical_date.desc().nulls_last(), r.started_at.desc(), r.run_id)
            .limit(limit)
            .subquery()
        )
        query = select(newest)
    query = query.order_by("started_at", "run_id")
    with engine.connect() as conn:
        return [AuditRun.from_row(row) for row in conn.execute(query).mappings()]


def count_runs(engine: Engine, selection: RunSelection) -> int:
    """How many audit runs :func:`select_runs` finds with this selection and no limit."""
    with engine.connect() as conn:
        query = select(func.count()).select_from(t.runs).where(*selection.conditions())
        return int(conn.execute(query).scalar_one())


def run_info(engine: Engine, run_id: str) -> RunInfo:
    """:raises NotFound: no such audit run."""
    with engine.connect() as conn:
        run = load_run(conn, run_id)
    if run is None:
        raise NotFound(f"no audit run {run_id}")
    return run


def find_row_run(engine: Engine, row_key: str, runs: Sequence[Run]) -> Run:
    """The newest of ``runs`` that has ``row_key``. :raises NotFound: none has it."""
    found = row_runs(engine, row_key, runs)
    if not found:
        raise NotFound(f"no audit run has a row with key {row_key!r}")
    return found[-1]


def row_runs(engine: Engine, row_key: str, runs: Sequence[Run]) -> list[Run]:
    """Those of ``runs`` that have a row with key ``row_key``, in the order of ``runs``."""
    ids = [run.audit_run_id for run in runs]
    having: set[str] = set()
    r = t.rows.c
    with engine.connect() as conn:
        for start in range(0, len(ids), _BATCH):
            having.update(
                conn.execute(
                    select(r.run_id).where(r.run_id.in_(ids[start : start + _BATCH]), r.row_key == row_key)
                ).scalars()
            )
    return [run for run in runs if run.audit_run_id in having]


def run_order(run: AuditRun) -> tuple[Any, ...]:
    """Sort key of audit runs: by logical date (else start), DAG, DAG run, fork, then fork try."""
    when = run.logical_date or run.started_at
    return (
        when is None,
        when.isoformat() if when is not None else "",
        run.dag_id,
        run.airflow_run_id,
        run.fork_task_id,
        run.try_number,
    )


def with_tries(engine: Engine, runs: Sequence[AuditRun]) -> list[AuditRunTry]:
    """``runs`` in :func:`run_order`, each with its fork's newest try in its DAG run (over the whole
    store): whether it is ``current``, else the try it is ``superseded_by_try``."""
    r = t.runs.c
    wanted = {(run.dag_id, run.airflow_run_id, run.fork_task_id) for run in runs}
    newest: dict[tuple[str, str, str], int] = {}
    with engine.connect() as conn:
        for dag_id in sorted({w[0] for w in wanted}):
            for dag_run, fork, n in conn.execute(
                select(r.airflow_run_id, r.fork_task_id, func.max(r.try_number))
                .where(r.dag_id == dag_id)
                .group_by(r.airflow_run_id, r.fork_task_id)
            ):
                if (dag_id, dag_run, fork) in wanted:
                    newest[(dag_id, dag_run, fork)] = int(n)
    return [
        AuditRunTry.of(run, newest.get((run.dag_id, run.airflow_run_id, run.fork_task_id), run.try_number))
        for run in sorted(runs, key=run_order)
    ]


def runs_of_dag_run(engine: Engine, dag_id: str, airflow_run_id: str) -> list[AuditRun]:
    """Every audit run of a DAG run, oldest first (a reprocessed run has several)."""
    with engine.connect() as conn:
        return [
            AuditRun.from_row(row)
            for row in conn.execute(
                select(t.runs)
                .where(t.runs.c.dag_id == dag_id, t.runs.c.airflow_run_id == airflow_run_id)
                .order_by(t.runs.c.try_number)
            ).mappings()
        ]


def coalesce_nodes(engine: Engine, run_id: str) -> list[CoalesceSpec]:
    """The coalesces registered in an audit run, each its configuration as registered."""
    with engine.connect() as conn:
        return coalesce_specs(conn, run_id)


def coalesce_specs(conn: Connection, run_id: str) -> list[CoalesceSpec]:
    """:func:`coalesce_nodes` on an open connection (inside a read that set its own options)."""
    n = t.nodes.c
    return [
        CoalesceSpec.from_dict(json.loads(config_json))
        for config_json in conn.execute(
            select(n.config_json)
            .where(n.run_id == run_id, n.node_type == NodeType.COALESCE)
            .order_by(n.node_id)
        ).scalars()
    ]


def coalesce_tasks(engine: Engine, run_ids: Sequence[str]) -> dict[str, list[str]]:
    """Audit run id -> the task ids of its registered coalesces."""
    n = t.nodes.c
    found: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for start in range(0, len(run_ids), _BATCH):
            for run_id, task_id in conn.execute(
                select(n.run_id, n.task_id).where(
                    n.run_id.in_(list(run_ids[start : start + _BATCH])), n.node_type == NodeType.COALESCE
                )
            ):
                found.setdefault(run_id, []).append(task_id)
    return found


def coalesce_spec(engine: Engine, run_id: str, node_id: str) -> CoalesceSpec:
    """The coalesce's configuration as it registered it; NotFound if it is not a coalesce of the run."""
    n = t.nodes.c
    with engine.connect() as conn:
        try:
            config_json = conn.execute(
                select(n.config_json).where(
                    n.run_id == run_id, n.node_id == node_id, n.node_type == NodeType.COALESCE
                )
            ).scalar_one()
        except NoResultFound as err:
            raise NotFound(f"no coalesce {node_id!r} in audit run {run_id}") from err
    return CoalesceSpec.from_dict(json.loads(config_json))


def audit_runs(engine: Engine, dag_id: str, airflow_run_id: str) -> list[AuditRunView]:
    """Every audit run of a DAG run, newest try first per fork, with its coalesces and branch steps.

    A DAG run has one audit run per execution of each fork: a reprocessed (cleared) fork starts a
    new one; the newest try of each fork is ``current``, the earlier ones stay readable.
    """
    runs = runs_of_dag_run(engine, dag_id, airflow_run_id)
    if not runs:
        return []
    n = t.nodes.c
    coalesces: dict[str, list[str]] = {run.audit_run_id: [] for run in runs}
    steps: dict[str, list[BranchStep]] = {run.audit_run_id: [] for run in runs}
    with engine.connect() as conn:
        for run_id, node_id, node_type, branch in conn.execute(
            select(n.run_id, n.node_id, n.node_type, n.branch_name)
            .where(n.run_id.in_([r.audit_run_id for r in runs]))
            .order_by(n.run_id, n.node_id)
        ):
            if node_type == NodeType.COALESCE:
                coalesces[run_id].append(node_id)
            elif node_type == NodeType.BRANCH:
                steps[run_id].append(BranchStep(node_id=node_id, branch=branch))
    newest: dict[str, int] = {}
    for run in runs:
        newest[run.fork_task_id] = max(newest.get(run.fork_task_id, 0), run.try_number)
    counts = decision_counts(
        engine, {run.audit_run_id: (run.rows_total, coalesces[run.audit_run_id]) for run in runs}
    )
    result = [
        AuditRunView(
            **fields_of(run, AuditRun),
            current=run.try_number == newest[run.fork_task_id],
            coalesces=coalesces[run.audit_run_id],
            branch_steps=steps[run.audit_run_id],
            decisions=counts.get(run.audit_run_id, {}),
        )
        for run in runs
    ]
    result.sort(key=lambda r: (r.fork_task_id, -r.try_number))
    return result


def decision_counts(
    engine: Engine, runs: Mapping[str, tuple[int | None, Sequence[str]]]
) -> dict[str, dict[str, DecisionCounts]]:
    """Per audit run, per registered coalesce: rows merged, failed and undecided, and the failed
    rows per failure reason, most first (one grouped read).

    :param runs: audit run id -> (its rows_total, or None while the fork runs; its coalesces).
    ``undecided`` is None while the run's row count is not known. A superseded resolution is not
    a decision: its row counts as undecided until the coalesce decides it again.
    """
    wanted = [run_id for run_id, (_, coalesces) in runs.items() if coalesces]
    found: dict[tuple[str, str], dict[str, int]] = {}
    reasons: dict[tuple[str, str], dict[str, int]] = {}
    cd, r = t.decisions.c, t.runs.c
    with engine.connect() as conn:
        for start in range(0, len(wanted), _BATCH):
            for run_id, node_id, decision, reason, n in conn.execute(
                select(r.run_id, cd.node_id, cd.decision, cd.failure_reason, func.count())
                .join_from(t.decisions, t.runs, r.run_no == cd.run_no)
                .where(r.run_id.in_(wanted[start : start + _BATCH]))
                .group_by(r.run_id, cd.node_id, cd.decision, cd.failure_reason)
            ):
                got = found.setdefault((run_id, node_id), {})
                got[decision] = got.get(decision, 0) + int(n)
                if decision == DecisionStatus.FAILED:
                    reasons.setdefault((run_id, node_id), {})[str(reason)] = int(n)
    result: dict[str, dict[str, DecisionCounts]] = {}
    for run_id, (rows_total, coalesces) in runs.items():
        per_node: dict[str, DecisionCounts] = {}
        for node_id in coalesces:
            got = found.get((run_id, node_id), {})
            merged, failed = got.get(DecisionStatus.MERGED, 0), got.get(DecisionStatus.FAILED, 0)
            why = reasons.get((run_id, node_id), {})
            per_node[node_id] = DecisionCounts(
                merged=merged,
                failed=failed,
                undecided=max(0, rows_total - merged - failed) if rows_total is not None else None,
                failure_reasons=dict(sorted(why.items(), key=lambda item: (-item[1], item[0]))),
            )
        result[run_id] = per_node
    return result


def newest_completed_run(engine: Engine, dag_id: str, airflow_run_id: str, fork_task_id: str) -> str | None:
    """The audit run of a fork's newest completed try in a DAG run (what a succeeded fork pushed)."""
    r = t.runs.c
    with engine.connect() as conn:
        found: str | None = conn.execute(
            select(r.run_id)
            .where(
                r.dag_id == dag_id,
                r.airflow_run_id == airflow_run_id,
                r.fork_task_id == fork_task_id,
                r.status == RunStatus.COMPLETED,
            )
            .order_by(r.try_number.desc())
            .limit(1)
        ).scalar()
    return found


def pick_audit_run(
    runs: Sequence[AuditRunView], *, audit_run_id: str | None = None, coalesce: str | None = None
) -> AuditRunView | None:
    """The audit run to show: the one asked for, else the newest one with ``coalesce``, else the
    first current one. Only runs of this DAG run are candidates (``runs`` comes from it)."""
    if audit_run_id:
        return next((r for r in runs if r.audit_run_id == audit_run_id), None)
    current = [r for r in runs if r.current]
    if coalesce:
        for run in [*current, *(r for r in runs if not r.current)]:
            if coalesce in run.coalesces:
                return run
    return current[0] if current else None
