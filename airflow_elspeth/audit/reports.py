"""Read-only queries behind the Elspeth UI: what the audit pages and their JSON API show.

Pages of decided rows (filtered by failure reason, missing branch and why it is missing), the
branch x reason matrix of missing branches, late arrivals, arrivals over time per branch against
the deadline, one row's lineage with its decision replayed from the event log, and what one task
did. Nothing here writes.

Cost model: a page of rows is a LIMIT/OFFSET query over the coalesce's decisions in (chunk, row_key)
order, through the ``(run_id, node_id, chunk)`` index, with the decision and reason filters on the
``(run_id, node_id, decision, failure_reason)`` index, so a page of a million-row run costs about a
page of a small one. Whole-run aggregates (the matrix, the arrival curves) need one scan of the run;
they are computed once and cached per process under a fingerprint of the run's progress (decision
counts and the writers' ``chunk_progress``) that changes whenever something new is written.
"""

from __future__ import annotations

import json
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, Integer, and_, bindparam, cast, func, select
from sqlalchemy.exc import NoResultFound

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.coalesce import CoalesceSpec, deadline_of, load_run, read_chunk_log, row_events
from airflow_elspeth.audit.dml import db_now
from airflow_elspeth.audit.queries import (
    RESOLUTION_PREFIX,
    is_resolution,
    replay_at_resolution,
    resolution_task_state,
    row_lineage,
    runs_of_dag_run,
)
from airflow_elspeth.audit.store import ARRIVAL_STATES
from airflow_elspeth.core.policy import BranchEvent, EventKind, Status, order_events, replay
from airflow_elspeth.exceptions import NotFound

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Beyond this many distinct missing-branch combinations, filter in SQL with JSON functions instead
# of an IN list of the matching combinations.
MAX_IN_LIST = 500
CHART_COLUMNS = 240
# The chart zooms on the events when they all happen before this share of the timeout, and
# compresses what comes after the deadline when events run past this many timeouts.
EARLY_SHARE = 0.3
LATE_FACTOR = 2.5
CACHE_SIZE = 64
CACHE_TTL_S = 300.0

LOSS_PREFIX_ERROR = "error:"
NOT_ARRIVED = "not_arrived"
LATE_AFTER_MERGE = "late_arrival_after_merge"
LATE_AFTER_FAILURE = "late_arrival_after_failure"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Words for reasons (shared by the pages and the JSON API)

FAILURE_REASON_TEXT = {
    "branch_lost": "a branch was lost (require_all needs every branch)",
    "incomplete_branches": "not every branch had arrived at the deadline (require_all)",
    "quorum_impossible": "too many branches were lost for the quorum to be reachable",
    "quorum_not_met_at_timeout": "the quorum was not reached by the deadline",
    "all_branches_lost": "every branch was lost",
    "best_effort_timeout_no_arrivals": "no branch had arrived by the deadline (best_effort)",
    "first_timeout_no_arrivals": "no branch had arrived by the deadline (first)",
    "select_branch_not_arrived": "the selected branch was not among the merged arrivals",
}


def failure_reason_text(reason: str | None) -> str:
    """Why a row failed, in words (resolutions included: ``coalesce_task_<state>``)."""
    reason = reason or ""
    if is_resolution(reason):
        state = reason[len(RESOLUTION_PREFIX) :]
        return (
            f"the coalesce task ended {state} before the row could be decided (a resolution, not the policy)"
        )
    return FAILURE_REASON_TEXT.get(reason, reason)


def missing_reason_text(reason: str) -> str:
    """Why a branch did not contribute to a row, in words."""
    if reason.startswith(LOSS_PREFIX_ERROR):
        return f"raised {reason[len(LOSS_PREFIX_ERROR) :]} (after its row retries)"
    if reason == "dropped":
        return "dropped the row (the callable returned None)"
    if reason.startswith("branch_task_"):
        return f"its task ended {reason[len('branch_task_') :]} before delivering the row"
    return {
        NOT_ARRIVED: "had not arrived when the row was decided",
        LATE_AFTER_MERGE: "arrived after the row had been merged",
        LATE_AFTER_FAILURE: "arrived after the row had failed",
    }.get(reason, reason)


def outcome_text(outcome: str, reason: str | None) -> str:
    """A branch token's terminal outcome, in words."""
    if outcome == "coalesced":
        return "arrived and was merged into the row"
    if outcome == "row_failed":
        return f"arrived, but the row failed ({reason})" if reason else "arrived, but the row failed"
    if outcome in ("lost", "late", "not_arrived") and reason:
        return f"{outcome}: {missing_reason_text(reason)}"
    return f"{outcome} ({reason})" if reason else outcome


def reason_kind(reason: str) -> str:
    """A CSS-friendly class of a missing reason: loss, waiting or late."""
    if reason in (LATE_AFTER_MERGE, LATE_AFTER_FAILURE):
        return "late"
    if reason == NOT_ARRIVED:
        return "waiting"
    return "loss"


def _reason_order(reason: str) -> tuple[int, str]:
    """Losses first (errors, drops, task losses), then not arrived, then late."""
    kind = reason_kind(reason)
    return ({"loss": 0, "waiting": 1, "late": 2}[kind], reason)


def policy_text(config: Mapping[str, Any]) -> str:
    policy = config["policy"]
    n = len(config["branches"])
    if policy == "quorum":
        return f"quorum {config['quorum']} of {n}"
    if policy == "require_all":
        return f"require_all ({n} of {n})"
    if policy == "first":
        return f"first of {n}"
    return f"best_effort (any of {n})"


# --------------------------------------------------------------------------------------------------
# Audit runs of a DAG run


def audit_runs(engine: Engine, dag_id: str, airflow_run_id: str) -> list[dict[str, Any]]:
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
    result = []
    for run in runs:
        mine = nodes.get(run["run_id"], [])
        result.append(
            {
                "audit_run_id": run["run_id"],
                "dag_id": run["dag_id"],
                "airflow_run_id": run["airflow_run_id"],
                "fork_task_id": run["fork_task_id"],
                "try_number": run["try_number"],
                "clear_number": run["clear_number"],
                "run_type": run["run_type"],
                "logical_date": run["logical_date"],
                "started_at": run["started_at"],
                "completed_at": run["completed_at"],
                "status": run["status"],
                "status_reason": run.get("status_reason"),
                "rows_total": run["rows_total"],
                "chunk_size": run["chunk_size"],
                "chunks_total": run["chunks_total"],
                "branches": json.loads(run["branches_json"]),
                "previous_run_id": run["previous_run_id"],
                "current": run["try_number"] == newest[run["fork_task_id"]],
                "coalesces": [x["node_id"] for x in mine if x["node_type"] == "coalesce"],
                "branch_steps": [
                    {"node_id": x["node_id"], "branch": x["branch"]}
                    for x in mine
                    if x["node_type"] == "branch"
                ],
            }
        )
    counts = decision_counts(engine, {r["audit_run_id"]: (r["rows_total"], r["coalesces"]) for r in result})
    for entry in result:
        entry["decisions"] = counts.get(entry["audit_run_id"], {})
    result.sort(key=lambda r: (r["fork_task_id"], -r["try_number"]))
    return result


