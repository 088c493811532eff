"""Reads from the audit store: coalesce summaries, merged rows (streamed), one row's lineage, limbo."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, or_, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.coalesce import (
    ENDED_TASK_STATES,
    CoalesceSpec,
    deadline_of,
    load_run,
    payload_bodies,
)
from airflow_elspeth.audit.dml import db_now
from airflow_elspeth.audit.store import ARRIVAL_STATES, TERMINAL_STATES
from airflow_elspeth.core.config import CoalesceConfig
from airflow_elspeth.core.policy import BranchEvent, Decision, replay

FAILED_ROWS_LIMIT = 100


def coalesce_summary(engine: Engine, spec: CoalesceSpec, run_id: str) -> dict[str, Any]:
    """The XCom ``coalesce_summary`` (docs/ARCHITECTURE.md, "The coalesce summary"), from grouped queries."""
    config = spec.config
    cd = t.coalesce_decisions.c
    mine = and_(cd.run_id == run_id, cd.node_id == spec.node_id)
    with engine.connect() as conn:
        run = load_run(conn, run_id)
        if run is None:
            raise LookupError(f"no audit run {run_id}")
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
        missing: dict[str, dict[str, Any]] = {}
        for missing_json, n in conn.execute(
            select(cd.missing_json, func.count()).where(mine).group_by(cd.missing_json)
        ):
            for branch, reason in json.loads(missing_json).items():
                entry = missing.setdefault(branch, {"rows": 0, "reasons": {}})
                entry["rows"] += n
                entry["reasons"][reason] = entry["reasons"].get(reason, 0) + n
        failed_rows = [
            {
                "row_key": row_key,
                "reason": reason,
                "arrived": json.loads(details).get("arrived", []),
                "missing": json.loads(missing_json),
            }
            for row_key, reason, details, missing_json in conn.execute(
                select(cd.row_key, cd.failure_reason, cd.details_json, cd.missing_json)
                .where(mine, cd.decision == "failed")
                .order_by(cd.chunk, cd.row_key)
                .limit(FAILED_ROWS_LIMIT + 1)
            )
        ]
        late_arrivals = _late_arrivals(conn, spec, run_id)
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
    rows_failed = sum(n for (decision, _), n in counts.items() if decision == "failed")
    rows_merged = sum(n for (decision, _), n in counts.items() if decision == "merged")
    failure_reasons = {reason: n for (decision, reason), n in counts.items() if decision == "failed"}
    return {
        "coalesce": spec.node_id,
        "policy": config.policy.value,
        "quorum": config.quorum,
        "merge": config.merge.value,
        "select_branch": config.select_branch,
        "expected_branches": list(config.branches),
        "deadline": deadline_of(run, config).isoformat() if run.completed_at else None,
        "rows_total": run.rows_total,
        "rows_merged": rows_merged,
        "rows_failed": rows_failed,
        # Rows this coalesce has not decided (yet): a resolution replaced by a later try's pass
        # (superseded_decisions) does not count as decided.
        "rows_undecided": max(0, run.rows_total - rows_merged - rows_failed),
        "late_arrivals": late_arrivals,
        "missing_branches": {b: missing[b] for b in config.branches if b in missing},
        "failure_reasons": dict(sorted(failure_reasons.items())),
        "field_collisions": dict(sorted(collisions.items())),
        "failed_rows": failed_rows[:FAILED_ROWS_LIMIT],
        "failed_rows_truncated": len(failed_rows) > FAILED_ROWS_LIMIT,
        "audit_run_id": run_id,
    }


def _late_arrivals(conn: Any, spec: CoalesceSpec, run_id: str) -> int:
    """Arrivals at this coalesce recorded after their row's decision time: every late arrival.

    Both kinds: those the deciding pass saw (also listed in the decision's ``late_json``) and those
    recorded after it (their token already ``not_arrived``). Counted against this coalesce's own
    decisions, not from the tokens' terminal outcomes: with several coalesces on one fork, a token's
    one terminal outcome may have been written by another coalesce.
    """
    ns, cd = t.node_states.c, t.coalesce_decisions.c
    return int(
        conn.execute(
            select(func.count(func.distinct(ns.token_id)))
            .select_from(
                t.node_states.join(
                    t.coalesce_decisions,
                    and_(cd.run_id == ns.run_id, cd.row_id == ns.row_id, cd.node_id == spec.node_id),
                )
            )
            .where(
                ns.run_id == run_id,
                ns.node_id.in_(list(spec.delivering.values())),
                ns.status.in_(ARRIVAL_STATES),
                ns.recorded_at > cd.decided_at,
            )
        ).scalar_one()
    )


def iter_merged_rows(
    engine: Engine, run_id: str, node_id: str, *, with_lineage: bool = False, batch_size: int = 1000
) -> Iterator[dict[str, Any]]:
    """Stream the merged rows of one coalesce in row order, ``batch_size`` rows in memory at a time.

    :param with_lineage: yield ``{"row_key", "merged_token_id", "row"}`` instead of the bare row.
    """
    cd, ns, p, r = t.coalesce_decisions.c, t.node_states.c, t.payloads.c, t.rows.c
    query = (
        select(cd.row_key, cd.merged_token_id, p.body)
        .select_from(
            t.coalesce_decisions.join(
                t.node_states, and_(ns.token_id == cd.merged_token_id, ns.node_id == cd.node_id)
            )
            .join(t.payloads, p.hash == ns.output_ref)
            .join(t.rows, and_(r.run_id == cd.run_id, r.row_id == cd.row_id))
        )
        .where(cd.run_id == run_id, cd.node_id == node_id, cd.decision == "merged")
        .order_by(r.row_index)
        .execution_options(yield_per=batch_size)
    )
    with engine.connect() as conn:
        for row_key, merged_id, body in conn.execute(query):
            row = json.loads(body)
            yield {"row_key": row_key, "merged_token_id": merged_id, "row": row} if with_lineage else row


def iter_source_rows(
    engine: Engine, run_id: str, *, batch_size: int = 1000
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream a run's input rows as (row key, row) in fork order, ``batch_size`` rows at a time."""
    r, p = t.rows.c, t.payloads.c
    query = (
        select(r.row_key, p.body)
        .select_from(t.rows.join(t.payloads, p.hash == r.payload_ref))
        .where(r.run_id == run_id)
        .order_by(r.row_index)
        .execution_options(yield_per=batch_size)
    )
    with engine.connect() as conn:
        for row_key, body in conn.execute(query):
            yield row_key, json.loads(body)


def read_merged_rows(
    summary_or_ref: Mapping[str, Any], *, audit_conn_id: str | None = None, engine: Engine | None = None
) -> Iterator[dict[str, Any]]:
    """Stream a coalesce's merged rows from the audit store, for downstream tasks.

    :param summary_or_ref: the coalesce's ``coalesce_summary`` / return value, or any mapping with
        ``audit_run_id`` and ``coalesce``.
    :param audit_conn_id: the audit connection, when it is not the default one.
    """
    try:
        run_id, node_id = summary_or_ref["audit_run_id"], summary_or_ref["coalesce"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            "read_merged_rows needs a coalesce summary (with 'audit_run_id' and 'coalesce'), "
            f"got {summary_or_ref!r}"
        ) from err
    if engine is None:
        from airflow_elspeth.hooks.audit import ElspethAuditHook

        engine = ElspethAuditHook(audit_conn_id=audit_conn_id).get_engine()
    yield from iter_merged_rows(engine, run_id, node_id)


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
    with engine.connect() as conn:
        return [
            dict(row)
            for row in conn.execute(
                select(t.nodes).where(t.nodes.c.run_id == run_id, t.nodes.c.node_type == "coalesce")
            ).mappings()
        ]


def spec_of_node(engine: Engine, run_id: str, node_id: str) -> CoalesceSpec:
    """Rebuild a coalesce's spec from the configuration it registered in ``nodes``."""
    with engine.connect() as conn:
        config_json = conn.execute(
            select(t.nodes.c.config_json).where(t.nodes.c.run_id == run_id, t.nodes.c.node_id == node_id)
        ).scalar_one()
    return CoalesceSpec.from_dict(json.loads(config_json))


def row_lineage(engine: Engine, run_id: str, row_key: str) -> dict[str, Any]:
    """One row: its source payload, every token and node state, outcomes and decisions.

    ``decisions`` are the current ones; ``superseded_decisions`` the resolutions a later coalesce
    try replaced. A token's ``outcomes`` are its terminal one and any superseded ones.
    """
    with engine.connect() as conn:
        row = (
            conn.execute(select(t.rows).where(t.rows.c.run_id == run_id, t.rows.c.row_key == row_key))
            .mappings()
            .first()
        )
        if row is None:
            raise LookupError(f"no row {row_key!r} in audit run {run_id}")
        row_id = row["row_id"]
        source = conn.execute(
            select(t.payloads.c.body).where(t.payloads.c.hash == row["payload_ref"])
        ).scalar()
        tokens = [
            dict(x)
            for x in conn.execute(
                select(t.tokens).where(t.tokens.c.run_id == run_id, t.tokens.c.row_id == row_id)
            ).mappings()
        ]
        token_ids = [tok["token_id"] for tok in tokens]
        states = defaultdict(list)
        for state in conn.execute(
            select(t.node_states)
            .where(t.node_states.c.token_id.in_(token_ids))
            .order_by(t.node_states.c.started_at)
        ).mappings():
            states[state["token_id"]].append(dict(state))
        outcomes = defaultdict(list)
        to = t.token_outcomes.c
        for outcome in conn.execute(
            select(t.token_outcomes)
            # Terminal outcomes, and those a later coalesce try superseded (no longer terminal: each
            # dict says which by ``is_terminal`` / ``superseded_at``).
            .where(to.token_id.in_(token_ids), or_(to.is_terminal, to.superseded_at.is_not(None)))
            .order_by(to.recorded_at)
        ).mappings():
            outcomes[outcome["token_id"]].append(dict(outcome))
        decisions = [
            dict(d)
            for d in conn.execute(
                select(t.coalesce_decisions).where(
                    t.coalesce_decisions.c.run_id == run_id, t.coalesce_decisions.c.row_id == row_id
                )
            ).mappings()
        ]
        sd = t.superseded_decisions.c
        superseded = [
            dict(d)
            for d in conn.execute(
                select(t.superseded_decisions)
                .where(sd.run_id == run_id, sd.row_id == row_id)
                .order_by(sd.node_id, sd.superseded_at)
            ).mappings()
        ]
        output_refs = {s["output_ref"] for ss in states.values() for s in ss if s["output_ref"]}
        outputs = {
            h: json.loads(b)
            for h, b in conn.execute(
                select(t.payloads.c.hash, t.payloads.c.body).where(t.payloads.c.hash.in_(output_refs))
            )
        }
    return {
        "row": dict(row),
        "source": json.loads(source) if source else None,
        "tokens": [
            {**tok, "states": states[tok["token_id"]], "outcomes": outcomes[tok["token_id"]]}
            for tok in tokens
        ],
        "outputs": outputs,
        "decisions": decisions,
        # Resolutions a later try of their coalesce replaced: history, never a decision.
        "superseded_decisions": superseded,
    }


@dataclass(frozen=True)
class WorkItem:
    """One branch token a branch step still has to process."""

    token_id: str
    row_id: str
    row_key: str
    input_hash: str
    input_row: dict[str, Any] | None  # None when the previous step lost the row
    upstream_status: str | None = None
    upstream_error: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChunkWork:
    items: list[WorkItem]
    tokens_total: int
    already_done: int
    already_decided: int


def branch_work(
    engine: Engine,
    run_id: str,
    node_id: str,
    branch: str,
    chunk: int,
    previous_node: str | None,
    *,
    coalesces: Sequence[str],
) -> ChunkWork:
    """The tokens of one chunk a branch step still has to process, with their input rows.

    Skips tokens this step already finished (a retried task resumes) and rows every coalesce
    joining this branch (``coalesces``) has already decided (their result could only arrive late).
    A row decided by another coalesce of the same fork is still needed by these.
    """
    tk, r, ns, cd = t.tokens.c, t.rows.c, t.node_states.c, t.coalesce_decisions.c
    with engine.connect() as conn:
        tokens = conn.execute(
            select(tk.token_id, tk.row_id, r.row_key, r.payload_ref)
            .select_from(t.tokens.join(t.rows, and_(r.run_id == tk.run_id, r.row_id == tk.row_id)))
            .where(
                tk.run_id == run_id, tk.chunk == chunk, tk.branch_name == branch, tk.token_kind == "branch"
            )
            .order_by(r.row_index)
        ).all()
        done = set(
            conn.execute(
                select(ns.token_id).where(
                    ns.run_id == run_id,
                    ns.node_id == node_id,
                    ns.chunk == chunk,
                    ns.status.in_(TERMINAL_STATES),
                )
            ).scalars()
        )
        decided = set(_decided_by_all(conn, run_id, coalesces, cd.chunk == chunk))
        upstream: dict[str, tuple[str, str | None, str | None]] = {}
        if previous_node is not None:
            for token_id, status, output_ref, error_json in conn.execute(
                select(ns.token_id, ns.status, ns.output_ref, ns.error_json)
                .where(
                    ns.run_id == run_id,
                    ns.node_id == previous_node,
                    ns.chunk == chunk,
                    ns.status.in_(TERMINAL_STATES),
                )
                .order_by(ns.completed_at)
            ):
                upstream.setdefault(token_id, (status, output_ref, error_json))
        pending = [
            tok
            for tok in tokens
            if tok.token_id not in done
            and tok.row_id not in decided
            and (previous_node is None or tok.token_id in upstream)
        ]
        refs = set()
        for tok in pending:
            if previous_node is None:
                refs.add(tok.payload_ref)
            elif upstream[tok.token_id][1]:
                refs.add(upstream[tok.token_id][1])
        bodies = payload_bodies(conn, refs)
    items = []
    for tok in pending:
        if previous_node is None:
            items.append(
                WorkItem(tok.token_id, tok.row_id, tok.row_key, tok.payload_ref, bodies[tok.payload_ref])
            )
            continue
        status, output_ref, error_json = upstream[tok.token_id]
        if status in ARRIVAL_STATES and output_ref:
            items.append(WorkItem(tok.token_id, tok.row_id, tok.row_key, output_ref, bodies[output_ref]))
        else:
            error = json.loads(error_json) if error_json else None
            items.append(
                WorkItem(tok.token_id, tok.row_id, tok.row_key, output_ref or "", None, status, error)
            )
    return ChunkWork(
        items=items,
        tokens_total=len(tokens),
        already_done=sum(1 for tok in tokens if tok.token_id in done),
        already_decided=sum(1 for tok in tokens if tok.row_id in decided and tok.token_id not in done),
    )


def _decided_by_all(conn: Connection, run_id: str, coalesces: Sequence[str], *where: Any) -> dict[str, str]:
    """row_id -> decision of the rows that every coalesce in ``coalesces`` has decided.

    The decision is "failed" when any of them failed the row. No coalesces: nothing is decided.
    """
    nodes = sorted(set(coalesces))
    if not nodes:
        return {}
    cd = t.coalesce_decisions.c
    return dict(
        conn.execute(
            select(cd.row_id, func.min(cd.decision))
            .where(cd.run_id == run_id, cd.node_id.in_(nodes), *where)
            .group_by(cd.row_id)
            .having(func.count(func.distinct(cd.node_id)) == len(nodes))
        ).all()
    )


def decided_rows(
    engine: Engine, run_id: str, row_ids: list[str], *, coalesces: Sequence[str]
) -> dict[str, str]:
    """row_id -> decision ('merged', or 'failed' if any failed it) for the given rows that every
    coalesce in ``coalesces`` has decided."""
    with engine.connect() as conn:
        return _decided_by_all(conn, run_id, coalesces, t.coalesce_decisions.c.row_id.in_(row_ids))


def decided_in_chunk(engine: Engine, run_id: str, chunk: int, *, coalesces: Sequence[str]) -> set[str]:
    """The rows of one chunk that every coalesce in ``coalesces`` has decided."""
    with engine.connect() as conn:
        return set(_decided_by_all(conn, run_id, coalesces, t.coalesce_decisions.c.chunk == chunk))


# --------------------------------------------------------------------------------------------------
# Resolutions and limbo
#
# A resolution is the decision written when a coalesce task ended (killed, marked failed by a
# person, out of retries) without deciding a row: ``decision='failed'`` with the failure reason
# ``coalesce_task_<state>``. It is not a policy outcome, so it is never compared with a replay of the
# whole log; what must hold is that the row really was undecidable when it was resolved.
#
# Limbo is work the audit trail shows as open that nothing will ever close: an audit run still
# ``running`` although its fork try ended, rows no coalesce decided long after the deadline (or
# after the coalesce task ended), tokens without a terminal outcome in a run that is over. The
# checks here read only the audit store; Airflow task states come in as a plain mapping.

RESOLUTION_PREFIX = "coalesce_task_"

#: Airflow task states as a plain mapping: (dag_id, airflow_run_id, task_id) -> the state of that
#: (unmapped) task instance, its latest try. Only the CLI reads them from Airflow.
TaskStates = Mapping[tuple[str, str, str], str]

UNDECIDED_GRACE = timedelta(minutes=5)
LIMBO_EXAMPLES = 5

RUN_NOT_CLOSED = "run_not_closed"
ROWS_UNDECIDED = "rows_undecided"
TOKENS_WITHOUT_OUTCOME = "tokens_without_outcome"
DUPLICATE_TERMINAL_OUTCOMES = "duplicate_terminal_outcomes"


def is_resolution(failure_reason: str | None) -> bool:
    """A ``coalesce_task_<state>`` decision: written when the coalesce task ended, not by the policy."""
    return bool(failure_reason) and str(failure_reason).startswith(RESOLUTION_PREFIX)


def resolution_task_state(decision: Mapping[str, Any]) -> str:
    """The state the coalesce task ended in, for a resolution (from its details, else its reason)."""
    try:
        details = json.loads(decision.get("details_json") or "{}")
    except ValueError:
        details = {}
    state = details.get("coalesce_task_state") if isinstance(details, dict) else None
    return str(state or str(decision.get("failure_reason") or "")[len(RESOLUTION_PREFIX) :])


def replay_at_resolution(
    config: CoalesceConfig, events: Sequence[BranchEvent], *, decided_at: datetime, deadline: datetime
) -> Decision:
    """The policy's replay of a resolved row as it stood when it was resolved.

    Only the events stamped at or before ``decided_at``, with the clock at ``decided_at``: PENDING
    when the row really was undecidable then (a final decision means the resolution hid one).
    """
    return replay(config, [e for e in events if e.at <= decided_at], deadline=deadline, now=decided_at)


def limbo_findings(
    engine: Engine,
    runs: Sequence[Mapping[str, Any]],
    *,
    task_states: TaskStates | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Limbo in the given audit runs: one finding per (audit run, kind), with a count and examples.

    :param runs: rows of ``runs`` (mappings with at least run_id, dag_id, airflow_run_id,
        fork_task_id, try_number, status, completed_at).
    :param task_states: Airflow task states (see :data:`TaskStates`), or None when they are not
        known: then only what the audit store shows by itself is checked.
    :param now: the audit clock to judge deadlines by (default: the store's own clock).

    Kinds:

    * ``run_not_closed``: a run still ``running`` while a later try of the same fork task exists,
      or (with task states) whose fork task instance has ended. Count: its rows.
    * ``rows_undecided``: rows of a completed run a registered coalesce has not decided past its
      deadline (fork completion + timeout) plus :data:`UNDECIDED_GRACE`, or (with task states)
      after that coalesce's task instance ended. Count: distinct rows.
    * ``tokens_without_outcome`` (and ``duplicate_terminal_outcomes``): tokens of a completed run
      without exactly one terminal outcome, once every registered coalesce decided every row or
      (with task states) every registered coalesce's task ended. Count: tokens.
    """
    findings: list[dict[str, Any]] = []
    with engine.connect() as conn:
        clock = now if now is not None else db_now(conn)
        for run in runs:
            findings.extend(_run_limbo(conn, run, task_states, clock))
    return findings


def _run_limbo(
    conn: Connection, run: Mapping[str, Any], task_states: TaskStates | None, now: datetime
) -> list[dict[str, Any]]:
    run_id = run["run_id"]

    def state_of(task_id: str) -> str | None:
        if task_states is None:
            return None
        state = task_states.get((run["dag_id"], run["airflow_run_id"], task_id))
        return str(state) if state is not None else None

    findings: list[dict[str, Any]] = []
    if run["status"] == "running":
        unclosed = _run_not_closed(conn, run, state_of(run["fork_task_id"]))
        if unclosed is not None:
            findings.append(unclosed)
        return findings
    if run["status"] != "completed" or run["completed_at"] is None:
        return findings

    r, cd = t.rows.c, t.coalesce_decisions.c
    rows_total = int(
        conn.execute(select(func.count()).select_from(t.rows).where(r.run_id == run_id)).scalar_one()
    )
    decided: dict[str, int] = {
        node_id: int(n)
        for node_id, n in conn.execute(
            select(cd.node_id, func.count()).where(cd.run_id == run_id).group_by(cd.node_id)
        )
    }
    flagged: dict[str, dict[str, Any]] = {}
    all_decided, all_ended = True, task_states is not None
    n = t.nodes.c
    for node_id, task_id, config_json in conn.execute(
        select(n.node_id, n.task_id, n.config_json)
        .where(n.run_id == run_id, n.node_type == "coalesce")
        .order_by(n.node_id)
    ):
        spec = CoalesceSpec.from_dict(json.loads(config_json))
        undecided = max(0, rows_total - int(decided.get(node_id, 0)))
        state = state_of(task_id)
        ended = state in ENDED_TASK_STATES
        all_decided = all_decided and undecided == 0
        all_ended = all_ended and ended
        if not undecided:
            continue
        deadline = run["completed_at"] + spec.config.timeout
        why = []
        if ended:
            why.append(f"coalesce task {task_id} ended {state}")
        if now > deadline + UNDECIDED_GRACE:
            why.append(f"past the deadline {deadline.isoformat()} by more than {UNDECIDED_GRACE}")
        if why:
            flagged[node_id] = {
                "undecided": undecided,
                "deadline": deadline,
                "task_state": state,
                "why": why,
            }
    if flagged:
        findings.append(_rows_undecided(conn, run_id, rows_total, flagged))
    if all_decided or all_ended:
        findings.extend(
            _outcome_findings(conn, run_id, "every row decided" if all_decided else "coalesces ended")
        )
    return findings


def _run_not_closed(
    conn: Connection, run: Mapping[str, Any], fork_state: str | None
) -> dict[str, Any] | None:
    ru, r = t.runs.c, t.rows.c
    later = [
        dict(x)
        for x in conn.execute(
            select(ru.run_id, ru.try_number, ru.status)
            .where(
                ru.dag_id == run["dag_id"],
                ru.airflow_run_id == run["airflow_run_id"],
                ru.fork_task_id == run["fork_task_id"],
                ru.try_number > run["try_number"],
            )
            .order_by(ru.try_number)
        ).mappings()
    ]
    why = []
    if later:
        why.append(f"try {later[0]['try_number']} of fork task {run['fork_task_id']} started")
    if fork_state in ENDED_TASK_STATES:
        why.append(f"fork task {run['fork_task_id']} ended {fork_state}")
    if not why:
        return None
    rows = int(
        conn.execute(select(func.count()).select_from(t.rows).where(r.run_id == run["run_id"])).scalar_one()
    )
    examples = list(
        conn.execute(
            select(r.row_key)
            .where(r.run_id == run["run_id"])
            .order_by(r.chunk, r.row_index)
            .limit(LIMBO_EXAMPLES)
        ).scalars()
    )
    return {
        "run_id": run["run_id"],
        "check": RUN_NOT_CLOSED,
        "count": rows,
        "counted": "rows",
        "examples": examples,
        "why": why,
        "try_number": run["try_number"],
        "later_tries": later,
        "fork_task_state": fork_state,
    }


def _rows_undecided(
    conn: Connection, run_id: str, rows_total: int, flagged: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    r, cd = t.rows.c, t.coalesce_decisions.c
    nodes = sorted(flagged)
    if len(nodes) == 1:
        count = int(flagged[nodes[0]]["undecided"])
    else:
        decided_by_all = (
            select(cd.row_id)
            .where(cd.run_id == run_id, cd.node_id.in_(nodes))
            .group_by(cd.row_id)
            .having(func.count(func.distinct(cd.node_id)) == len(nodes))
            .subquery()
        )
        count = rows_total - int(conn.execute(select(func.count()).select_from(decided_by_all)).scalar_one())
    examples: dict[str, tuple[int, int]] = {}
    for node_id in nodes:
        decided = (
            select(cd.row_id)
            .where(cd.run_id == r.run_id, cd.node_id == node_id, cd.row_id == r.row_id)
            .exists()
        )
        for key, chunk, index in conn.execute(
            select(r.row_key, r.chunk, r.row_index)
            .where(r.run_id == run_id, ~decided)
            .order_by(r.chunk, r.row_index)
            .limit(LIMBO_EXAMPLES)
        ):
            examples[key] = (chunk, index)
    return {
        "run_id": run_id,
        "check": ROWS_UNDECIDED,
        "count": count,
        "counted": "rows",
        "examples": sorted(examples, key=lambda k: examples[k])[:LIMBO_EXAMPLES],
        "coalesces": {node: dict(flagged[node]) for node in nodes},
    }


def _outcome_findings(conn: Connection, run_id: str, because: str) -> list[dict[str, Any]]:
    """Tokens of a finished run without exactly one terminal outcome (superseded ones do not count)."""
    tk, to, r = t.tokens.c, t.token_outcomes.c, t.rows.c
    terminal = select(to.token_id).where(to.token_id == tk.token_id, to.is_terminal).exists()
    missing = [tk.run_id == run_id, ~terminal]
    by_kind = {
        str(kind): int(n)
        for kind, n in conn.execute(
            select(tk.token_kind, func.count())
            .where(*missing)
            .group_by(tk.token_kind)
            .order_by(tk.token_kind)
        )
    }
    findings = []
    if by_kind:
        examples = conn.execute(
            select(tk.token_id, r.row_key)
            .select_from(t.tokens.outerjoin(t.rows, and_(r.run_id == tk.run_id, r.row_id == tk.row_id)))
            .where(*missing)
            .order_by(tk.chunk, tk.token_id)
            .limit(LIMBO_EXAMPLES)
        ).all()
        findings.append(
            {
                "run_id": run_id,
                "check": TOKENS_WITHOUT_OUTCOME,
                "count": sum(by_kind.values()),
                "counted": "tokens",
                "examples": [token_id for token_id, _ in examples],
                "example_rows": sorted({key for _, key in examples if key is not None}),
                "by_kind": by_kind,
                "checked_because": because,
            }
        )
    duplicated = conn.execute(
        select(to.token_id, func.count())
        .where(to.run_id == run_id, to.is_terminal)
        .group_by(to.token_id)
        .having(func.count() > 1)
        .order_by(to.token_id)
    ).all()
    if duplicated:
        findings.append(
            {
                "run_id": run_id,
                "check": DUPLICATE_TERMINAL_OUTCOMES,
                "count": len(duplicated),
                "counted": "tokens",
                "examples": [token_id for token_id, _ in duplicated[:LIMBO_EXAMPLES]],
                "checked_because": because,
            }
        )
    return findings
