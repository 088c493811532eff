"""Replay and verify: a stored decision against the replay of its stored event log, and every
integrity finding of ``airflow-elspeth verify``.

**One notion of the replay moment.** A decision is replayed as it stood when it was made:

* a policy decision from the whole stored log with the clock at its ``recorded_at`` (the deciding
  pass's clock), and must come out the same (decision, failure reason, consumed branches, time);
* a resolution (``coalesce_task_<state>``, written when the coalesce task ended first) is no policy
  outcome: it is replayed from the events stamped up to its ``decided_at``, with the clock there,
  and must still be pending (the row really was undecidable when it was resolved).

``explain`` (CLI), the row page and its JSON API, and ``verify`` all replay through
:func:`replay_stored`; ``verify``'s findings (limbo, orphan token parents, broken derived lineage
links, replay disagreements, decidable resolutions) all come from :func:`verify_run`. Nothing here
writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    and_,
    case,
    func,
    null,
    or_,
    select,
    true,
    union,
)

from airflow_elspeth.audit import ids
from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.log import (
    TokenState,
    arrival_bodies,
    collision_check,
    late_writes,
    read_chunk_log,
    row_events,
)
from airflow_elspeth.audit.model import CoalesceSpec, RunInfo, deadline_of, load_run, run_number
from airflow_elspeth.audit.read.decisions import whole_run_reads
from airflow_elspeth.audit.read.events import of_source_row
from airflow_elspeth.audit.read.limbo import LIMBO_EXAMPLES, TaskStates, limbo_findings
from airflow_elspeth.audit.read.records import (
    AuditRun,
    BranchParentsMissing,
    ConsumedTokensMissing,
    DecidableResolution,
    DecidableResolutions,
    DecisionFields,
    DecisionsDifferFromReplay,
    Difference,
    Finding,
    MergedTokensMissing,
    MergedTokensWithoutDecision,
    OrphanParents,
    ReplayFinding,
    ReplayMismatch,
    RowReplayT,
    SourceTokensMissing,
    to_json,
)
from airflow_elspeth.audit.read.runs import coalesce_nodes, coalesce_specs
from airflow_elspeth.audit.read.sql import json_list_elements
from airflow_elspeth.core.policy import BranchEvent, CollisionCheck, Decision, order_events, replay
from airflow_elspeth.core.vocabulary import (
    ARRIVAL_NODE_STATUSES,
    DecisionStatus,
    RunStatus,
    is_resolution,
    resolution_task_state,
)

FINDING_EXAMPLES = LIMBO_EXAMPLES
# Nested-fork parents looked up per statement (``orphan_parents``).
PARENT_PAGE = 500

# What "agrees" compares, in this order. The arrival record is compared only where it was stored
# (decisions written before schema revision 0003 have none).
COMPARED = (
    "decision",
    "failure_reason",
    "consumed",
    "decided_at",
    "arrival_order",
    "wait_from_first_arrival_ms",
)


ARRIVAL_RECORD = ("arrival_order", "wait_from_first_arrival_ms")


def decision_fields(decision: Decision) -> DecisionFields:
    """The compared fields of a replayed decision (its arrival record as a decision stores it)."""
    return DecisionFields(
        decision=decision.status.value,
        decided_at=decision.decided_at,
        consumed=list(decision.consumed),
        failure_reason=decision.failure_reason.value if decision.failure_reason else None,
        arrival_order=[{"branch": a.branch, "offset_ms": a.offset_ms} for a in decision.arrival_order],
        wait_from_first_arrival_ms=decision.wait_from_first_arrival_ms,
    )


def stored_fields(stored: Mapping[str, Any]) -> DecisionFields:
    """The compared fields of a stored ``coalesce_decisions`` row (``consumed`` parsed); the arrival
    record is None where it was not stored."""
    consumed = stored["consumed"]
    details = _details(stored)
    recorded = "arrival_order" in details
    return DecisionFields(
        decision=stored["decision"],
        decided_at=stored["decided_at"],
        consumed=json.loads(consumed) if isinstance(consumed, str) else list(consumed),
        failure_reason=stored["failure_reason"],
        arrival_order=details["arrival_order"] if recorded else None,
        wait_from_first_arrival_ms=stored.get("wait_from_first_arrival_ms") if recorded else None,
    )


def _details(stored: Mapping[str, Any]) -> dict[str, Any]:
    try:
        details = json.loads(stored.get("details_json") or "{}")
    except ValueError:
        return {}
    return details if isinstance(details, dict) else {}


def resolved_task_state(stored: Mapping[str, Any]) -> str:
    """The state the coalesce task ended in, for a resolution (from its details, else its reason)."""
    state = _details(stored).get("coalesce_task_state")
    return str(state or resolution_task_state(str(stored["failure_reason"])))


@dataclass(frozen=True)
class Replay:
    """One stored decision replayed from its stored event log, at the decision's own moment."""

    coalesce: str
    row_key: str
    resolution: bool
    stored: DecisionFields  # stored_fields() of the stored decision
    replayed: Decision
    events: list[BranchEvent]  # the whole stored log, in log order (also what came after)
    deadline: datetime
    moment: datetime  # the clock of the replay: recorded_at, or a resolution's decided_at
    task_state: str | None  # a resolution's coalesce task state
    # What branch tasks wrote after their recorded loss (``audit.log.late_writes``): late,
    # never in the log.
    late_writes: Sequence[BranchEvent] = ()

    @property
    def replayed_record(self) -> DecisionFields:
        """The replayed decision's compared fields, as :attr:`stored` holds the stored one's."""
        return decision_fields(self.replayed)

    @property
    def replayed_fields(self) -> dict[str, Any]:
        """:attr:`replayed_record` as plain values (what the row page and ``explain`` show)."""
        fields: dict[str, Any] = to_json(self.replayed_record)
        return fields

    @property
    def differences(self) -> dict[str, Difference]:
        """Field -> its recorded and replayed value, where a policy decision and its replay differ
        (a resolution has none: it is judged by :attr:`undecidable_then`)."""
        if self.resolution:
            return {}
        got = self.replayed_record
        unrecorded = self.stored.arrival_order is None
        differences = {
            k: Difference(recorded=getattr(self.stored, k), replayed=getattr(got, k)) for k in COMPARED
        }
        return {
            k: d
            for k, d in differences.items()
            if d.recorded != d.replayed and not (unrecorded and k in ARRIVAL_RECORD)
        }

    @property
    def undecidable_then(self) -> bool:
        """For a resolution: the log up to it left the row pending."""
        return self.replayed.status is DecisionStatus.PENDING

    @property
    def agrees(self) -> bool:
        return self.undecidable_then if self.resolution else not self.differences