def decision_counts(
    engine: Engine, runs: Mapping[str, tuple[int | None, Sequence[str]]]
) -> dict[str, dict[str, dict[str, int | None]]]:
    """Per audit run, per registered coalesce: rows merged, failed and undecided (one grouped read).

    :param runs: audit run id -> (its rows_total, or None while the fork runs; its coalesces).
    ``undecided`` is None while the run's row count is not known. A superseded resolution is not
    a decision: its row counts as undecided until the coalesce decides it again.
    """
    wanted = [run_id for run_id, (_, coalesces) in runs.items() if coalesces]
    found: dict[tuple[str, str], dict[str, int]] = {}
    cd = t.coalesce_decisions.c
    with engine.connect() as conn:
        for start in range(0, len(wanted), 500):
            for run_id, node_id, decision, n in conn.execute(
                select(cd.run_id, cd.node_id, cd.decision, func.count())
                .where(cd.run_id.in_(wanted[start : start + 500]))
                .group_by(cd.run_id, cd.node_id, cd.decision)
            ):
                found.setdefault((run_id, node_id), {})[decision] = int(n)
    result: dict[str, dict[str, dict[str, int | None]]] = {}
    for run_id, (rows_total, coalesces) in runs.items():
        per_node: dict[str, dict[str, int | None]] = {}
        for node_id in coalesces:
            got = found.get((run_id, node_id), {})
            merged, failed = got.get("merged", 0), got.get("failed", 0)
            undecided = max(0, rows_total - merged - failed) if rows_total is not None else None
            per_node[node_id] = {"merged": merged, "failed": failed, "undecided": undecided}
        result[run_id] = per_node
    return result


def pick_audit_run(
    runs: Sequence[dict[str, Any]], *, audit_run_id: str | None = None, coalesce: str | None = None
) -> dict[str, Any] | None:
    """The audit run to show: the one asked for, else the newest one with ``coalesce``, else the
    first current one. Only runs of this DAG run are candidates (``runs`` comes from it)."""
    if audit_run_id:
        return next((r for r in runs if r["audit_run_id"] == audit_run_id), None)
    current = [r for r in runs if r["current"]]
    if coalesce:
        for run in [*current, *(r for r in runs if not r["current"])]:
            if coalesce in run["coalesces"]:
                return run
    return current[0] if current else None


def coalesce_spec(engine: Engine, run_id: str, node_id: str) -> CoalesceSpec:
    """The coalesce's configuration as it registered it; NotFound if it is not a coalesce of the run."""
    n = t.nodes.c
    with engine.connect() as conn:
        try:
            config_json = conn.execute(
                select(n.config_json).where(
                    n.run_id == run_id, n.node_id == node_id, n.node_type == "coalesce"
                )
            ).scalar_one()
        except NoResultFound as err:
            raise NotFound(f"no coalesce {node_id!r} in audit run {run_id}") from err
    return CoalesceSpec.from_dict(json.loads(config_json))


# --------------------------------------------------------------------------------------------------
# Cache of whole-run aggregates


