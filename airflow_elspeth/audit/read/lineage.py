"""One row, from source to decision: its lineage (tokens, node states, outcomes, decisions), what a
person reads about it (the row page, ``airflow-elspeth explain``) and each decision replayed from
its stored event log (through :mod:`airflow_elspeth.audit.read.verify`). Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, or_, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.ids import row_numbers
from airflow_elspeth.audit.model import CoalesceSpec, RunInfo
from airflow_elspeth.audit.read.records import (
    AuditRunView,
    DecisionRecord,
    ExplainedReplay,
    Explanation,
    LogEvent,
    NodeStateRecord,
    OutcomeRecord,
    ReplayedDecision,
    RowDecision,
    RowLineage,
    RowView,
    StoredRow,
    SupersededDecision,
    TokenRecord,
    from_columns,
)
from airflow_elspeth.audit.read.runs import coalesce_spec, run_info
from airflow_elspeth.audit.read.verify import COMPARED, Replay, replay_row
from airflow_elspeth.core.config import CoalesceConfig
from airflow_elspeth.core.policy import BranchEvent, EventKind
from airflow_elspeth.core.vocabulary import (
    NOT_ARRIVED,
    SKIP_LABEL,
    SKIPPED_DECIDED,
    DecisionStatus,
    FailureReason,
    NodeType,
    ReasonKind,
    TokenKind,
    TokenOutcome,
    answered_since,
    collision_rule_text,
    failure_reason_text,
    is_resolution,
    is_task_loss,
    missing_reason_text,
    outcome_label,
    policy_text,
    reason_kind,
    resolution_task_state,
)
from airflow_elspeth.exceptions import NotFound

# The event kind of a late write in the row page's and explain's replay views (not stored): a state
# a branch task wrote after its recorded end, shown beside the log it is not part of.
LATE_WRITE = "late_write"


def row_lineage(engine: Engine, run_id: str, row_key: str) -> RowLineage:
    """One row: its source payload, every token with its parents, node states and outcomes, and its
    decisions.

    ``decisions`` are the current ones; ``superseded_decisions`` the resolutions a later coalesce
    try replaced. A token's ``outcomes`` are its terminal one and any superseded ones.

    :raises NotFound: no such row in the run.
    """
    return _read_lineage(engine, run_id, row_key)[0]


def _read_lineage(engine: Engine, run_id: str, row_key: str) -> tuple[RowLineage, list[dict[str, Any]]]:
    """:func:`row_lineage`, and its decisions as stored (what a replay reads)."""
    with engine.connect() as conn:
        row = (
            conn.execute(select(t.rows).where(t.rows.c.run_id == run_id, t.rows.c.row_key == row_key))
            .mappings()
            .first()
        )
        if row is None:
            raise NotFound(f"no row {row_key!r} in audit run {run_id}")
        row_id = row["row_id"]
        run_no, row_no = row_numbers(row_id)
        # Bodies are read with their events by key; the views are read within the row's chunk (a
        # key prefix of the events), never searched by a computed id across the store.
        sr, st, d = t.source_rows.c, t.step_results.c, t.decisions.c
        in_row = [sr.run_no == run_no, sr.chunk == row["chunk"], sr.row_no == row_no]
        source = conn.execute(select(sr.body).where(*in_row)).scalar()
        tokens = [
            dict(x)
            for x in conn.execute(
                select(t.tokens).where(
                    t.tokens.c.run_id == run_id, t.tokens.c.chunk == row["chunk"], t.tokens.c.row_id == row_id
                )
            ).mappings()
        ]
        token_ids = [tok["token_id"] for tok in tokens]
        states = defaultdict(list)
        ns = t.node_states.c
        for state in conn.execute(
            select(t.node_states)
            .where(ns.run_id == run_id, ns.chunk == row["chunk"], ns.token_id.in_(token_ids))
            .order_by(ns.started_at)
        ).mappings():
            states[state["token_id"]].append(from_columns(NodeStateRecord, state))
        outcomes = defaultdict(list)
        to = t.token_outcomes.c
        for outcome in conn.execute(
            select(t.token_outcomes)
            # Terminal outcomes, and those a later coalesce try superseded (no longer terminal: each
            # says which by ``is_terminal`` / ``superseded_at``).
            .where(
                to.run_id == run_id,
                to.token_id.in_(token_ids),
                or_(to.is_terminal, to.superseded_at.is_not(None)),
            )
            .order_by(to.recorded_at)
        ).mappings():
            outcomes[outcome["token_id"]].append(from_columns(OutcomeRecord, outcome))
        tp = t.token_parents.c
        # The one stored link: a nested fork's source token -> the upstream merged token.
        stored_parents = defaultdict(list)
        for token_id, parent in conn.execute(
            select(tp.token_id, tp.parent_token_id).where(tp.token_id.in_(token_ids)).order_by(tp.ordinal)
        ):
            stored_parents[token_id].append(parent)
        stored = [
            dict(d)
            for d in conn.execute(
                select(t.coalesce_decisions).where(
                    t.coalesce_decisions.c.run_id == run_id,
                    t.coalesce_decisions.c.chunk == row["chunk"],
                    t.coalesce_decisions.c.row_id == row_id,
                )
            ).mappings()
        ]
        sd = t.superseded_decisions.c
        superseded = [
            SupersededDecision.from_row(d)
            for d in conn.execute(
                select(t.superseded_decisions)
                .where(sd.run_id == run_id, sd.row_id == row_id)
                .order_by(sd.node_id, sd.superseded_at)
            ).mappings()
        ]
        in_chunk = [st.run_no == run_no, st.chunk == row["chunk"], st.row_no == row_no]
        merged = [d.run_no == run_no, d.chunk == row["chunk"], d.row_no == row_no, d.merged_hash.is_not(None)]
        outputs = {
            h: json.loads(b)
            for h, b in [
                *conn.execute(
                    select(st.output_hash, st.output_body).where(*in_chunk, st.output_body.is_not(None))
                ),
                *conn.execute(select(d.merged_hash, d.merged_body).where(*merged)),
            ]
        }
    decisions = [DecisionRecord.from_row(d) for d in stored]
    parents = _parents(tokens, decisions, stored_parents)
    records = [
        from_columns(
            TokenRecord,
            tok,
            parents=parents[tok["token_id"]],
            states=states[tok["token_id"]],
            outcomes=outcomes[tok["token_id"]],
        )
        for tok in tokens
    ]
    lineage = RowLineage(
        row=from_columns(StoredRow, row),
        source=json.loads(source) if source else None,
        tokens=records,
        outputs=outputs,
        decisions=[
            dataclasses.replace(d, missing_since=_since_decision(records, d.missing)) for d in decisions
        ],
        superseded_decisions=superseded,
    )
    return lineage, stored


def _parents(
    tokens: Sequence[Mapping[str, Any]],
    decisions: Sequence[DecisionRecord],
    stored: Mapping[str, list[str]],
) -> dict[str, list[str]]:
    """Token -> its parents: a branch token's is its row's source token, a merged token's the branch
    tokens of its decision's ``consumed`` (in that order), a source token's the stored link of a
    nested fork (docs/ARCHITECTURE.md, ``token_parents``)."""
    source = [tok["token_id"] for tok in tokens if tok["token_kind"] == TokenKind.SOURCE]
    branch_token = {
        tok["branch_name"]: tok["token_id"] for tok in tokens if tok["token_kind"] == TokenKind.BRANCH
    }
    consumed = {d.merged_token_id: d.consumed for d in decisions if d.merged_token_id}
    parents: dict[str, list[str]] = {}
    for tok in tokens:
        token_id, kind = tok["token_id"], tok["token_kind"]
        if kind == TokenKind.BRANCH:
            parents[token_id] = source
        elif kind == TokenKind.MERGED:
            parents[token_id] = [branch_token[b] for b in consumed.get(token_id, []) if b in branch_token]
        else:
            parents[token_id] = stored.get(token_id, [])
    return parents


def _since_decision(tokens: Sequence[TokenRecord], missing: Mapping[str, str]) -> dict[str, str]:
    """Branch -> what it did after the decision saw it ``missing``, where that replaces the reason
    the decision recorded (:func:`~airflow_elspeth.core.vocabulary.answered_since`): its token's
    late or skipped outcome, which replaced the decision's ``not_arrived`` or task-loss outcome."""
    found = {}
    for token in tokens:
        branch = token.branch_name
        if token.token_kind != TokenKind.BRANCH or branch is None or branch not in missing:
            continue
        replaced = any(
            not x.is_terminal
            and (
                x.outcome == TokenOutcome.NOT_ARRIVED
                or (x.outcome == TokenOutcome.LOST and is_task_loss(str(x.reason)))
            )
            for x in token.outcomes
        )
        for o in token.terminal:
            after = str(o.reason)
            if (
                replaced
                and o.outcome in (TokenOutcome.LATE, TokenOutcome.SKIPPED)
                and answered_since(missing[branch], arrived=after != SKIPPED_DECIDED)
            ):
                found[branch] = after
    return found


