"""Limbo: work the audit trail shows as open that nothing will ever close.

An audit run still ``running`` although its fork try ended, rows no coalesce decided long after the
deadline (or after the coalesce task ended), tokens without a terminal outcome in a run that is
over. The checks read only the audit store; Airflow task states come in as a plain mapping (only
the CLI reads them, through :mod:`airflow_elspeth.airflow_states`). ``verify`` reports these
through :func:`airflow_elspeth.audit.read.verify.verify_run`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, and_, func, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.dml import db_now
from airflow_elspeth.audit.model import CoalesceSpec
from airflow_elspeth.audit.read.records import (
    AuditRun,
    DuplicateTerminalOutcomes,
    Finding,
    LaterTry,
    RowsUndecided,
    RunNotClosed,
    TokensWithoutOutcome,
    UndecidedCoalesce,
)
from airflow_elspeth.audit.read.runs import coalesce_tasks
from airflow_elspeth.core.vocabulary import ENDED_TASK_STATES, NodeType, RunStatus

#: Airflow task states as a plain mapping: (dag_id, airflow_run_id, task_id) -> the state of that
#: (unmapped) task instance, its latest try. Only the CLI reads them from Airflow.
TaskStates = Mapping[tuple[str, str, str], str]

UNDECIDED_GRACE = timedelta(minutes=5)
LIMBO_EXAMPLES = 5


def limbo_findings(
    engine: Engine,
    runs: Sequence[AuditRun],
    *,
    task_states: TaskStates | None = None,
    now: datetime | None = None,
) -> list[Finding]:
    """Limbo in the given audit runs: one finding (a :class:`~airflow_elspeth.audit.read.records.Finding`
    of its kind) per (audit run, kind), with a count and examples.

    :param runs: the audit runs (``runs.select_runs``).
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
    findings: list[Finding] = []
    with engine.connect() as conn:
        clock = now if now is not None else db_now(conn)
        for run in runs:
            findings.extend(_run_limbo(conn, run, task_states, clock))
    return findings


def _run_limbo(
    conn: Connection, run: AuditRun, task_states: TaskStates | None, now: datetime
) -> list[Finding]:
    run_id = run.audit_run_id

    def state_of(task_id: str) -> str | None:
        if task_states is None:
            return None
        state = task_states.get((run.dag_id, run.airflow_run_id, task_id))
        return str(state) if state is not None else None

    findings: list[Finding] = []
    if run.status == RunStatus.RUNNING:
        unclosed = _run_not_closed(conn, run, state_of(run.fork_task_id))
        if unclosed is not None:
            findings.append(unclosed)
        return findings
    if run.status != RunStatus.COMPLETED or run.completed_at is None:
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
    flagged: dict[str, UndecidedCoalesce] = {}
    all_decided, all_ended = True, task_states is not None
    n = t.nodes.c
    for node_id, task_id, config_json in conn.execute(
        select(n.node_id, n.task_id, n.config_json)
        .where(n.run_id == run_id, n.node_type == NodeType.COALESCE)
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
        deadline = run.completed_at + spec.config.timeout
        why = []
        if ended:
            why.append(f"coalesce task {task_id} ended {state}")
        if now > deadline + UNDECIDED_GRACE:
            why.append(f"past the deadline {deadline.isoformat()} by more than {UNDECIDED_GRACE}")
        if why:
            flagged[node_id] = UndecidedCoalesce(
                undecided=undecided, deadline=deadline, task_state=state, why=why
            )
    if flagged:
        findings.append(_rows_undecided(conn, run_id, rows_total, flagged))
    if all_decided or all_ended:
        findings.extend(
            _outcome_findings(conn, run_id, "every row decided" if all_decided else "coalesces ended")
        )
    return findings


def _run_not_closed(conn: Connection, run: AuditRun, fork_state: str | None) -> RunNotClosed | None:
    ru, r = t.runs.c, t.rows.c
    later = [
        LaterTry(run_id=x.run_id, try_number=x.try_number, status=x.status)
        for x in conn.execute(
            select(ru.run_id, ru.try_number, ru.status)
            .where(
                ru.dag_id == run.dag_id,
                ru.airflow_run_id == run.airflow_run_id,
                ru.fork_task_id == run.fork_task_id,
                ru.try_number > run.try_number,
            )
            .order_by(ru.try_number)
        )
    ]
    why = []
    if later:
        why.append(f"try {later[0].try_number} of fork task {run.fork_task_id} started")
    if fork_state in ENDED_TASK_STATES:
        why.append(f"fork task {run.fork_task_id} ended {fork_state}")
    if not why:
        return None
    rows = int(
        conn.execute(
            select(func.count()).select_from(t.rows).where(r.run_id == run.audit_run_id)
        ).scalar_one()
    )
    examples = list(
        conn.execute(
            select(r.row_key)
            .where(r.run_id == run.audit_run_id)
            .order_by(r.chunk, r.row_index)
            .limit(LIMBO_EXAMPLES)
        ).scalars()
    )
    return RunNotClosed(
        run_id=run.audit_run_id,
        count=rows,
        examples=examples,
        why=why,
        try_number=run.try_number,
        later_tries=later,
        fork_task_state=fork_state,
    )


def _rows_undecided(
    conn: Connection, run_id: str, rows_total: int, flagged: Mapping[str, UndecidedCoalesce]
) -> RowsUndecided:
    r, cd = t.rows.c, t.coalesce_decisions.c
    nodes = sorted(flagged)
    if len(nodes) == 1:
        count = flagged[nodes[0]].undecided
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
    return RowsUndecided(
        run_id=run_id,
        count=count,
        examples=sorted(examples, key=lambda k: examples[k])[:LIMBO_EXAMPLES],
        coalesces={node: flagged[node] for node in nodes},
    )


def _outcome_findings(conn: Connection, run_id: str, because: str) -> list[Finding]:
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
    findings: list[Finding] = []
    if by_kind:
        examples = conn.execute(
            select(tk.token_id, r.row_key)
            .select_from(t.tokens.outerjoin(t.rows, and_(r.run_id == tk.run_id, r.row_id == tk.row_id)))
            .where(*missing)
            .order_by(tk.chunk, tk.token_id)
            .limit(LIMBO_EXAMPLES)
        ).all()
        findings.append(
            TokensWithoutOutcome(
                run_id=run_id,
                count=sum(by_kind.values()),
                examples=[token_id for token_id, _ in examples],
                example_rows=sorted({key for _, key in examples if key is not None}),
                by_kind=by_kind,
                checked_because=because,
            )
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
            DuplicateTerminalOutcomes(
                run_id=run_id,
                count=len(duplicated),
                examples=[token_id for token_id, _ in duplicated[:LIMBO_EXAMPLES]],
                checked_because=because,
            )
        )
    return findings


def tasks_to_look_up(engine: Engine, runs: Sequence[AuditRun]) -> dict[tuple[str, str], set[str]]:
    """(dag_id, airflow_run_id) -> the fork and coalesce task ids whose Airflow states the checks use."""
    coalesces = coalesce_tasks(engine, [r.audit_run_id for r in runs])
    wanted: dict[tuple[str, str], set[str]] = {}
    for run in runs:
        key = (run.dag_id, run.airflow_run_id)
        wanted.setdefault(key, set()).update([run.fork_task_id, *coalesces.get(run.audit_run_id, [])])
    return wanted
