"""The typed records the read models return, and their one way into JSON.

The UI (attributes in its templates), the CLI and the JSON outputs (``--json``, the UI's JSON API,
the XCom ``coalesce_summary``) render these; a stored row becomes a record in one place
(:meth:`DecisionRecord.from_row`), and a record becomes JSON in one place (:func:`to_json`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

from sqlalchemy import RowMapping

from airflow_elspeth.core.vocabulary import Word

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Record = TypeVar("Record", bound="DataclassInstance")


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


def from_columns(cls: type[Record], row: RowMapping | Mapping[str, Any], **extra: Any) -> Record:
    """A record of ``cls`` from the stored row's columns of its fields' names (and ``extra``)."""
    return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls) if f.name not in extra}, **extra)


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
        return from_columns(cls, row, audit_run_id=row["run_id"], branches=json.loads(row["branches_json"]))


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
    # Rows each branch was lost on (its decision missed it for a loss), merged rows too.
    branch_losses: dict[str, int]
    # Branch answers that came late (before or after their row's decision), merged rows too.
    late_arrivals: int
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
class ShownField:
    """One shown field of a decision record: its label and its text as phrases, which an outlet
    joins with ``sep`` and breaks into lines only between two of them."""

    name: str
    label: str
    entries: list[str]
    sep: str

    @property
    def text(self) -> str:
        return self.sep.join(self.entries)


# Field metadata key: how the row page and ``explain`` show a field of a decision record.
SHOWN = "shown"


@dataclass(frozen=True)
class _Shown:
    label: str
    # The record -> the field's phrases; an empty list leaves the field out.
    entries: Callable[[Any], list[str]] | None
    sep: str


def shown(
    label: str, entries: Callable[[Any], list[str]] | None = None, *, sep: str = ", "
) -> dict[str, Any]:
    """Field metadata: the field is a line of the decision record on the row page and in
    ``explain`` (:meth:`DecisionRecord.shown_fields`), in declaration order.

    :param label: what both call it.
    :param entries: the record -> the field's phrases; by default the value's own
        (:func:`shown_entries`).
    :param sep: what joins the phrases.
    """
    return {SHOWN: _Shown(label, entries, sep)}


def shown_entries(value: Any) -> list[str]:
    """A field's value as phrases: nothing for None or an empty collection, a list's items, a
    mapping's ``key: value`` pairs, else the value's text."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"{key}: {item}" for key, item in value.items()]
    if isinstance(value, list | tuple):
        return [str(item) for item in value]
    return [str(value)]


def _consumed_entries(record: DecisionRecord) -> list[str]:
    return record.consumed or ["-"]


def _arrival_entries(record: DecisionRecord) -> list[str]:
    """``gpt +0 ms``, ``claude +437 ms``, ..., ``decided 5563 ms after the first``: the arrival
    record (nothing for a decision without arrivals, or written before it was recorded)."""
    order = record.arrival_order
    if not order:
        return []
    entries = [f"{a['branch']} +{a['offset_ms']} ms" for a in order]
    wait = record.wait_from_first_arrival_ms
    return [*entries, f"decided {wait} ms after the first"] if wait is not None else entries


def _missing_entries(record: DecisionRecord) -> list[str]:
    """``branch: reason``, with what the branch did since where that replaces the reason
    (``gemini: not_arrived, then skipped_decided``)."""
    since = record.missing_since
    return [f"{b}: {r}" + (f", then {since[b]}" if b in since else "") for b, r in record.missing.items()]


def _details_entries(record: DecisionRecord) -> list[str]:
    """The details as one JSON object, key by key (the arrival order is the arrived line)."""
    details = {k: v for k, v in record.details.items() if k != "arrival_order"}
    if not details:
        return []
    entries = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(details.items())]
    entries[0] = "{" + entries[0]
    entries[-1] += "}"  # the same entry when there is one
    return [e + "," for e in entries[:-1]] + entries[-1:]