def replay_stored(
    spec: CoalesceSpec,
    run: RunInfo,
    stored: Mapping[str, Any],
    events: Sequence[BranchEvent],
    collisions: CollisionCheck | None = None,
    late: Sequence[BranchEvent] = (),
) -> Replay:
    """Replay a stored decision (a ``coalesce_decisions`` row) from its row's stored ``events``.

    :param collisions: the row's collision check (``audit.log.collision_check``) when
        ``on_collision="fail_row"`` makes the decision depend on the stored outputs.
    :param late: the row's late writes (``audit.log.late_writes``), shown beside the log.
    :raises ValueError: the run's fork never completed (no deadline).
    """
    deadline = deadline_of(run, spec.config)
    resolution = is_resolution(stored["failure_reason"])
    if resolution:
        moment = stored["decided_at"]
        replayed = replay(spec.config, [e for e in events if e.at <= moment], deadline=deadline, now=moment)
    else:
        moment = stored["recorded_at"]
        replayed = replay(spec.config, events, deadline=deadline, now=moment, collisions=collisions)
    return Replay(
        coalesce=spec.node_id,
        row_key=stored["row_key"],
        resolution=resolution,
        stored=stored_fields(stored),
        replayed=replayed,
        events=order_events(spec.config, events),
        deadline=deadline,
        moment=moment,
        task_state=resolved_task_state(stored) if resolution else None,
        late_writes=sorted(late, key=lambda e: e.at),
    )