class _Cache:
    """A small LRU of aggregates keyed by (what, store, run, node, fingerprint), with a TTL as a
    safety net should a writer ever change data without moving the fingerprint."""

    def __init__(self, size: int = CACHE_SIZE, ttl: float = CACHE_TTL_S) -> None:
        self._data: OrderedDict[tuple[Any, ...], tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.size, self.ttl = size, ttl

    def get_or_compute(self, key: tuple[Any, ...], compute: Callable[[], T]) -> T:
        now = time.monotonic()
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                self._data.move_to_end(key)
                return hit[1]  # type: ignore[no-any-return]
        value = compute()
        with self._lock:
            self._data[key] = (now, value)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_cache = _Cache()


def clear_cache() -> None:
    _cache.clear()


def _store_key(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _fingerprint(engine: Engine, run_id: str, spec: CoalesceSpec) -> tuple[Any, ...]:
    """Cheap reads that change whenever the coalesce decides rows or a branch delivers more."""
    cd, cp = t.coalesce_decisions.c, t.chunk_progress.c
    nodes = [spec.node_id, *spec.delivering.values()]
    with engine.connect() as conn:
        decided = tuple(
            conn.execute(
                select(cd.decision, cd.failure_reason, func.count())
                .where(cd.run_id == run_id, cd.node_id == spec.node_id)
                .group_by(cd.decision, cd.failure_reason)
                .order_by(cd.decision, cd.failure_reason)
            ).all()
        )
        progress = tuple(
            conn.execute(
                select(cp.node_id, func.sum(cp.rows_done), func.max(cp.updated_at), func.count())
                .where(cp.run_id == run_id, cp.node_id.in_(nodes))
                .group_by(cp.node_id)
                .order_by(cp.node_id)
            ).all()
        )
    return decided, progress


def _parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run independent read queries side by side (each on its own pooled connection).

    Only for server databases: SQLite connections each keep their own page cache, and in-process
    threads contend for it; there, one connection after the other is faster.
    """
    if len(calls) == 1:
        return [calls[0]()]
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="elspeth-report") as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def _serial(*calls: Callable[[], Any]) -> list[Any]:
    return [call() for call in calls]


@dataclass(frozen=True)
class CoalesceRef:
    """One coalesce of one audit run, with its spec and cache key looked up once per request."""

    engine: Engine
    run_id: str
    node_id: str
    spec: CoalesceSpec
    key: tuple[Any, ...]

    def cached(self, what: str, compute: Callable[[], T]) -> T:
        return _cache.get_or_compute((what, *self.key), compute)


def coalesce_ref(engine: Engine, run_id: str, node_id: str) -> CoalesceRef:
    """:raises NotFound: ``node_id`` is not a coalesce of the audit run."""
    spec = coalesce_spec(engine, run_id, node_id)
    key = (_store_key(engine), run_id, node_id, _fingerprint(engine, run_id, spec))
    return CoalesceRef(engine, run_id, node_id, spec, key)


# --------------------------------------------------------------------------------------------------
# Decision groups: the one scan behind counts, the matrix, filtered totals and decisions over time


@dataclass(frozen=True)
class DecisionGroup:
    decision: str
    failure_reason: str | None
    missing_json: str
    late_json: str
    rows: int
    missing: Mapping[str, str] = field(compare=False)
    late: tuple[str, ...] = field(compare=False)


def _decision_scan(ref: CoalesceRef) -> tuple[list[DecisionGroup], dict[str, dict[int, int]]]:
    """One grouped scan of the coalesce's decisions: the groups, and decisions per time slot."""
    cd = t.coalesce_decisions.c
    resolution = chart_resolution(ref.spec)
    # wait_ms is decided_at - fork completion: slots need no date arithmetic.
    slot = (cast(cd.wait_ms / (resolution * 1000.0) + _SLOT_OFFSET, Integer) - _SLOT_OFFSET).label("slot")
    rows: dict[tuple[str, str | None, str, str], int] = {}
    slots: dict[str, dict[int, int]] = {"merged": {}, "failed": {}}
    with ref.engine.connect() as conn:
        for decision, reason, missing_json, late_json, at, n in conn.execute(
            select(cd.decision, cd.failure_reason, cd.missing_json, cd.late_json, slot, func.count())
            .where(cd.run_id == ref.run_id, cd.node_id == ref.node_id)
            .group_by(cd.decision, cd.failure_reason, cd.missing_json, cd.late_json, slot)
        ):
            group = (decision, reason, missing_json, late_json)
            rows[group] = rows.get(group, 0) + n
            if at is not None:
                series = slots.setdefault(decision, {})
                series[int(at)] = series.get(int(at), 0) + n
    groups = [
        DecisionGroup(
            decision,
            reason,
            missing_json,
            late_json,
            n,
            json.loads(missing_json),
            tuple(json.loads(late_json)),
        )
        for (decision, reason, missing_json, late_json), n in rows.items()
    ]
    return groups, slots


def _groups(ref: CoalesceRef) -> list[DecisionGroup]:
    return ref.cached("decisions", lambda: _decision_scan(ref))[0]


@dataclass(frozen=True)
class RowFilter:
    """Which decided rows to list.

    :param decision: ``failed``, ``merged`` or None for both.
    :param reason: the row's failure reason.
    :param branch: a branch that did not contribute to the row.
    :param branch_reason: why ``branch`` did not contribute (needs ``branch``).
    :param late: only rows with a late arrival recorded in their decision.
    """

    decision: str | None = "failed"
    reason: str | None = None
    branch: str | None = None
    branch_reason: str | None = None
    late: bool = False

    def matches(self, group: DecisionGroup) -> bool:
        if self.decision is not None and group.decision != self.decision:
            return False
        if self.reason is not None and group.failure_reason != self.reason:
            return False
        if self.late and not group.late:
            return False
        if self.branch is not None:
            if self.branch not in group.missing:
                return False
            if self.branch_reason is not None and group.missing[self.branch] != self.branch_reason:
                return False
        return True

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reason": self.reason,
            "branch": self.branch,
            "branch_reason": self.branch_reason,
            "late": self.late,
        }


def _json_field(engine: Engine, column: Any, key: str) -> Any:
    """The text of ``key`` in a JSON object column, per dialect."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB

        return cast(column, JSONB).op("->>")(key)
    return func.json_extract(column, f"$.{key}")


def _json_missing_condition(engine: Engine, flt: RowFilter) -> Any:
    """SQL for "``branch`` is missing [for ``branch_reason``]" on missing_json, per dialect."""
    cd = t.coalesce_decisions.c
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB

        value = cast(cd.missing_json, JSONB).op("->>")(flt.branch)
        return value == flt.branch_reason if flt.branch_reason is not None else value.is_not(None)
    entries = func.json_each(cd.missing_json).table_valued("key", "value").alias("missing_entry")
    conditions = [entries.c.key == flt.branch]
    if flt.branch_reason is not None:
        conditions.append(entries.c.value == flt.branch_reason)
    return select(entries.c.key).where(*conditions).exists()


# --------------------------------------------------------------------------------------------------
# The coalesce overview


def _matrix(groups: Iterable[DecisionGroup], branches: Sequence[str]) -> dict[str, Any]:
    cells: dict[str, dict[str, dict[str, int]]] = {}
    reasons: set[str] = set()
    for group in groups:
        for branch, reason in group.missing.items():
            reasons.add(reason)
            cell = cells.setdefault(branch, {}).setdefault(reason, {"rows": 0, "failed_rows": 0})
            cell["rows"] += group.rows
            if group.decision == "failed":
                cell["failed_rows"] += group.rows
    ordered = sorted(reasons, key=_reason_order)
    listed = [b for b in branches if b in cells] + sorted(b for b in cells if b not in branches)
    return {
        "branches": listed,
        "reasons": ordered,
        "reason_kinds": {r: reason_kind(r) for r in ordered},
        "cells": cells,
        "branch_totals": {b: sum(c["rows"] for c in cells[b].values()) for b in listed},
        "reason_totals": {r: sum(cells[b].get(r, {}).get("rows", 0) for b in listed) for r in ordered},
    }


def _late_after_write(
    engine: Engine, run_id: str, spec: CoalesceSpec, limit: int | None
) -> list[dict[str, Any]]:
    """Arrivals written after their row's decision (the decision saw the branch as not arrived)."""
    ns, to, cd = t.node_states.c, t.token_outcomes.c, t.coalesce_decisions.c
    branch_of = {node: branch for branch, node in spec.delivering.items()}
    query = (
        select(
            cd.row_key,
            cd.decision,
            cd.failure_reason,
            cd.decided_at,
            cd.recorded_at,
            ns.node_id,
            func.min(ns.recorded_at),
        )
        .select_from(
            t.token_outcomes.join(t.node_states, ns.token_id == to.token_id).join(
                t.coalesce_decisions,
                and_(cd.run_id == ns.run_id, cd.node_id == spec.node_id, cd.row_id == ns.row_id),
            )
        )
        .where(
            to.run_id == run_id,
            to.outcome == "not_arrived",
            to.is_terminal,
            ns.node_id.in_(list(branch_of)),
            ns.status.in_(ARRIVAL_STATES),
        )
        .group_by(cd.row_key, cd.decision, cd.failure_reason, cd.decided_at, cd.recorded_at, ns.node_id)
        .order_by(func.min(ns.recorded_at))
    )
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        return [
            {
                "row_key": row_key,
                "branch": branch_of[node_id],
                "decision": decision,
                "failure_reason": reason,
                "decided_at": decided_at,
                "decision_recorded_at": recorded_at,
                "arrived_at": arrived_at,
                "after_decision_s": (arrived_at - decided_at).total_seconds(),
            }
            for row_key, decision, reason, decided_at, recorded_at, node_id, arrived_at in conn.execute(query)
        ]


def coalesce_overview(
    engine: Engine, audit_run: Mapping[str, Any], node_id: str, *, ref: CoalesceRef | None = None
) -> dict[str, Any]:
    """Everything the coalesce section shows above its row lists: configuration, deadline, counts,
    failure reasons, the branch x reason matrix of missing branches and the arrival curves.

    The numbers are those of the coalesce summary (docs/ARCHITECTURE.md, "The coalesce summary");
    ``rows_undecided`` is non-zero while the coalesce is still running.
    """
    run_id = audit_run["audit_run_id"]
    ref = ref or coalesce_ref(engine, run_id, node_id)
    spec = ref.spec
    config = spec.config.as_dict()
    resolution = chart_resolution(spec)
    run_all = _parallel if engine.dialect.name == "postgresql" else _serial
    (groups, decision_slots), arrival_slots, after_write = run_all(
        lambda: ref.cached("decisions", lambda: _decision_scan(ref)),
        lambda: (
            ref.cached("arrivals", lambda: _arrival_slots(engine, audit_run, spec, resolution))
            if audit_run["completed_at"] is not None
            else {}
        ),
        lambda: ref.cached("after", lambda: _late_after_write(engine, run_id, spec, None)),
    )
    series = arrival_series(engine, audit_run, spec, slots=(arrival_slots, decision_slots))
    collisions = (
        ref.cached("collisions", lambda: _collisions(ref)) if spec.config.merge.value == "union" else {}
    )
    merged = sum(g.rows for g in groups if g.decision == "merged")
    failed = sum(g.rows for g in groups if g.decision == "failed")
    reasons: dict[str, int] = {}
    for g in groups:
        if g.decision == "failed" and g.failure_reason:
            reasons[g.failure_reason] = reasons.get(g.failure_reason, 0) + g.rows
    late_recorded = sum(g.rows * len(g.late) for g in groups)
    rows_total = audit_run["rows_total"] or 0
    completed_at = audit_run["completed_at"]
    deadline = completed_at + spec.config.timeout if completed_at else None
    return {
        "coalesce": node_id,
        "audit_run_id": run_id,
        "policy": config["policy"],
        "policy_text": policy_text(config),
        "quorum": config["quorum"],
        "merge": config["merge"],
        "select_branch": config["select_branch"],
        "branches": list(spec.config.branches),
        "delivering": dict(spec.delivering),
        "timeout_s": spec.config.timeout.total_seconds(),
        "fork_completed_at": completed_at,
        "deadline": deadline,
        "rows_total": rows_total,
        "rows_merged": merged,
        "rows_failed": failed,
        "rows_undecided": max(0, rows_total - merged - failed),
        "late_arrivals": late_recorded + len(after_write),
        "late_rows": sum(g.rows for g in groups if g.late),
        "late_after_write": len(after_write),
        "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "missing_matrix": _matrix(groups, spec.config.branches),
        "field_collisions": collisions,
        "arrivals": series,
    }


def _collisions(ref: CoalesceRef) -> dict[str, dict[str, Any]]:
    """``union`` merges: each field more than one branch supplied -> rows, branches (config order)."""
    cd = t.coalesce_decisions.c
    found: dict[str, dict[str, Any]] = {}
    with ref.engine.connect() as conn:
        for collisions_json, n in conn.execute(
            select(cd.collisions_json, func.count())
            .where(cd.run_id == ref.run_id, cd.node_id == ref.node_id, cd.collisions_json.is_not(None))
            .group_by(cd.collisions_json)
        ):
            for name, branches in json.loads(collisions_json).items():
                entry = found.setdefault(name, {"rows": 0, "branches": set()})
                entry["rows"] += n
                entry["branches"].update(branches)
    order = list(ref.spec.config.branches)
    return {
        name: {"rows": entry["rows"], "branches": [b for b in order if b in entry["branches"]]}
        for name, entry in sorted(found.items())
    }


# --------------------------------------------------------------------------------------------------
# Rows of a coalesce


def _page_bounds(limit: int, offset: int) -> tuple[int, int]:
    return max(1, min(int(limit), MAX_PAGE_SIZE)), max(0, int(offset))


def decision_rows(
    engine: Engine,
    run_id: str,
    node_id: str,
    flt: RowFilter,
    *,
    limit: int = PAGE_SIZE,
    offset: int = 0,
    max_in_list: int = MAX_IN_LIST,
    ref: CoalesceRef | None = None,
) -> dict[str, Any]:
    """One page of a coalesce's decided rows, in (chunk, row key) order, with the filter's total."""
    limit, offset = _page_bounds(limit, offset)
    ref = ref or coalesce_ref(engine, run_id, node_id)
    groups = _groups(ref)
    matching = [g for g in groups if flt.matches(g)]
    total = sum(g.rows for g in matching)
    rows: list[dict[str, Any]] = []
    if total and offset < total:
        cd = t.coalesce_decisions.c
        conditions = [cd.run_id == run_id, cd.node_id == node_id]
        if flt.decision is not None:
            conditions.append(cd.decision == flt.decision)
        if flt.reason is not None:
            conditions.append(cd.failure_reason == flt.reason)
        if flt.branch is not None:
            # The groups say which missing-branch combinations match: filter on those exact texts.
            combos = sorted({g.missing_json for g in matching})
            if len(combos) <= max_in_list:
                conditions.append(cd.missing_json.in_(combos))
            else:
                conditions.append(_json_missing_condition(engine, flt))
        if flt.late:
            conditions.append(cd.late_json != "[]")
        query = (
            select(
                cd.row_key,
                cd.chunk,
                cd.decision,
                cd.failure_reason,
                cd.details_json,
                cd.consumed,
                cd.missing_json,
                cd.late_json,
                cd.decided_at,
                cd.wait_ms,
            )
            .where(*conditions)
            .order_by(cd.chunk, cd.row_key)
            .limit(limit)
            .offset(offset)
        )
        with engine.connect() as conn:
            for row in conn.execute(query).mappings():
                details = json.loads(row["details_json"])
                consumed = json.loads(row["consumed"])
                rows.append(
                    {
                        "row_key": row["row_key"],
                        "chunk": row["chunk"],
                        "decision": row["decision"],
                        "failure_reason": row["failure_reason"],
                        "consumed": consumed,
                        "arrived": details.get("arrived", consumed),
                        "missing": json.loads(row["missing_json"]),
                        "late": json.loads(row["late_json"]),
                        "details": details,
                        "decided_at": row["decided_at"],
                        "wait_ms": row["wait_ms"],
                    }
                )
    return {"filter": flt.as_dict(), "total": total, "limit": limit, "offset": offset, "rows": rows}


def late_arrivals(
    engine: Engine,
    audit_run: Mapping[str, Any],
    node_id: str,
    *,
    limit: int = PAGE_SIZE,
    offset: int = 0,
    ref: CoalesceRef | None = None,
) -> dict[str, Any]:
    """Arrivals after their row's decision: never merged, always recorded.

    ``rows`` pages the rows whose decision recorded a late branch (with each late branch's arrival
    time); ``after_write`` lists arrivals that came after the decision was even written.
    """
    run_id = audit_run["audit_run_id"]
    ref = ref or coalesce_ref(engine, run_id, node_id)
    spec = ref.spec
    page = decision_rows(
        engine, run_id, node_id, RowFilter(decision=None, late=True), limit=limit, offset=offset, ref=ref
    )
    if page["rows"]:
        ns = t.node_states.c
        branch_of = {node: branch for branch, node in spec.delivering.items()}
        wanted = {r["row_key"] for r in page["rows"]}
        r = t.rows.c
        arrived: dict[tuple[str, str], datetime] = {}
        with engine.connect() as conn:
            for row_key, node, at in conn.execute(
                select(r.row_key, ns.node_id, func.min(ns.recorded_at))
                .select_from(t.node_states.join(t.rows, and_(r.run_id == ns.run_id, r.row_id == ns.row_id)))
                .where(
                    ns.run_id == run_id,
                    ns.node_id.in_(list(branch_of)),
                    ns.chunk.in_(sorted({x["chunk"] for x in page["rows"]})),
                    ns.status.in_(ARRIVAL_STATES),
                    r.row_key.in_(sorted(wanted)),
                )
                .group_by(r.row_key, ns.node_id)
            ):
                arrived[(row_key, branch_of[node])] = at
        for row in page["rows"]:
            row["late_arrivals"] = [
                {
                    "branch": branch,
                    "arrived_at": arrived.get((row["row_key"], branch)),
                    "after_decision_s": (
                        (arrived[(row["row_key"], branch)] - row["decided_at"]).total_seconds()
                        if (row["row_key"], branch) in arrived
                        else None
                    ),
                }
                for branch in row["late"]
            ]
    after = ref.cached("after", lambda: _late_after_write(engine, run_id, spec, None))
    return {
        "total_rows": page["total"],
        "limit": page["limit"],
        "offset": page["offset"],
        "rows": page["rows"],
        "after_write": after[:MAX_PAGE_SIZE],
        "after_write_total": len(after),
    }


# --------------------------------------------------------------------------------------------------
# Arrivals over time


def _arrival_slots(
    engine: Engine, audit_run: Mapping[str, Any], spec: CoalesceSpec, resolution: float
) -> dict[str, dict[int, int]]:
    """Arrivals per branch per time slot (slot s: [s, s+1) x resolution seconds after the fork)."""
    ns = t.node_states.c
    branch_of = {node: branch for branch, node in spec.delivering.items()}
    origin = bindparam("origin", audit_run["completed_at"], type_=t.runs.c.completed_at.type)
    if engine.dialect.name == "postgresql":
        slot = func.floor(func.date_part("epoch", ns.recorded_at - origin) / resolution)
    else:
        # One julianday per row; the offset makes CAST's truncation a floor for times before the fork.
        seconds = (func.julianday(ns.recorded_at) - func.julianday(origin)) * 86400.0
        slot = cast(seconds / resolution + _SLOT_OFFSET, Integer) - _SLOT_OFFSET
    slot = slot.label("slot")
    arrivals: dict[str, dict[int, int]] = {b: {} for b in spec.config.branches}
    with engine.connect() as conn:
        for node, at, n in conn.execute(
            select(ns.node_id, slot, func.count())
            .where(
                ns.run_id == audit_run["audit_run_id"],
                ns.node_id.in_(list(branch_of)),
                ns.status.in_(ARRIVAL_STATES),
            )
            .group_by(ns.node_id, slot)
        ):
            if at is None:
                continue
            series = arrivals[branch_of[node]]
            series[int(at)] = series.get(int(at), 0) + n
    return arrivals


_SLOT_OFFSET = 1_000_000_000


def chart_resolution(spec: CoalesceSpec) -> float:
    """Time slots of a thousandth of the timeout (at least a millisecond).

    Fine slots cost little: events are stamped per written batch, so the number of non-empty slots
    is bounded by the number of batches, not by the length of the run.
    """
    return max(spec.config.timeout.total_seconds() / 1000, 0.001)


def arrival_series(
    engine: Engine,
    audit_run: Mapping[str, Any],
    spec: CoalesceSpec,
    *,
    slots: tuple[dict[str, dict[int, int]], dict[str, dict[int, int]]] | None = None,
) -> dict[str, Any]:
    """Cumulative arrivals per branch and cumulative decisions over time, against the deadline.

    Times are seconds since the fork completed (the deadline is at ``timeout_s``). One grouped scan
    per table at a fine resolution (see :func:`chart_resolution`), resampled to ``CHART_COLUMNS``
    points, so the series' size does not grow with the run.

    :param slots: the two scans' results, when the caller ran them already (in parallel).
    """
    timeout = spec.config.timeout.total_seconds()
    resolution = chart_resolution(spec)
    empty: dict[str, Any] = {
        "timeout_s": timeout,
        "start_s": 0.0,
        "end_s": timeout,
        "resolution_s": resolution,
        "x_s": [],
        "segments": [],
        "rows_total": audit_run["rows_total"] or 0,
        "branches": {},
        "decisions": {},
    }
    if audit_run["completed_at"] is None:
        return empty
    if slots is None:
        slots = (
            _arrival_slots(engine, audit_run, spec, resolution),
            _decision_scan(coalesce_ref(engine, audit_run["audit_run_id"], spec.node_id))[1],
        )
    arrivals, decisions = slots
    every = [s for series in [*arrivals.values(), *decisions.values()] for s in series]
    if not every:
        return empty
    start = min(0.0, min(every) * resolution)
    last = (max(every) + 1) * resolution
    end = max(timeout * 1.1, last)
    # Where the action is gets most of the points (and of the chart's width): everything happened
    # long before the deadline, or long after it, or the time scale is plain.
    if last < timeout * EARLY_SHARE:
        knee = max(last * 1.15, start + resolution * 2)
        segments = [(start, knee, False), (knee, end, True)]
    elif last > timeout * LATE_FACTOR and timeout > start:
        segments = [(start, timeout, False), (timeout, end, True)]
    else:
        segments = [(start, end, False)]
    xs: list[float] = []
    for low, high, compressed in segments:
        count = (
            CHART_COLUMNS
            if len(segments) == 1
            else (CHART_COLUMNS // 3 if compressed else CHART_COLUMNS * 2 // 3)
        )
        xs += [low + (high - low) * (i + 1) / count for i in range(count)]

    def cumulative(series: Mapping[int, int]) -> dict[str, Any]:
        ends = sorted(series)
        running, totals = 0, []
        for slot in ends:
            running += series[slot]
            totals.append(running)
        points = []
        for x in xs:
            # Everything in slots ending at or before x: slot s ends at (s + 1) x resolution.
            i = bisect_right(ends, x / resolution - 1 + 1e-9)
            points.append(totals[i - 1] if i else 0)
        first = (min(ends) * resolution) if ends else None
        last = ((max(ends) + 1) * resolution) if ends else None
        return {"total": running, "points": points, "first_s": first, "last_s": last}

    return {
        "timeout_s": timeout,
        "start_s": start,
        "end_s": end,
        "resolution_s": resolution,
        "x_s": xs,
        "segments": [
            {"from_s": low, "to_s": high, "compressed": compressed} for low, high, compressed in segments
        ],
        "rows_total": audit_run["rows_total"] or 0,
        "branches": {b: cumulative(s) for b, s in arrivals.items()},
        "decisions": {d: cumulative(s) for d, s in decisions.items()},
    }


# --------------------------------------------------------------------------------------------------
# One row


def explain_decision(
    decision: Mapping[str, Any], config: Mapping[str, Any], deadline: datetime | None
) -> str:
    """One paragraph: what was decided, when, and why, in words."""
    details = decision["details"]
    missing: Mapping[str, str] = decision["missing"]
    consumed: list[str] = decision["consumed"]
    at = decision["decided_at"]
    when = "at the deadline" if deadline is not None and at == deadline else "when the deciding event arrived"
    policy = policy_text(config)

    def listing(names: Iterable[str]) -> str:
        names = list(names)
        return ", ".join(names) if names else "none"

    lost = {b: r for b, r in missing.items() if reason_kind(r) == "loss"}
    waiting = [b for b, r in missing.items() if r == NOT_ARRIVED]
    late = [b for b, r in missing.items() if reason_kind(r) == "late"]
    parts = []
    if is_resolution(decision["failure_reason"]):
        state = (
            details.get("coalesce_task_state") or str(decision["failure_reason"])[len(RESOLUTION_PREFIX) :]
        )
        parts.append(
            f"Resolved when the coalesce task ended {state}, with the row still undecided under {policy}: "
            "closed as failed so it is never left waiting. This is not a policy outcome."
        )
        parts.append(f"Arrived before the coalesce task ended: {listing(details.get('arrived', []))}.")
    elif decision["decision"] == "merged":
        parts.append(f"Merged {when} under {policy} (merge={config['merge']}), from {listing(consumed)}.")
    else:
        reason = decision["failure_reason"] or ""
        parts.append(f"Failed {when} under {policy}: {failure_reason_text(reason)}.")
        arrived = details.get("arrived")
        if arrived is not None:
            parts.append(f"Arrived before the decision: {listing(arrived)}.")
        if "need" in details:
            need = details["need"]
            if "max_possible" in details:
                parts.append(
                    f"The quorum needs {need}; at most {details['max_possible']} could still arrive."
                )
            else:
                parts.append(f"The quorum needs {need}.")
        if reason == "select_branch_not_arrived":
            parts.append(
                f"merge=select keeps only {details.get('select_branch')!r}, which was not among the "
                f"merged arrivals ({listing(details.get('consumed', []))}); no other branch is substituted."
            )
    for branch, why in lost.items():
        parts.append(f"{branch} {missing_reason_text(why)}.")
    if waiting:
        parts.append(f"{listing(waiting)} had not arrived when the row was decided.")
    if late:
        parts.append(f"{listing(late)} arrived after the decision (late: recorded, never merged).")
    return " ".join(parts)


def _replay_check(
    engine: Engine,
    audit_run: Mapping[str, Any],
    spec: CoalesceSpec,
    row: Mapping[str, Any],
    recorded: Mapping[str, Any],
) -> dict[str, Any]:
    """Replay the row's event log with the core and compare with the recorded decision.

    A resolution (``coalesce_task_<state>``) is no policy outcome: its check replays only the
    events up to its ``decided_at``, which must leave the row pending (``undecidable_then``).
    """
    run_id = audit_run["audit_run_id"]
    resolution = is_resolution(recorded["failure_reason"])
    try:
        with engine.connect() as conn:
            run = load_run(conn, run_id)
            assert run is not None
            _, states, losses = read_chunk_log(
                conn, spec, run_id, row["chunk"], undecided_only=False, row_ids=[row["row_id"]]
            )
            now = db_now(conn)
        deadline = deadline_of(run, spec.config)
        events = row_events(spec, states.get(row["row_id"], {}), losses)
        if resolution:
            replayed = replay_at_resolution(
                spec.config, events, decided_at=recorded["decided_at"], deadline=deadline
            )
        else:
            replayed = replay(spec.config, events, deadline=deadline, now=now)
    except Exception as err:  # the page still shows the recorded decision
        return {"available": False, "error": f"{type(err).__name__}: {err}", "events": [], "timeline": []}
    log = order_events(spec.config, events)
    got = {
        "decision": replayed.status.value,
        "failure_reason": replayed.failure_reason.value if replayed.failure_reason else None,
        "consumed": list(replayed.consumed),
        "decided_at": replayed.decided_at,
    }
    if resolution:
        undecidable = replayed.status is Status.PENDING
        return {
            "available": True,
            "resolution": True,
            "task_state": resolution_task_state(
                {
                    "failure_reason": recorded["failure_reason"],
                    "details_json": json.dumps(recorded["details"]),
                }
            ),
            "undecidable_then": undecidable,
            "agrees": undecidable,
            "differences": {},
            "replayed": got,
            "deadline": deadline,
            "events": [_event_dict(e, deadline, recorded["decided_at"], set()) for e in log],
            "timeline": _timeline(log, deadline, recorded),
        }
    want = {k: recorded[k] for k in got}
    differences = [k for k in got if got[k] != want[k]]
    return {
        "available": True,
        "resolution": False,
        "agrees": not differences,
        "differences": {k: {"recorded": want[k], "replayed": got[k]} for k in differences},
        "replayed": got,
        "deadline": deadline,
        "events": [_event_dict(e, deadline, recorded["decided_at"], set(recorded["consumed"])) for e in log],
        "timeline": _timeline(log, deadline, recorded),
    }


def _timeline(
    log: list[BranchEvent], deadline: datetime, recorded: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The log as read by a person: events, the deadline and the decision, in replay order.

    The deadline sorts after every event stamped at or before it (as in the replay), and the
    decision right after the event (or deadline) that made it.
    """
    consumed = set(recorded["consumed"])
    entries = [
        (e.at, 0, i, {"type": "event", **_event_dict(e, deadline, recorded["decided_at"], consumed)})
        for i, e in enumerate(log)
    ]
    entries.append((deadline, 1, 0, {"type": "deadline", "at": deadline}))
    entries.append(
        (
            recorded["decided_at"],
            2,
            0,
            {
                "type": "decision",
                "at": recorded["decided_at"],
                "decision": recorded["decision"],
                "failure_reason": recorded["failure_reason"],
            },
        )
    )
    return [entry for *_, entry in sorted(entries, key=lambda x: (x[0], x[1], x[2]))]


def _event_dict(
    event: BranchEvent, deadline: datetime, decided_at: datetime, consumed: set[str]
) -> dict[str, Any]:
    if event.kind is EventKind.ARRIVAL:
        note = "consumed" if event.branch in consumed else ("late" if event.at > decided_at else "arrived")
    else:
        note = "lost"
    return {
        "branch": event.branch,
        "at": event.at,
        "kind": event.kind.value,
        "reason": event.reason,
        "after_deadline": event.at > deadline,
        "note": note,
    }


def _error_of(state: Mapping[str, Any]) -> dict[str, Any] | None:
    if not state.get("error_json"):
        return None
    try:
        error = json.loads(state["error_json"])
    except ValueError:
        return {"type": "?", "message": state["error_json"]}
    return error if isinstance(error, dict) else {"type": "?", "message": str(error)}


def _chain(steps: Mapping[str, Mapping[str, Any]], branch: str) -> list[str]:
    """A branch's steps in order, from each step's registered ``previous_step``."""
    mine = {node: cfg for node, cfg in steps.items() if cfg.get("branch") == branch}
    after = {cfg.get("previous_step"): node for node, cfg in mine.items()}
    order, current = [], after.get(None)
    while current is not None and current not in order:
        order.append(current)
        current = after.get(current)
    return order + sorted(n for n in mine if n not in order)


def row_view(engine: Engine, audit_run: Mapping[str, Any], row_key: str) -> dict[str, Any]:
    """One row from source to decision: the source row, the fork, each branch's node states in step
    order (timing, errors, outputs), the terminal outcome of each token, every coalesce decision with
    its explanation and a replay of its event log, and the merged output."""
    run_id = audit_run["audit_run_id"]
    try:
        lineage = row_lineage(engine, run_id, row_key)
    except LookupError as err:
        raise NotFound(str(err)) from err
    n = t.nodes.c
    with engine.connect() as conn:
        node_rows = conn.execute(
            select(n.node_id, n.node_type, n.branch_name, n.config_json).where(n.run_id == run_id)
        ).all()
    steps = {
        node_id: {**json.loads(config_json), "branch": branch}
        for node_id, node_type, branch, config_json in node_rows
        if node_type == "branch"
    }
    coalesce_configs = {
        node_id: json.loads(config_json)
        for node_id, node_type, _, config_json in node_rows
        if node_type == "coalesce"
    }
    outputs = lineage["outputs"]
    tokens = lineage["tokens"]
    source = next((tok for tok in tokens if tok["token_kind"] == "source"), None)
    branches = []
    for branch in audit_run["branches"]:
        token = next(
            (tok for tok in tokens if tok["token_kind"] == "branch" and tok["branch_name"] == branch), None
        )
        if token is None:
            continue
        order = _chain(steps, branch)
        states = sorted(
            token["states"],
            key=lambda s: (order.index(s["node_id"]) if s["node_id"] in order else len(order), s["attempt"]),
        )
        terminal = next((o for o in token["outcomes"] if o["is_terminal"]), None)
        branches.append(
            {
                "branch": branch,
                "token_id": token["token_id"],
                "steps": order,
                "states": [
                    {
                        "node_id": s["node_id"],
                        "attempt": s["attempt"],
                        "status": s["status"],
                        "started_at": s["started_at"],
                        "completed_at": s["completed_at"],
                        "recorded_at": s.get("recorded_at"),
                        "duration_ms": s["duration_ms"],
                        "error": _error_of(s),
                        "context": json.loads(s["context_json"]) if s.get("context_json") else None,
                        "output": outputs.get(s["output_ref"]) if s["output_ref"] else None,
                        "output_ref": s["output_ref"],
                    }
                    for s in states
                ],
                "missing_steps": [step for step in order if step not in {s["node_id"] for s in states}],
                "outcome": terminal["outcome"] if terminal else None,
                "outcome_reason": terminal["reason"] if terminal else None,
                "outcomes": token["outcomes"],
                # Outcomes of a resolution a later coalesce try replaced: shown, never terminal.
                "superseded_outcomes": [
                    o
                    for o in token["outcomes"]
                    if not o["is_terminal"] and o.get("superseded_at") is not None
                ],
            }
        )
    decisions = []
    for d in lineage["decisions"]:
        config_data = coalesce_configs.get(d["node_id"])
        recorded = {
            "coalesce": d["node_id"],
            "decision": d["decision"],
            "failure_reason": d["failure_reason"],
            "details": json.loads(d["details_json"]),
            "consumed": json.loads(d["consumed"]),
            "missing": json.loads(d["missing_json"]),
            "late": json.loads(d["late_json"]),
            "collisions": json.loads(d["collisions_json"]) if d.get("collisions_json") else None,
            "decided_at": d["decided_at"],
            "recorded_at": d["recorded_at"],
            "wait_ms": d["wait_ms"],
            "merged_token_id": d["merged_token_id"],
        }
        merged = next((tok for tok in tokens if tok["token_id"] == d["merged_token_id"]), None)
        merged_state = merged["states"][0] if merged and merged["states"] else None
        recorded["merged_output"] = (
            outputs.get(merged_state["output_ref"]) if merged_state and merged_state["output_ref"] else None
        )
        if config_data is not None:
            spec = CoalesceSpec.from_dict(config_data)
            config = spec.config.as_dict()
            deadline = (
                audit_run["completed_at"] + spec.config.timeout
                if audit_run["completed_at"] is not None
                else None
            )
            recorded["policy_text"] = policy_text(config)
            recorded["deadline"] = deadline
            recorded["explanation"] = explain_decision(recorded, config, deadline)
            recorded["replay"] = _replay_check(engine, audit_run, spec, lineage["row"], recorded)
        decisions.append(recorded)
    decisions.sort(key=lambda d: d["coalesce"])
    superseded = [
        {
            "coalesce": d["node_id"],
            "decision": d["decision"],
            "failure_reason": d["failure_reason"],
            "details": json.loads(d["details_json"]),
            "missing": json.loads(d["missing_json"]),
            "decided_at": d["decided_at"],
            "recorded_at": d["recorded_at"],
            "superseded_at": d["superseded_at"],
        }
        for d in lineage.get("superseded_decisions", [])
    ]
    return {
        "audit_run_id": run_id,
        "row_key": lineage["row"]["row_key"],
        "row_index": lineage["row"]["row_index"],
        "chunk": lineage["row"]["chunk"],
        "source": lineage["source"],
        "source_hash": lineage["row"]["source_hash"],
        "fork": {
            "task_id": audit_run["fork_task_id"],
            "token_id": source["token_id"] if source else None,
            "fork_group_id": source["fork_group_id"] if source else None,
            "created_at": source["created_at"] if source else None,
            "branches": audit_run["branches"],
        },
        "fork_completed_at": audit_run["completed_at"],
        "branches": branches,
        "decisions": decisions,
        # Resolutions replaced when a person cleared the coalesce: history, never decisions.
        "superseded_decisions": superseded,
    }


# --------------------------------------------------------------------------------------------------
# One task


def task_view(
    engine: Engine, runs: Sequence[dict[str, Any]], task_id: str, map_index: int | None = None
) -> dict[str, Any]:
    """What one task of the DAG run is in the audit trail (fork, branch step or coalesce) and, for a
    branch step, what it did: node states by status, errors by type, durations.

    The newest audit run in which the task appears is used.
    """
    ordered = [*(r for r in runs if r["current"]), *(r for r in runs if not r["current"])]
    for run in ordered:
        if run["fork_task_id"] == task_id:
            return {"kind": "fork", "task_id": task_id, "audit_run_id": run["audit_run_id"]}
        if task_id in run["coalesces"]:
            return {"kind": "coalesce", "task_id": task_id, "audit_run_id": run["audit_run_id"]}
        step = next((s for s in run["branch_steps"] if s["node_id"] == task_id), None)
        if step is not None:
            return {"kind": "branch", **_branch_step_stats(engine, run, task_id, step["branch"], map_index)}
    return {"kind": None, "task_id": task_id, "audit_run_id": None}


def _branch_step_stats(
    engine: Engine, run: Mapping[str, Any], node_id: str, branch: str, map_index: int | None
) -> dict[str, Any]:
    run_id = run["audit_run_id"]
    ns, r = t.node_states.c, t.rows.c
    scope = [ns.run_id == run_id, ns.node_id == node_id]
    n = t.nodes.c
    with engine.connect() as conn:
        coalesce_configs = [
            json.loads(c)
            for c in conn.execute(
                select(n.config_json).where(n.run_id == run_id, n.node_type == "coalesce")
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
        error_type = _json_field(engine, ns.error_json, "type").label("error_type")
        errors: dict[str, dict[str, Any]] = {}
        for kind, n, message in conn.execute(
            select(error_type, func.count(), func.min(_json_field(engine, ns.error_json, "message")))
            .where(*scope, ns.status == "failed")
            .group_by(error_type)
            .order_by(func.count().desc())
        ):
            errors[str(kind)] = {"rows": n, "message": message or "", "row_keys": []}
        for kind, entry in list(errors.items())[:20]:
            entry["row_keys"] = list(
                conn.execute(
                    select(r.row_key)
                    .select_from(
                        t.node_states.join(t.rows, and_(r.run_id == ns.run_id, r.row_id == ns.row_id))
                    )
                    .where(*scope, ns.status == "failed", _json_field(engine, ns.error_json, "type") == kind)
                    .order_by(ns.chunk)
                    .limit(10)
                ).scalars()
            )
    states_total = sum(by_status.values())
    feeds = [cfg["node_id"] for cfg in coalesce_configs if cfg.get("delivering", {}).get(branch) == node_id]
    return {
        "task_id": node_id,
        "branch": branch,
        "audit_run_id": run_id,
        "mapped": mapped,
        "chunk": chunk,
        "states_total": states_total,
        "by_status": dict(sorted(by_status.items())),
        "first_started_at": first_started,
        "last_completed_at": last_completed,
        "avg_duration_ms": duration_sum / states_total if states_total else None,
        "max_duration_ms": duration_max,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1]["rows"])),
        "delivers_to": feeds,
    }


# --------------------------------------------------------------------------------------------------
# Recent audit runs (the landing page)


def recent_runs(engine: Engine, dag_ids: Iterable[str] | None, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest audit runs, of the given DAGs only (None: of every DAG), with their coalesces'
    merged, failed and undecided rows."""
    ru, n = t.runs.c, t.nodes.c
    query = select(
        ru.run_id,
        ru.dag_id,
        ru.airflow_run_id,
        ru.fork_task_id,
        ru.try_number,
        ru.status,
        ru.status_reason,
        ru.started_at,
        ru.rows_total,
    )
    if dag_ids is not None:
        wanted = sorted(set(dag_ids))
        if not wanted:
            return []
        query = query.where(ru.dag_id.in_(wanted))
    with engine.connect() as conn:
        runs = [
            dict(row) for row in conn.execute(query.order_by(ru.started_at.desc()).limit(limit)).mappings()
        ]
        coalesces: dict[str, list[str]] = {}
        if runs:
            for run_id, node_id in conn.execute(
                select(n.run_id, n.node_id)
                .where(n.run_id.in_([r["run_id"] for r in runs]), n.node_type == "coalesce")
                .order_by(n.run_id, n.node_id)
            ):
                coalesces.setdefault(run_id, []).append(node_id)
    counts = decision_counts(
        engine, {r["run_id"]: (r["rows_total"], coalesces.get(r["run_id"], [])) for r in runs}
    )
    for run in runs:
        run["coalesces"] = coalesces.get(run["run_id"], [])
        # Per coalesce: {"merged", "failed", "undecided"}.
        run["decisions"] = counts.get(run["run_id"], {})
    return runs