def _collision_entries(record: DecisionRecord) -> list[str]:
    """``field ← branch, branch`` per field several merged branches supplied."""
    return [f"{name} ← {', '.join(branches)}" for name, branches in sorted((record.collisions or {}).items())]


@dataclass(frozen=True)
class DecisionRecord:
    """One stored decision, its JSON columns read (:meth:`from_row`).

    A field with :func:`shown` metadata is a line of the record wherever a person reads it (the
    row page and ``explain`` iterate :meth:`shown_fields`), so a new shown field needs nothing
    there.
    """

    coalesce: str
    row_key: str
    chunk: int
    decision: str
    failure_reason: str | None
    policy: str
    merge_strategy: str
    consumed: list[str] = field(metadata=shown("consumed", _consumed_entries))
    # The branches that arrived before the decision: a merge's consumed, a failure's ``arrived``;
    # shown as the arrival record (each one's offset from the first, the wait from the first).
    arrived: list[str] = field(metadata=shown("arrived", _arrival_entries, sep="; "))
    missing: dict[str, str] = field(metadata=shown("missing", _missing_entries, sep="; "))
    late: list[str]
    details: dict[str, Any] = field(metadata=shown("details", _details_entries, sep=" "))
    collisions: dict[str, list[str]] | None = field(
        metadata=shown("field collisions", _collision_entries, sep="; ")
    )
    decided_at: datetime
    recorded_at: datetime
    wait_ms: int
    wait_from_first_arrival_ms: int | None
    merged_token_id: str | None
    # Branch -> what it did since the decision where that replaces the decision's missing reason
    # (a late answer or a skip of a branch seen ``not_arrived``, ...): the row page and ``explain``
    # fill it from the row's tokens (:func:`~airflow_elspeth.core.vocabulary.answered_since`).
    missing_since: dict[str, str] = field(default_factory=dict)

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

    def shown_fields(self) -> list[ShownField]:
        """The fields a person reads, in declaration order, each as phrases (an empty one left out)."""
        found = []
        for f in dataclasses.fields(self):
            how: _Shown | None = f.metadata.get(SHOWN)
            if how is None:
                continue
            entries = how.entries(self) if how.entries else shown_entries(getattr(self, f.name))
            if entries:
                found.append(ShownField(f.name, how.label, entries, how.sep))
        return found

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
    merged_output_ref: str | None = None  # its payload hash (the row page links the whole value)
    policy_text: str | None = None
    # What the union did with the collided fields, shown beside them.
    collision_rule: str | None = field(
        default=None,
        metadata=shown(
            "collision rule", lambda d: [d.collision_rule] if d.collisions and d.collision_rule else []
        ),
    )
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


# --------------------------------------------------------------------------------------------------
# One row's lineage, as ``explain`` shows it (``--json`` is :func:`to_json` of an Explanation): the
# stored rows of the row, its tokens, their node states and outcomes, under their column names.


@dataclass(frozen=True)
class StoredRow:
    """A ``rows`` row: one source row of an audit run."""

    run_id: str
    row_id: str
    row_key: str
    row_index: int
    chunk: int
    source_hash: str
    payload_ref: str


@dataclass(frozen=True)
class NodeStateRecord:
    """A ``node_states`` row: one token's work at one node (step or coalesce), one attempt."""

    state_id: str
    token_id: str
    run_id: str
    node_id: str
    attempt: int
    status: str
    input_hash: str | None
    output_hash: str | None
    output_ref: str | None
    error_json: str | None
    context_json: str | None
    started_at: datetime
    completed_at: datetime | None
    duration_ms: int | None
    recorded_at: datetime
    row_id: str
    chunk: int


@dataclass(frozen=True)
class OutcomeRecord:
    """A ``token_outcomes`` row: a token's terminal outcome, or one a later coalesce try superseded
    (``is_terminal`` false, ``superseded_at`` set)."""

    outcome_id: int
    token_id: str
    run_id: str
    outcome: str
    is_terminal: bool
    reason: str | None
    error_hash: str | None
    join_group_id: str | None
    recorded_at: datetime
    superseded_at: datetime | None


