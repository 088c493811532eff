"""What a coalesce decided: its summary (the one source of counts), pages of decided rows and their
filters, the branch x reason matrix of missing branches, late arrivals and events per time slot.

The summary (docs/ARCHITECTURE.md, "The coalesce summary") is what the sensor pushes to XCom, what
``airflow-elspeth report`` prints and what the UI's coalesce overview extends: every count of rows
merged, failed, undecided and late comes from :func:`coalesce_summary`.

Cost model: a page of rows is a LIMIT/OFFSET query over the coalesce's decisions in (chunk, row_key)
order, through the ``(run_id, node_id, chunk)`` index, with the decision and reason filters on the
``(run_id, node_id, decision, failure_reason)`` index, so a page of a million-row run costs about a
page of a small one. Whole-run aggregates are cached (:mod:`airflow_elspeth.audit.read.cache`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Integer, and_, bindparam, cast, func, or_, select, text

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.ids import branch_of_token, branch_token_id, row_id, row_numbers
from airflow_elspeth.audit.model import CoalesceSpec, RunInfo, deadline_of, load_run, run_number
from airflow_elspeth.audit.read.cache import CoalesceRef, coalesce_ref, run_reads
from airflow_elspeth.audit.read.events import (
    DECISION_OF_RESULT,
    SOURCE_OF_DECISION,
    decision_rows_of,
    of_source_row,
    row_id_of,
)
from airflow_elspeth.audit.read.records import (
    AuditRunView,
    CoalesceOverview,
    CoalesceSummary,
    DecisionPage,
    DecisionRecord,
    FailedRow,
    FieldCollision,
    LateArrival,
    LateArrivalsPage,
    LateDecision,
    MatrixCell,
    MissingBranch,
    MissingMatrix,
    Wait,
    to_json,
)
from airflow_elspeth.audit.read.runs import Run, coalesce_nodes
from airflow_elspeth.core.vocabulary import (
    ARRIVAL_NODE_STATUSES,
    BRANCH_TASK_PREFIX,
    LATE_AFTER_MERGE,
    LATE_REASONS,
    NOT_ARRIVED,
    SKIPPED_DECIDED,
    DecisionStatus,
    ReasonKind,
    TokenOutcome,
    after_decision_reason,
    answered_since,
    collision_rule_text,
    is_task_loss,
    policy_text,
    reason_kind,
    reason_order,
)
from airflow_elspeth.exceptions import NotFound

FAILED_ROWS_LIMIT = 100
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Beyond this many distinct missing-branch combinations, filter in SQL with JSON functions instead
# of an IN list of the matching combinations.
MAX_IN_LIST = 500
# Events over time are counted per slot of a thousandth of the timeout (at least a millisecond).
SLOTS_PER_TIMEOUT = 1000
_SLOT_OFFSET = 1_000_000_000

_ARRIVALS = [s.value for s in ARRIVAL_NODE_STATUSES]


# --------------------------------------------------------------------------------------------------
# The coalesce summary


@contextmanager
def whole_run_reads(engine: Engine) -> Iterator[Connection]:
    """A connection for grouped reads over every row of an audit run.

    On PostgreSQL, nested-loop joins are off for its transaction: a run's rows are new to the
    planner's statistics until autovacuum analyzes them, and on estimates of a handful of rows it
    picks nested loops that take quadratic time over thousands (the summary of 5,000 rows took
    8-13 s instead of 0.03 s on a database not yet analyzed). Reads over a whole run are
    hash-join shaped whatever the statistics say.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL enable_nestloop = off"))
        yield conn


def coalesce_summary(engine: Engine, spec: CoalesceSpec, run_id: str) -> dict[str, Any]:
    """The XCom ``coalesce_summary`` (docs/ARCHITECTURE.md, "The coalesce summary"): the JSON of
    :func:`summarise`, a public contract.

    :raises NotFound: no such audit run.
    """
    summary: dict[str, Any] = to_json(summarise(engine, spec, run_id))
    return summary