def row_payload(engine: Engine, run_id: str, row_key: str, payload_hash: str) -> str:
    """One value of a row, as stored (canonical JSON): its source row, or the output of a node state
    of one of its tokens (a merged output included). A hash that is none of the row's values is not
    found, so a value of another DAG run is never served under this one.

    :raises NotFound: no such row in the run, or the hash is none of its values.
    """
    r, tk, ns = t.rows.c, t.tokens.c, t.node_states.c
    with engine.connect() as conn:
        row = conn.execute(
            select(r.row_id, r.payload_ref).where(r.run_id == run_id, r.row_key == row_key)
        ).first()
        if row is None:
            raise NotFound(f"no row {row_key!r} in audit run {run_id}")
        its_value = (
            row.payload_ref == payload_hash
            or conn.execute(
                select(ns.token_id)
                .select_from(t.node_states.join(t.tokens, tk.token_id == ns.token_id))
                .where(tk.run_id == run_id, tk.row_id == row.row_id, ns.output_ref == payload_hash)
                .limit(1)
            ).first()
            is not None
        )
        body = (
            conn.execute(select(t.payloads.c.body).where(t.payloads.c.hash == payload_hash)).scalar()
            if its_value
            else None
        )
    if body is None:
        raise NotFound(f"no value {payload_hash!r} of row {row_key!r} in audit run {run_id}")
    return str(body)


