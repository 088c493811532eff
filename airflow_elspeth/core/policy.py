"""Replay one row's ordered event log under a coalesce policy and return its decision.

A decision is a pure function of the log: events are ordered by time, ties broken by the configured
branch order, and the deadline sorts after every event stamped at or before it. The first event at
which the policy resolves is the decision time; any longer log gives the same decision, and arrivals
ordered after it are late. Nothing here knows about Airflow or SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from airflow_elspeth.core.config import CoalesceConfig, MergeStrategy, Policy
from airflow_elspeth.core.vocabulary import (
    NOT_ARRIVED,
    DecisionStatus,
    FailureReason,
    coalesce_task_reason,
    late_reason,
)
from airflow_elspeth.exceptions import ElspethConfigError


class EventKind(str, Enum):
    ARRIVAL = "arrival"
    LOSS = "loss"


@dataclass(frozen=True)
class BranchEvent:
    """One branch token reaching the coalesce: an arrival, or a loss with its reason."""

    branch: str
    at: datetime
    kind: EventKind
    reason: str | None = None

    def __post_init__(self) -> None:
        # Accept the kind as stored text ("arrival"/"loss"); anything else is an error, never a loss.
        object.__setattr__(self, "kind", EventKind(self.kind))
        if self.kind is EventKind.LOSS and not self.reason:
            raise ValueError(f"a loss of branch {self.branch!r} needs a reason")


@dataclass(frozen=True)
class Arrival:
    """One branch's arrival before its row's decision: ``offset_ms`` after the row's first arrival."""

    branch: str
    offset_ms: int


@dataclass(frozen=True)
class Decision:
    """The resolution of one (coalesce, row).

    ``status``, ``decided_at``, ``consumed``, ``arrived``, ``failure_reason``, ``details`` and the
    arrival record (``arrival_order``: the arrivals up to the decision in log order, with their
    offsets from the first; ``wait_from_first_arrival_ms``: from the first arrival to the decision,
    None without an arrival) depend only on the log up to the decision. ``missing`` and ``late``
    describe the non-contributing branches as far as the given log knows them (a branch not arrived
    at the decision may arrive late later).
    """

    status: DecisionStatus
    decided_at: datetime | None = None
    consumed: tuple[str, ...] = ()
    arrived: tuple[str, ...] = ()
    failure_reason: FailureReason | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    at_deadline: bool = False
    missing: Mapping[str, str] = field(default_factory=dict)
    late: tuple[str, ...] = ()
    arrival_order: tuple[Arrival, ...] = ()
    wait_from_first_arrival_ms: int | None = None

    @property
    def is_final(self) -> bool:
        return self.status is not DecisionStatus.PENDING


_PENDING = Decision(status=DecisionStatus.PENDING)


def order_events(config: CoalesceConfig, events: Iterable[BranchEvent]) -> list[BranchEvent]:
    """The log order: by time, ties by configured branch order; a branch's first event only."""
    # A branch has one event per row; should two share a timestamp, the arrival counts, whatever
    # order they were read in.
    ordered = sorted(events, key=lambda e: (e.at, config.branch_index(e.branch), e.kind is EventKind.LOSS))
    seen: set[str] = set()
    log: list[BranchEvent] = []
    for event in ordered:
        if event.branch not in seen:
            seen.add(event.branch)
            log.append(event)
    return log