def summarise(engine: Engine, spec: CoalesceSpec, run_id: str) -> CoalesceSummary:
    """What a coalesce decided, from grouped queries: the one source of counts.

    :raises NotFound: no such audit run.
    """
    config = spec.config
    cd = t.decisions.c
    with whole_run_reads(engine) as conn:
        run = _run(conn, run_id)
        mine = and_(cd.run_no == run.run_no, cd.node_id == spec.node_id)
        counts = Counter(
            {
                (decision, reason): n
                for decision, reason, n in conn.execute(
                    select(cd.decision, cd.failure_reason, func.count())
                    .where(mine)
                    .group_by(cd.decision, cd.failure_reason)
                )
            }
        )
        groups = Counter(
            {
                (decision, missing_json): n
                for decision, missing_json, n in conn.execute(
                    select(cd.decision, cd.missing_json, func.count())
                    .where(mine)
                    .group_by(cd.decision, cd.missing_json)
                )
            }
        )
        waits = conn.execute(
            select(
                func.avg(cd.wait_ms),
                func.max(cd.wait_ms),
                func.avg(cd.wait_from_first_arrival_ms),
                func.max(cd.wait_from_first_arrival_ms),
            ).where(mine)
        ).one()
        moves = _after_decision(conn, spec, run_id)
        missing: dict[str, dict[str, Any]] = {}
        for (_, branch, reason), n in _missing_counts(groups, moves).items():
            entry = missing.setdefault(branch, {"rows": 0, "reasons": {}})
            entry["rows"] += n
            entry["reasons"][reason] = entry["reasons"].get(reason, 0) + n
        sr = t.source_rows.c
        failed = conn.execute(
            select(cd.row_no, sr.row_key, cd.failure_reason, cd.details_json, cd.missing_json)
            .join_from(
                t.decisions,
                t.source_rows,
                SOURCE_OF_DECISION,
            )
            .where(mine, cd.decision == DecisionStatus.FAILED.value)
            .order_by(cd.chunk, sr.row_key)
            .limit(FAILED_ROWS_LIMIT + 1)
        ).all()
        failed_ids = [row_id(run.run_no, row.row_no) for row in failed]
        since = _rows_after_decision(conn, spec, run_id, failed_ids)
        failed_rows = [
            FailedRow(
                row_key=row.row_key,
                reason=row.failure_reason,
                arrived=json.loads(row.details_json).get("arrived", []),
                missing=_missing_now(since, failed_id, row.missing_json),
            )
            for row, failed_id in zip(failed, failed_ids, strict=True)
        ]
        collisions: dict[str, dict[str, Any]] = {}
        for collisions_json, n in conn.execute(
            select(cd.collisions_json, func.count())
            .where(mine, cd.collisions_json.is_not(None))
            .group_by(cd.collisions_json)
        ):
            for field_name, branches in json.loads(collisions_json).items():
                entry = collisions.setdefault(field_name, {"rows": 0, "branches": []})
                entry["rows"] += n
                entry["branches"] = [b for b in config.branches if b in {*entry["branches"], *branches}]
    rows_failed = sum(n for (decision, _), n in counts.items() if decision == DecisionStatus.FAILED)
    rows_merged = sum(n for (decision, _), n in counts.items() if decision == DecisionStatus.MERGED)
    failure_reasons = {
        reason: n for (decision, reason), n in counts.items() if decision == DecisionStatus.FAILED
    }
    return CoalesceSummary(
        coalesce=spec.node_id,
        policy=config.policy.value,
        quorum=config.quorum,
        merge=config.merge.value,
        select_branch=config.select_branch,
        on_collision=config.on_collision,
        output_contract=spec.output_contract,
        expected_branches=list(config.branches),
        deadline=deadline_of(run, config).isoformat() if run.completed_at else None,
        rows_total=run.rows_total,
        rows_merged=rows_merged,
        rows_failed=rows_failed,
        rows_undecided=max(0, run.rows_total - rows_merged - rows_failed),
        late_arrivals=sum(
            n
            for info in missing.values()
            for r, n in info["reasons"].items()
            if reason_kind(r) is ReasonKind.LATE
        ),
        missing_branches={
            b: MissingBranch(
                rows=missing[b]["rows"],
                reasons=dict(sorted(missing[b]["reasons"].items(), key=lambda kv: reason_order(kv[0]))),
            )
            for b in config.branches
            if b in missing
        },
        failure_reasons=dict(sorted(failure_reasons.items())),
        field_collisions={
            name: FieldCollision(rows=entry["rows"], branches=entry["branches"])
            for name, entry in sorted(collisions.items())
        },
        failed_rows=failed_rows[:FAILED_ROWS_LIMIT],
        failed_rows_truncated=len(failed_rows) > FAILED_ROWS_LIMIT,
        waits_ms={
            "from_fork_completion": Wait(mean=_whole(waits[0]), max=_whole(waits[1])),
            "from_first_arrival": Wait(mean=_whole(waits[2]), max=_whole(waits[3])),
        },
        audit_run_id=run_id,
    )


def _whole(value: Any) -> int | None:
    """A SQL aggregate (an int, a float, PostgreSQL's Decimal, or NULL) as whole milliseconds."""
    return None if value is None else round(float(value))


# (decision, missing_json, branch, reason): rows of this coalesce whose decision saw ``branch`` as
# ``not_arrived`` (or lost to its task's end) and whose branch has since answered late or skipped
# the row (``reason``; see ``core.vocabulary.answered_since``).
Moves = Mapping[tuple[str, str, str, str], int]