def explain_decision(decision: DecisionRecord, config: CoalesceConfig, deadline: datetime | None) -> str:
    """One paragraph: what was decided, when, and why, in words."""
    details = decision.details
    missing = decision.missing
    consumed = decision.consumed
    at = decision.decided_at
    when = "at the deadline" if deadline is not None and at == deadline else "when the deciding event arrived"
    policy = policy_text(config.policy, len(config.branches), config.quorum)

    def listing(names: Iterable[str]) -> str:
        names = list(names)
        return ", ".join(names) if names else "none"

    lost = {b: r for b, r in missing.items() if reason_kind(r) is ReasonKind.LOSS}
    waiting = [b for b, r in missing.items() if r == NOT_ARRIVED]
    late = [b for b, r in missing.items() if reason_kind(r) is ReasonKind.LATE]
    parts = []
    if is_resolution(decision.failure_reason):
        state = details.get("coalesce_task_state") or resolution_task_state(str(decision.failure_reason))
        parts.append(
            f"Resolved when the coalesce task ended {state}, with the row still undecided under {policy}: "
            "closed as failed so it is never left waiting. This is not a policy outcome."
        )
        parts.append(f"Arrived before the coalesce task ended: {listing(details.get('arrived', []))}.")
    elif decision.decision == DecisionStatus.MERGED:
        parts.append(f"Merged {when} under {policy} (merge={config.merge.value}), from {listing(consumed)}.")
    else:
        reason = decision.failure_reason or ""
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
        if reason == FailureReason.SELECT_BRANCH_NOT_ARRIVED:
            parts.append(
                f"merge=select keeps only {details.get('select_branch')!r}, which was not among the "
                f"merged arrivals ({listing(details.get('consumed', []))}); no other branch is substituted."
            )
        if reason == FailureReason.FIELD_COLLISION:
            clashes = "; ".join(
                f"{name!r} from {listing(branches)}"
                for name, branches in details.get("collisions", {}).items()
            )
            parts.append(
                f"The union of {listing(details.get('consumed', []))} would have merged, but they supplied "
                f"the same fields ({clashes}) and on_collision='fail_row' fails such a row."
            )
    for branch, why in lost.items():
        parts.append(f"{branch} {missing_reason_text(why)}.")
    if waiting:
        parts.append(f"{listing(waiting)} had not arrived when the row was decided.")
    if late:
        parts.append(f"{listing(late)} arrived after the decision (late: recorded, never merged).")
    return " ".join(parts)


