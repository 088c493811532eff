"""The coalesce pass: read each ready chunk's event log, replay it with the core, write the decisions.

This is the one piece of code that decides rows. The sensor (poke and reschedule), the deferred
sensor's resumption, the deferred sensor's trigger and the coalesce's finalizer all go through it;
:func:`waiting_poll` replays chunks read-only with :func:`decide_chunk` to know whether a pass
would decide anything before taking a chunk's write lock. It knows SQL and
the core, not Airflow: task states come in as a plain mapping. The log it reads is
:mod:`~airflow_elspeth.audit.log`'s, the one ``verify`` and ``explain`` replay.

Each chunk is decided in one transaction ordered against the branch writers of that chunk
(:func:`~airflow_elspeth.audit.dml.ordered_write`): the pass reads the audit clock after every
writer in flight has committed, so no event stamped before a decision can appear after it. A
decision is therefore always what a replay of the stored log says, whatever the interleaving.
"""

from __future__ import annotations

import functools
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, select, update

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.dml import db_now, insert_ignore, ordered_write, refresh_statistics
from airflow_elspeth.audit.ids import branch_token_id, join_group_id, row_numbers
from airflow_elspeth.audit.log import TokenState, collision_check, output_bodies, read_chunk_log, row_events
from airflow_elspeth.audit.model import (
    WHOLE_TASK,
    CoalesceSpec,
    RunInfo,
    deadline_of,
    load_run,
)
from airflow_elspeth.audit.store import (
    AuditStore,
    DecisionWrite,
    decided_in_chunk_count,
    dumps,
    outcome_row,
    set_progress,
    write_decisions,
)
from airflow_elspeth.core.canonical import hash_value
from airflow_elspeth.core.errors import recorded_error_fingerprint
from airflow_elspeth.core.merge import merge_outputs
from airflow_elspeth.core.policy import (
    Decision,
    replay,
    resolve_ended,
)
from airflow_elspeth.core.vocabulary import (
    ARRIVAL_NODE_STATUSES,
    COALESCE_TASK_PREFIX,
    ENDED_TASK_STATES,
    NOT_ARRIVED,
    UNKNOWN_TASK_STATE,
    DecisionStatus,
    NodeStatus,
    TokenOutcome,
    branch_task_reason,
    is_task_loss,
    late_reason,
    missing_outcome,
)
from airflow_elspeth.exceptions import AuditInvariantError


@dataclass(frozen=True)
class DecidedRows:
    """The decisions one pass wrote. A row is decided once (the pass decides only undecided rows,
    under its chunks' exclusive lock), so the tallies of every pass of a coalesce add up to its
    decisions without counting a row twice, whichever process ran them and however often.

    ``failed``: rows per failure reason (resolutions, ``coalesce_task_<state>``, included);
    ``late_arrivals``: branch tokens these decisions recorded as late (outcome ``late``);
    ``waits_from_first_arrival_ms``: per row with an arrival, its decision time minus its first
    arrival (``coalesce_decisions.wait_from_first_arrival_ms``).
    """

    merged: int = 0
    failed: Mapping[str, int] = field(default_factory=dict)
    late_arrivals: int = 0
    # Machine integers, not a tuple of int objects: a pass over a million rows keeps a million.
    waits_from_first_arrival_ms: Sequence[int] = ()

    @classmethod
    def of(cls, writes: Iterable[DecisionWrite]) -> DecidedRows:
        """The tally of one chunk's decision writes (:func:`decide_chunk`'s, as written)."""
        merged, late = 0, 0
        failed: Counter[str] = Counter()
        waits = array("q")
        for write in writes:
            row = write.decision
            if row["decision"] == DecisionStatus.MERGED:
                merged += 1
            else:
                failed[row["failure_reason"]] += 1
            if row["wait_from_first_arrival_ms"] is not None:
                waits.append(row["wait_from_first_arrival_ms"])
            late += sum(1 for o in write.outcomes if o["outcome"] == TokenOutcome.LATE)
        return cls(merged, dict(sorted(failed.items())), late, waits)

    @classmethod
    def combined(cls, parts: Iterable[DecidedRows]) -> DecidedRows:
        """The tallies of several chunks as one."""
        parts = list(parts)
        failed: Counter[str] = Counter()
        waits = array("q")
        for part in parts:
            failed.update(part.failed)
            waits.extend(part.waits_from_first_arrival_ms)
        return cls(
            sum(p.merged for p in parts),
            dict(sorted(failed.items())),
            sum(p.late_arrivals for p in parts),
            waits,
        )