# An answer after the row's decision, or any answer of a branch a decision saw lost to its task's end
# (written after that end: a late write, even before the decision). Decisions with such a loss are
# few, so the time condition still prunes the join for all the others.
_ANSWER_SINCE = or_(
    t.step_results.c.recorded_at > t.decisions.c.decided_at,
    t.decisions.c.missing_json.contains(f'"{BRANCH_TASK_PREFIX}', autoescape=True),
)


def _answers_since(spec: CoalesceSpec, run_no: int, *where: Any) -> Any:
    """(row_no, decision, missing_json, delivering node) of each arrival at a delivering step of this
    coalesce written since its row's decision (:data:`_ANSWER_SINCE`), one per (row, node)."""
    st, d = t.step_results.c, t.decisions.c
    return (
        select(d.row_no, d.decision, d.missing_json, st.node_id)
        .distinct()
        .join_from(
            t.step_results,
            t.decisions,
            and_(
                d.run_no == st.run_no,
                d.node_id == spec.node_id,
                d.chunk == st.chunk,
                d.row_no == st.row_no,
            ),
        )
        .where(
            st.run_no == run_no,
            st.node_id.in_(list(spec.delivering.values())),
            st.status.in_(_ARRIVALS),
            _ANSWER_SINCE,
            *where,
        )
    )