def replay_row(engine: Engine, spec: CoalesceSpec, run: RunInfo, stored: Mapping[str, Any]) -> Replay:
    """Read one decided row's stored event log and replay its stored decision."""
    with engine.connect() as conn:
        _, states, losses = read_chunk_log(
            conn, spec, run.run_id, stored["chunk"], undecided_only=False, row_ids=[stored["row_id"]]
        )
        bodies = arrival_bodies(spec.config, states)
    return _replay_of(spec, run, stored, states.get(stored["row_id"], {}), losses, bodies)


def _replay_of(
    spec: CoalesceSpec,
    run: RunInfo,
    stored: Mapping[str, Any],
    row: Mapping[str, TokenState],
    losses: Mapping[str, tuple[str, datetime]],
    bodies: Mapping[str, Any],
) -> Replay:
    as_of = stored["recorded_at"]  # what the deciding pass could see (a 0.1 coalesce's rule needs it)
    return replay_stored(
        spec,
        run,
        stored,
        row_events(spec, row, losses, as_of=as_of),
        collision_check(spec.config, row, bodies),
        late_writes(spec, row, losses, as_of=as_of),
    )


def replay_coalesce(engine: Engine, spec: CoalesceSpec, run: RunInfo) -> Iterator[Replay]:
    """Every stored decision of a coalesce replayed, chunk by chunk (one log read per chunk)."""
    cd = t.coalesce_decisions.c
    for chunk in range(run.chunks_total):
        with engine.connect() as conn:
            _, states, losses = read_chunk_log(conn, spec, run.run_id, chunk, undecided_only=False)
            bodies = arrival_bodies(spec.config, states)
            stored: Sequence[Any] = (
                conn.execute(
                    select(t.coalesce_decisions)
                    .where(cd.run_id == run.run_id, cd.node_id == spec.node_id, cd.chunk == chunk)
                    .order_by(cd.row_key)
                )
                .mappings()
                .all()
            )
        for decision in stored:
            yield _replay_of(spec, run, decision, states.get(decision["row_id"], {}), losses, bodies)


# --------------------------------------------------------------------------------------------------
# verify


def verify_run(engine: Engine, run: AuditRun, *, task_states: TaskStates | None = None) -> list[Finding]:
    """Integrity findings of one audit run; empty when everything holds.

    One finding per kind (:class:`~airflow_elspeth.audit.read.records.FindingCheck`), with a
    ``count`` and a few ``examples``: limbo (see
    :func:`~airflow_elspeth.audit.read.limbo.limbo_findings`), orphan token parents, the broken
    derived lineage links of a completed run (:func:`derived_link_findings`), policy decisions
    that differ from the replay of their stored log (``decision_replay``), and resolutions of rows
    that were decidable when resolved (``resolution_decidable``).
    """
    run_id = run.audit_run_id
    findings = limbo_findings(engine, [run], task_states=task_states)
    orphan = orphan_parents(engine, run_id)
    if orphan is not None:
        findings.append(orphan)
    if run.status == RunStatus.COMPLETED:  # a failed run's rows and tokens are gone by design
        findings.extend(derived_link_findings(engine, run_id))
    with engine.connect() as conn:
        info = load_run(conn, run_id)
    if info is None or info.completed_at is None:
        return findings
    mismatches: list[ReplayMismatch] = []
    decidable: list[DecidableResolution] = []
    for spec in coalesce_nodes(engine, run_id):
        for replayed in replay_coalesce(engine, spec, info):
            if replayed.agrees:
                continue
            if replayed.resolution:
                decidable.append(
                    DecidableResolution(
                        coalesce=replayed.coalesce,
                        row_key=replayed.row_key,
                        # A resolution always has its coalesce_task_<state> reason.
                        resolution=str(replayed.stored.failure_reason),
                        decided_at=replayed.moment,  # a resolution is replayed at its decided_at
                        replayed=replayed.replayed_record,
                    )
                )
            else:
                mismatches.append(
                    ReplayMismatch(
                        coalesce=replayed.coalesce,
                        row_key=replayed.row_key,
                        stored=replayed.stored,
                        replayed=replayed.replayed_record,
                    )
                )
    if mismatches:
        findings.append(_aggregate(DecisionsDifferFromReplay, run_id, mismatches))
    if decidable:
        findings.append(_aggregate(DecidableResolutions, run_id, decidable))
    return findings