@dataclass(frozen=True)
class PassResult:
    rows_total: int
    rows_decided: int
    deadline: datetime
    now: datetime
    newly_decided: int = 0  # rows this pass decided (or closed)
    decided: DecidedRows = field(default_factory=DecidedRows)  # what this pass wrote, for the shells' metrics

    @property
    def done(self) -> bool:
        return self.rows_decided >= self.rows_total


def task_loss_rows(
    spec: CoalesceSpec, chunks_total: int, task_states: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Branch tasks that ended, from a ``get_task_states`` mapping, as ``branch_task_losses`` rows."""
    rows = []
    for branch in spec.config.branches:
        for key, chunk in spec.task_keys(branch, chunks_total).items():
            state = task_states.get(key, UNKNOWN_TASK_STATE)
            if state in ENDED_TASK_STATES:
                rows.append(
                    {
                        "node_id": spec.delivering[branch],
                        "chunk": chunk,
                        "branch_name": branch,
                        "task_state": state,
                    }
                )
    return rows


def ended_tasks_by_chunk(
    spec: CoalesceSpec, chunks_total: int, task_states: Mapping[str, str]
) -> dict[int, dict[str, str]]:
    """Per chunk: {delivering task id: final state} of the branch tasks that ended."""
    ended: dict[int, dict[str, str]] = defaultdict(dict)
    for row in task_loss_rows(spec, chunks_total, task_states):
        chunks = range(chunks_total) if row["chunk"] == WHOLE_TASK else [row["chunk"]]
        for chunk in chunks:
            ended[chunk][row["node_id"]] = row["task_state"]
    return ended


def chunk_signatures(
    conn: Connection, spec: CoalesceSpec, run: RunInfo, now: datetime, task_states: Mapping[str, str]
) -> dict[int, tuple[str, int, str | None]]:
    """Per chunk: (what a decision of the chunk would depend on, rows decided, signature last evaluated).

    The signature covers the branches' delivery progress, the branch tasks that ended, and whether
    the deadline passed: while it is unchanged, evaluating the chunk again cannot decide more.
    """
    nodes = list(spec.delivering.values())
    progress: dict[int, dict[str, int]] = defaultdict(dict)
    own: dict[int, tuple[int, str | None]] = {}
    cp = t.chunk_progress.c
    for node_id, chunk, rows_done, seen in conn.execute(
        select(cp.node_id, cp.chunk, cp.rows_done, cp.seen_signature).where(
            cp.run_id == run.run_id, cp.node_id.in_([*nodes, spec.node_id])
        )
    ):
        if node_id == spec.node_id:
            own[chunk] = (rows_done, seen)
        else:
            progress[chunk][node_id] = rows_done
    ended = ended_tasks_by_chunk(spec, run.chunks_total, task_states)
    past_deadline = now >= deadline_of(run, spec.config)
    result = {}
    for chunk in range(run.chunks_total):
        decided, seen = own.get(chunk, (0, None))
        signature = dumps([progress.get(chunk, {}), ended.get(chunk, {}), past_deadline])
        result[chunk] = (signature, decided, seen)
    return result


@dataclass(frozen=True)
class WaitResult:
    """What one read-only look at a waiting coalesce found (:func:`waiting_poll`).

    ``reason`` says why a pass should run now (None: nothing to do yet); ``pass_writes`` whether that
    pass would write (decide a row, record a branch task's loss) rather than only find every row
    decided or nothing to wait on; ``deadline`` and ``now`` (the audit clock) are known once the
    fork has completed.
    """

    reason: str | None
    deadline: datetime | None = None
    now: datetime | None = None
    pass_writes: bool = False
    passed: PassResult | None = None  # the pass run on what the poll found (``CoalesceService.poll``)


def waiting_poll(
    engine: Engine,
    spec: CoalesceSpec,
    run_id: str,
    task_states: Mapping[str, str],
    undecidable: dict[int, str] | None = None,
) -> WaitResult:
    """The waiting coalesce's poll, read-only: would a pass do something now, and why.

    What the deferred coalesce's trigger runs on every poll before it runs a pass itself (and what the
    benchmarks time): a changed chunk takes no write lock unless a row of it can be decided. A pass
    is due when every row is decided, when a branch task ended still owing tokens the sensor has not
    recorded as lost (only a pass writes that), or when a chunk whose inputs changed since the pass
    last evaluated it has a row to decide now: that chunk is replayed with :func:`decide_chunk`,
    the pass's own replay. Past the deadline, every undecided chunk is such a chunk once.

    :param undecidable: chunk -> the signature at which a replay here found nothing to decide;
        read and updated, so a caller that polls again does not replay a chunk whose inputs did
        not change.
    """
    with engine.connect() as conn:
        run = load_run(conn, run_id)
        if run is None:
            return WaitResult("audit run missing")
        if run.completed_at is None:
            return WaitResult("fork not completed")
        now = db_now(conn)  # the clock the pass decides by
        deadline = deadline_of(run, spec.config)
        signatures = chunk_signatures(conn, spec, run, now, task_states)
        undecided = {
            chunk for chunk, (_, decided, _) in signatures.items() if decided < run.chunk_rows(chunk)
        }
        if not undecided:
            return WaitResult("every row decided", deadline, now)
        ended = unrecorded_task_ends(conn, spec, run, task_states, undecided)
        if ended:
            return WaitResult(f"branch task ended: {ended}", deadline, now, pass_writes=True)
        skip = undecidable if undecidable is not None else {}
        for chunk in sorted(undecided):
            signature, _, seen = signatures[chunk]
            if signature == seen or signature == skip.get(chunk):
                continue
            if decide_chunk(conn, spec, run, chunk, task_states=task_states, now=now):
                return WaitResult(f"rows to decide in chunk {chunk}", deadline, now, pass_writes=True)
            skip[chunk] = signature
    return WaitResult(None, deadline, now)


def unrecorded_task_ends(
    conn: Connection, spec: CoalesceSpec, run: RunInfo, task_states: Mapping[str, str], undecided: set[int]
) -> list[str]:
    """Ended branch tasks the sensor has not recorded that still owe tokens to an undecided chunk."""
    ended = task_loss_rows(spec, run.chunks_total, task_states)
    if not ended:
        return []
    tl, cp = t.branch_task_losses.c, t.chunk_progress.c
    recorded = {
        (node, chunk)
        for node, chunk in conn.execute(select(tl.node_id, tl.chunk).where(tl.run_id == run.run_id))
    }
    nodes = list(spec.delivering.values())
    delivered = {
        (node, chunk): (done, total)
        for node, chunk, done, total in conn.execute(
            select(cp.node_id, cp.chunk, cp.rows_done, cp.rows_total).where(
                cp.run_id == run.run_id, cp.node_id.in_(nodes)
            )
        )
    }
    owing = []
    for row in ended:
        node, chunk = row["node_id"], row["chunk"]
        chunks = undecided if chunk == WHOLE_TASK else undecided & {chunk}
        for c in sorted(chunks):
            if (node, c) in recorded or (node, WHOLE_TASK) in recorded:
                continue  # the sensor has recorded this end for that chunk
            done, total = delivered.get((node, c), (0, None))
            if total is None or done < total:
                owing.append(f"{node}={row['task_state']}")
                break
    return owing


def coalesce_pass(
    store: AuditStore,
    spec: CoalesceSpec,
    run_id: str,
    task_states: Mapping[str, str],
    *,
    ended_state: str | None = None,
) -> PassResult:
    """Decide every row that can be decided now, one ordered, atomic chunk at a time.

    :param task_states: Airflow states of the branch tasks (``get_task_states`` keys).
    :param ended_state: the coalesce task ended in this state and will not run again (the
        finalizer's pass): every row still undecidable is closed with
        :func:`~airflow_elspeth.core.policy.resolve_ended` instead of left waiting.
    """
    with store.engine.connect() as conn:
        run = load_run(conn, run_id)
        if run is None or run.completed_at is None:
            raise ValueError(f"audit run {run_id} is not a completed fork")
        now = db_now(conn)
        deadline = deadline_of(run, spec.config)
        signatures = chunk_signatures(conn, spec, run, now, task_states)
    ended = ended_tasks_by_chunk(spec, run.chunks_total, task_states)
    decided_total = newly_decided = 0
    tallies: list[DecidedRows] = []
    due: list[tuple[int, str, int]] = []  # (chunk, signature, rows decided before) to evaluate
    for chunk, (signature, decided, seen) in signatures.items():
        chunk_rows = run.chunk_rows(chunk)
        if decided >= chunk_rows or (signature == seen and ended_state is None):
            decided_total += min(decided, chunk_rows)
            continue
        due.append((chunk, signature, decided))
    for group in _write_groups(run, due):
        # One ordered transaction for a few chunks (their locks taken in one order): a commit costs
        # SQLite a WAL sync and often a checkpoint. Each chunk still commits whole or not at all.
        with ordered_write(store.engine, run_id, [chunk for chunk, _, _ in group], decider=True) as conn:
            now_locked = db_now(conn)  # read under the locks: every event stamped before it is visible
            for chunk, signature, decided in group:
                insert_ignore(
                    conn,
                    t.branch_task_losses,
                    _chunk_task_losses(spec, run, chunk, ended.get(chunk, {}), now_locked),
                )
                writes = decide_chunk(
                    conn, spec, run, chunk, task_states=task_states, now=now_locked, ended_state=ended_state
                )
                chunk_decided = write_decisions(
                    conn,
                    run_id,
                    spec.node_id,
                    chunk,
                    writes,
                    rows_total=run.chunk_rows(chunk),
                    signature=signature,
                )
                decided_total += chunk_decided
                newly_decided += chunk_decided - decided
                tallies.append(DecidedRows.of(writes))
    if newly_decided and decided_total >= run.rows_total:
        # The run is decided: the summary, the report and the UI read these tables next.
        with store.engine.begin() as conn:
            refresh_statistics(conn, [t.step_results, t.decisions, t.recorded_outcomes, t.source_rows])
    return PassResult(
        rows_total=run.rows_total,
        rows_decided=decided_total,
        deadline=deadline,
        now=now,
        newly_decided=newly_decided,
        decided=DecidedRows.combined(tallies),
    )


# Rows of undecided chunks the pass evaluates per transaction (whole chunks, one at least).
PASS_ROWS_PER_WRITE = 5_000


def _write_groups(run: RunInfo, due: list[tuple[int, str, int]]) -> Iterator[list[tuple[int, str, int]]]:
    """The chunks to evaluate, in order, grouped up to :data:`PASS_ROWS_PER_WRITE` rows a group."""
    group: list[tuple[int, str, int]] = []
    rows = 0
    for item in due:
        group.append(item)
        rows += run.chunk_rows(item[0])
        if rows >= PASS_ROWS_PER_WRITE:
            yield group
            group, rows = [], 0
    if group:
        yield group


def _chunk_task_losses(
    spec: CoalesceSpec, run: RunInfo, chunk: int, ended: Mapping[str, str], now: datetime
) -> list[dict[str, Any]]:
    """``branch_task_losses`` rows of one chunk: its ended branch tasks ``{task id: state}``, seen ``now``."""
    branch_of = {node: branch for branch, node in spec.delivering.items()}
    return [
        {
            "run_id": run.run_id,
            "node_id": node_id,
            "chunk": chunk,
            "branch_name": branch_of[node_id],
            "task_state": state,
            "observed_at": now,
        }
        for node_id, state in ended.items()
    ]


def supersede_resolutions(store: AuditStore, spec: CoalesceSpec, run_id: str, *, before: datetime) -> int:
    """A new try of a coalesce that had ended: reopen the rows its end resolved, keeping the trail.

    Resolutions (``coalesce_task_<state>`` decisions) move to ``superseded_decisions``, their token
    outcomes stay but are no longer terminal (``superseded_at``), so the new try decides those rows
    afresh. Policy decisions are never reopened. Returns how many rows were reopened.

    :param before: the start of the try that asks: only resolutions recorded before it are from an
        earlier try. A try that was itself marked ended while still running (a person marked it
        failed) must not undo the resolution of its own end.
    """
    cd = t.coalesce_decisions.c
    resolution = and_(
        cd.run_id == run_id,
        cd.node_id == spec.node_id,
        cd.failure_reason.like(COALESCE_TASK_PREFIX + "%"),
        cd.recorded_at < before,
    )
    with store.engine.connect() as conn:
        chunks = sorted(conn.execute(select(cd.chunk).where(resolution).distinct()).scalars())
        run = load_run(conn, run_id)
    if run is None or not chunks:
        return 0
    reopened = 0
    for chunk in chunks:
        with ordered_write(store.engine, run_id, [chunk], decider=True) as conn:
            now = db_now(conn)
            rows = (
                conn.execute(select(t.coalesce_decisions).where(resolution, cd.chunk == chunk))
                .mappings()
                .all()
            )
            if not rows:
                continue
            conn.execute(
                t.superseded_decisions.insert(),
                [
                    {
                        **{
                            c.name: row[c.name] for c in t.superseded_decisions.c if c.name != "superseded_at"
                        },
                        "superseded_at": now,
                    }
                    for row in rows
                ],
            )
            groups = [join_group_id(row["row_id"], spec.node_id) for row in rows]
            ro = t.recorded_outcomes.c
            conn.execute(
                update(t.recorded_outcomes)
                .where(ro.run_id == run_id, ro.join_group_id.in_(groups), ro.is_terminal)
                .values(is_terminal=False, superseded_at=now)
            )
            d = t.decisions.c
            conn.execute(
                t.decisions.delete().where(
                    d.run_no == run.run_no,
                    d.node_id == spec.node_id,
                    d.chunk == chunk,
                    d.row_no.in_([row_numbers(row["row_id"])[1] for row in rows]),
                )
            )
            decided = decided_in_chunk_count(conn, run_id, spec.node_id, chunk)
            set_progress(conn, run_id, spec.node_id, {chunk: (decided, run.chunk_rows(chunk))}, now)
            reopened += len(rows)
    return reopened


def decide_chunk(
    conn: Connection,
    spec: CoalesceSpec,
    run: RunInfo,
    chunk: int,
    *,
    task_states: Mapping[str, str],
    now: datetime,
    ended_state: str | None = None,
) -> list[DecisionWrite]:
    """Replay every undecided row of a chunk as of the audit clock ``now``; the final ones to write.

    Called inside the pass's ordered transaction (so ``now`` is after every event it can see), or
    read-only by :func:`waiting_poll` to know whether a pass would decide something.

    :param ended_state: see :func:`coalesce_pass`: rows still pending are resolved, not skipped.
    """
    deadline = deadline_of(run, spec.config)
    rows, states, losses = read_chunk_log(conn, spec, run.run_id, chunk, undecided_only=True)
    decided: list[tuple[str, str, Decision]] = []
    for row_id, row_key, _ in rows:
        events = row_events(spec, states.get(row_id, {}), losses)
        decision = replay(spec.config, events, deadline=deadline, now=now)
        if not decision.is_final:
            if ended_state is None:
                continue
            decision = resolve_ended(spec.config, events, at=now, task_state=ended_state)
        decided.append((row_id, row_key, decision))
    bodies = output_bodies(
        states[row_id][b] for row_id, _, d in decided if d.status is DecisionStatus.MERGED for b in d.consumed
    )
    if spec.config.fails_on_collision and bodies:
        # The log says merge; whether the outputs collide decides it: replay those rows with them.
        decided = [
            (
                row_id,
                row_key,
                replay(
                    spec.config,
                    row_events(spec, states[row_id], losses),
                    deadline=deadline,
                    now=now,
                    collisions=collision_check(spec.config, states[row_id], bodies),
                )
                if d.status is DecisionStatus.MERGED
                else d,
            )
            for row_id, row_key, d in decided
        ]
    task_state_of = {
        branch: task_states.get(key, UNKNOWN_TASK_STATE)
        for branch in spec.config.branches
        for key, key_chunk in spec.task_keys(branch, run.chunks_total).items()
        if key_chunk in (chunk, WHOLE_TASK)
    }
    return [
        _decision_write(
            spec, run, chunk, row_id, row_key, d, states.get(row_id, {}), bodies, task_state_of, now
        )
        for row_id, row_key, d in decided
    ]


# A pass writes the same few branch lists and missing-branch maps for thousands of rows: their JSON
# is made once (the values are tuples of branch names and reasons, so they can key a cache).
@functools.lru_cache(maxsize=4096)
def _list_json(items: tuple[str, ...]) -> str:
    return dumps(list(items))


@functools.lru_cache(maxsize=4096)
def _mapping_json(items: tuple[tuple[str, str], ...]) -> str:
    return dumps(dict(items))


def _decision_write(
    spec: CoalesceSpec,
    run: RunInfo,
    chunk: int,
    row_id: str,
    row_key: str,
    decision: Decision,
    states: Mapping[str, TokenState],
    bodies: Mapping[str, Any],
    task_state_of: Mapping[str, str],
    now: datetime,
) -> DecisionWrite:
    config, node_id, run_id = spec.config, spec.node_id, run.run_id
    join_group = join_group_id(row_id, node_id)
    # A final decision always has its time, and a run is decided only once its fork completed.
    if decision.decided_at is None or run.completed_at is None:
        missing = "the decision has no decided_at" if decision.decided_at is None else "no completed_at"
        raise AuditInvariantError(
            f"coalesce {node_id}: cannot write the {decision.status} decision of row {row_key!r} "
            f"of audit run {run_id}: {missing}"
        )
    write = DecisionWrite(row_id=row_id, row_key=row_key, chunk=chunk, decision={})
    # A field_collision failure keeps the collisions that failed it, as a merge records its own.
    collisions = decision.details.get("collisions") if decision.status is DecisionStatus.FAILED else None
    merged_hash = merged_body = None
    if decision.status is DecisionStatus.MERGED:
        # The merged token, its state at this node and the consumed tokens' outcome (coalesced)
        # are implied by the decision and its merged row: nothing else is written for them.
        outputs = {b: bodies[states[b].output_ref or ""] for b in decision.consumed}
        merged = merge_outputs(config, decision.consumed, outputs)
        collisions = merged.collisions or None
        merged_hash, merged_body = hash_value(merged.row, what=f"merged row {row_key!r}")
    for branch in config.branches:
        if branch in decision.consumed:
            continue
        state = states.get(branch)
        # A branch with a state already has its token id; derive it only for the others.
        token = state.token_id if state is not None else branch_token_id(row_id, branch)
        reason: str | None
        if branch in decision.missing:
            reason = decision.missing[branch]
            if is_task_loss(reason) and state is not None and state.status in ARRIVAL_NODE_STATUSES:
                # Its task's loss was the branch's event; the answer that task wrote after it is late.
                reason = late_reason(decision.status)
            outcome = missing_outcome(reason)
            if reason == NOT_ARRIVED:  # the outcome's reason says what its task was doing then
                reason = branch_task_reason(task_state_of.get(branch))
        else:  # arrived before a failure decision
            outcome = TokenOutcome.ROW_FAILED
            reason = decision.failure_reason.value if decision.failure_reason else None
        error_hash = (
            recorded_error_fingerprint(state.error)
            if outcome == TokenOutcome.LOST
            and state is not None
            and state.status == NodeStatus.FAILED
            and reason is not None
            and not is_task_loss(reason)
            else None
        )
        write.outcomes.append(
            outcome_row(
                token, run_id, row_id, outcome, reason, now, join_group=join_group, error_hash=error_hash
            )
        )
    details = dict(decision.details)
    waiting = {
        b: task_state_of.get(b, UNKNOWN_TASK_STATE) for b, r in decision.missing.items() if r == NOT_ARRIVED
    }
    if waiting:
        details["branch_task_states"] = waiting
    details["arrival_order"] = [
        {"branch": a.branch, "offset_ms": a.offset_ms} for a in decision.arrival_order
    ]
    write.decision = {
        "run_no": run.run_no,
        "node_id": node_id,
        "chunk": chunk,
        "row_no": row_numbers(row_id)[1],
        "decision": decision.status.value,
        "failure_reason": decision.failure_reason.value if decision.failure_reason else None,
        "details_json": dumps(details),
        "consumed": _list_json(decision.consumed),
        "missing_json": _mapping_json(tuple(decision.missing.items())),
        "late_json": _list_json(decision.late),
        "collisions_json": dumps(collisions) if collisions else None,
        "merged_hash": merged_hash,
        "merged_body": merged_body,
        "decided_at": decision.decided_at,
        "wait_ms": int((decision.decided_at - run.completed_at).total_seconds() * 1000),
        "wait_from_first_arrival_ms": decision.wait_from_first_arrival_ms,
        "recorded_at": now,
    }
    return write