def _resolve(
    config: CoalesceConfig, arrived: list[str], lost: dict[str, str], at_deadline: bool
) -> tuple[DecisionStatus, tuple[str, ...], FailureReason | None, dict[str, Any]] | None:
    """Apply the policy table to the state after one log step; None while pending."""
    n, a, lost_count = len(config.branches), len(arrived), len(lost)
    waiting = _waiting(config, arrived, lost)
    policy = config.policy
    if policy is Policy.REQUIRE_ALL:
        if lost_count:
            return DecisionStatus.FAILED, (), FailureReason.BRANCH_LOST, waiting
        if a == n:
            return DecisionStatus.MERGED, tuple(arrived), None, {}
        if at_deadline:
            return DecisionStatus.FAILED, (), FailureReason.INCOMPLETE_BRANCHES, waiting
        return None
    if policy is Policy.QUORUM:
        need = config.quorum or n
        if a >= need:
            return DecisionStatus.MERGED, tuple(arrived[:need]), None, {}
        if n - lost_count < need:
            details = {"need": need, "max_possible": n - lost_count, **waiting}
            return DecisionStatus.FAILED, (), FailureReason.QUORUM_IMPOSSIBLE, details
        if at_deadline:
            return (
                DecisionStatus.FAILED,
                (),
                FailureReason.QUORUM_NOT_MET_AT_TIMEOUT,
                {"need": need, **waiting},
            )
        return None
    if policy is Policy.BEST_EFFORT:
        if a + lost_count == n or at_deadline:
            if a:
                return DecisionStatus.MERGED, tuple(arrived), None, {}
            reason = (
                FailureReason.BEST_EFFORT_TIMEOUT_NO_ARRIVALS
                if a + lost_count < n
                else FailureReason.ALL_BRANCHES_LOST
            )
            return DecisionStatus.FAILED, (), reason, waiting
        return None
    if policy is Policy.FIRST:
        if a:
            return DecisionStatus.MERGED, tuple(arrived[:1]), None, {}
        if lost_count == n:
            return DecisionStatus.FAILED, (), FailureReason.ALL_BRANCHES_LOST, waiting
        if at_deadline:
            return DecisionStatus.FAILED, (), FailureReason.FIRST_TIMEOUT_NO_ARRIVALS, waiting
        return None
    # A policy added to core.config without its rule here must not be decided by another's rule.
    raise ElspethConfigError(f"coalesce policy {policy!r} has no rule in core.policy")


def _apply_select(
    config: CoalesceConfig,
    resolved: tuple[DecisionStatus, tuple[str, ...], FailureReason | None, dict[str, Any]],
    arrived: list[str],
    lost: dict[str, str],
) -> tuple[DecisionStatus, tuple[str, ...], FailureReason | None, dict[str, Any]]:
    """``select`` never substitutes another branch: a merge without the selected one fails.

    The failure keeps what did arrive (and what was lost), like every other failure's details.
    """
    status, consumed, _, _ = resolved
    if (
        status is DecisionStatus.MERGED
        and config.merge is MergeStrategy.SELECT
        and config.select_branch not in consumed
    ):
        details = {
            "select_branch": config.select_branch,
            "consumed": list(consumed),
            **_waiting(config, arrived, lost),
        }
        return DecisionStatus.FAILED, (), FailureReason.SELECT_BRANCH_NOT_ARRIVED, details
    return resolved


# The collisions of merging the outputs of the given consumed branches (``core.merge``): field ->
# the branches that supplied it. What a union with ``on_collision="fail_row"`` needs of the outputs.
CollisionCheck = Callable[[tuple[str, ...]], Mapping[str, list[str]]]


def _apply_collisions(
    config: CoalesceConfig,
    resolved: tuple[DecisionStatus, tuple[str, ...], FailureReason | None, dict[str, Any]],
    arrived: list[str],
    lost: dict[str, str],
    collisions: CollisionCheck | None,
) -> tuple[DecisionStatus, tuple[str, ...], FailureReason | None, dict[str, Any]]:
    """``on_collision="fail_row"``: a union whose consumed outputs share a field fails instead."""
    status, consumed, _, _ = resolved
    if status is not DecisionStatus.MERGED or collisions is None or not config.fails_on_collision:
        return resolved
    found = collisions(consumed)
    if not found:
        return resolved
    details = {
        "collisions": {name: list(branches) for name, branches in found.items()},
        "consumed": list(consumed),
        **_waiting(config, arrived, lost),
    }
    return DecisionStatus.FAILED, (), FailureReason.FIELD_COLLISION, details


def _waiting(config: CoalesceConfig, arrived: list[str], lost: dict[str, str]) -> dict[str, Any]:
    not_arrived = [b for b in config.branches if b not in arrived and b not in lost]
    return {"arrived": list(arrived), "lost": dict(lost), "not_arrived": not_arrived}


