"""Which audit runs there are: the runs of a DAG run, the newest runs, the one to show, their coalesces.

An audit run is one try of a fork task; a DAG run has one per fork execution (a cleared fork starts a
new one, linked to the earlier try). Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import NoResultFound

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.model import CoalesceSpec, RunInfo, load_run
from airflow_elspeth.audit.read.records import AuditRunView, BranchStep
from airflow_elspeth.core.vocabulary import DecisionStatus, NodeType, RunStatus
from airflow_elspeth.exceptions import NotFound

# Runs per IN list.
_BATCH = 500


def select_runs(
    engine: Engine, run_id: str | None = None, dag_id: str | None = None, airflow_run_id: str | None = None
) -> list[dict[str, Any]]:
    """Every audit run (rows of ``runs``, oldest first), or only those matching the given ids."""
    r = t.runs.c
    query = select(t.runs).order_by(r.started_at)
    if run_id:
        query = query.where(r.run_id == run_id)
    if dag_id:
        query = query.where(r.dag_id == dag_id)
    if airflow_run_id:
        query = query.where(r.airflow_run_id == airflow_run_id)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def run_info(engine: Engine, run_id: str) -> RunInfo:
    """:raises NotFound: no such audit run."""
    with engine.connect() as conn:
        run = load_run(conn, run_id)
    if run is None:
        raise NotFound(f"no audit run {run_id}")
    return run


def find_row_run(engine: Engine, row_key: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The newest of ``runs`` that has ``row_key``. :raises NotFound: none has it."""
    found = row_runs(engine, row_key, runs)
    if not found:
        raise NotFound(f"no audit run has a row with key {row_key!r}")
    return found[-1]


