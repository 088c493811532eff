"""The one vocabulary of the audit trail: statuses, outcomes, decisions and reasons, with their words.

Every status or reason the trail stores is spelled here and nowhere else; the operators, the store,
the reports, the UI and the CLI build, parse and explain them through this module. Reasons come in
two families:

* a **failure reason** says why a row failed (:class:`FailureReason`: the policy's own reasons, and
  the ``coalesce_task_<state>`` resolutions written when the coalesce task ended first);
* a **missing reason** says why one branch did not contribute to a decided row: a loss
  (``error:<Type>``, ``dropped``, ``branch_task_<state>``), still waiting (``not_arrived``), or a late
  answer (``late_arrival_after_merge`` / ``late_arrival_after_failure``).

Nothing here knows about Airflow or SQL.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from airflow_elspeth.core.config import ON_COLLISION_FAIL_ROW, ON_COLLISION_PREFER, Policy
from airflow_elspeth.exceptions import ElspethConfigError


class Word(str, Enum):
    """A stored word: compares, formats and serialises as its value (``f"{NodeStatus.FAILED}"`` is
    ``failed``, whatever the Python version's enum formatting)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class RunStatus(Word):
    """An audit run: one try of a fork task."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class NodeStatus(Word):
    """A token's work at one node (step or coalesce). ``aborted`` marks a row error in a try that
    failed on its failure threshold: the next try processes that row again."""

    COMPLETED = "completed"
    DROPPED = "dropped"
    FAILED = "failed"
    DISCARDED = "discarded"
    ABORTED = "aborted"


TERMINAL_NODE_STATUSES = (NodeStatus.COMPLETED, NodeStatus.DROPPED, NodeStatus.FAILED, NodeStatus.DISCARDED)
# A discarded result arrived (late, after its row was decided), so it counts as an arrival.
ARRIVAL_NODE_STATUSES = (NodeStatus.COMPLETED, NodeStatus.DISCARDED)


class NodeType(Word):
    """What a registered node (``nodes.node_type``) is: a fork, a branch step or a coalesce."""

    FORK = "fork"
    BRANCH = "branch"
    COALESCE = "coalesce"


class TokenKind(Word):
    SOURCE = "source"
    BRANCH = "branch"
    MERGED = "merged"


class TokenOutcome(Word):
    """The terminal outcome of a token."""

    # A source token, once its branch tokens exist.
    FORKED = "forked"
    # A branch token whose branch no coalesce joins, delivered by its last step (reason ``not_joined``).
    COMPLETED = "completed"
    MERGED = "merged"
    COALESCED = "coalesced"
    ROW_FAILED = "row_failed"
    LOST = "lost"
    NOT_ARRIVED = "not_arrived"
    LATE = "late"
    # A branch token a step did not process because every coalesce consuming it had already decided
    # its row (reason ``skipped_decided``); it replaces the ``not_arrived`` outcome of the decision.
    SKIPPED = "skipped"


class DecisionStatus(Word):
    PENDING = "pending"
    MERGED = "merged"
    FAILED = "failed"


class FailureReason(Word):
    BRANCH_LOST = "branch_lost"
    INCOMPLETE_BRANCHES = "incomplete_branches"
    QUORUM_IMPOSSIBLE = "quorum_impossible"
    QUORUM_NOT_MET_AT_TIMEOUT = "quorum_not_met_at_timeout"
    ALL_BRANCHES_LOST = "all_branches_lost"
    BEST_EFFORT_TIMEOUT_NO_ARRIVALS = "best_effort_timeout_no_arrivals"
    FIRST_TIMEOUT_NO_ARRIVALS = "first_timeout_no_arrivals"
    SELECT_BRANCH_NOT_ARRIVED = "select_branch_not_arrived"
    # A union whose consumed branches supplied the same field, with ``on_collision="fail_row"``: the
    # decision depends on the outputs, not only on the log (``core.merge.settle``).
    FIELD_COLLISION = "field_collision"
    # Resolutions, not policy outcomes: the coalesce task ended (killed, marked by a person, out of
    # retries, skipped) with the row still undecidable; see ``core.policy.resolve_ended``.
    COALESCE_TASK_FAILED = "coalesce_task_failed"
    COALESCE_TASK_SKIPPED = "coalesce_task_skipped"
    COALESCE_TASK_UPSTREAM_FAILED = "coalesce_task_upstream_failed"
    COALESCE_TASK_SUCCESS = "coalesce_task_success"
    COALESCE_TASK_REMOVED = "coalesce_task_removed"

    @property
    def is_resolution(self) -> bool:
        return self.value.startswith(COALESCE_TASK_PREFIX)


COALESCE_TASK_PREFIX = "coalesce_task_"
ERROR_PREFIX = "error:"
CONTRACT_PREFIX = "contract:"
# ``error_json.type`` of a node state whose output broke its step's contract (``core/contract.py``).
CONTRACT_VIOLATION = "ContractViolation"
BRANCH_TASK_PREFIX = "branch_task_"

# Missing reasons that are not built from a prefix.
DROPPED = "dropped"
NOT_ARRIVED = "not_arrived"
LATE_AFTER_MERGE = "late_arrival_after_merge"
LATE_AFTER_FAILURE = "late_arrival_after_failure"
LATE_REASONS = (LATE_AFTER_MERGE, LATE_AFTER_FAILURE)
# A branch step skipped the row: every coalesce consuming the step had already decided it.
SKIPPED_DECIDED = "skipped_decided"
# The reason of a ``completed`` outcome at the last step of a branch no coalesce joins.
NOT_JOINED = "not_joined"
# Airflow's task-instance states as they reach the core and the audit layer: plain strings (neither
# imports Airflow); the shells compare against the same words.
TASK_SUCCESS = "success"
ENDED_TASK_STATES = frozenset({TASK_SUCCESS, "failed", "upstream_failed", "skipped", "removed"})
# A branch task state unknown to the reader (no Airflow states at hand).
UNKNOWN_TASK_STATE = "none"


# ``runs.status_reason`` of an audit run closed ``failed``.
BAD_ROW_PREFIX = "bad_row: "
FORK_TASK_PREFIX = "fork_task_"
FORK_TASK_ENDED = "fork_task_ended"


def bad_row_run_reason(problem: str) -> str:
    """A fork try that met a row it cannot take (no retry: the input is wrong)."""
    return f"{BAD_ROW_PREFIX}{problem}"


def fork_error_run_reason(error: BaseException) -> str:
    """A fork try that ended with ``error``: its type and first words. ``error:`` for errors (the
    task may be retried), ``interrupted:`` for what stops a task from outside (SIGTERM, a timeout,
    KeyboardInterrupt, SystemExit). SQLAlchemy errors are cut before the statement they carry."""
    kind = "error" if isinstance(error, Exception) else "interrupted"
    message = " ".join(str(error).split("\n[SQL:", 1)[0].split())
    if len(message) > 1000:
        message = message[:1000] + "..."
    name = type(error).__name__
    return f"{kind}:{name}: {message}" if message else f"{kind}:{name}"


def fork_task_run_reason(task_state: str) -> str:
    """A run closed by the finalizer because its fork task ended ``task_state`` without completing."""
    return f"{FORK_TASK_PREFIX}{task_state}"


def superseded_try_run_reason(try_number: int) -> str:
    """A run left open by an earlier fork try, closed when try ``try_number`` began."""
    return f"{FORK_TASK_ENDED}: try {try_number} started before this try was decided"


def coalesce_task_reason(task_state: str) -> FailureReason:
    """The resolution reason for a coalesce task that ended in ``task_state`` (unknown: failed)."""
    try:
        return FailureReason(COALESCE_TASK_PREFIX + task_state)
    except ValueError:
        return FailureReason.COALESCE_TASK_FAILED


def is_resolution(failure_reason: str | None) -> bool:
    """Whether a stored failure reason is a ``coalesce_task_<state>`` resolution."""
    return bool(failure_reason) and str(failure_reason).startswith(COALESCE_TASK_PREFIX)


def resolution_task_state(failure_reason: str) -> str:
    """The coalesce task state a resolution reason names (``coalesce_task_failed`` -> ``failed``)."""
    if not is_resolution(failure_reason):
        raise ValueError(f"{failure_reason!r} is not a coalesce task resolution")
    return failure_reason[len(COALESCE_TASK_PREFIX) :]


def error_reason(error_type: str | None) -> str:
    """The loss reason of a row whose callable raised ``error_type`` (after its row retries)."""
    return f"{ERROR_PREFIX}{error_type or 'Exception'}"


def contract_reason(field: str) -> str:
    """The loss reason of a row whose output broke its step's contract at ``field``."""
    return f"{CONTRACT_PREFIX}{field}"


def failed_state_reason(error: Mapping[str, Any] | None) -> str:
    """The loss reason of a ``failed`` node state from its stored error: ``contract:<field>`` for a
    contract violation (the error carries ``contract.field``), else ``error:<Type>``."""
    error = error or {}
    contract = error.get("contract")
    if error.get("type") == CONTRACT_VIOLATION and isinstance(contract, Mapping) and "field" in contract:
        return contract_reason(str(contract["field"]))
    return error_reason(error.get("type"))


def branch_task_reason(task_state: str | None) -> str:
    """The missing reason of a branch whose task was ``task_state`` when the row was decided."""
    return f"{BRANCH_TASK_PREFIX}{task_state or UNKNOWN_TASK_STATE}"


def is_task_loss(reason: str) -> bool:
    """Whether a missing reason is a branch task's end (``branch_task_<state>``), not a row's own."""
    return reason.startswith(BRANCH_TASK_PREFIX)


def late_reason(decision: DecisionStatus) -> str:
    """The missing reason of a branch that answered after its row was decided ``decision``."""
    return LATE_AFTER_MERGE if decision is DecisionStatus.MERGED else LATE_AFTER_FAILURE


class ReasonKind(Word):
    """What a missing reason says about the branch: lost, still waiting, or late."""

    LOSS = "loss"
    WAITING = "waiting"
    SKIPPED = "skipped"
    LATE = "late"


def reason_kind(reason: str) -> ReasonKind:
    if reason in LATE_REASONS:
        return ReasonKind.LATE
    if reason == NOT_ARRIVED:
        return ReasonKind.WAITING
    if reason == SKIPPED_DECIDED:
        return ReasonKind.SKIPPED
    return ReasonKind.LOSS


def reason_order(reason: str) -> tuple[int, str]:
    """Sort key of missing reasons: losses first (errors, drops, task losses), then waiting, then
    skipped, then late."""
    return (list(ReasonKind).index(reason_kind(reason)), reason)


def missing_outcome(reason: str) -> TokenOutcome:
    """The terminal outcome of a branch token missing from its decided row for ``reason``."""
    kind = reason_kind(reason)
    if kind is ReasonKind.LATE:
        return TokenOutcome.LATE
    if kind is ReasonKind.WAITING:
        return TokenOutcome.NOT_ARRIVED
    if kind is ReasonKind.SKIPPED:
        return TokenOutcome.SKIPPED
    return TokenOutcome.LOST


def answered_since(reason: str, *, arrived: bool) -> bool:
    """Whether what a branch did with a decided row replaces, in its token's outcome and the
    summaries, the reason its row's decision recorded: an answer or a skip of a branch seen
    ``not_arrived``; an answer of a branch seen lost to its task's end (that task wrote after its
    end was recorded: a late write)."""
    return reason == NOT_ARRIVED or (arrived and is_task_loss(reason))


def after_decision_reason(decision: DecisionStatus | str, *, arrived: bool) -> str:
    """What became of a branch its row's decision saw as ``not_arrived``, once the branch is done
    with the row: it answered late (``late_arrival_after_<decision>``) or its step skipped the row."""
    return late_reason(DecisionStatus(decision)) if arrived else SKIPPED_DECIDED


# --------------------------------------------------------------------------------------------------
# Words (the pages, the JSON API, the CLI and the sensor's failure message all use these)

FAILURE_REASON_TEXT: Mapping[str, str] = {
    FailureReason.BRANCH_LOST: "a branch was lost (require_all needs every branch)",
    FailureReason.INCOMPLETE_BRANCHES: "not every branch had arrived at the deadline (require_all)",
    FailureReason.QUORUM_IMPOSSIBLE: "too many branches were lost for the quorum to be reachable",
    FailureReason.QUORUM_NOT_MET_AT_TIMEOUT: "the quorum was not reached by the deadline",
    FailureReason.ALL_BRANCHES_LOST: "every branch was lost",
    FailureReason.BEST_EFFORT_TIMEOUT_NO_ARRIVALS: "no branch had arrived by the deadline (best_effort)",
    FailureReason.FIRST_TIMEOUT_NO_ARRIVALS: "no branch had arrived by the deadline (first)",
    FailureReason.SELECT_BRANCH_NOT_ARRIVED: "the selected branch was not among the merged arrivals",
    FailureReason.FIELD_COLLISION: "branches supplied the same field (on_collision='fail_row')",
}

MISSING_REASON_TEXT: Mapping[str, str] = {
    DROPPED: "dropped the row (the callable returned None)",
    NOT_ARRIVED: "had not arrived when the row was decided",
    LATE_AFTER_MERGE: "arrived after the row had been merged",
    LATE_AFTER_FAILURE: "arrived after the row had failed",
    SKIPPED_DECIDED: "the row was already decided",
}


def failure_reason_text(reason: str | None) -> str:
    """Why a row failed, in words (resolutions included)."""
    reason = reason or ""
    if is_resolution(reason):
        return (
            f"the coalesce task ended {resolution_task_state(reason)} before the row could be decided "
            "(a resolution, not the policy)"
        )
    return FAILURE_REASON_TEXT.get(reason, reason)


def missing_reason_text(reason: str) -> str:
    """Why a branch did not contribute to a row, in words."""
    if reason.startswith(ERROR_PREFIX):
        return f"raised {reason[len(ERROR_PREFIX) :]} (after its row retries)"
    if reason.startswith(CONTRACT_PREFIX):
        return f"its output broke the branch's contract at field {reason[len(CONTRACT_PREFIX) :]!r}"
    if is_task_loss(reason):
        return f"its task ended {reason[len(BRANCH_TASK_PREFIX) :]} before delivering the row"
    return MISSING_REASON_TEXT.get(reason, reason)


def outcome_text(outcome: str, reason: str | None) -> str:
    """A token's terminal outcome, in words."""
    if outcome == TokenOutcome.COALESCED:
        return "arrived and was merged into the row"
    if outcome == TokenOutcome.ROW_FAILED:
        return f"arrived, but the row failed ({reason})" if reason else "arrived, but the row failed"
    if (
        outcome in (TokenOutcome.LOST, TokenOutcome.LATE, TokenOutcome.NOT_ARRIVED, TokenOutcome.SKIPPED)
        and reason
    ):
        return f"{outcome}: {missing_reason_text(reason)}"
    return f"{outcome} ({reason})" if reason else str(outcome)


def outcome_label(outcome: str, reason: str | None) -> str:
    """An outcome, or an event of a row's log, with its stored reason: the one label ``explain`` and
    the row page give it (``lost (error:RateLimitError)``, ``late (late_arrival_after_merge)``,
    ``arrival``). A skip of a decided row is :data:`SKIP_LABEL` wherever it shows, its token's
    outcome or the end of the branch task that skipped the row."""
    return f"{outcome} ({reason})" if reason else str(outcome)


SKIP_LABEL = outcome_label(TokenOutcome.SKIPPED, SKIPPED_DECIDED)


def collision_rule_text(on_collision: str) -> str:
    """What a union does with a field several branches supplied (``on_collision``), in words."""
    if on_collision == ON_COLLISION_FAIL_ROW:
        return f"the row fails ({FailureReason.FIELD_COLLISION})"
    if on_collision.startswith(ON_COLLISION_PREFER):
        return f"branch {on_collision[len(ON_COLLISION_PREFER) :]!r} wins"
    return "the later branch in configured order wins"


def policy_text(policy: str, branches: int, quorum: int | None) -> str:
    """A coalesce policy in words ("quorum 2 of 3"): the one wording the CLI, the UI, ``explain`` and
    the sensor's failure message use.

    :param policy: the policy's stored value (a :class:`~airflow_elspeth.core.config.Policy` value).
    :param branches: how many branches the coalesce joins.
    :param quorum: the quorum (read only for ``quorum``).
    :raises ElspethConfigError: ``policy`` is no policy this function has words for.
    """
    try:
        member = Policy(policy)
    except ValueError:
        raise ElspethConfigError(f"unknown coalesce policy {policy!r}") from None
    if member is Policy.QUORUM:
        return f"quorum {quorum} of {branches}"
    if member is Policy.REQUIRE_ALL:
        return f"require_all ({branches} of {branches})"
    if member is Policy.BEST_EFFORT:
        return f"best_effort (any of {branches})"
    if member is Policy.FIRST:
        return f"first of {branches}"
    raise ElspethConfigError(f"coalesce policy {policy!r} has no words in core.vocabulary.policy_text")