def _skips(
    conn: Any, spec: CoalesceSpec, run: RunInfo, row_nos: set[int] | None = None
) -> Iterator[tuple[int, str, str, str]]:
    """(row_no, decision, missing_json, branch) of each branch token of this coalesce's decided rows
    that a branch step skipped since (terminal outcome ``skipped``), optionally of some rows only
    (then their tokens are looked up by id, not the run's skips read whole)."""
    ro, d = t.recorded_outcomes.c, t.decisions.c
    scope = [ro.run_id == run.run_id, ro.outcome == TokenOutcome.SKIPPED.value, ro.is_terminal]
    if row_nos is None:
        tokens = list(conn.execute(select(ro.token_id).where(*scope)).scalars())
    else:
        wanted_tokens = [
            branch_token_id(row_id(run.run_no, row_no), branch)
            for row_no in sorted(row_nos)
            for branch in spec.config.branches
        ]
        tokens = [
            token
            for start in range(0, len(wanted_tokens), 500)
            for token in conn.execute(
                select(ro.token_id).where(*scope, ro.token_id.in_(wanted_tokens[start : start + 500]))
            ).scalars()
        ]
    skipped: dict[int, list[str]] = {}
    for token in tokens:
        row, branch = branch_of_token(token)
        if branch in spec.config.branches:
            skipped.setdefault(row_numbers(row)[1], []).append(branch)
    wanted = sorted(skipped)
    for start in range(0, len(wanted), 500):
        rows = wanted[start : start + 500]
        for row_no, decision, missing_json in conn.execute(
            select(d.row_no, d.decision, d.missing_json).where(
                d.run_no == run.run_no,
                d.node_id == spec.node_id,
                d.chunk.in_(sorted({row_no // run.chunk_size for row_no in rows})),
                d.row_no.in_(rows),
            )
        ):
            for branch in skipped[row_no]:
                yield row_no, decision, missing_json, branch


def _after_decision(conn: Any, spec: CoalesceSpec, run_id: str) -> dict[tuple[str, str, str, str], int]:
    """What became of the branches a decision saw as ``not_arrived`` (or lost to their task's end):
    the decision keeps the reason it had, while the token's outcome, the summary and the reports tell
    what happened since.

    * a **late arrival written after the decision** (at the delivering step, stamped after the row's
      decision time): ``late_arrival_after_<decision>``, as if the decision had seen it late, which
      it does in a mode whose pass runs after the answer was written;
    * a **skip** (the branch step did not process the row, already decided): ``skipped_decided``.

    Counted against this coalesce's own decisions: with several coalesces on one fork, a token's one
    terminal outcome may have been written by another coalesce.
    """
    branch_of = {node: branch for branch, node in spec.delivering.items()}
    run = _run(conn, run_id)
    found: Counter[tuple[str, str, str, bool]] = Counter()
    for _, decision, missing_json, node in conn.execute(_answers_since(spec, run.run_no)):
        found[(decision, missing_json, branch_of[node], True)] += 1
    for _, decision, missing_json, branch in _skips(conn, spec, run):
        found[(decision, missing_json, branch, False)] += 1
    moves: dict[tuple[str, str, str, str], int] = {}
    for (decision, missing_json, branch, arrived), n in found.items():
        reason = json.loads(missing_json).get(branch)
        if reason is not None and answered_since(reason, arrived=arrived):
            key = (decision, missing_json, branch, after_decision_reason(decision, arrived=arrived))
            moves[key] = moves.get(key, 0) + n
    return moves


def _rows_after_decision(
    conn: Any, spec: CoalesceSpec, run_id: str, row_ids: Sequence[str]
) -> dict[tuple[str, str], str]:
    """(row_id, branch) -> what became of a branch since the row's decision (as in
    :func:`_after_decision`), for the given rows of this coalesce: a late arrival or a skip."""
    if not row_ids:
        return {}
    branch_of = {node: branch for branch, node in spec.delivering.items()}
    run = _run(conn, run_id)
    row_nos = {row_numbers(row)[1] for row in row_ids}
    # The rows' chunks bound the read to a key range of the run's results.
    chunks = sorted({row_no // run.chunk_size for row_no in row_nos})
    query = _answers_since(
        spec, run.run_no, t.step_results.c.chunk.in_(chunks), t.decisions.c.row_no.in_(sorted(row_nos))
    )
    found: dict[tuple[str, str], str] = {}
    for row_no, decision, _, node in conn.execute(query):
        found[(row_id(run.run_no, row_no), branch_of[node])] = after_decision_reason(decision, arrived=True)
    for row_no, decision, _, branch in _skips(conn, spec, run, row_nos):
        found.setdefault((row_id(run.run_no, row_no), branch), after_decision_reason(decision, arrived=False))
    return found


def _run(conn: Any, run_id: str) -> RunInfo:
    """:raises NotFound: no such audit run."""
    run = load_run(conn, run_id)
    if run is None:
        raise NotFound(f"no audit run {run_id}")
    return run


def _missing_now(since: Mapping[tuple[str, str], str], row_id: str, missing_json: str) -> dict[str, str]:
    """A decided row's missing branches, each with what it did since where that replaces the
    decision's reason (``since``: :func:`_rows_after_decision`)."""
    missing: dict[str, str] = json.loads(missing_json)
    for branch, reason in missing.items():
        after = since.get((row_id, branch))
        if after is not None and answered_since(reason, arrived=after != SKIPPED_DECIDED):
            missing[branch] = after
    return missing


def _missing_counts(groups: Mapping[tuple[str, str], int], moves: Moves) -> Counter[tuple[str, str, str]]:
    """(decision, branch, reason) -> rows over the decision groups ``(decision, missing_json) -> rows``,
    with the branches that answered late or skipped since the decision counted under that reason."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for (decision, missing_json), n in groups.items():
        for branch, reason in json.loads(missing_json).items():
            counts[(decision, branch, reason)] += n
    for (decision, missing_json, branch, reason), n in moves.items():
        counts[(decision, branch, json.loads(missing_json)[branch])] -= n
        counts[(decision, branch, reason)] += n
    return +counts


# Audit runs per IN list (branch_reasons).
_RUNS_PER_READ = 500


def branch_reasons(
    engine: Engine, specs: Mapping[str, Mapping[str, CoalesceSpec]]
) -> dict[tuple[str, str], Counter[tuple[str, str]]]:
    """(audit run, coalesce) -> (branch, reason) -> rows whose decision missed ``branch``, each
    under what it did since where that replaces the decision's reason (as the summary's
    ``missing_branches`` counts them), for many audit runs at once: one grouped read, plus the
    after-decision reads of the coalesces that missed a branch at all.

    :param specs: audit run id -> coalesce task id -> its spec as registered.
    """
    cd = t.coalesce_decisions.c
    run_ids = [run_id for run_id, nodes in specs.items() if nodes]
    groups: dict[tuple[str, str], Counter[tuple[str, str]]] = {}
    with engine.connect() as conn:
        for start in range(0, len(run_ids), _RUNS_PER_READ):
            for run_id, node_id, decision, missing_json, n in conn.execute(
                select(cd.run_id, cd.node_id, cd.decision, cd.missing_json, func.count())
                .where(cd.run_id.in_(run_ids[start : start + _RUNS_PER_READ]))
                .group_by(cd.run_id, cd.node_id, cd.decision, cd.missing_json)
            ):
                if json.loads(missing_json):
                    groups.setdefault((run_id, node_id), Counter())[(decision, missing_json)] += int(n)
        found: dict[tuple[str, str], Counter[tuple[str, str]]] = {}
        for (run_id, node_id), decided in groups.items():
            per_branch = found.setdefault((run_id, node_id), Counter())
            moves = _after_decision(conn, specs[run_id][node_id], run_id)
            for (_, branch, reason), n in _missing_counts(decided, moves).items():
                per_branch[(branch, reason)] += n
    return found


def run_summaries(engine: Engine, runs: Iterable[Run]) -> Iterator[tuple[Run, CoalesceSummary]]:
    """(run, summary) of every coalesce registered in each of ``runs``."""
    for run in runs:
        for spec in coalesce_nodes(engine, run.audit_run_id):
            yield run, summarise(engine, spec, run.audit_run_id)


def failure_message(summary: Mapping[str, Any]) -> str:
    """The one-paragraph answer to "why did the coalesce fail": policy, counts, missing branches."""
    policy = policy_text(summary["policy"], len(summary["expected_branches"]), summary["quorum"])
    reasons = ", ".join(f"{reason}={n}" for reason, n in summary["failure_reasons"].items())
    missing = "; ".join(
        f"{branch}: " + ", ".join(f"{reason} x{n}" for reason, n in info["reasons"].items())
        for branch, info in summary["missing_branches"].items()
    )
    return (
        f"coalesce {summary['coalesce']!r} ({policy}, merge={summary['merge']}): "
        f"{summary['rows_failed']} of {summary['rows_total']} rows failed "
        f"(tolerated: {summary['tolerated_failures']}"
        + (
            f" or rate {summary['tolerated_failure_rate']}"
            if summary.get("tolerated_failure_rate") is not None
            else ""
        )
        + f"). Failure reasons: {reasons or 'none'}. Missing branches: {missing or 'none'}. "
        + _failed_keys(summary)
        + f"Audit run {summary['audit_run_id']}."
    )


FAILED_KEYS_IN_MESSAGE = 10


def _failed_keys(summary: Mapping[str, Any]) -> str:
    """ "Failed rows: k1, k2 ... and N more. " (at most ten keys), or nothing when none failed."""
    keys = [str(row["row_key"]) for row in summary.get("failed_rows", [])[:FAILED_KEYS_IN_MESSAGE]]
    if not keys:
        return ""
    more = summary["rows_failed"] - len(keys)
    return f"Failed rows: {', '.join(keys)}" + (f" and {more} more" if more > 0 else "") + ". "


# --------------------------------------------------------------------------------------------------
# Decision groups: the one scan behind the matrix, filtered totals and decisions over time


def slot_seconds(spec: CoalesceSpec) -> float:
    """The width of a time slot: a thousandth of the timeout (at least a millisecond).

    Fine slots cost little: events are stamped per written batch, so the number of non-empty slots
    is bounded by the number of batches, not by the length of the run.
    """
    return max(spec.config.timeout.total_seconds() / SLOTS_PER_TIMEOUT, 0.001)


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
    cd = t.decisions.c
    resolution = slot_seconds(ref.spec)
    # wait_ms is decided_at - fork completion: slots need no date arithmetic.
    slot = (cast(cd.wait_ms / (resolution * 1000.0) + _SLOT_OFFSET, Integer) - _SLOT_OFFSET).label("slot")
    rows: dict[tuple[str, str | None, str, str], int] = {}
    slots: dict[str, dict[int, int]] = {DecisionStatus.MERGED.value: {}, DecisionStatus.FAILED.value: {}}
    with ref.engine.connect() as conn:
        run_no = run_number(conn, ref.run_id)
        for decision, reason, missing_json, late_json, at, n in conn.execute(
            select(cd.decision, cd.failure_reason, cd.missing_json, cd.late_json, slot, func.count())
            .where(cd.run_no == run_no, cd.node_id == ref.node_id)
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


def _scan(ref: CoalesceRef) -> tuple[list[DecisionGroup], dict[str, dict[int, int]]]:
    return ref.cached("decisions", lambda: _decision_scan(ref))


def decision_slots(ref: CoalesceRef) -> dict[str, dict[int, int]]:
    """Decisions (``merged`` / ``failed``) per time slot of :func:`slot_seconds` after the fork."""
    return _scan(ref)[1]


def arrival_slots(ref: CoalesceRef, audit_run: AuditRunView) -> dict[str, dict[int, int]]:
    """Arrivals per branch per time slot (slot s: [s, s+1) x :func:`slot_seconds` after the fork);
    empty while the fork has not completed."""
    if audit_run.completed_at is None:
        return {}
    return ref.cached("arrivals", lambda: _arrival_slots(ref, audit_run))


def _arrival_slots(ref: CoalesceRef, audit_run: AuditRunView) -> dict[str, dict[int, int]]:
    engine, spec, resolution = ref.engine, ref.spec, slot_seconds(ref.spec)
    ns = t.step_results.c
    branch_of = {node: branch for branch, node in spec.delivering.items()}
    origin = bindparam("origin", audit_run.completed_at, type_=t.runs.c.completed_at.type)
    slot: Any
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
                ns.run_no == run_number(conn, audit_run.audit_run_id),
                ns.node_id.in_(list(branch_of)),
                ns.status.in_(_ARRIVALS),
            )
            .group_by(ns.node_id, slot)
        ):
            if at is None:
                continue
            series = arrivals[branch_of[node]]
            series[int(at)] = series.get(int(at), 0) + n
    return arrivals


@dataclass(frozen=True)
class RowFilter:
    """Which decided rows to list.

    :param decision: ``failed``, ``merged`` or None for both.
    :param reason: the row's failure reason.
    :param branch: a branch that did not contribute to the row.
    :param branch_reason: why ``branch`` did not contribute (needs ``branch``).
    :param late: only rows with a late arrival recorded in their decision.
    """

    decision: str | None = DecisionStatus.FAILED.value
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


def _json_missing_condition(engine: Engine, flt: RowFilter) -> Any:
    """SQL for "``branch`` is missing [for ``branch_reason``]" on missing_json, per dialect."""
    cd = t.decisions.c
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


def _matrix(groups: Iterable[DecisionGroup], branches: Sequence[str], moves: Moves) -> MissingMatrix:
    """The branch x reason matrix of missing branches (the summary's ``missing_branches``, cell by
    cell, with how many of each cell's rows failed)."""
    rows: Counter[tuple[str, str]] = Counter()
    failed: Counter[tuple[str, str]] = Counter()
    by_group: Counter[tuple[str, str]] = Counter()
    for group in groups:
        by_group[(group.decision, group.missing_json)] += group.rows
    for (decision, branch, reason), n in _missing_counts(by_group, moves).items():
        rows[(branch, reason)] += n
        if decision == DecisionStatus.FAILED:
            failed[(branch, reason)] += n
    cells: dict[str, dict[str, MatrixCell]] = {}
    for (branch, reason), n in rows.items():
        cells.setdefault(branch, {})[reason] = MatrixCell(rows=n, failed_rows=failed[(branch, reason)])
    ordered = sorted({reason for _, reason in rows}, key=reason_order)
    listed = [b for b in branches if b in cells] + sorted(b for b in cells if b not in branches)
    return MissingMatrix(
        branches=listed,
        reasons=ordered,
        reason_kinds={r: reason_kind(r).value for r in ordered},
        cells=cells,
        branch_totals={b: sum(c.rows for c in cells[b].values()) for b in listed},
        reason_totals={r: sum(rows[(b, r)] for b in listed) for r in ordered},
    )


def _late_after_write(ref: CoalesceRef) -> list[dict[str, Any]]:
    """Arrivals written after their row's decision (the decision saw the branch as not arrived)."""
    spec = ref.spec
    st, cd, sr = t.step_results.c, t.decisions.c, t.source_rows.c
    branch_of = {node: branch for branch, node in spec.delivering.items()}
    with ref.engine.connect() as conn:
        run_no = run_number(conn, ref.run_id)
    query = (
        select(
            sr.row_key,
            cd.decision,
            cd.failure_reason,
            cd.decided_at,
            cd.recorded_at,
            st.node_id,
            func.min(st.recorded_at),
        )
        .select_from(
            t.step_results.join(t.decisions, and_(DECISION_OF_RESULT, cd.node_id == spec.node_id)).join(
                t.source_rows, SOURCE_OF_DECISION
            )
        )
        .where(
            st.run_no == run_no,
            st.node_id.in_(list(branch_of)),
            st.status.in_(_ARRIVALS),
            # Written after the decision was (the decision saw the branch as not arrived).
            st.recorded_at > cd.recorded_at,
        )
        .group_by(sr.row_key, cd.decision, cd.failure_reason, cd.decided_at, cd.recorded_at, st.node_id)
        .order_by(func.min(st.recorded_at))
    )
    with ref.engine.connect() as conn:
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


def _after_write(ref: CoalesceRef) -> list[dict[str, Any]]:
    return ref.cached("after", lambda: _late_after_write(ref))


def _moves(ref: CoalesceRef) -> dict[tuple[str, str, str, str], int]:
    with ref.engine.connect() as conn:
        return _after_decision(conn, ref.spec, ref.run_id)


def cached_summary(ref: CoalesceRef) -> CoalesceSummary:
    """:func:`summarise` of the coalesce, cached under the run's fingerprint."""
    return ref.cached("summary", lambda: summarise(ref.engine, ref.spec, ref.run_id))


def coalesce_overview(
    engine: Engine, audit_run: AuditRunView, node_id: str, *, ref: CoalesceRef | None = None
) -> CoalesceOverview:
    """The coalesce summary, extended with what the coalesce section of a page shows besides it:
    the policy in words, the deadline, late rows, the branch x reason matrix of missing branches.

    Every count is the summary's; ``rows_undecided`` is non-zero while the coalesce is still running.
    """
    run_id = audit_run.audit_run_id
    ref = ref or coalesce_ref(engine, run_id, node_id)
    spec = ref.spec
    summary, (groups, _), after_write, moves = run_reads(
        engine,
        lambda: cached_summary(ref),
        lambda: _scan(ref),
        lambda: _after_write(ref),
        lambda: ref.cached("moves", lambda: _moves(ref)),
    )
    completed_at = audit_run.completed_at
    deadline = completed_at + spec.config.timeout if completed_at else None
    return CoalesceOverview(
        coalesce=node_id,
        audit_run_id=run_id,
        policy=summary.policy,
        policy_text=policy_text(summary.policy, len(summary.expected_branches), summary.quorum),
        quorum=summary.quorum,
        merge=summary.merge,
        select_branch=summary.select_branch,
        branches=summary.expected_branches,
        delivering=dict(spec.delivering),
        timeout_s=spec.config.timeout.total_seconds(),
        fork_completed_at=completed_at,
        deadline=deadline,
        rows_total=summary.rows_total,
        rows_merged=summary.rows_merged,
        rows_failed=summary.rows_failed,
        rows_undecided=summary.rows_undecided,
        late_arrivals=summary.late_arrivals,
        late_rows=sum(g.rows for g in groups if g.late),
        late_after_write=len(after_write),
        failure_reasons=dict(sorted(summary.failure_reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        missing_matrix=_matrix(groups, spec.config.branches, moves),
        field_collisions=summary.field_collisions,
        collision_rule=collision_rule_text(spec.config.on_collision),
        output_contract=summary.output_contract,
    )


# --------------------------------------------------------------------------------------------------
# Rows of a coalesce


def _page_bounds(limit: int, offset: int) -> tuple[int, int]:
    return max(1, min(int(limit), MAX_PAGE_SIZE)), max(0, int(offset))


# Missing reasons whose rows depend on what branches did after the decision (see _after_decision);
# a task's end (``branch_task_<state>``) too.
_STORY_REASONS = (NOT_ARRIVED, *LATE_REASONS, SKIPPED_DECIDED)


def _is_story_reason(reason: str | None) -> bool:
    return reason is not None and (reason in _STORY_REASONS or is_task_loss(reason))


def _story_matches(
    ref: CoalesceRef, groups: Sequence[DecisionGroup], flt: RowFilter
) -> tuple[list[DecisionGroup], int]:
    """The groups that may hold rows where ``flt.branch`` is missing for ``flt.branch_reason`` as the
    summary counts it (after :func:`_after_decision`), and how many rows that is."""
    branch, wanted = str(flt.branch), flt.branch_reason
    moves = ref.cached("moves", lambda: _moves(ref))
    wide = replace(flt, branch_reason=None)
    matching, total = [], 0
    for g in groups:
        if not wide.matches(g) or branch not in g.missing:
            continue
        # Only a reason that what the branch did since can replace has moves (_after_decision).
        moved = {
            r: n for (d, mj, b, r), n in moves.items() if (d, mj, b) == (g.decision, g.missing_json, branch)
        }
        n = g.rows - sum(moved.values()) if g.missing[branch] == wanted else moved.get(str(wanted), 0)
        if n:
            matching.append(g)
            total += n
    return matching, total


def _story_condition(
    engine: Engine, spec: CoalesceSpec, flt: RowFilter, matching: Sequence[DecisionGroup], max_in_list: int
) -> Any:
    """SQL for the rows of :func:`_story_matches`: the decision's own reason, or ``not_arrived`` and
    what the branch did since (answered late, skipped the row), per ``flt.branch_reason``."""
    cd, st, ro = t.decisions.c, t.step_results.c, t.recorded_outcomes.c
    branch, wanted = str(flt.branch), str(flt.branch_reason)

    def having(reason: str) -> Any:
        combos = sorted({g.missing_json for g in matching if g.missing.get(branch) == reason})
        if len(combos) <= max_in_list:
            return cd.missing_json.in_(combos)
        return _json_missing_condition(engine, replace(flt, branch_reason=reason))

    def answer(*since: Any) -> Any:
        return (
            select(st.row_no)
            .where(
                DECISION_OF_RESULT,
                st.node_id == spec.delivering[branch],
                st.status.in_(_ARRIVALS),
                *since,
            )
            .exists()
        )

    answered = answer(st.recorded_at > cd.decided_at)
    # Lost to its task's end: any answer is a late write (written after that end).
    task_ends = sorted({g.missing[branch] for g in matching if is_task_loss(g.missing.get(branch, ""))})
    if is_task_loss(wanted):
        return and_(having(wanted), ~answer())
    skipped = (
        select(ro.outcome_id)
        .where(
            ro.token_id == row_id_of(cd) + f":b:{branch}",
            ro.outcome == TokenOutcome.SKIPPED.value,
            ro.is_terminal,
        )
        .exists()
    )
    if wanted == NOT_ARRIVED:
        return and_(having(NOT_ARRIVED), ~answered, ~skipped)
    if wanted == SKIPPED_DECIDED:
        since = and_(having(NOT_ARRIVED), ~answered, skipped)
    else:
        decision = DecisionStatus.MERGED if wanted == LATE_AFTER_MERGE else DecisionStatus.FAILED
        late_writes = [and_(having(end), answer()) for end in task_ends]
        since = and_(or_(and_(having(NOT_ARRIVED), answered), *late_writes), cd.decision == decision.value)
    return or_(having(wanted), since)


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
) -> DecisionPage:
    """One page of a coalesce's decided rows, in (chunk, row key) order, with the filter's total."""
    limit, offset = _page_bounds(limit, offset)
    ref = ref or coalesce_ref(engine, run_id, node_id)
    groups = _scan(ref)[0]
    story = flt.branch is not None and _is_story_reason(flt.branch_reason)
    if story:
        matching, total = _story_matches(ref, groups, flt)
    else:
        matching = [g for g in groups if flt.matches(g)]
        total = sum(g.rows for g in matching)
    rows: list[DecisionRecord] = []
    if total and offset < total:
        cd, sr = t.decisions.c, t.source_rows.c
        conditions = []
        if flt.decision is not None:
            conditions.append(cd.decision == flt.decision)
        if flt.reason is not None:
            conditions.append(cd.failure_reason == flt.reason)
        if story:
            conditions.append(_story_condition(engine, ref.spec, flt, matching, max_in_list))
        elif flt.branch is not None:
            # The groups say which missing-branch combinations match: filter on those exact texts.
            combos = sorted({g.missing_json for g in matching})
            if len(combos) <= max_in_list:
                conditions.append(cd.missing_json.in_(combos))
            else:
                conditions.append(_json_missing_condition(engine, flt))
        if flt.late:
            conditions.append(cd.late_json != "[]")
        with engine.connect() as conn:
            run = _run(conn, run_id)
            query = (
                decision_rows_of(run, ref.spec)
                .where(*conditions)
                .order_by(cd.chunk, sr.row_key)
                .limit(limit)
                .offset(offset)
            )
            found = list(conn.execute(query).mappings())
            since = _rows_after_decision(conn, ref.spec, run_id, [row["row_id"] for row in found])
            rows = [
                DecisionRecord.from_row(row, missing=_missing_now(since, row["row_id"], row["missing_json"]))
                for row in found
            ]
    return DecisionPage(filter=flt.as_dict(), total=total, limit=limit, offset=offset, rows=rows)


def late_arrivals(
    engine: Engine,
    audit_run: AuditRunView,
    node_id: str,
    *,
    limit: int = PAGE_SIZE,
    offset: int = 0,
    ref: CoalesceRef | None = None,
) -> LateArrivalsPage:
    """Arrivals after their row's decision: never merged, always recorded.

    ``rows`` pages the rows whose decision recorded a late branch (with each late branch's arrival
    time); ``after_write`` lists arrivals that came after the decision was even written.
    """
    run_id = audit_run.audit_run_id
    ref = ref or coalesce_ref(engine, run_id, node_id)
    spec = ref.spec
    page = decision_rows(
        engine, run_id, node_id, RowFilter(decision=None, late=True), limit=limit, offset=offset, ref=ref
    )
    arrived: dict[tuple[str, str], datetime] = {}
    if page.rows:
        st, sr = t.step_results.c, t.source_rows.c
        branch_of = {node: branch for branch, node in spec.delivering.items()}
        wanted = {row.row_key for row in page.rows}
        with engine.connect() as conn:
            for row_key, node, at in conn.execute(
                select(sr.row_key, st.node_id, func.min(st.recorded_at))
                .select_from(t.step_results.join(t.source_rows, of_source_row(t.step_results)))
                .where(
                    st.run_no == run_number(conn, run_id),
                    st.node_id.in_(list(branch_of)),
                    st.chunk.in_(sorted({row.chunk for row in page.rows})),
                    st.status.in_(_ARRIVALS),
                    sr.row_key.in_(sorted(wanted)),
                )
                .group_by(sr.row_key, st.node_id)
            ):
                arrived[(row_key, branch_of[node])] = at
    rows = [
        LateDecision.extending(
            row,
            late_arrivals=[
                LateArrival(
                    branch=branch,
                    arrived_at=arrived.get((row.row_key, branch)),
                    after_decision_s=(
                        (arrived[(row.row_key, branch)] - row.decided_at).total_seconds()
                        if (row.row_key, branch) in arrived
                        else None
                    ),
                )
                for branch in row.late
            ],
        )
        for row in page.rows
    ]
    after = _after_write(ref)
    return LateArrivalsPage(
        total_rows=page.total,
        limit=page.limit,
        offset=page.offset,
        rows=rows,
        after_write=after[:MAX_PAGE_SIZE],
        after_write_total=len(after),
    )