@dataclass(frozen=True)
class TokenRecord:
    """A ``tokens`` row with its parents (derived as docs/ARCHITECTURE.md says, or the one stored
    link of a nested fork), its node states by start and its outcomes by record time."""

    token_id: str
    run_id: str
    row_id: str
    token_kind: str
    branch_name: str | None
    fork_group_id: str | None
    join_group_id: str | None
    chunk: int
    created_at: datetime
    parents: list[str]
    states: list[NodeStateRecord]
    outcomes: list[OutcomeRecord]

    @property
    def terminal(self) -> list[OutcomeRecord]:
        return [o for o in self.outcomes if o.is_terminal]

    @property
    def superseded(self) -> list[OutcomeRecord]:
        """Outcomes of a resolution a later coalesce try replaced: shown, never terminal."""
        return [o for o in self.outcomes if not o.is_terminal and o.superseded_at is not None]


@dataclass(frozen=True)
class RowLineage:
    """One row: its stored row and source payload, every token with its node states and outcomes,
    the outputs they reference (payload hash -> body), its coalesce decisions (each with what its
    missing branches did since) and the resolutions a later coalesce try replaced."""

    row: StoredRow
    source: Any
    tokens: list[TokenRecord]
    outputs: dict[str, Any]
    decisions: list[DecisionRecord]
    # Resolutions a later try of their coalesce replaced: history, never a decision.
    superseded_decisions: list[SupersededDecision]

    def output_of(self, state: NodeStateRecord) -> Any:
        """What a node state output (None for a state without output)."""
        return self.outputs.get(state.output_ref) if state.output_ref else None


@dataclass(frozen=True)
class LogEvent:
    """An event of a row's stored log (or a late write beside it), with the label a person reads:
    ``arrival``, ``loss (error:X)``; a branch task's end after a skip of the decided row is the
    skip, labelled as the skip (``skipped (skipped_decided)``)."""

    branch: str
    at: datetime
    kind: str
    reason: str | None
    label: str


@dataclass(frozen=True)
class ReplayedDecision:
    """A decision replayed from its row's stored log (the fields ``verify`` compares), with that
    log and the late writes beside it."""

    decision: str
    decided_at: datetime | None
    consumed: list[str]
    failure_reason: str | None
    arrival_order: list[dict[str, Any]]
    wait_from_first_arrival_ms: int | None
    events: list[LogEvent]
    late_writes: list[LogEvent]


@dataclass(frozen=True)
class ExplainedReplay:
    """One decision of the row replayed; a resolution (the coalesce task ended first) is judged by
    ``undecidable_then`` (its log up to it left the row pending), with its ``task_state``."""

    coalesce: str
    resolution: bool
    task_state: str | None
    replayed: ReplayedDecision
    undecidable_then: bool | None
    agrees: bool


@dataclass(frozen=True)
class Explanation(RowLineage):
    """``explain``: the row's lineage and each decision replayed (``replays``, in decision order)."""

    replays: list[ExplainedReplay]


# verify: a stored decision against its replay, and the integrity findings (``verify --json``)


@dataclass(frozen=True)
class DecisionFields:
    """What ``verify`` compares of a decision, stored or replayed (``read.verify.COMPARED``). The
    arrival record (``arrival_order``, ``wait_from_first_arrival_ms``) of a stored decision is None
    where it was not stored (decisions written before schema revision 0003)."""

    decision: str
    decided_at: datetime | None  # None: the replay left the row pending
    consumed: list[str]
    failure_reason: str | None
    # Each ``{branch, offset_ms}``, as the decision stores it in ``details_json``.
    arrival_order: list[dict[str, Any]] | None
    wait_from_first_arrival_ms: int | None


@dataclass(frozen=True)
class Difference:
    """One compared field where a stored decision and its replay differ."""

    recorded: Any
    replayed: Any