def _timeline(replayed: Replay, recorded: DecisionRecord) -> list[dict[str, Any]]:
    """The log as read by a person: events, the deadline and the decision, in replay order, with
    what branch tasks wrote after their recorded end (late writes, never in the log).

    The deadline sorts after every event stamped at or before it (as in the replay), and the
    decision right after the event (or deadline) that made it.
    """
    deadline = replayed.deadline
    consumed = set(recorded.consumed)
    entries = [
        (e.at, 0, i, {"type": "event", **_event_dict(e, deadline, recorded, consumed)})
        for i, e in enumerate(replayed.events)
    ]
    entries += [
        (e.at, 0, len(entries) + i, {"type": "event", **_late_write_dict(e, deadline)})
        for i, e in enumerate(replayed.late_writes)
    ]
    entries.append((deadline, 1, 0, {"type": "deadline", "at": deadline}))
    entries.append(
        (
            recorded.decided_at,
            2,
            0,
            {
                "type": "decision",
                "at": recorded.decided_at,
                "decision": recorded.decision,
                "failure_reason": recorded.failure_reason,
            },
        )
    )
    return [entry for *_, entry in sorted(entries, key=lambda x: (x[0], x[1], x[2]))]


def _is_skip(event: BranchEvent, recorded: DecisionRecord) -> bool:
    """Whether a log event is the end of a branch task that skipped the decided row (it delivered
    nothing, so its end reads as a loss in the log): the skip, shown as the skip."""
    return (
        event.kind is EventKind.LOSS
        and recorded.missing_since.get(event.branch) == SKIPPED_DECIDED
        and is_task_loss(str(event.reason))
    )


def _label(event: BranchEvent, recorded: DecisionRecord) -> str:
    """An event's one label (:func:`~airflow_elspeth.core.vocabulary.outcome_label`)."""
    return SKIP_LABEL if _is_skip(event, recorded) else outcome_label(event.kind.value, event.reason)


def _event_dict(
    event: BranchEvent, deadline: datetime, recorded: DecisionRecord, consumed: set[str]
) -> dict[str, Any]:
    if event.kind is EventKind.ARRIVAL:
        note = (
            "consumed"
            if event.branch in consumed
            else ("late" if event.at > recorded.decided_at else "arrived")
        )
    else:
        note = TokenOutcome.SKIPPED.value if _is_skip(event, recorded) else "lost"
    return {
        "branch": event.branch,
        "at": event.at,
        "kind": event.kind.value,
        "reason": event.reason,
        "label": _label(event, recorded),
        "after_deadline": event.at > deadline,
        "note": note,
    }


def _late_write_dict(event: BranchEvent, deadline: datetime) -> dict[str, Any]:
    """A state its branch task wrote after its recorded end: kept, late, never in the log."""
    return {
        "branch": event.branch,
        "at": event.at,
        "kind": LATE_WRITE,
        "reason": event.reason,
        "label": outcome_label(event.kind.value, event.reason),
        "after_deadline": event.at > deadline,
        "note": "late",
    }