def _aggregate(
    kind: type[ReplayFinding[RowReplayT]], run_id: str, items: list[RowReplayT]
) -> ReplayFinding[RowReplayT]:
    """One finding for many rows: their count, per coalesce, and the first few in full."""
    per_coalesce: dict[str, int] = {}
    for item in items:
        per_coalesce[item.coalesce] = per_coalesce.get(item.coalesce, 0) + 1
    return kind(
        run_id=run_id,
        count=len(items),
        examples=[item.row_key for item in items[:FINDING_EXAMPLES]],
        coalesces=per_coalesce,
        details=items[:FINDING_EXAMPLES],
    )


def orphan_parents(engine: Engine, run_id: str) -> OrphanParents | None:
    """The run's stored token parents (a nested fork's source row -> the upstream merged token,
    ``source_rows.parent_token_id``) that name no merged token: not a merged token's id, or one of
    a row no coalesce merged (a merged token exists exactly while its merged decision does).

    The ids are parsed and their decisions looked up by key (the run's number, the coalesce, the
    row's number), pages of :data:`PARENT_PAGE` rows a statement: nothing indexes the views' computed
    token ids, and the view ``tokens`` would be searched whole for each link.
    """
    sr, d = t.source_rows.c, t.decisions.c
    with engine.connect() as conn:
        run_no = run_number(conn, run_id)
        links = conn.execute(
            select(sr.row_no, sr.parent_token_id)
            .where(sr.run_no == run_no, sr.parent_token_id.is_not(None))
            .order_by(sr.chunk, sr.row_no)
        ).all()
        named: dict[tuple[int, str], set[int]] = {}
        for link in links:
            parent = _merged_token_key(link.parent_token_id)
            if parent is not None:
                named.setdefault(parent[:2], set()).add(parent[2])
        merged: set[tuple[int, str, int]] = set()
        for (upstream, coalesce), row_nos in named.items():
            wanted = sorted(row_nos)
            for start in range(0, len(wanted), PARENT_PAGE):
                merged.update(
                    (upstream, coalesce, row_no)
                    for row_no in conn.execute(
                        select(d.row_no).where(
                            d.run_no == upstream,
                            d.node_id == coalesce,
                            d.decision == DecisionStatus.MERGED.value,
                            d.row_no.in_(wanted[start : start + PARENT_PAGE]),
                        )
                    ).scalars()
                )
    orphans = [link for link in links if _merged_token_key(link.parent_token_id) not in merged]
    if not orphans:
        return None
    examples = orphans[:FINDING_EXAMPLES]
    return OrphanParents(
        run_id=run_id,
        count=len(orphans),
        examples=[ids.source_token_id(ids.row_id(run_no, x.row_no)) for x in examples],
        missing_parents=[x.parent_token_id for x in examples],
    )


def _merged_token_key(token_id: str) -> tuple[int, str, int] | None:
    """(run number, coalesce, row number) of a merged token id, or None for a string that is no
    such id (a stored parent may be anything)."""
    try:
        row, coalesce = ids.merged_token_of(token_id)
    except ValueError:
        return None
    run_no, row_no = ids.row_numbers(row)
    return run_no, coalesce, row_no


