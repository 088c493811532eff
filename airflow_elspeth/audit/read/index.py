"""The index of audit runs, outcomes first: per audit run and coalesce, what was decided, whether the
run is the current try of its fork, and whether undecided rows are overdue. Nothing here writes.

Counts are :func:`airflow_elspeth.audit.read.runs.decision_counts` (the grouped decision count the
run pages use). Airflow task states come in as a plain mapping (``(dag_id, airflow_run_id,
task_id) -> state``, as :mod:`airflow_elspeth.airflow_states` reads them), or ``None`` when they
could not be read: then only the audit-side facts decide the verdict.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, and_, exists, func, select
from sqlalchemy.orm import aliased

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.model import CoalesceSpec
from airflow_elspeth.audit.read.decisions import branch_reasons
from airflow_elspeth.audit.read.records import (
    AuditRun,
    CoalesceOutcome,
    DecisionCounts,
    IndexedRun,
    UndecidedStatus,
)
from airflow_elspeth.audit.read.runs import RunSelection, decision_counts
from airflow_elspeth.core.vocabulary import (
    ENDED_TASK_STATES,
    DecisionStatus,
    NodeType,
    ReasonKind,
    RunStatus,
    reason_kind,
)

# (dag_id, airflow_run_id, task_id) -> Airflow task state.
TaskStates = Mapping[tuple[str, str, str], str]
# (dag_id, airflow_run_id) -> the task ids whose states are wanted (airflow_states.WantedTasks).
WantedTasks = Mapping[tuple[str, str], set[str]]

# The first is the default: newest logical date first, as Airflow's grid lists DAG runs.
SORT_KEYS = ("logical_date", "started_at")
MAX_LIMIT = 500
_BATCH = 500

# Verdicts of one (audit run, coalesce), worst first: what the index shows before any count.
FORK_FAILED = "fork_failed"
SUPERSEDED = "superseded"
ENDED_UNDECIDED = "ended_undecided"  # the coalesce task ended with rows undecided
OVERDUE = "overdue"  # rows undecided past their deadline, the coalesce task not (known to be) ended
WAITING = "waiting"  # rows undecided, deadline not reached
FORK_RUNNING = "fork_running"
NO_COALESCE = "no_coalesce"  # no coalesce has registered in this audit run (yet)
ROWS_FAILED = "rows_failed"
ALL_MERGED = "all_merged"
ALERTS = frozenset({ENDED_UNDECIDED, OVERDUE})
# What the index filters on in SQL: the verdicts, the three of undecided rows as one (which of them
# a run has takes Airflow's task states and the clock, which the audit store does not have).
UNDECIDED = "undecided"
UNDECIDED_VERDICTS = frozenset({ENDED_UNDECIDED, OVERDUE, WAITING})
OUTCOMES = (FORK_FAILED, SUPERSEDED, FORK_RUNNING, NO_COALESCE, UNDECIDED, ROWS_FAILED, ALL_MERGED)


@dataclass(frozen=True)
class IndexSelection(RunSelection):
    """Which audit runs the index lists: a :class:`~airflow_elspeth.audit.read.runs.RunSelection`
    (the index sets a DAG, None for every readable one, and a logical-date range) and an outcome of
    :data:`OUTCOMES` (None: any)."""

    outcome: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {list(OUTCOMES)}, got {self.outcome!r}")


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def undecided_status(
    *,
    undecided: int | None,
    deadline: datetime | None,
    task_state: str | None,
    current: bool,
    now: datetime,
) -> UndecidedStatus | None:
    """Why rows of a coalesce are undecided, or None when none is.

    ``kind``: ``superseded`` (a later fork try of the DAG run is the one decided), ``fork_running``
    (no deadline yet), ``ended`` (the coalesce task ended: its finalizer should have resolved them),
    ``overdue`` (the deadline has passed, the task has not ended, or its state is not known) or
    ``waiting`` (decided at the deadline at the latest).
    """
    if not undecided:
        return None
    deadline = _utc(deadline)
    if not current:
        kind = SUPERSEDED
    elif deadline is None:
        kind = FORK_RUNNING
    elif task_state in ENDED_TASK_STATES:
        kind = "ended"
    elif deadline <= now:
        kind = OVERDUE
    else:
        kind = WAITING
    return UndecidedStatus(
        kind=kind,
        rows=undecided,
        deadline=deadline,
        task_state=task_state,
        overdue=kind in ("ended", OVERDUE),
        seconds_to_deadline=(deadline - now).total_seconds() if deadline is not None else None,
    )


def verdict(*, status: str, current: bool, counts: DecisionCounts | None, why: UndecidedStatus | None) -> str:
    """The verdict of one (audit run, coalesce): ``counts`` None when the run has no coalesce.

    :param status: the audit run's status.
    :param current: it is the newest try of its fork in its DAG run.
    :param why: why rows of the coalesce are undecided (:func:`undecided_status`), None if none is.
    """
    if status == RunStatus.FAILED:
        return FORK_FAILED
    if not current:
        return SUPERSEDED
    if counts is None:
        return FORK_RUNNING if status == RunStatus.RUNNING else NO_COALESCE
    if why is not None:
        return {"ended": ENDED_UNDECIDED, OVERDUE: OVERDUE}.get(why.kind, WAITING)
    if counts.failed:
        return ROWS_FAILED
    return ALL_MERGED


def audit_index(
    engine: Engine,
    dag_ids: Iterable[str] | None,
    *,
    selection: IndexSelection = IndexSelection(),
    read_task_states: Callable[[WantedTasks], TaskStates | None] | None = None,
    sort: str = SORT_KEYS[0],
    descending: bool = True,
    limit: int = 50,
    offset: int = 0,
    now: datetime | None = None,
) -> list[IndexedRun]:
    """One page of the audit runs of the given DAGs (None: of every DAG) that ``selection`` selects,
    as :func:`index_runs` lists them. Filter, order and page are one SQL query: sorted by ``sort``
    (``logical_date`` or ``started_at``, runs without one last; ties by fork try, then start, then
    id, so pages neither repeat nor skip a run), ``limit`` runs (at most :data:`MAX_LIMIT`) from
    ``offset``; :func:`count_index` counts them all.
    """
    if sort not in SORT_KEYS:
        raise ValueError(f"sort must be one of {list(SORT_KEYS)}, got {sort!r}")
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")
    conditions = _conditions(dag_ids, selection)
    if conditions is None:
        return []
    ru = t.runs.c
    column = ru.logical_date if sort == "logical_date" else ru.started_at
    by = [(c.desc() if descending else c.asc()) for c in (column, ru.try_number, ru.started_at, ru.run_id)]
    by[0] = by[0].nulls_last()
    query = (
        select(t.runs)
        .where(*conditions)
        .order_by(*by)
        .limit(max(1, min(int(limit), MAX_LIMIT)))
        .offset(offset)
    )
    with engine.connect() as conn:
        runs = [AuditRun.from_row(row) for row in conn.execute(query).mappings()]
    return index_runs(engine, runs, read_task_states=read_task_states, now=now)


def count_index(
    engine: Engine, dag_ids: Iterable[str] | None, selection: IndexSelection = IndexSelection()
) -> int:
    """How many audit runs :func:`audit_index` pages through (one SQL count)."""
    conditions = _conditions(dag_ids, selection)
    if conditions is None:
        return 0
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(t.runs).where(*conditions)).scalar_one())


def index_dag_ids(engine: Engine, dag_ids: Iterable[str] | None) -> list[str]:
    """The DAGs of ``dag_ids`` (None: every DAG) that have an audit run, sorted (the DAG filter's
    choices)."""
    ru = t.runs.c
    query = select(ru.dag_id).distinct().order_by(ru.dag_id)
    if dag_ids is not None:
        query = query.where(ru.dag_id.in_(sorted(set(dag_ids))))
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def _conditions(dag_ids: Iterable[str] | None, selection: IndexSelection) -> list[Any] | None:
    """SQL conditions on ``runs`` for the readable DAGs and the selection; None when none can match."""
    conditions = selection.conditions()
    if dag_ids is not None:
        wanted = sorted(set(dag_ids))
        if not wanted or (selection.dag_id is not None and selection.dag_id not in wanted):
            return None
        conditions.append(t.runs.c.dag_id.in_(wanted))
    if selection.outcome is not None:
        conditions.append(_outcome_condition(selection.outcome))
    return conditions


def _outcome_condition(outcome: str) -> Any:
    """SQL for "the run's verdict is ``outcome``": :func:`verdict` and :func:`worst` spelled on the
    audit-side facts (status, a later try, registered coalesces, decision counts)."""
    run, later = t.runs, aliased(t.runs)
    n, cd = t.nodes, t.coalesce_decisions
    not_failed = run.c.status != RunStatus.FAILED.value
    current = ~exists().where(
        later.c.dag_id == run.c.dag_id,
        later.c.airflow_run_id == run.c.airflow_run_id,
        later.c.fork_task_id == run.c.fork_task_id,
        later.c.try_number > run.c.try_number,
    )
    has_coalesce = exists().where(n.c.run_id == run.c.run_id, n.c.node_type == NodeType.COALESCE.value)
    decided = (
        select(func.count())
        .select_from(cd)
        .where(cd.c.run_id == n.c.run_id, cd.c.node_id == n.c.node_id)
        .scalar_subquery()
    )
    # As decision_counts: undecided while the row count is known and exceeds the decided rows.
    undecided = exists().where(
        n.c.run_id == run.c.run_id,
        n.c.node_type == NodeType.COALESCE.value,
        run.c.rows_total.is_not(None),
        decided < run.c.rows_total,
    )
    failed_rows = exists().where(cd.c.run_id == run.c.run_id, cd.c.decision == DecisionStatus.FAILED.value)
    coalesced = [not_failed, current, has_coalesce]
    return {
        FORK_FAILED: run.c.status == RunStatus.FAILED.value,
        SUPERSEDED: not_failed & ~current,
        FORK_RUNNING: not_failed & current & ~has_coalesce & (run.c.status == RunStatus.RUNNING.value),
        NO_COALESCE: not_failed & current & ~has_coalesce & (run.c.status != RunStatus.RUNNING.value),
        UNDECIDED: and_(*coalesced, undecided),
        ROWS_FAILED: and_(*coalesced, ~undecided, failed_rows),
        ALL_MERGED: and_(*coalesced, ~undecided, ~failed_rows),
    }[outcome]


def index_runs(
    engine: Engine,
    runs: Sequence[AuditRun],
    *,
    read_task_states: Callable[[WantedTasks], TaskStates | None] | None = None,
    now: datetime | None = None,
) -> list[IndexedRun]:
    """``runs`` (in their order) outcomes first: each with per coalesce its counts, deadline, Airflow
    task state, why rows are undecided and a verdict (``outcomes``, in task order), and the worst.

    A run is ``current`` when it is the newest try of its fork in its DAG run; an earlier try is
    superseded (``newest_try`` names the later one). ``read_task_states`` is called once with the
    coalesce tasks listed (:data:`WantedTasks`) and returns their states, or None when it cannot.
    """
    if not runs:
        return []
    now = now or datetime.now(timezone.utc)
    newest = _newest_tries(engine, runs)
    specs = _coalesce_specs(engine, [r.audit_run_id for r in runs])
    coalesces = {r.audit_run_id: sorted(specs.get(r.audit_run_id, {})) for r in runs}
    counts = decision_counts(
        engine, {r.audit_run_id: (r.rows_total, coalesces[r.audit_run_id]) for r in runs}
    )
    missed = branch_reasons(engine, specs)
    wanted = wanted_task_states((r.dag_id, r.airflow_run_id, coalesces[r.audit_run_id]) for r in runs)
    task_states = read_task_states(wanted) if read_task_states is not None and wanted else None
    indexed = []
    for run in runs:
        newest_try = newest.get((run.dag_id, run.airflow_run_id, run.fork_task_id), run.try_number)
        current = run.try_number >= newest_try
        decided = counts.get(run.audit_run_id, {})
        outcomes = [
            _outcome(
                run,
                current,
                node_id,
                spec,
                decided[node_id],
                missed.get((run.audit_run_id, node_id)),
                task_states,
                now,
            )
            for node_id, spec in sorted(specs.get(run.audit_run_id, {}).items())
        ]
        indexed.append(
            IndexedRun(
                run_id=run.audit_run_id,
                dag_id=run.dag_id,
                airflow_run_id=run.airflow_run_id,
                fork_task_id=run.fork_task_id,
                try_number=run.try_number,
                run_type=run.run_type,
                logical_date=run.logical_date,
                status=run.status,
                status_reason=run.status_reason,
                started_at=run.started_at,
                completed_at=run.completed_at,
                rows_total=run.rows_total,
                chunks_total=run.chunks_total,
                previous_run_id=run.previous_run_id,
                audit_run_id=run.audit_run_id,
                newest_try=newest_try,
                current=current,
                coalesces=coalesces[run.audit_run_id],
                decisions=decided,
                outcomes=outcomes,
                verdict=(
                    worst(outcomes)
                    if outcomes
                    else verdict(status=run.status, current=current, counts=None, why=None)
                ),
            )
        )
    return indexed


_ORDER = [
    FORK_FAILED,
    ENDED_UNDECIDED,
    OVERDUE,
    SUPERSEDED,
    FORK_RUNNING,
    WAITING,
    ROWS_FAILED,
    NO_COALESCE,
    ALL_MERGED,
]


def worst(outcomes: Sequence[CoalesceOutcome]) -> str:
    """The worst verdict of ``outcomes`` (worst first: fork failed, undecided past an end or a
    deadline, superseded, running, waiting, rows failed, no coalesce, all merged)."""
    return min((o.verdict for o in outcomes), key=_ORDER.index)


def _outcome(
    run: AuditRun,
    current: bool,
    node_id: str,
    spec: CoalesceSpec,
    counts: DecisionCounts,
    missed: Mapping[tuple[str, str], int] | None,
    task_states: TaskStates | None,
    now: datetime,
) -> CoalesceOutcome:
    completed_at = _utc(run.completed_at)
    deadline = completed_at + spec.config.timeout if completed_at is not None else None
    state = None
    if task_states is not None:
        state = task_states.get((run.dag_id, run.airflow_run_id, node_id))
    why = undecided_status(
        undecided=counts.undecided, deadline=deadline, task_state=state, current=current, now=now
    )
    losses: dict[str, int] = {}
    late = 0
    for (branch, reason), n in (missed or {}).items():
        kind = reason_kind(reason)
        if kind is ReasonKind.LOSS:
            losses[branch] = losses.get(branch, 0) + n
        elif kind is ReasonKind.LATE:
            late += n
    return CoalesceOutcome(
        coalesce=node_id,
        policy=spec.config.policy.value,
        rows=run.rows_total,
        merged=counts.merged,
        failed=counts.failed,
        failure_reasons=dict(counts.failure_reasons),
        # In the coalesce's branch order, as its pages list branches.
        branch_losses={b: losses[b] for b in spec.config.branches if b in losses},
        late_arrivals=late,
        undecided=counts.undecided,
        deadline=deadline,
        task_state=state,
        undecided_status=why,
        overdue=bool(why and why.overdue),
        verdict=verdict(status=run.status, current=current, counts=counts, why=why),
    )


def _newest_tries(engine: Engine, runs: Sequence[AuditRun]) -> dict[tuple[str, str, str], int]:
    """(dag, Airflow run, fork task) -> its newest try, over every audit run of those DAG runs."""
    ru = t.runs.c
    keys = sorted({(r.dag_id, r.airflow_run_id) for r in runs})
    newest: dict[tuple[str, str, str], int] = {}
    with engine.connect() as conn:
        for start in range(0, len(keys), _BATCH):
            for dag_id, airflow_run_id, fork, try_number in conn.execute(
                select(ru.dag_id, ru.airflow_run_id, ru.fork_task_id, func.max(ru.try_number))
                .where(
                    ru.dag_id.in_(sorted({k[0] for k in keys[start : start + _BATCH]})),
                    ru.airflow_run_id.in_(sorted({k[1] for k in keys[start : start + _BATCH]})),
                )
                .group_by(ru.dag_id, ru.airflow_run_id, ru.fork_task_id)
            ):
                newest[(dag_id, airflow_run_id, fork)] = int(try_number)
    return newest


def _coalesce_specs(engine: Engine, run_ids: Sequence[str]) -> dict[str, dict[str, CoalesceSpec]]:
    """Audit run id -> coalesce task id -> its spec as registered (for the deadline and policy)."""
    n = t.nodes.c
    found: dict[str, dict[str, CoalesceSpec]] = {}
    with engine.connect() as conn:
        for start in range(0, len(run_ids), _BATCH):
            for run_id, node_id, config_json in conn.execute(
                select(n.run_id, n.node_id, n.config_json).where(
                    n.run_id.in_(list(run_ids[start : start + _BATCH])), n.node_type == NodeType.COALESCE
                )
            ):
                found.setdefault(run_id, {})[node_id] = CoalesceSpec.from_dict(json.loads(config_json))
    return found


def wanted_task_states(runs: Iterable[tuple[str, str, Sequence[str]]]) -> dict[tuple[str, str], set[str]]:
    """(dag_id, airflow_run_id) -> the coalesce task ids whose Airflow states the index shows.

    :param runs: per audit run, its DAG, its DAG run and its coalesces.
    """
    wanted: dict[tuple[str, str], set[str]] = {}
    for dag_id, airflow_run_id, coalesces in runs:
        if coalesces:
            wanted.setdefault((dag_id, airflow_run_id), set()).update(coalesces)
    return wanted