def replay(
    config: CoalesceConfig,
    events: Iterable[BranchEvent],
    *,
    deadline: datetime,
    now: datetime,
    collisions: CollisionCheck | None = None,
) -> Decision:
    """Replay a row's events under ``config``; the deadline is in the log once ``now >= deadline``.

    :param events: the row's arrivals and losses, in any order; unknown branches raise ``ValueError``.
    :param deadline: fork completion + timeout.
    :param now: the audit clock at the time of reading.
    :param collisions: with ``on_collision="fail_row"``, the collisions of the consumed branches'
        outputs: a merge with any fails ``field_collision`` at the same step. Without it the decision
        is the log's alone (a caller that merges must pass it: ``audit.log.collision_check``).
    """
    events = list(events)
    for event in events:
        if event.branch not in config.branches:
            raise ValueError(f"event for unknown branch {event.branch!r}; branches: {config.branches}")
    log = order_events(config, events)
    # The deadline is one more step of the log, after every event stamped at or before it.
    steps: list[BranchEvent | None] = list(log)
    if now >= deadline:
        cut = sum(1 for e in log if e.at <= deadline)
        steps.insert(cut, None)

    arrivals: list[BranchEvent] = []
    lost: dict[str, str] = {}
    for index, step in enumerate(steps):
        if step is None:
            resolved = _resolve(config, _branches(arrivals), lost, at_deadline=True)
            decided_at = deadline
        else:
            if step.kind is EventKind.ARRIVAL:
                arrivals.append(step)
            else:
                lost[step.branch] = step.reason or ""
            resolved = _resolve(config, _branches(arrivals), lost, at_deadline=False)
            decided_at = step.at
        if resolved is not None:
            after = [e for e in steps[index + 1 :] if e is not None]
            return _decision(
                config,
                resolved,
                decided_at,
                arrivals,
                lost,
                after,
                at_deadline=step is None,
                collisions=collisions,
            )
    return _PENDING


def _branches(arrivals: list[BranchEvent]) -> list[str]:
    return [e.branch for e in arrivals]


def _ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)


def arrival_record(
    arrivals: list[BranchEvent], decided_at: datetime
) -> tuple[tuple[Arrival, ...], int | None]:
    """The arrivals in log order with their offsets from the first, and the wait from the first
    arrival to ``decided_at`` (None without an arrival)."""
    if not arrivals:
        return (), None
    first = arrivals[0].at
    return tuple(Arrival(e.branch, _ms(e.at - first)) for e in arrivals), _ms(decided_at - first)


def _decision(
    config: CoalesceConfig,
    resolved: tuple[DecisionStatus, tuple[str, ...], FailureReason | None, dict[str, Any]],
    decided_at: datetime,
    arrivals: list[BranchEvent],
    lost: dict[str, str],
    after: list[BranchEvent],
    *,
    at_deadline: bool,
    collisions: CollisionCheck | None,
) -> Decision:
    """Assemble the decision and classify every branch that did not contribute."""
    arrived = _branches(arrivals)
    selected = _apply_select(config, resolved, arrived, lost)
    status, consumed, reason, details = _apply_collisions(config, selected, arrived, lost, collisions)
    order, wait = arrival_record(arrivals, decided_at)
    late = tuple(e.branch for e in after if e.kind is EventKind.ARRIVAL)
    later_losses = {e.branch: e.reason or "" for e in after if e.kind is EventKind.LOSS}
    missing: dict[str, str] = {}
    for branch in config.branches:
        if branch in consumed or (status is DecisionStatus.FAILED and branch in arrived):
            continue
        if branch in lost:
            missing[branch] = lost[branch]
        elif branch in later_losses:
            missing[branch] = later_losses[branch]
        elif branch in late:
            missing[branch] = late_reason(status)
        else:
            missing[branch] = NOT_ARRIVED
    return Decision(
        status=status,
        decided_at=decided_at,
        consumed=consumed,
        arrived=tuple(arrived),
        failure_reason=reason,
        details=details,
        at_deadline=at_deadline,
        missing=missing,
        late=late,
        arrival_order=order,
        wait_from_first_arrival_ms=wait,
    )


def resolve_ended(
    config: CoalesceConfig, events: Iterable[BranchEvent], *, at: datetime, task_state: str
) -> Decision:
    """Close a row its coalesce task can no longer decide: failed, with the task's end as reason.

    Only for a row whose replay is still pending at ``at`` (the caller decides every decidable row
    first). Arrivals so far are kept as arrived; every other branch is missing with its loss
    reason, or ``not_arrived``. Events after ``at`` belong to nobody: the row is closed.
    """
    log = [e for e in order_events(config, events) if e.at <= at]
    arrivals = [e for e in log if e.kind is EventKind.ARRIVAL]
    arrived = _branches(arrivals)
    lost = {e.branch: e.reason or "" for e in log if e.kind is EventKind.LOSS}
    missing = {b: lost.get(b, NOT_ARRIVED) for b in config.branches if b not in arrived}
    order, wait = arrival_record(arrivals, at)
    return Decision(
        status=DecisionStatus.FAILED,
        decided_at=at,
        arrived=tuple(arrived),
        failure_reason=coalesce_task_reason(task_state),
        details={**_waiting(config, arrived, lost), "coalesce_task_state": task_state},
        missing=missing,
        arrival_order=order,
        wait_from_first_arrival_ms=wait,
    )