def derived_link_findings(engine: Engine, run_id: str) -> list[Finding]:
    """The lineage links of a completed run that do not hold, one finding per kind.

    In schema 0.2 a token exists exactly while the event it comes from does: a row's source token
    and its branch tokens (one per branch of ``runs.branches_json``) while its ``source_rows`` row
    does, a merged token while its merged decision does. So the links that can break are those
    between events, and each check reads the event tables themselves (a check through the views,
    which derive tokens from the same rows, could never fail):

    * ``source_token_missing``: rows that step results or decisions name, without their source row
      (examples: row ids, their keys went with the row);
    * ``branch_parent_missing``: branch tokens with step results whose row is gone;
    * ``consumed_token_missing``: branches a merged decision consumed that did not arrive (no
      completed or discarded result at the coalesce's delivering step of that branch, or no branch
      of the coalesce at all);
    * ``merged_token_missing``: merged decisions without their merged row (``merged_hash`` and
      ``merged_body``), the merged token's payload;
    * ``merged_token_without_decision``: merged rows stored with a decision that did not merge.

    Each check is one anti-join or filter over the run (hash-join shaped on PostgreSQL:
    ``whole_run_reads``), counted and its first :data:`FINDING_EXAMPLES` read in the same statement.
    """
    with whole_run_reads(engine) as conn:
        run_no = run_number(conn, run_id)
        found = [
            _rows_without_source(conn, run_id, run_no),
            _results_without_row(conn, run_id, run_no),
            _consumed_without_arrival(conn, run_id, run_no),
            _merged_without_row(conn, run_id, run_no),
            _merged_rows_without_merge(conn, run_id, run_no),
        ]
    return [finding for finding in found if finding is not None]


def _rows_without_source(conn: Connection, run_id: str, run_no: int) -> SourceTokensMissing | None:
    sr = t.source_rows.c
    gone = union(
        *(
            select(event.c.chunk, event.c.row_no)
            .select_from(event.outerjoin(t.source_rows, of_source_row(event)))
            .where(event.c.run_no == run_no, sr.row_no.is_(None))
            for event in (t.step_results, t.decisions)
        )
    ).subquery("gone")
    count, rows = _first(conn, select(gone.c.chunk, gone.c.row_no), gone.c.chunk, gone.c.row_no)
    if not count:
        return None
    return SourceTokensMissing(
        run_id=run_id, count=count, examples=[ids.row_id(run_no, x.row_no) for x in rows]
    )


def _results_without_row(conn: Connection, run_id: str, run_no: int) -> BranchParentsMissing | None:
    sr, st, n = t.source_rows.c, t.step_results.c, t.nodes.c
    tokens = (
        select(st.chunk, st.row_no, n.branch_name)
        .distinct()
        .select_from(
            t.step_results.join(t.nodes, and_(n.run_id == run_id, n.node_id == st.node_id)).outerjoin(
                t.source_rows, of_source_row(t.step_results)
            )
        )
        .where(st.run_no == run_no, n.branch_name.is_not(None), sr.row_no.is_(None))
        .subquery("orphan_results")
    )
    count, found = _first(
        conn,
        select(tokens.c.row_no, tokens.c.branch_name),
        tokens.c.chunk,
        tokens.c.row_no,
        tokens.c.branch_name,
    )
    if not count:
        return None
    return BranchParentsMissing(
        run_id=run_id,
        count=count,
        examples=[ids.branch_token_id(ids.row_id(run_no, x.row_no), x.branch_name) for x in found],
        rows=[None] * len(found),  # the row is gone, its key with it
        branches=[x.branch_name for x in found],
    )