def _error_of(error_json: str | None) -> dict[str, Any] | None:
    if not error_json:
        return None
    try:
        error = json.loads(error_json)
    except ValueError:
        return {"type": "?", "message": error_json}
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


def row_view(engine: Engine, audit_run: AuditRunView, row_key: str) -> RowView:
    """One row from source to decision: the source row, the fork, each branch's node states in step
    order (timing, errors, outputs), the terminal outcome of each token, every coalesce decision with
    its explanation and a replay of its event log, and the merged output."""
    run_id = audit_run.audit_run_id
    lineage, stored = _read_lineage(engine, run_id, row_key)
    run = run_info(engine, run_id)
    n = t.nodes.c
    with engine.connect() as conn:
        node_rows = conn.execute(
            select(n.node_id, n.node_type, n.branch_name, n.config_json).where(n.run_id == run_id)
        ).all()
    steps = {
        node_id: {**json.loads(config_json), "branch": branch}
        for node_id, node_type, branch, config_json in node_rows
        if node_type == NodeType.BRANCH
    }
    coalesce_configs = {
        node_id: json.loads(config_json)
        for node_id, node_type, _, config_json in node_rows
        if node_type == NodeType.COALESCE
    }
    tokens = lineage.tokens
    source = next((tok for tok in tokens if tok.token_kind == TokenKind.SOURCE), None)
    branches = []
    for branch in audit_run.branches:
        token = next(
            (tok for tok in tokens if tok.token_kind == TokenKind.BRANCH and tok.branch_name == branch),
            None,
        )
        if token is None:
            continue
        order = _chain(steps, branch)
        states = sorted(
            token.states,
            key=lambda s: (order.index(s.node_id) if s.node_id in order else len(order), s.attempt),
        )
        terminal = next(iter(token.terminal), None)
        branches.append(
            {
                "branch": branch,
                "token_id": token.token_id,
                "steps": order,
                "states": [
                    {
                        "node_id": s.node_id,
                        "attempt": s.attempt,
                        "status": s.status,
                        "started_at": s.started_at,
                        "completed_at": s.completed_at,
                        "recorded_at": s.recorded_at,
                        "duration_ms": s.duration_ms,
                        "error": _error_of(s.error_json),
                        "context": json.loads(s.context_json) if s.context_json else None,
                        "output": lineage.output_of(s),
                        "output_ref": s.output_ref,
                    }
                    for s in states
                ],
                "missing_steps": [step for step in order if step not in {s.node_id for s in states}],
                "outcome": terminal.outcome if terminal else None,
                "outcome_reason": terminal.reason if terminal else None,
                "outcomes": token.outcomes,
                # Outcomes of a resolution a later coalesce try replaced: shown, never terminal.
                "superseded_outcomes": token.superseded,
            }
        )
    decisions = []
    for record, d in zip(lineage.decisions, stored, strict=True):
        merged = next((tok for tok in tokens if tok.token_id == record.merged_token_id), None)
        merged_state = merged.states[0] if merged and merged.states else None
        merged_ref = merged_state.output_ref if merged_state else None
        merged_output = lineage.output_of(merged_state) if merged_state else None
        config_data = coalesce_configs.get(record.coalesce)
        if config_data is None:
            decisions.append(
                RowDecision.extending(record, merged_output=merged_output, merged_output_ref=merged_ref)
            )
            continue
        spec = CoalesceSpec.from_dict(config_data)
        config = spec.config
        deadline = audit_run.completed_at + config.timeout if audit_run.completed_at is not None else None
        decisions.append(
            RowDecision.extending(
                record,
                merged_output=merged_output,
                merged_output_ref=merged_ref,
                policy_text=policy_text(config.policy, len(config.branches), config.quorum),
                collision_rule=collision_rule_text(config.on_collision),
                deadline=deadline,
                explanation=explain_decision(record, config, deadline),
                replay=_replay_view(engine, spec, run, d, record),
            )
        )
    decisions.sort(key=lambda d: d.coalesce)
    return RowView(
        audit_run_id=run_id,
        row_key=lineage.row.row_key,
        row_index=lineage.row.row_index,
        chunk=lineage.row.chunk,
        source=lineage.source,
        source_hash=lineage.row.source_hash,
        fork={
            "task_id": audit_run.fork_task_id,
            "token_id": source.token_id if source else None,
            "fork_group_id": source.fork_group_id if source else None,
            "created_at": source.created_at if source else None,
            "branches": audit_run.branches,
        },
        fork_completed_at=audit_run.completed_at,
        branches=branches,
        decisions=decisions,
        superseded_decisions=lineage.superseded_decisions,
    )


