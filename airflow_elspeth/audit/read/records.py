"""The typed records the read models return, and their one way into JSON.

The UI (attributes in its templates), the CLI and the JSON outputs (``--json``, the UI's JSON API,
the XCom ``coalesce_summary``) render these; a stored row becomes a record in one place
(:meth:`DecisionRecord.from_row`), and a record becomes JSON in one place (:func:`to_json`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self

from sqlalchemy import RowMapping


def to_json(value: Any) -> Any:
    """A record (or a list or mapping of records) as plain JSON values: dataclasses become dicts of
    their fields in declared order, tuples lists.

    Timestamps stay ``datetime``: each outlet writes them as it always did (the CLI with ``str``, the
    UI's JSON API as ISO 8601), and the records that are a public contract (the summary) hold text.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    return value


def fields_of(record: Any, base: type) -> dict[str, Any]:
    """The fields ``base`` declares, read from ``record`` (an instance of ``base`` or a subclass):
    what a record extending ``base`` is built from."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(base)}


# --------------------------------------------------------------------------------------------------
# A coalesce's summary (docs/ARCHITECTURE.md, "The coalesce summary")


@dataclass(frozen=True)
class MissingBranch:
    """Rows of a coalesce a branch did not contribute to, per reason (in reason order)."""

    rows: int
    reasons: dict[str, int]


@dataclass(frozen=True)
class FieldCollision:
    """Rows whose merge found a field in several branches, and those branches (configured order)."""

    rows: int
    branches: list[str]


@dataclass(frozen=True)
class FailedRow:
    row_key: str
    reason: str | None
    arrived: list[str]
    missing: dict[str, str]


@dataclass(frozen=True)
class Wait:
    """Mean and max of a wait over the decided rows, in whole milliseconds (None before any)."""

    mean: int | None
    max: int | None


@dataclass(frozen=True)
class CoalesceSummary:
    """What a coalesce decided, from grouped queries: the one source of counts (the XCom
    ``coalesce_summary`` is :func:`to_json` of it, the report and the UI read it)."""

    coalesce: str
    policy: str
    quorum: int | None
    merge: str
    select_branch: str | None
    on_collision: str
    output_contract: Mapping[str, Any] | None
    expected_branches: list[str]
    deadline: str | None  # ISO 8601; None until the fork completed
    rows_total: int
    rows_merged: int
    rows_failed: int
    # Rows this coalesce has not decided (yet): a resolution replaced by a later try's pass
    # (superseded_decisions) does not count as decided.
    rows_undecided: int
    # Equal to the late columns of missing_branches: late answers seen by the decision and those
    # written after it.
    late_arrivals: int
    missing_branches: dict[str, MissingBranch]
    failure_reasons: dict[str, int]
    field_collisions: dict[str, FieldCollision]
    failed_rows: list[FailedRow]
    failed_rows_truncated: bool
    # How long the decided rows waited: ``from_fork_completion`` and ``from_first_arrival`` (rows
    # with an arrival).
    waits_ms: dict[str, Wait]
    audit_run_id: str


# --------------------------------------------------------------------------------------------------
# Audit runs: as stored, with their place among the tries of their fork, as the run pages show them


@dataclass(frozen=True)
class AuditRun:
    """One audit run (a fork try) as stored in ``runs`` (:meth:`from_row`), ``branches_json`` read."""

    audit_run_id: str
    dag_id: str
    airflow_run_id: str
    fork_task_id: str
    try_number: int
    clear_number: int
    run_type: str | None
    logical_date: datetime | None
    started_at: datetime
    completed_at: datetime | None
    status: str
    status_reason: str | None
    rows_total: int | None
    chunk_size: int
    chunks_total: int | None
    branches: list[str]
    previous_run_id: str | None

    @classmethod
    def from_row(cls, row: RowMapping | Mapping[str, Any]) -> AuditRun:
        """The record of a ``runs`` row."""
        return cls(
            audit_run_id=row["run_id"],
            dag_id=row["dag_id"],
            airflow_run_id=row["airflow_run_id"],
            fork_task_id=row["fork_task_id"],
            try_number=row["try_number"],
            clear_number=row["clear_number"],
            run_type=row["run_type"],
            logical_date=row["logical_date"],
            started_at=row["started_at"],
            completed_at=row["completed_at"],
            status=row["status"],
            status_reason=row["status_reason"],
            rows_total=row["rows_total"],
            chunk_size=row["chunk_size"],
            chunks_total=row["chunks_total"],
            branches=json.loads(row["branches_json"]),
            previous_run_id=row["previous_run_id"],
        )


@dataclass(frozen=True)
class AuditRunTry(AuditRun):
    """An audit run with its place among the tries of its fork in its DAG run (``runs.with_tries``):
    ``newest_try`` over the whole store; an earlier try is superseded by it."""

    newest_try: int

    @classmethod
    def of(cls, run: AuditRun, newest_try: int) -> AuditRunTry:
        return cls(**fields_of(run, AuditRun), newest_try=newest_try)

    @property
    def current(self) -> bool:
        """It is the newest try of its fork in its DAG run."""
        return self.try_number >= self.newest_try

    @property
    def superseded_by_try(self) -> int | None:
        return None if self.current else self.newest_try


@dataclass(frozen=True)
class BranchStep:
    node_id: str
    branch: str


@dataclass(frozen=True)
class DecisionCounts:
    """What a coalesce decided in an audit run (``runs.decision_counts``, one grouped read): rows
    merged, failed, undecided (None while the run's row count is not known) and the failed rows per
    failure reason, most first."""

    merged: int
    failed: int
    undecided: int | None
    failure_reasons: dict[str, int]


@dataclass(frozen=True)
class AuditRunView(AuditRun):
    """One audit run (a fork try) of a DAG run with its coalesces, branch steps and, per coalesce,
    its decision counts."""

    # The newest try of its fork in the DAG run (an earlier try stays readable, superseded).
    current: bool
    coalesces: list[str]
    branch_steps: list[BranchStep]
    decisions: dict[str, DecisionCounts]


# --------------------------------------------------------------------------------------------------
# The runs index (outcomes first)


@dataclass(frozen=True)
class UndecidedStatus:
    """Why rows of a coalesce are undecided (:func:`~airflow_elspeth.audit.read.index.undecided_status`)."""

    kind: str
    rows: int
    deadline: datetime | None
    task_state: str | None
    overdue: bool
    seconds_to_deadline: float | None


@dataclass(frozen=True)
class CoalesceOutcome:
    """One coalesce of an audit run as the index lists it: counts, why rows failed or wait, verdict."""

    coalesce: str
    policy: str
    rows: int | None  # None while the fork runs
    merged: int
    failed: int
    # Why rows failed: failure reason -> rows, most first (what the index shows beside the count).
    failure_reasons: dict[str, int]
    undecided: int | None
    deadline: datetime | None
    task_state: str | None
    undecided_status: UndecidedStatus | None
    overdue: bool
    verdict: str


@dataclass(frozen=True)
class IndexedRun:
    """One audit run as the index lists it (``index.audit_index``): the stored run, its place among
    the tries of its fork (``newest_try``, ``current``), its coalesces with their decision counts
    and outcomes (in task order), and the worst verdict of those.

    ``run_id`` and ``audit_run_id`` are the same id: the index's JSON has always carried both.
    """

    run_id: str
    dag_id: str
    airflow_run_id: str
    fork_task_id: str
    try_number: int
    run_type: str | None
    logical_date: datetime | None
    status: str
    status_reason: str | None
    started_at: datetime
    completed_at: datetime | None
    rows_total: int | None
    chunks_total: int | None
    previous_run_id: str | None
    audit_run_id: str
    newest_try: int
    current: bool
    coalesces: list[str]
    decisions: dict[str, DecisionCounts]
    outcomes: list[CoalesceOutcome]
    verdict: str


# --------------------------------------------------------------------------------------------------
# A coalesce's decision of one row (``coalesce_decisions``), as the row page, the pages of rows and
# ``explain`` show it


@dataclass(frozen=True)
class DecisionRecord:
    """One stored decision, its JSON columns read (:meth:`from_row`)."""

    coalesce: str
    row_key: str
    chunk: int
    decision: str
    failure_reason: str | None
    policy: str
    merge_strategy: str
    consumed: list[str]
    # The branches that arrived before the decision: a merge's consumed, a failure's ``arrived``.
    arrived: list[str]
    missing: dict[str, str]
    late: list[str]
    details: dict[str, Any]
    collisions: dict[str, list[str]] | None
    decided_at: datetime
    recorded_at: datetime
    wait_ms: int
    wait_from_first_arrival_ms: int | None
    merged_token_id: str | None

    @classmethod
    def from_row(
        cls, row: RowMapping | Mapping[str, Any], *, missing: dict[str, str] | None = None
    ) -> DecisionRecord:
        """The record of a ``coalesce_decisions`` row.

        :param missing: the missing branches to show instead of the stored ones (what became of
            them since the decision, :func:`~airflow_elspeth.audit.read.decisions.decision_rows`).
        """
        consumed = json.loads(row["consumed"])
        details = json.loads(row["details_json"])
        return cls(
            coalesce=row["node_id"],
            row_key=row["row_key"],
            chunk=row["chunk"],
            decision=row["decision"],
            failure_reason=row["failure_reason"],
            policy=row["policy"],
            merge_strategy=row["merge_strategy"],
            consumed=consumed,
            arrived=details.get("arrived", consumed),
            missing=json.loads(row["missing_json"]) if missing is None else missing,
            late=json.loads(row["late_json"]),
            details=details,
            collisions=json.loads(row["collisions_json"]) if row["collisions_json"] else None,
            decided_at=row["decided_at"],
            recorded_at=row["recorded_at"],
            wait_ms=row["wait_ms"],
            wait_from_first_arrival_ms=row["wait_from_first_arrival_ms"],
            merged_token_id=row["merged_token_id"],
        )

    @classmethod
    def extending(cls, record: DecisionRecord, **extra: Any) -> Self:
        """This kind of record (a subclass adding what a view shows) of ``record``, with ``extra``."""
        return cls(**fields_of(record, DecisionRecord), **extra)

    @property
    def arrival_order(self) -> list[dict[str, Any]]:
        """The arrivals up to the decision, each ``{branch, offset_ms}`` from the first (empty for
        a decision without arrivals, or written before the arrival record existed)."""
        order: list[dict[str, Any]] = self.details.get("arrival_order") or []
        return order


@dataclass(frozen=True)
class RowDecision(DecisionRecord):
    """A decision as the row page shows it: the record, what it merged, and (when its coalesce's
    configuration is stored) its policy in words, the deadline, the explanation and the replay."""

    merged_output: Any = None
    policy_text: str | None = None
    collision_rule: str | None = None
    deadline: datetime | None = None
    explanation: str | None = None
    replay: dict[str, Any] | None = None


@dataclass(frozen=True)
class RowView:
    """One row from source to decision, as the row page and the lineage API show it: the source
    row, the fork, each branch's node states in step order and outcomes, every coalesce decision
    and the resolutions a later try of their coalesce replaced."""

    audit_run_id: str
    row_key: str
    row_index: int
    chunk: int
    source: Any
    source_hash: str
    fork: dict[str, Any]  # task_id, token_id, fork_group_id, created_at, branches
    fork_completed_at: datetime | None
    branches: list[dict[str, Any]]
    decisions: list[RowDecision]
    # Resolutions replaced when a person cleared the coalesce: history, never decisions.
    superseded_decisions: list[SupersededDecision]


@dataclass(frozen=True)
class LateArrival:
    """A branch that answered a row after its decision; None times: no answer found at the step."""

    branch: str
    arrived_at: datetime | None
    after_decision_s: float | None


@dataclass(frozen=True)
class LateDecision(DecisionRecord):
    """A decision that recorded late branches, with each one's arrival (the late-arrivals page)."""

    late_arrivals: list[LateArrival] = field(default_factory=list)


@dataclass(frozen=True)
class SupersededDecision:
    """A resolution a later try of its coalesce replaced: history, never a decision."""

    coalesce: str
    decision: str
    failure_reason: str | None
    details: dict[str, Any]
    missing: dict[str, str]
    decided_at: datetime
    recorded_at: datetime
    superseded_at: datetime

    @classmethod
    def from_row(cls, row: RowMapping | Mapping[str, Any]) -> SupersededDecision:
        """The record of a ``superseded_decisions`` row."""
        return cls(
            coalesce=row["node_id"],
            decision=row["decision"],
            failure_reason=row["failure_reason"],
            details=json.loads(row["details_json"]),
            missing=json.loads(row["missing_json"]),
            decided_at=row["decided_at"],
            recorded_at=row["recorded_at"],
            superseded_at=row["superseded_at"],
        )


@dataclass(frozen=True)
class DecisionPage:
    """One page of a coalesce's decided rows, with the filter's total."""

    filter: dict[str, Any]
    total: int
    limit: int
    offset: int
    rows: list[DecisionRecord] = field(default_factory=list)


@dataclass(frozen=True)
class LateArrivalsPage:
    """Arrivals after their row's decision (``decisions.late_arrivals``): a page of the rows whose
    decision recorded a late branch, and the arrivals written after their decision was."""

    total_rows: int
    limit: int
    offset: int
    rows: list[LateDecision]
    # Each: row_key, branch, decision, failure_reason, decided_at, decision_recorded_at, arrived_at,
    # after_decision_s (at most a page's maximum of them; ``after_write_total`` counts them all).
    after_write: list[dict[str, Any]]
    after_write_total: int


# --------------------------------------------------------------------------------------------------
# A coalesce's overview (the coalesce section of the run page)


@dataclass(frozen=True)
class MatrixCell:
    """Rows a branch did not contribute to for one reason, and how many of them failed."""

    rows: int
    failed_rows: int


@dataclass(frozen=True)
class MissingMatrix:
    """The branch x reason matrix of missing branches (the summary's ``missing_branches``, cell by
    cell): branches in configured order, reasons in reason order."""

    branches: list[str]
    reasons: list[str]
    reason_kinds: dict[str, str]
    cells: dict[str, dict[str, MatrixCell]]
    branch_totals: dict[str, int]
    reason_totals: dict[str, int]


@dataclass(frozen=True)
class CoalesceOverview:
    """The coalesce summary extended with what the coalesce section of a page shows besides it
    (``decisions.coalesce_overview``); every count is the summary's."""

    coalesce: str
    audit_run_id: str
    policy: str
    policy_text: str
    quorum: int | None
    merge: str
    select_branch: str | None
    branches: list[str]
    delivering: dict[str, str]
    timeout_s: float
    fork_completed_at: datetime | None
    deadline: datetime | None
    rows_total: int
    rows_merged: int
    rows_failed: int
    rows_undecided: int
    late_arrivals: int
    late_rows: int
    late_after_write: int
    # Failed rows per reason, most first.
    failure_reasons: dict[str, int]
    missing_matrix: MissingMatrix
    field_collisions: dict[str, FieldCollision]
    collision_rule: str
    output_contract: Mapping[str, Any] | None


@dataclass(frozen=True)
class CoalescePage(CoalesceOverview):
    """The overview with the arrival curves the page's chart draws (``plugins.series``)."""

    arrivals: dict[str, Any]

    @classmethod
    def of(cls, overview: CoalesceOverview, arrivals: dict[str, Any]) -> CoalescePage:
        return cls(**fields_of(overview, CoalesceOverview), arrivals=arrivals)


# --------------------------------------------------------------------------------------------------
# What one task of a DAG run is in the audit trail


@dataclass(frozen=True)
class TaskView:
    """A task of a DAG run in the audit trail (``tasks.task_view``): ``kind`` is ``fork``,
    ``branch`` or ``coalesce`` with the audit run it appears in, or None (no audit record)."""

    kind: str | None
    task_id: str
    audit_run_id: str | None


@dataclass(frozen=True)
class StepErrors:
    """Failed rows of a branch step with one error type: how many, a message, the first row keys."""

    rows: int
    message: str
    row_keys: list[str]


@dataclass(frozen=True)
class TaskEnd:
    """Ends of a delivering task the coalesce recorded with one task state: chunk records, first seen."""

    task_state: str
    records: int
    first_seen_at: datetime


@dataclass(frozen=True)
class BranchStepView(TaskView):
    """What a branch step did (in one chunk, for a mapped task instance): node states by status,
    durations, errors by type (most rows first), and the rows its branch lost to its task's end."""

    branch: str
    mapped: bool
    chunk: int | None
    states_total: int
    by_status: dict[str, int]
    first_started_at: datetime | None
    last_completed_at: datetime | None
    avg_duration_ms: float | None
    max_duration_ms: int | None
    errors: dict[str, StepErrors]
    delivers_to: list[str]
    task_ends: list[TaskEnd]
    rows_lost_at_task_end: int