def _consumed_without_arrival(conn: Connection, run_id: str, run_no: int) -> ConsumedTokensMissing | None:
    sr, d = t.source_rows.c, t.decisions.c
    consumed = json_list_elements(conn.engine, d.consumed)
    # (coalesce, branch) -> the step that delivers that branch to that coalesce.
    delivering = {
        (spec.node_id, branch): step
        for spec in coalesce_specs(conn, run_id)
        for branch, step in spec.delivering.items()
    }
    step: ColumnElement[Any] = (
        case(
            *(
                (and_(d.node_id == coalesce, consumed.c.value == branch), node)
                for (coalesce, branch), node in delivering.items()
            )
        )
        if delivering
        else null()
    )
    arrival = t.step_results.alias("arrival")
    count, gone = _first(
        conn,
        select(sr.row_key, d.node_id, consumed.c.value.label("branch"))
        .select_from(
            t.decisions.join(t.source_rows, of_source_row(t.decisions))  # a row that is gone: see above
            .join(consumed, true())
            .outerjoin(
                arrival,
                and_(
                    arrival.c.run_no == d.run_no,
                    arrival.c.chunk == d.chunk,
                    arrival.c.row_no == d.row_no,
                    arrival.c.node_id == step,
                    arrival.c.status.in_([s.value for s in ARRIVAL_NODE_STATUSES]),
                ),
            )
        )
        .where(d.run_no == run_no, d.decision == DecisionStatus.MERGED.value, arrival.c.row_no.is_(None)),
        d.chunk,
        d.row_no,
        d.node_id,
        consumed.c.value,
    )
    if not count:
        return None
    return ConsumedTokensMissing(
        run_id=run_id,
        count=count,
        examples=[x.row_key for x in gone],
        coalesces=[x.node_id for x in gone],
        branches=[x.branch for x in gone],
    )


def _merged_without_row(conn: Connection, run_id: str, run_no: int) -> MergedTokensMissing | None:
    sr, d = t.source_rows.c, t.decisions.c
    count, decisions = _first(
        conn,
        select(sr.row_key, d.row_no, d.node_id)
        .select_from(t.decisions.join(t.source_rows, of_source_row(t.decisions)))
        .where(
            d.run_no == run_no,
            d.decision == DecisionStatus.MERGED.value,
            or_(d.merged_hash.is_(None), d.merged_body.is_(None)),
        ),
        d.chunk,
        d.row_no,
        d.node_id,
    )
    if not count:
        return None
    return MergedTokensMissing(
        run_id=run_id,
        count=count,
        examples=[x.row_key for x in decisions],
        coalesces=[x.node_id for x in decisions],
        merged_token_ids=[ids.merged_token_id(ids.row_id(run_no, x.row_no), x.node_id) for x in decisions],
    )


def _merged_rows_without_merge(
    conn: Connection, run_id: str, run_no: int
) -> MergedTokensWithoutDecision | None:
    sr, d = t.source_rows.c, t.decisions.c
    count, decisions = _first(
        conn,
        select(sr.row_key, d.row_no, d.node_id)
        .select_from(t.decisions.outerjoin(t.source_rows, of_source_row(t.decisions)))
        .where(
            d.run_no == run_no,
            d.decision != DecisionStatus.MERGED.value,
            or_(d.merged_hash.is_not(None), d.merged_body.is_not(None)),
        ),
        d.chunk,
        d.row_no,
        d.node_id,
    )
    if not count:
        return None
    return MergedTokensWithoutDecision(
        run_id=run_id,
        count=count,
        examples=[ids.merged_token_id(ids.row_id(run_no, x.row_no), x.node_id) for x in decisions],
        rows=[x.row_key for x in decisions],
    )


def _first(conn: Connection, query: Select[Any], *order_by: Any) -> tuple[int, Sequence[Row[Any]]]:
    """How many rows ``query`` finds and the first :data:`FINDING_EXAMPLES` of them in ``order_by``,
    in one statement (the count is a window over every row, taken before the limit)."""
    found = query.add_columns(func.count().over().label("found"))
    first = conn.execute(found.order_by(*order_by).limit(FINDING_EXAMPLES)).all()
    return (first[0].found if first else 0), first