class FindingCheck(Word):
    """The kinds of ``verify`` finding (each one's ``check``): a closed set, one record each."""

    RUN_NOT_CLOSED = "run_not_closed"
    ROWS_UNDECIDED = "rows_undecided"
    TOKENS_WITHOUT_OUTCOME = "tokens_without_outcome"
    DUPLICATE_TERMINAL_OUTCOMES = "duplicate_terminal_outcomes"
    ORPHAN_PARENT = "orphan_parent"
    SOURCE_TOKEN_MISSING = "source_token_missing"
    BRANCH_PARENT_MISSING = "branch_parent_missing"
    CONSUMED_TOKEN_MISSING = "consumed_token_missing"
    MERGED_TOKEN_MISSING = "merged_token_missing"
    MERGED_TOKEN_WITHOUT_DECISION = "merged_token_without_decision"
    DECISION_REPLAY = "decision_replay"
    RESOLUTION_DECIDABLE = "resolution_decidable"


@dataclass(frozen=True)
class Finding:
    """One ``verify`` finding: an audit run, what was checked, how many items (rows, tokens or token
    parents, per ``counted``) fail it and the first few of them. A finding is always one of the kinds
    below, whose class fixes ``check`` and ``counted`` and adds its details."""

    run_id: str
    check: FindingCheck = field(init=False)
    count: int
    counted: str = field(init=False)
    examples: list[str]

    def __post_init__(self) -> None:
        if not isinstance(getattr(self, "check", None), FindingCheck):
            raise TypeError(f"{type(self).__name__} is no kind of finding: each kind names its check")


@dataclass(frozen=True)
class LaterTry:
    """A later try of a fork task than a run still ``running``."""

    run_id: str
    try_number: int
    status: str


@dataclass(frozen=True)
class RunNotClosed(Finding):
    """A run still ``running`` while a later try of its fork task exists or that task ended. Its
    examples are row keys."""

    check: FindingCheck = field(default=FindingCheck.RUN_NOT_CLOSED, init=False)
    counted: str = field(default="rows", init=False)
    why: list[str]
    try_number: int
    later_tries: list[LaterTry]
    fork_task_state: str | None


@dataclass(frozen=True)
class UndecidedCoalesce:
    """A coalesce that left rows undecided past its deadline (and grace) or after its task ended."""

    undecided: int
    deadline: datetime
    task_state: str | None
    why: list[str]


@dataclass(frozen=True)
class RowsUndecided(Finding):
    """Rows of a completed run left undecided, counted once however many coalesces left them."""

    check: FindingCheck = field(default=FindingCheck.ROWS_UNDECIDED, init=False)
    counted: str = field(default="rows", init=False)
    coalesces: dict[str, UndecidedCoalesce]


@dataclass(frozen=True)
class TokensWithoutOutcome(Finding):
    """Tokens of a finished run without a terminal outcome. Its examples are token ids."""

    check: FindingCheck = field(default=FindingCheck.TOKENS_WITHOUT_OUTCOME, init=False)
    counted: str = field(default="tokens", init=False)
    example_rows: list[str]
    by_kind: dict[str, int]
    checked_because: str


@dataclass(frozen=True)
class DuplicateTerminalOutcomes(Finding):
    """Tokens with more than one terminal outcome. Its examples are token ids."""

    check: FindingCheck = field(default=FindingCheck.DUPLICATE_TERMINAL_OUTCOMES, init=False)
    counted: str = field(default="tokens", init=False)
    checked_because: str


@dataclass(frozen=True)
class OrphanParents(Finding):
    """Token parents that are no token; examples are the children, ``missing_parents`` theirs."""

    check: FindingCheck = field(default=FindingCheck.ORPHAN_PARENT, init=False)
    counted: str = field(default="token parents", init=False)
    missing_parents: list[str]


# The derived lineage links of a completed run (docs/ARCHITECTURE.md, ``token_parents``): a branch
# token's parent is its row's source token, a merged token's parents the branch tokens its
# decision consumed. Each detail list runs parallel to ``examples``.