def row_runs(engine: Engine, row_key: str, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Those of ``runs`` that have a row with key ``row_key``, in the order of ``runs``."""
    ids = [run["run_id"] for run in runs]
    having: set[str] = set()
    r = t.rows.c
    with engine.connect() as conn:
        for start in range(0, len(ids), _BATCH):
            having.update(
                conn.execute(
                    select(r.run_id).where(r.run_id.in_(ids[start : start + _BATCH]), r.row_key == row_key)
                ).scalars()
            )
    return [run for run in runs if run["run_id"] in having]


def run_order(run: Mapping[str, Any]) -> tuple[Any, ...]:
    """Sort key of audit runs: by logical date (else start), DAG, DAG run, fork, then fork try."""
    when = run.get("logical_date") or run.get("started_at")
    return (
        when is None,
        when.isoformat() if when is not None else "",
        run["dag_id"],
        run["airflow_run_id"],
        run["fork_task_id"],
        run["try_number"],
    )


def with_tries(engine: Engine, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``runs`` in :func:`run_order`, each with ``newest_try`` (the newest try of its fork in its DAG
    run, over the whole store), ``current`` (it is that try) and ``superseded_by_try`` (else None)."""
    r = t.runs.c
    wanted = {(run["dag_id"], run["airflow_run_id"], run["fork_task_id"]) for run in runs}
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
    marked = []
    for run in sorted(runs, key=run_order):
        top = newest.get((run["dag_id"], run["airflow_run_id"], run["fork_task_id"]), run["try_number"])
        current = run["try_number"] >= top
        marked.append(
            {**run, "newest_try": top, "current": current, "superseded_by_try": None if current else top}
        )
    return marked


def runs_of_dag_run(engine: Engine, dag_id: str, airflow_run_id: str) -> list[dict[str, Any]]:
    """Every audit run of a DAG run, oldest first (a reprocessed run has several)."""
    with engine.connect() as conn:
        return [
            dict(row)
            for row in conn.execute(
                select(t.runs)
                .where(t.runs.c.dag_id == dag_id, t.runs.c.airflow_run_id == airflow_run_id)
                .order_by(t.runs.c.try_number)
            ).mappings()
        ]


def coalesce_nodes(engine: Engine, run_id: str) -> list[dict[str, Any]]:
    """The coalesces registered in an audit run (rows of ``nodes``)."""
    with engine.connect() as conn:
        return [
            dict(row)
            for row in conn.execute(
                select(t.nodes).where(t.nodes.c.run_id == run_id, t.nodes.c.node_type == NodeType.COALESCE)
            ).mappings()
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
    nodes: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for run_id, node_id, node_type, branch in conn.execute(
            select(n.run_id, n.node_id, n.node_type, n.branch_name)
            .where(n.run_id.in_([r["run_id"] for r in runs]))
            .order_by(n.run_id, n.node_id)
        ):
            nodes.setdefault(run_id, []).append(
                {"node_id": node_id, "node_type": node_type, "branch": branch}
            )
    newest: dict[str, int] = {}
    for run in runs:
        newest[run["fork_task_id"]] = max(newest.get(run["fork_task_id"], 0), run["try_number"])
    coalesces = {
        run["run_id"]: [
            x["node_id"] for x in nodes.get(run["run_id"], []) if x["node_type"] == NodeType.COALESCE
        ]
        for run in runs
    }
    counts = decision_counts(
        engine, {run["run_id"]: (run["rows_total"], coalesces[run["run_id"]]) for run in runs}
    )
    result = [
        AuditRunView(
            audit_run_id=run["run_id"],
            dag_id=run["dag_id"],
            airflow_run_id=run["airflow_run_id"],
            fork_task_id=run["fork_task_id"],
            try_number=run["try_number"],
            clear_number=run["clear_number"],
            run_type=run["run_type"],
            logical_date=run["logical_date"],
            started_at=run["started_at"],
            completed_at=run["completed_at"],
            status=run["status"],
            status_reason=run["status_reason"],
            rows_total=run["rows_total"],
            chunk_size=run["chunk_size"],
            chunks_total=run["chunks_total"],
            branches=json.loads(run["branches_json"]),
            previous_run_id=run["previous_run_id"],
            current=run["try_number"] == newest[run["fork_task_id"]],
            coalesces=coalesces[run["run_id"]],
            branch_steps=[
                BranchStep(node_id=x["node_id"], branch=x["branch"])
                for x in nodes.get(run["run_id"], [])
                if x["node_type"] == NodeType.BRANCH
            ],
            decisions=counts.get(run["run_id"], {}),
        )
        for run in runs
    ]
    result.sort(key=lambda r: (r.fork_task_id, -r.try_number))
    return result


def decision_counts(
    engine: Engine, runs: Mapping[str, tuple[int | None, Sequence[str]]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per audit run, per registered coalesce: rows merged, failed and undecided, and the failed
    rows per failure reason, most first (one grouped read).

    :param runs: audit run id -> (its rows_total, or None while the fork runs; its coalesces).
    ``undecided`` is None while the run's row count is not known. A superseded resolution is not
    a decision: its row counts as undecided until the coalesce decides it again.
    """
    wanted = [run_id for run_id, (_, coalesces) in runs.items() if coalesces]
    found: dict[tuple[str, str], dict[str, int]] = {}
    reasons: dict[tuple[str, str], dict[str, int]] = {}
    cd = t.coalesce_decisions.c
    with engine.connect() as conn:
        for start in range(0, len(wanted), _BATCH):
            for run_id, node_id, decision, reason, n in conn.execute(
                select(cd.run_id, cd.node_id, cd.decision, cd.failure_reason, func.count())
                .where(cd.run_id.in_(wanted[start : start + _BATCH]))
                .group_by(cd.run_id, cd.node_id, cd.decision, cd.failure_reason)
            ):
                got = found.setdefault((run_id, node_id), {})
                got[decision] = got.get(decision, 0) + int(n)
                if decision == DecisionStatus.FAILED:
                    reasons.setdefault((run_id, node_id), {})[str(reason)] = int(n)
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for run_id, (rows_total, coalesces) in runs.items():
        per_node: dict[str, dict[str, Any]] = {}
        for node_id in coalesces:
            got = found.get((run_id, node_id), {})
            merged, failed = got.get(DecisionStatus.MERGED, 0), got.get(DecisionStatus.FAILED, 0)
            undecided = max(0, rows_total - merged - failed) if rows_total is not None else None
            why = reasons.get((run_id, node_id), {})
            per_node[node_id] = {
                "merged": merged,
                "failed": failed,
                "undecided": undecided,
                "failure_reasons": dict(sorted(why.items(), key=lambda item: (-item[1], item[0]))),
            }
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
