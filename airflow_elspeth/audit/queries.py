"""Reads from the audit store: coalesce summaries, merged rows (streamed), one row's lineage."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.coalesce import CoalesceSpec, deadline_of, load_run, payload_bodies
from airflow_elspeth.audit.store import ARRIVAL_STATES, TERMINAL_STATES

FAILED_ROWS_LIMIT = 100


def coalesce_summary(engine: Engine, spec: CoalesceSpec, run_id: str) -> dict[str, Any]:
    """The reporting contract of DESIGN §5, computed with grouped queries (no per-row reads)."""
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
        "rows_merged": sum(n for (decision, _), n in counts.items() if decision == "merged"),
        "rows_failed": rows_failed,
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
    """One row: its source payload, every token and node state, outcomes and decisions."""
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
        for outcome in conn.execute(
            select(t.token_outcomes)
            # Terminal outcomes are what the lineage shows; their unique index serves this lookup.
            .where(t.token_outcomes.c.token_id.in_(token_ids), t.token_outcomes.c.is_terminal)
            .order_by(t.token_outcomes.c.recorded_at)
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
