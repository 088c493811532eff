"""Audit data for the UI tests.

``build_run`` writes a run through the store's own write path, the calls the operators make
(``begin_run``, ``write_fork_chunk``, ``complete_run``, ``write_branch_results``, ``coalesce_pass``),
with a scripted behaviour per (row, branch), so the pages see data shaped exactly like a real run's.
Event times are when results become visible (``step_results.recorded_at``, stamped by the store), so
the script says *when* a branch delivers by phase: on time (before the deadline), after the deadline
but before the coalesce decides (a late arrival recorded with the decision), or after the decision
was written.

``bulk_build_run`` writes the same shape of data at 100k rows in seconds (SQLite only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine

from airflow_elspeth.audit import ids
from airflow_elspeth.audit.coalesce import coalesce_pass
from airflow_elspeth.audit.model import CoalesceSpec, run_number
from airflow_elspeth.audit.store import (
    DECISION_COLUMNS,
    SOURCE_ROW_COLUMNS,
    STEP_RESULT_COLUMNS,
    AuditStore,
    ForkRow,
    NodeResult,
    RunIdentity,
)
from airflow_elspeth.core.canonical import hash_value
from airflow_elspeth.core.config import coalesce_config
from airflow_elspeth.core.vocabulary import NodeStatus

COMPLETED, DROPPED, FAILED = NodeStatus.COMPLETED, NodeStatus.DROPPED, NodeStatus.FAILED

ON_TIME, AFTER_DEADLINE, AFTER_DECISION = "on_time", "after_deadline", "after_decision"


@dataclass(frozen=True)
class Arrive:
    after_s: float
    output: dict[str, Any]
    after_decision: bool = False


@dataclass(frozen=True)
class Error:
    after_s: float
    type: str
    message: str
    after_decision: bool = False


@dataclass(frozen=True)
class Drop:
    after_s: float
    after_decision: bool = False


# What one branch does with one row; None: the branch never delivers it.
Behaviour = Callable[[int, dict[str, Any], str], "Arrive | Error | Drop | None"]


@dataclass(frozen=True)
class BuiltRun:
    run_id: str
    dag_id: str
    airflow_run_id: str
    coalesce: str
    branches: tuple[str, ...]
    delivering: dict[str, str]
    rows_total: int
    fork_completed_at: datetime
    coalesces: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtraCoalesce:
    """Another coalesce over the same fork (and the same delivering steps)."""

    node_id: str
    policy: str
    quorum: int | None = None
    merge: str = "union"


def _phase(what: Arrive | Error | Drop, timeout_s: float) -> str:
    if what.after_decision:
        return AFTER_DECISION
    return ON_TIME if what.after_s < timeout_s else AFTER_DEADLINE


def build_run(
    engine: Engine,
    *,
    dag_id: str,
    airflow_run_id: str,
    rows: Sequence[dict[str, Any]],
    row_key: str,
    branches: Sequence[str],
    behaviour: Behaviour,
    policy: str = "quorum",
    quorum: int | None = 2,
    merge: str = "nested",
    timeout_s: float = 1.0,
    try_number: int = 1,
    coalesce: str = "consensus",
    extra_coalesces: Sequence[ExtraCoalesce] = (),
    fork_task_id: str = "fork",
    chunk_size: int = 1000,
    step_ids: Sequence[str] | None = None,
    task_states: Mapping[str, str] | None = None,
) -> BuiltRun:
    """Fork ``rows``, deliver each branch's results in three phases, and decide every row.

    ``task_states``: the branch tasks' Airflow states the coalesce's pass sees (none: all running);
    a task seen ended loses the rows it had not delivered (``branch_task_<state>``).

    1. on time (``after_s < timeout_s``): written right after the fork completes, branch by branch,
       in the order of ``branches``;
    2. after the deadline: written once the deadline has passed, before the coalesce's pass;
    3. ``after_decision=True``: written after the pass, so they arrive after their row's decision
       was recorded.
    """
    store = AuditStore(engine)
    identity = RunIdentity(
        dag_id=dag_id,
        airflow_run_id=airflow_run_id,
        fork_task_id=fork_task_id,
        try_number=try_number,
        run_type="manual",
        logical_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )
    run_id = store.begin_run(
        identity,
        branches=list(branches),
        chunk_size=chunk_size,
        config={"branches": list(branches), "row_key": row_key, "chunk_size": chunk_size},
    )
    keyed: list[tuple[int, int, str, dict[str, Any]]] = []
    for start in range(0, len(rows), chunk_size):
        chunk = start // chunk_size
        batch = []
        for index in range(start, min(start + chunk_size, len(rows))):
            row = rows[index]
            key = str(row[row_key])
            payload_hash, body = hash_value(row)
            batch.append(ForkRow(row_key=key, row_index=index, payload_hash=payload_hash, payload_body=body))
            keyed.append((index, chunk, key, row))
        store.write_fork_chunk(run_id, list(branches), chunk, batch)
    chunks_total = (len(rows) + chunk_size - 1) // chunk_size
    completed_at = store.complete_run(run_id, rows_total=len(rows), chunks_total=chunks_total)
    with engine.connect() as conn:
        run_no = run_number(conn, run_id)

    steps = list(step_ids) if step_ids else [f"ask_{i}" for i in range(len(branches))]
    delivering = dict(zip(branches, steps, strict=True))
    for branch, step in delivering.items():
        store.register_node(
            run_id,
            step,
            "branch",
            branch,
            {"branch": branch, "callable": f"tests.{step}", "previous_step": None},
        )
    per_chunk: dict[int, int] = {}
    for _, chunk, _, _ in keyed:
        per_chunk[chunk] = per_chunk.get(chunk, 0) + 1

    def deliver(phase: str) -> None:
        for branch, step in delivering.items():
            results: list[NodeResult] = []
            for index, chunk, _key, row in keyed:
                what = behaviour(index, row, branch)
                if what is None or _phase(what, timeout_s) != phase:
                    continue
                row_id = ids.row_id(run_no, index)
                done = datetime.now(timezone.utc)
                started = done - timedelta(milliseconds=5 + index % 7)
                common: dict[str, Any] = {
                    "token_id": ids.branch_token_id(row_id, branch),
                    "row_id": row_id,
                    "chunk": chunk,
                    "started_at": started,
                    "completed_at": done,
                }
                if isinstance(what, Arrive):
                    output_hash, output_body = hash_value(what.output)
                    results.append(
                        NodeResult(
                            **common, status=COMPLETED, output_hash=output_hash, output_body=output_body
                        )
                    )
                elif isinstance(what, Error):
                    error = {"type": what.type, "message": what.message, "attempts": 1}
                    results.append(NodeResult(**common, status=FAILED, error=error, context={"attempts": 1}))
                else:
                    results.append(NodeResult(**common, status=DROPPED))
            for start in range(0, len(results), 5000):
                part = results[start : start + 5000]
                store.write_branch_results(
                    run_id, step, 1, part, chunk_tokens={c: per_chunk[c] for c in {r.chunk for r in part}}
                )

    deliver(ON_TIME)
    deadline = completed_at + timedelta(seconds=timeout_s)
    wait = (deadline - datetime.now(timezone.utc)).total_seconds()
    if wait > 0:
        time.sleep(wait + 0.05)
    deliver(AFTER_DEADLINE)

    specs = [
        CoalesceSpec(
            node_id=coalesce,
            config=coalesce_config(
                branches=list(branches),
                policy=policy,
                quorum=quorum,
                merge=merge,
                timeout=timedelta(seconds=timeout_s),
            ),
            delivering=delivering,
            mapped=dict.fromkeys(branches, False),
        )
    ]
    for extra in extra_coalesces:
        specs.append(
            CoalesceSpec(
                node_id=extra.node_id,
                config=coalesce_config(
                    branches=list(branches),
                    policy=extra.policy,
                    quorum=extra.quorum,
                    merge=extra.merge,
                    timeout=timedelta(seconds=timeout_s),
                ),
                delivering=delivering,
                mapped=dict.fromkeys(branches, False),
            )
        )
    for spec in specs:
        store.register_node(run_id, spec.node_id, "coalesce", None, spec.as_dict())
        result = coalesce_pass(store, spec, run_id, task_states or {})
        assert result.done, f"{spec.node_id}: {result.rows_decided}/{result.rows_total} rows decided"
    deliver(AFTER_DECISION)
    return BuiltRun(
        run_id=run_id,
        dag_id=dag_id,
        airflow_run_id=airflow_run_id,
        coalesce=coalesce,
        branches=tuple(branches),
        delivering=delivering,
        rows_total=len(rows),
        fork_completed_at=completed_at,
        coalesces=tuple(s.node_id for s in specs),
    )


def failed_fork(
    engine: Engine, *, dag_id: str, airflow_run_id: str, logical_date: datetime, reason: str
) -> str:
    """A fork try that failed before it completed, saying why (its audit run id)."""
    store = AuditStore(engine)
    identity = RunIdentity(
        dag_id=dag_id,
        airflow_run_id=airflow_run_id,
        fork_task_id="fork",
        try_number=1,
        run_type="manual",
        logical_date=logical_date,
    )
    run_id = store.begin_run(identity, branches=["a", "b"], chunk_size=10, config={"branches": ["a", "b"]})
    store.fail_run(run_id, reason)
    return run_id


def consensus_behaviour(index: int, row: dict[str, Any], branch: str) -> Arrive | Error | Drop | None:
    """Every 2nd row claude is rate-limited, every 4th gemini is late, every 10th (6, 16, ...) dropped.

    Quorum 2 of 3: rows with claude lost and gemini late fail ``quorum_not_met_at_timeout``; rows
    with claude lost and gemini dropped fail ``quorum_impossible``; the rest merge (some with a late
    gemini arrival).
    """
    spread = (index % 97) / 1000
    if branch == "gpt":
        return Arrive(0.05 + spread, {"label": "invoice", "confidence": 0.9})
    if branch == "claude":
        if index % 2 == 0:
            return Error(0.1 + spread, "RateLimitError", f"429 Too Many Requests for {row['id']}")
        return Arrive(0.1 + spread, {"label": "invoice", "confidence": 0.8})
    if index % 10 == 6:
        return Drop(0.2 + spread)
    if index % 4 in (0, 1):
        return Arrive(30 + spread, {"label": "invoice", "confidence": 0.7})
    return Arrive(0.2 + spread, {"label": "invoice", "confidence": 0.7})


# --------------------------------------------------------------------------------------------------
# Bulk: the same shape of data at 100k rows in seconds (SQLite only)


_FORMATTED: dict[datetime, str] = {}


def _fmt(value: datetime) -> str:
    """How SQLAlchemy stores a DateTime on SQLite (naive UTC)."""
    text = _FORMATTED.get(value)
    if text is None:
        if len(_FORMATTED) > 100_000:
            _FORMATTED.clear()
        text = _FORMATTED[value] = value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    return text


def _insert(table: str, columns: Sequence[str], *, ignore: bool = False) -> str:
    marks = ", ".join("?" * len(columns))
    return f"INSERT {'OR IGNORE ' if ignore else ''}INTO {table} ({', '.join(columns)}) VALUES ({marks})"


def _next_run_no(engine: Engine) -> int:
    """The run number ``begin_run`` would give the next run of this store."""
    from sqlalchemy import func, select

    from airflow_elspeth.audit import schema as t

    with engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.max(t.runs.c.run_no), 0) + 1)).scalar_one())


def bulk_build_run(
    engine: Engine,
    *,
    dag_id: str,
    airflow_run_id: str,
    rows_total: int,
    branches: Sequence[str],
    behaviour: Behaviour,
    policy: str = "quorum",
    quorum: int | None = 2,
    merge: str = "nested",
    timeout_s: float = 1.0,
    coalesce: str = "consensus",
    fork_task_id: str = "fork",
    chunk_size: int = 1000,
) -> BuiltRun:
    """Write a decided run with plain ``executemany`` (no per-row SQL, no ORM), deciding every row
    with the core's own ``replay``, so a 100k-row run takes seconds instead of minutes.

    Rows are ``{"id": "doc-000042", "n": 42}``. The events are what the writers store: source rows,
    step results and decisions with their bodies inline, and only the branch outcomes no decision
    implies (``recorded_outcomes``). The fork completed two minutes ago, so the deadline has passed
    and every row is decided.
    """
    import hashlib
    import json

    from airflow_elspeth.audit.store import dumps
    from airflow_elspeth.core.merge import merge_outputs
    from airflow_elspeth.core.policy import BranchEvent, EventKind, replay
    from airflow_elspeth.core.vocabulary import LATE_AFTER_FAILURE, LATE_AFTER_MERGE, NOT_ARRIVED
    from airflow_elspeth.core.vocabulary import DecisionStatus as Status

    assert engine.dialect.name == "sqlite", "bulk_build_run writes SQLite's storage format"
    config = coalesce_config(
        branches=list(branches),
        policy=policy,
        quorum=quorum,
        merge=merge,
        timeout=timedelta(seconds=timeout_s),
    )
    steps = [f"ask_{i}" for i in range(len(branches))]
    delivering = dict(zip(branches, steps, strict=True))
    spec = CoalesceSpec(
        node_id=coalesce, config=config, delivering=delivering, mapped=dict.fromkeys(branches, False)
    )
    run_id = RunIdentity(dag_id, airflow_run_id, fork_task_id, 1).run_id
    run_no = _next_run_no(engine)
    now = datetime.now(timezone.utc)
    fork_done = now - timedelta(seconds=120)
    deadline = fork_done + config.timeout
    chunks_total = (rows_total + chunk_size - 1) // chunk_size

    row_values: list[tuple[Any, ...]] = []
    result_values: list[tuple[Any, ...]] = []
    outcome_values: list[tuple[Any, ...]] = []
    decision_values: list[tuple[Any, ...]] = []
    output_cache: dict[str, tuple[str, str]] = {}  # output JSON -> (hash, canonical body)
    # Rows scripted alike decide alike: replay, merge and the JSON columns are computed once per
    # distinct script (a few hundred), not once per row.
    decided: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    fork_done_text, now_text = _fmt(fork_done), _fmt(now)
    for index in range(rows_total):
        chunk = index // chunk_size
        row = {"id": f"doc-{index:06d}", "n": index}
        key = row["id"]
        row_id = ids.row_id(run_no, index)
        # rfc8785 of these flat ASCII rows is json.dumps with sorted keys and no spaces.
        body = json.dumps(row, sort_keys=True, separators=(",", ":"))
        source_ref = hashlib.sha256(body.encode()).hexdigest()
        row_values.append((run_no, chunk, index, key, source_ref, body, None, fork_done_text))
        scripts = [behaviour(index, row, branch) for branch in branches]
        script_key = tuple(
            None
            if what is None
            else (
                type(what).__name__,
                what.after_s,
                json.dumps(getattr(what, "output", None), sort_keys=True),
            )
            + ((what.type,) if isinstance(what, Error) else ())
            for what in scripts
        )
        for ordinal, branch in enumerate(branches):
            what = scripts[ordinal]
            if what is None:
                continue
            done = fork_done + timedelta(seconds=what.after_s)
            started = done - timedelta(milliseconds=5)
            output_ref = output_body = error_json = None
            if isinstance(what, Arrive):
                body_key = json.dumps(what.output, sort_keys=True)
                if body_key not in output_cache:
                    output_cache[body_key] = hash_value(what.output)
                output_ref, output_body = output_cache[body_key]
                status = COMPLETED
            elif isinstance(what, Error):
                status = FAILED
                error_json = dumps({"type": what.type, "message": what.message, "attempts": 1})
            else:
                status = DROPPED
            result_values.append(
                (
                    run_no,
                    delivering[branch],
                    chunk,
                    index,
                    1,
                    status,
                    source_ref,
                    output_ref,
                    output_body,
                    error_json,
                    None,
                    _fmt(started),
                    _fmt(done),
                    5,
                    _fmt(done),
                )
            )
        if script_key not in decided:
            events: list[BranchEvent] = []
            outputs: dict[str, dict[str, Any]] = {}
            for branch, what in zip(branches, scripts, strict=True):
                if what is None:
                    continue
                at = fork_done + timedelta(seconds=what.after_s)
                if isinstance(what, Arrive):
                    events.append(BranchEvent(branch, at, EventKind.ARRIVAL))
                    outputs[branch] = what.output
                elif isinstance(what, Error):
                    events.append(BranchEvent(branch, at, EventKind.LOSS, f"error:{what.type}"))
                else:
                    events.append(BranchEvent(branch, at, EventKind.LOSS, "dropped"))
            decision = replay(config, events, deadline=deadline, now=now)
            assert decision.is_final and decision.decided_at is not None
            merged_ref = merged_body = collisions = None
            if decision.status is Status.MERGED:
                merged = merge_outputs(config, decision.consumed, {b: outputs[b] for b in decision.consumed})
                collisions = merged.collisions or None
                merged_ref, merged_body = hash_value(merged.row)
            branch_outcomes = []
            for branch in branches:
                if branch in decision.consumed:
                    continue  # coalesced: implied by the merged decision
                elif branch in decision.missing:
                    reason = decision.missing[branch]
                    outcome = {
                        NOT_ARRIVED: "not_arrived",
                        LATE_AFTER_MERGE: "late",
                        LATE_AFTER_FAILURE: "late",
                    }.get(reason, "lost")
                else:
                    outcome = "row_failed"
                    reason = decision.failure_reason.value if decision.failure_reason else None
                branch_outcomes.append((branch, outcome, reason))
            decided[script_key] = (
                merged_ref,
                merged_body,
                branch_outcomes,
                decision.status.value,
                decision.failure_reason.value if decision.failure_reason else None,
                dumps(dict(decision.details)),
                dumps(list(decision.consumed)),
                dumps(dict(decision.missing)),
                dumps(list(decision.late)),
                dumps(collisions) if collisions else None,
                _fmt(decision.decided_at),
                int((decision.decided_at - fork_done).total_seconds() * 1000),
            )
        (
            merged_ref,
            merged_body,
            branch_outcomes,
            status_text,
            reason_text,
            details_json,
            consumed_json,
            missing_json,
            late_json,
            collisions_json,
            decided_text,
            wait_ms,
        ) = decided[script_key]
        join_group = ids.join_group_id(row_id, coalesce)
        for branch, outcome, reason in branch_outcomes:
            outcome_values.append(
                (
                    ids.branch_token_id(row_id, branch),
                    run_id,
                    row_id,
                    outcome,
                    1,
                    reason,
                    join_group,
                    now_text,
                )
            )
        decision_values.append(
            (
                run_no,
                coalesce,
                chunk,
                index,
                status_text,
                reason_text,
                details_json,
                consumed_json,
                missing_json,
                late_json,
                collisions_json,
                merged_ref,
                merged_body,
                decided_text,
                wait_ms,
                None,
                now_text,
            )
        )

    fork_config = {"branches": list(branches), "row_key": "id", "chunk_size": chunk_size}
    fork_hash, fork_json = hash_value(fork_config)
    spec_hash, spec_json = hash_value(spec.as_dict())
    node_values = [(run_id, fork_task_id, fork_task_id, "fork", None, fork_json, fork_hash)]
    for branch, step in delivering.items():
        step_hash, step_json = hash_value(
            {"branch": branch, "callable": f"tests.{step}", "previous_step": None}
        )
        node_values.append((run_id, step, step, "branch", branch, step_json, step_hash))
    node_values.append((run_id, coalesce, coalesce, "coalesce", None, spec_json, spec_hash))
    progress_values = []
    for chunk in range(chunks_total):
        size = min(chunk_size, rows_total - chunk * chunk_size)
        for node in [*steps, coalesce]:
            progress_values.append((run_id, node, chunk, size, size, None, _fmt(now)))

    statements = [
        (
            _insert(
                "runs",
                [
                    "run_id",
                    "run_no",
                    "dag_id",
                    "airflow_run_id",
                    "fork_task_id",
                    "try_number",
                    "clear_number",
                    "run_type",
                    "logical_date",
                    "started_at",
                    "completed_at",
                    "status",
                    "config_hash",
                    "previous_run_id",
                    "rows_total",
                    "chunk_size",
                    "chunks_total",
                    "branches_json",
                ],
            ),
            [
                (
                    run_id,
                    run_no,
                    dag_id,
                    airflow_run_id,
                    fork_task_id,
                    1,
                    0,
                    "manual",
                    _fmt(datetime(2026, 1, 1, tzinfo=timezone.utc)),
                    _fmt(fork_done - timedelta(seconds=3)),
                    _fmt(fork_done),
                    "completed",
                    fork_hash,
                    None,
                    rows_total,
                    chunk_size,
                    chunks_total,
                    dumps(list(branches)),
                )
            ],
        ),
        (
            _insert(
                "nodes",
                ["run_id", "node_id", "task_id", "node_type", "branch_name", "config_json", "config_hash"],
            ),
            node_values,
        ),
        (_insert("source_rows", SOURCE_ROW_COLUMNS), row_values),
        (_insert("step_results", STEP_RESULT_COLUMNS), result_values),
        (
            _insert(
                "recorded_outcomes",
                [
                    "token_id",
                    "run_id",
                    "row_id",
                    "outcome",
                    "is_terminal",
                    "reason",
                    "join_group_id",
                    "recorded_at",
                ],
            ),
            outcome_values,
        ),
        (_insert("decisions", DECISION_COLUMNS), decision_values),
        (
            _insert(
                "chunk_progress",
                ["run_id", "node_id", "chunk", "rows_done", "rows_total", "seen_signature", "updated_at"],
            ),
            progress_values,
        ),
    ]
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        # A big page cache: the id indexes are random-ordered, and thrash SQLite's 2 MB default.
        cursor.execute("PRAGMA cache_size = -400000")
        # Branch tasks write their results node by node, chunk by chunk: keep that physical order.
        result_values.sort(key=lambda v: (v[1], v[2]))
        for sql, values in statements:
            cursor.executemany(sql, values)
        raw.commit()
    finally:
        raw.close()
    return BuiltRun(
        run_id=run_id,
        dag_id=dag_id,
        airflow_run_id=airflow_run_id,
        coalesce=coalesce,
        branches=tuple(branches),
        delivering=delivering,
        rows_total=rows_total,
        fork_completed_at=fork_done,
    )


# --------------------------------------------------------------------------------------------------
# Many audit runs: the runs index at scale (tests/ui/test_index_scale.py, benchmarks/index.py)


@dataclass(frozen=True)
class IndexedFixture:
    """One generated audit run and the outcome the index must give it (``index.OUTCOMES``)."""

    run_id: str
    dag_id: str
    airflow_run_id: str
    try_number: int
    logical_date: datetime
    started_at: datetime
    outcome: str


INDEX_DAGS = tuple(f"index_dag_{i}" for i in range(5))
INDEX_ROWS = 4  # rows of each audit run with a coalesce


def bulk_index_runs(engine: Engine, runs: int) -> list[IndexedFixture]:
    """Write ``runs`` audit runs in a few statements (no per-row SQL), spread over
    :data:`INDEX_DAGS`, each a DAG run an hour after the last of its DAG, started in an order
    unrelated to its logical date (a backfill), with every outcome the index filters on: a failed
    fork, a running one, one without a coalesce, superseded tries (every tenth DAG run has two),
    undecided rows, failed rows, all merged. Returns them, each with its expected outcome.
    """
    from airflow_elspeth.audit import schema as t
    from airflow_elspeth.audit.store import dumps

    config = coalesce_config(
        branches=["a", "b"], policy="require_all", quorum=None, merge="union", timeout=timedelta(minutes=5)
    )
    spec = CoalesceSpec(
        node_id="join",
        config=config,
        delivering={"a": "ask_a", "b": "ask_b"},
        mapped={"a": False, "b": False},
    )
    config_hash, config_json = hash_value(spec.as_dict())
    base = datetime(2020, 1, 1, tzinfo=timezone.utc)
    made: list[IndexedFixture] = []
    run_rows: list[dict[str, Any]] = []
    node_rows: list[dict[str, Any]] = []
    source_rows: list[dict[str, Any]] = []
    decision_rows: list[dict[str, Any]] = []
    run_no = _next_run_no(engine)
    k = 0
    while len(made) < runs:
        dag_id = INDEX_DAGS[k % len(INDEX_DAGS)]
        logical_date = base + timedelta(hours=k // len(INDEX_DAGS))
        airflow_run_id = f"scheduled__{logical_date.isoformat()}"
        tries = min(2 if k % 10 == 0 else 1, runs - len(made))
        for try_number in range(1, tries + 1):
            run_id = RunIdentity(dag_id, airflow_run_id, "fork", try_number).run_id
            # Started in a scrambled order: a multiplicative permutation of the run's position.
            started_at = base + timedelta(days=3000, seconds=(len(made) * 7919) % runs)
            status, outcome, decided, failed = "completed", "all_merged", INDEX_ROWS, 0
            if k % 17 == 3:
                status, outcome = "failed", "fork_failed"
            elif tries == 2 and try_number == 1:
                outcome = "superseded"
            elif k % 23 == 5:
                status, outcome = "running", "fork_running"
            elif k % 29 == 7:
                outcome = "no_coalesce"
            elif k % 7 == 2:
                outcome, decided = "undecided", INDEX_ROWS // 2
            elif k % 3 == 1:
                outcome, failed = "rows_failed", 1
            coalesced = status == "completed" and outcome != "no_coalesce"
            run_rows.append(
                {
                    "run_id": run_id,
                    "run_no": run_no,
                    "dag_id": dag_id,
                    "airflow_run_id": airflow_run_id,
                    "fork_task_id": "fork",
                    "try_number": try_number,
                    "clear_number": 0,
                    "run_type": "scheduled",
                    "logical_date": logical_date,
                    "started_at": started_at,
                    "completed_at": started_at + timedelta(seconds=30) if status == "completed" else None,
                    "status": status,
                    "status_reason": "the source went away" if status == "failed" else None,
                    "config_hash": config_hash,
                    "previous_run_id": None,
                    "rows_total": INDEX_ROWS if status == "completed" else None,
                    "chunk_size": 1000,
                    "chunks_total": 1 if status == "completed" else None,
                    "branches_json": dumps(["a", "b"]),
                }
            )
            if coalesced:
                node_rows.append(
                    {
                        "run_id": run_id,
                        "node_id": "join",
                        "task_id": "join",
                        "node_type": "coalesce",
                        "branch_name": None,
                        "config_json": config_json,
                        "config_hash": config_hash,
                    }
                )
                for row in range(decided):
                    lost = row < failed
                    # A decision is read with its source row (``coalesce_decisions``).
                    source_hash, body = hash_value({"id": f"r{row}"})
                    source_rows.append(
                        {
                            "run_no": run_no,
                            "chunk": 0,
                            "row_no": row,
                            "row_key": f"r{row}",
                            "source_hash": source_hash,
                            "body": body,
                            "recorded_at": started_at,
                        }
                    )
                    decision_rows.append(
                        {
                            "run_no": run_no,
                            "node_id": "join",
                            "chunk": 0,
                            "row_no": row,
                            "decision": "failed" if lost else "merged",
                            "failure_reason": "incomplete_branches" if lost else None,
                            "details_json": "{}",
                            "consumed": "[]" if lost else '["a","b"]',
                            "missing_json": "{}",
                            "late_json": "[]",
                            "collisions_json": None,
                            "decided_at": started_at + timedelta(minutes=1),
                            "wait_ms": 30_000,
                            "wait_from_first_arrival_ms": 0,
                            "recorded_at": started_at + timedelta(minutes=1),
                        }
                    )
            made.append(
                IndexedFixture(run_id, dag_id, airflow_run_id, try_number, logical_date, started_at, outcome)
            )
            run_no += 1
        k += 1
    with engine.begin() as conn:
        conn.execute(t.runs.insert(), run_rows)
        conn.execute(t.nodes.insert(), node_rows)
        conn.execute(t.source_rows.insert(), source_rows)
        conn.execute(t.decisions.insert(), decision_rows)
    return made
