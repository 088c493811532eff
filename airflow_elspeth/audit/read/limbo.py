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

from sqlalchemy import (
    Connection,
    Engine,
    func,
    literal,
    select,
    true,
    union_all,
)

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.dml import db_now
from airflow_elspeth.audit.model import CoalesceSpec, run_number
from airflow_elspeth.audit.read.decisions import whole_run_reads
from airflow_elspeth.audit.read.events import of_source_row, row_id_of
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
from airflow_elspeth.audit.read.sql import json_list_elements
from airflow_elspeth.core.vocabulary import (
    ENDED_TASK_STATES,
    DecisionStatus,
    NodeType,
    RunStatus,
    TokenKind,
)

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
    * ``tokens_without_outcome`` (and ``duplicate_terminal_outcomes``): branch tokens of a
      completed run without a terminal outcome (or with two in one join group), once every
      registered coalesce decided every row or (with task states) every registered coalesce's task
      ended. Count: tokens. Read from the event tables (see :func:`_outcome_findings`).
    """
    findings: list[Finding] = []
    with whole_run_reads(engine) as conn:
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

    d = t.decisions.c
    run_no = run_number(conn, run_id)
    rows_total = _rows_of(conn, run_no)
    # Decisions of rows still stored: one whose row is gone is verify's source_token_missing.
    decided: dict[str, int] = {
        node_id: int(n)
        for node_id, n in conn.execute(
            select(d.node_id, func.count())
            .select_from(t.decisions.join(t.source_rows, of_source_row(t.decisions)))
            .where(d.run_no == run_no)
            .group_by(d.node_id)
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
        findings.append(_rows_undecided(conn, run_id, run_no, rows_total, flagged))
    if all_decided or all_ended:
        because = "every row decided" if all_decided else "coalesces ended"
        findings.extend(_outcome_findings(conn, run, run_no, because))
    return findings


def _rows_of(conn: Connection, run_no: int) -> int:
    sr = t.source_rows.c
    return int(conn.execute(select(func.count()).where(sr.run_no == run_no)).scalar_one())


def _run_not_closed(conn: Connection, run: AuditRun, fork_state: str | None) -> RunNotClosed | None:
    ru, sr = t.runs.c, t.source_rows.c
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
    run_no = run_number(conn, run.audit_run_id)
    rows = _rows_of(conn, run_no)
    examples = list(
        conn.execute(
            select(sr.row_key).where(sr.run_no == run_no).order_by(sr.chunk, sr.row_no).limit(LIMBO_EXAMPLES)
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
    conn: Connection, run_id: str, run_no: int, rows_total: int, flagged: Mapping[str, UndecidedCoalesce]
) -> RowsUndecided:
    sr, d = t.source_rows.c, t.decisions.c
    nodes = sorted(flagged)
    if len(nodes) == 1:
        count = flagged[nodes[0]].undecided
    else:
        decided_by_all = (
            select(d.chunk, d.row_no)
            .select_from(t.decisions.join(t.source_rows, of_source_row(t.decisions)))
            .where(d.run_no == run_no, d.node_id.in_(nodes))
            .group_by(d.chunk, d.row_no)
            .having(func.count(func.distinct(d.node_id)) == len(nodes))
            .subquery()
        )
        count = rows_total - int(conn.execute(select(func.count()).select_from(decided_by_all)).scalar_one())
    examples: dict[str, tuple[int, int]] = {}
    for node_id in nodes:
        decided = select(d.row_no).where(d.node_id == node_id, of_source_row(t.decisions)).exists()
        for key, chunk, row_no in conn.execute(
            select(sr.row_key, sr.chunk, sr.row_no)
            .where(sr.run_no == run_no, ~decided)
            .order_by(sr.chunk, sr.row_no)
            .limit(LIMBO_EXAMPLES)
        ):
            examples[key] = (chunk, row_no)
    return RowsUndecided(
        run_id=run_id,
        count=count,
        examples=sorted(examples, key=lambda k: examples[k])[:LIMBO_EXAMPLES],
        coalesces={node: flagged[node] for node in nodes},
    )


def _outcome_findings(conn: Connection, run: AuditRun, run_no: int, because: str) -> list[Finding]:
    """Tokens of a finished run without exactly one terminal outcome (superseded ones do not count).

    Read from the events, never the views: a source token's outcome (``forked``) and a merged
    token's (``merged``) are implied by the very rows their tokens come from, so only branch
    tokens can lack one. A branch token (one per row and branch of the run) has its terminal
    outcome when a merged decision of its row consumed its branch (``coalesced``, implied) or when
    ``recorded_outcomes`` holds a terminal one. The tokens are matched by their ids (``audit.ids``)
    in one anti-join. A duplicate is a token with two terminal outcomes in one join group: a
    coalesce that merged it and also recorded another outcome for it. Two coalesces consuming one
    branch each end its token here, one per join group (the ``token_outcomes`` view shows only the
    first, as 0.1 kept one); the recorded ones are one per token (``uq_recorded_outcomes_terminal``).
    """
    run_id = run.audit_run_id
    sr, d, o = t.source_rows.c, t.decisions.c, t.recorded_outcomes.c
    if not run.branches:
        return []

    tokens = union_all(
        *(
            select(
                sr.chunk, sr.row_no, sr.row_key, (row_id_of(sr) + literal(f":b:{branch}")).label("token_id")
            ).where(sr.run_no == run_no)
            for branch in run.branches
        )
    ).subquery("branch_tokens")
    consumed = json_list_elements(conn.engine, d.consumed)
    # Terminal outcomes as (token, join group): the coalesced ones merged decisions imply, and the
    # recorded ones.
    implied = (
        select(
            (row_id_of(d) + ":b:" + consumed.c.value).label("token_id"),
            (row_id_of(d) + ":j:" + d.node_id).label("join_group_id"),
        )
        .select_from(t.decisions.join(consumed, true()))
        .where(d.run_no == run_no, d.decision == DecisionStatus.MERGED.value)
    )
    recorded = select(o.token_id, o.join_group_id).where(o.run_id == run_id, o.is_terminal)
    terminal = union_all(implied, recorded).subquery("terminal")
    ended = select(terminal.c.token_id).distinct().subquery("ended")
    missing = (
        select(tokens.c.token_id, tokens.c.row_key, tokens.c.chunk, tokens.c.row_no)
        .select_from(tokens.outerjoin(ended, ended.c.token_id == tokens.c.token_id))
        .where(ended.c.token_id.is_(None))
        .subquery("missing")
    )
    found = conn.execute(
        select(missing.c.token_id, missing.c.row_key, func.count().over().label("found"))
        .order_by(missing.c.chunk, missing.c.row_no, missing.c.token_id)
        .limit(LIMBO_EXAMPLES)
    ).all()
    findings: list[Finding] = []
    if found:
        findings.append(
            TokensWithoutOutcome(
                run_id=run_id,
                count=found[0].found,
                examples=[x.token_id for x in found],
                example_rows=sorted({x.row_key for x in found}),
                by_kind={TokenKind.BRANCH.value: found[0].found},
                checked_because=because,
            )
        )
    duplicated = sorted(
        set(
            conn.execute(
                select(terminal.c.token_id)
                .group_by(terminal.c.token_id, terminal.c.join_group_id)
                .having(func.count() > 1)
            ).scalars()
        )
    )
    if duplicated:
        findings.append(
            DuplicateTerminalOutcomes(
                run_id=run_id,
                count=len(duplicated),
                examples=duplicated[:LIMBO_EXAMPLES],
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