# --------------------------------------------------------------------------------------------------
# Replays, as the row page and ``explain`` show them


def _replay_view(
    engine: Engine, spec: CoalesceSpec, run: RunInfo, stored: Mapping[str, Any], recorded: DecisionRecord
) -> dict[str, Any]:
    """The row page's replay of one decision: agreement, differences, the log and its timeline.

    A resolution's check replays only the events up to its ``decided_at``, which must leave the row
    pending (``undecidable_then``).
    """
    try:
        replayed = replay_row(engine, spec, run, stored)
    except Exception as err:  # the page still shows the recorded decision
        return {"available": False, "error": f"{type(err).__name__}: {err}", "events": [], "timeline": []}
    fields = replayed.replayed_fields
    got = {k: fields[k] for k in COMPARED}
    log, deadline = replayed.events, replayed.deadline
    late = [_late_write_dict(e, deadline) for e in replayed.late_writes]
    if replayed.resolution:
        return {
            "available": True,
            "resolution": True,
            "task_state": replayed.task_state,
            "undecidable_then": replayed.undecidable_then,
            "agrees": replayed.agrees,
            "differences": {},
            "replayed": got,
            "deadline": deadline,
            "events": [_event_dict(e, deadline, recorded, set()) for e in log],
            "late_writes": late,
            "timeline": _timeline(replayed, recorded),
        }
    return {
        "available": True,
        "resolution": False,
        "agrees": replayed.agrees,
        "differences": replayed.differences,
        "replayed": got,
        "deadline": deadline,
        "events": [_event_dict(e, deadline, recorded, set(recorded.consumed)) for e in log],
        "late_writes": late,
        "timeline": _timeline(replayed, recorded),
    }


def _explained_replay(replayed: Replay, recorded: DecisionRecord) -> ExplainedReplay:
    """``explain``'s replay of one decision: the replayed decision and the whole stored log."""
    return ExplainedReplay(
        coalesce=replayed.coalesce,
        resolution=replayed.resolution,
        task_state=replayed.task_state if replayed.resolution else None,
        replayed=ReplayedDecision(
            **replayed.replayed_fields,
            events=[_log_event(e, _label(e, recorded)) for e in replayed.events],
            late_writes=[_log_event(e, outcome_label(e.kind.value, e.reason)) for e in replayed.late_writes],
        ),
        undecidable_then=replayed.undecidable_then if replayed.resolution else None,
        agrees=replayed.agrees,
    )


def _log_event(event: BranchEvent, label: str) -> LogEvent:
    return LogEvent(branch=event.branch, at=event.at, kind=event.kind.value, reason=event.reason, label=label)


def explain_row(engine: Engine, run_id: str, row_key: str) -> Explanation:
    """The row's lineage plus, per coalesce decision, its replay (``replays``, in the same order).

    :raises NotFound: no such row (or run).
    """
    lineage, stored = _read_lineage(engine, run_id, row_key)
    run = run_info(engine, run_id)
    replays = [
        _explained_replay(replay_row(engine, coalesce_spec(engine, run_id, d["node_id"]), run, d), record)
        for record, d in zip(lineage.decisions, stored, strict=True)
    ]
    fields = {f.name: getattr(lineage, f.name) for f in dataclasses.fields(RowLineage)}
    return Explanation(**fields, replays=replays)