@dataclass(frozen=True)
class SourceTokensMissing(Finding):
    """Rows without their source token (the parent of their branch tokens). Examples: row keys."""

    check: FindingCheck = field(default=FindingCheck.SOURCE_TOKEN_MISSING, init=False)
    counted: str = field(default="rows", init=False)


@dataclass(frozen=True)
class BranchParentsMissing(Finding):
    """Branch tokens whose parent is gone: their row's source token, or their row itself.
    Examples: token ids; ``rows`` their row keys (None: the row is missing, else its source token
    is), ``branches`` their branches."""

    check: FindingCheck = field(default=FindingCheck.BRANCH_PARENT_MISSING, init=False)
    counted: str = field(default="tokens", init=False)
    rows: list[str | None]
    branches: list[str]


@dataclass(frozen=True)
class ConsumedTokensMissing(Finding):
    """Branches a decision consumed that are no branch token of its row (a merged token's parents).
    Examples: row keys; ``coalesces`` the deciding coalesce, ``branches`` the consumed branch."""

    check: FindingCheck = field(default=FindingCheck.CONSUMED_TOKEN_MISSING, init=False)
    counted: str = field(default="consumed branches", init=False)
    coalesces: list[str]
    branches: list[str]


@dataclass(frozen=True)
class MergedTokensMissing(Finding):
    """Merged decisions whose ``merged_token_id`` is no merged token of their row. Examples: row
    keys; ``coalesces`` the deciding coalesce, ``merged_token_ids`` what the decision names."""

    check: FindingCheck = field(default=FindingCheck.MERGED_TOKEN_MISSING, init=False)
    counted: str = field(default="decisions", init=False)
    coalesces: list[str]
    merged_token_ids: list[str | None]


@dataclass(frozen=True)
class MergedTokensWithoutDecision(Finding):
    """Merged tokens no decision of their row names (their decision is missing, or names another
    token): nothing says what they merged. Examples: token ids; ``rows`` their row keys (None: the
    row is missing)."""

    check: FindingCheck = field(default=FindingCheck.MERGED_TOKEN_WITHOUT_DECISION, init=False)
    counted: str = field(default="tokens", init=False)
    rows: list[str | None]


@dataclass(frozen=True)
class RowReplay:
    """One decided row whose replay disagrees with what is stored."""

    coalesce: str
    row_key: str


@dataclass(frozen=True)
class ReplayMismatch(RowReplay):
    """A policy decision that differs from the replay of its stored log."""

    stored: DecisionFields
    replayed: DecisionFields


@dataclass(frozen=True)
class DecidableResolution(RowReplay):
    """A resolution of a row the log up to it had already decided."""

    resolution: str
    decided_at: datetime
    replayed: DecisionFields


RowReplayT = TypeVar("RowReplayT", bound=RowReplay)


@dataclass(frozen=True)
class ReplayFinding(Finding, Generic[RowReplayT]):
    """Decided rows whose replay disagrees: per coalesce how many, and the first few in full."""

    coalesces: dict[str, int]
    details: list[RowReplayT]


@dataclass(frozen=True)
class DecisionsDifferFromReplay(ReplayFinding[ReplayMismatch]):
    check: FindingCheck = field(default=FindingCheck.DECISION_REPLAY, init=False)
    counted: str = field(default="rows", init=False)


@dataclass(frozen=True)
class DecidableResolutions(ReplayFinding[DecidableResolution]):
    check: FindingCheck = field(default=FindingCheck.RESOLUTION_DECIDABLE, init=False)
    counted: str = field(default="rows", init=False)


# --------------------------------------------------------------------------------------------------
# Row errors by fingerprint


@dataclass(frozen=True)
class ErrorGroup:
    """The terminal losses to one error fingerprint (``token_outcomes.error_hash``): its loss reason,
    rows (branch tokens), audit runs and branches, one example message and its shape, and up to five
    example row keys."""

    error_hash: str
    reason: str
    rows: int
    audit_runs: list[str]
    branches: list[str]
    message: str
    message_shape: str
    example_row_keys: list[str]


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
