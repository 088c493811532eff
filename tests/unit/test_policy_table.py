"""Every cell of the policy table (docs/ARCHITECTURE.md, "Decision semantics"), one readable case each.

Branches are configured as ``gpt, claude, gemini`` (that order breaks ties in time). Times are seconds after
the fork; the deadline is at 10 s. ``now`` is 9 s (before the deadline) or 30 s (after it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from airflow_elspeth.core.config import CoalesceConfig, MergeStrategy, Policy, coalesce_config
from airflow_elspeth.core.merge import merge_outputs
from airflow_elspeth.core.policy import (
    BranchEvent,
    Decision,
    EventKind,
    replay,
)
from airflow_elspeth.core.vocabulary import (
    LATE_AFTER_FAILURE,
    LATE_AFTER_MERGE,
    NOT_ARRIVED,
    DecisionStatus,
    FailureReason,
    policy_text,
)
from airflow_elspeth.exceptions import ElspethConfigError

BRANCHES = ("gpt", "claude", "gemini")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
DEADLINE_S = 10
BEFORE, AFTER = 9, 30
D = "deadline"  # decided_at == the deadline


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def arrive(branch: str, seconds: float) -> BranchEvent:
    return BranchEvent(branch, t(seconds), EventKind.ARRIVAL)


def lose(branch: str, seconds: float, reason: str) -> BranchEvent:
    return BranchEvent(branch, t(seconds), EventKind.LOSS, reason)


@dataclass(frozen=True)
class Cell:
    policy: str
    events: tuple[BranchEvent, ...]
    now: float
    status: DecisionStatus
    decided_at: float | str | None = None
    consumed: frozenset[str] = frozenset()
    reason: FailureReason | None = None
    missing: Mapping[str, str] = field(default_factory=dict)
    late: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)  # expected subset of Decision.details
    quorum: int | None = None
    merge: str = "union"
    select_branch: str | None = None

    @property
    def at_deadline(self) -> bool:
        return self.decided_at == D

    def config(self) -> CoalesceConfig:
        return coalesce_config(
            branches=BRANCHES,
            policy=self.policy,
            quorum=self.quorum,
            merge=self.merge,
            select_branch=self.select_branch,
            timeout=timedelta(seconds=DEADLINE_S),
        )


def cells(*consumed: str) -> frozenset[str]:
    return frozenset(consumed)


# fmt: off
CASES = [
    # ---- require_all
    pytest.param(
        Cell("require_all", (arrive("gpt", 1), arrive("claude", 2), arrive("gemini", 3)), BEFORE,
             DecisionStatus.MERGED, 3, cells(*BRANCHES)),
        id="require_all-merges-when-A=N",
    ),
    pytest.param(
        Cell("require_all", (arrive("gemini", 1), arrive("gpt", 2), arrive("claude", DEADLINE_S)), AFTER,
             DecisionStatus.MERGED, DEADLINE_S, cells(*BRANCHES)),
        id="require_all-arrival-stamped-at-the-deadline-is-in-time",
    ),
    pytest.param(
        Cell("require_all", (arrive("gpt", 1),), BEFORE, DecisionStatus.PENDING),
        id="require_all-pending-before-deadline",
    ),
    pytest.param(
        Cell("require_all", (arrive("gpt", 1), lose("claude", 2, "error:TimeoutError")), BEFORE,
             DecisionStatus.FAILED, 2, reason=FailureReason.BRANCH_LOST,
             missing={"claude": "error:TimeoutError", "gemini": NOT_ARRIVED},
             details={"lost": {"claude": "error:TimeoutError"}, "arrived": ["gpt"],
                      "not_arrived": ["gemini"]}),
        id="require_all-fails-branch_lost-on-a-loss-before-the-deadline",
    ),
    pytest.param(
        Cell("require_all", (lose("gpt", 1, "dropped"), arrive("claude", 2), arrive("gemini", 3)), BEFORE,
             DecisionStatus.FAILED, 1, reason=FailureReason.BRANCH_LOST,
             missing={"gpt": "dropped", "claude": LATE_AFTER_FAILURE, "gemini": LATE_AFTER_FAILURE},
             late=("claude", "gemini"), details={"lost": {"gpt": "dropped"}}),
        id="require_all-branch_lost-arrivals-after-the-loss-are-late",
    ),
    pytest.param(
        Cell("require_all", (arrive("gpt", 1), arrive("claude", 2), arrive("gemini", 12)), AFTER,
             DecisionStatus.FAILED, D, reason=FailureReason.INCOMPLETE_BRANCHES,
             missing={"gemini": LATE_AFTER_FAILURE}, late=("gemini",),
             details={"arrived": ["gpt", "claude"], "not_arrived": ["gemini"]}),
        id="require_all-fails-incomplete_branches-at-the-deadline",
    ),
    # ---- quorum
    pytest.param(
        Cell("quorum", (arrive("gemini", 1), arrive("gpt", 2), arrive("claude", 3)), BEFORE,
             DecisionStatus.MERGED, 2, cells("gemini", "gpt"), quorum=2,
             missing={"claude": LATE_AFTER_MERGE}, late=("claude",)),
        id="quorum-merges-when-A-reaches-q-with-the-first-q",
    ),
    pytest.param(
        Cell("quorum", (arrive("gemini", 1), arrive("claude", 1), arrive("gpt", 1)), BEFORE,
             DecisionStatus.MERGED, 1, cells("gpt", "claude"), quorum=2,
             missing={"gemini": LATE_AFTER_MERGE}, late=("gemini",)),
        id="quorum-same-time-arrivals-tie-broken-by-configured-order",
    ),
    pytest.param(
        Cell("quorum", (lose("gpt", 1, "error:KeyError"), arrive("claude", 2), arrive("gemini", 3)), BEFORE,
             DecisionStatus.MERGED, 3, cells("claude", "gemini"), quorum=2,
             missing={"gpt": "error:KeyError"}),
        id="quorum-a-loss-does-not-fail-while-q-is-reachable",
    ),
    pytest.param(
        Cell("quorum", (lose("gpt", 1, "error:KeyError"), arrive("claude", 2)), BEFORE,
             DecisionStatus.PENDING, quorum=2),
        id="quorum-pending-before-deadline",
    ),
    pytest.param(
        Cell("quorum", (lose("gpt", 1, "dropped"), lose("claude", 2, "task_failed"), arrive("gemini", 3)),
             BEFORE, DecisionStatus.FAILED, 2, reason=FailureReason.QUORUM_IMPOSSIBLE, quorum=2,
             missing={"gpt": "dropped", "claude": "task_failed", "gemini": LATE_AFTER_FAILURE},
             late=("gemini",),
             details={"need": 2, "max_possible": 1, "lost": {"gpt": "dropped", "claude": "task_failed"}}),
        id="quorum-fails-quorum_impossible-when-N-L<q",
    ),
    pytest.param(
        Cell("quorum", (arrive("gpt", 1), lose("claude", 2, "task_skipped")), BEFORE,
             DecisionStatus.FAILED, 2, reason=FailureReason.QUORUM_IMPOSSIBLE, quorum=3,
             missing={"claude": "task_skipped", "gemini": NOT_ARRIVED},
             details={"need": 3, "max_possible": 2}),
        id="quorum-q=N-fails-quorum_impossible-on-the-first-loss",
    ),
    pytest.param(
        Cell("quorum", (arrive("gpt", 1), arrive("claude", 11)), AFTER,
             DecisionStatus.FAILED, D, reason=FailureReason.QUORUM_NOT_MET_AT_TIMEOUT, quorum=2,
             missing={"claude": LATE_AFTER_FAILURE, "gemini": NOT_ARRIVED}, late=("claude",),
             details={"need": 2}),
        id="quorum-fails-quorum_not_met_at_timeout-at-the-deadline",
    ),
    pytest.param(
        Cell("quorum", (arrive("claude", 4), arrive("gpt", 5)), BEFORE,
             DecisionStatus.MERGED, 4, cells("claude"), quorum=1,
             missing={"gpt": LATE_AFTER_MERGE, "gemini": NOT_ARRIVED}, late=("gpt",)),
        id="quorum-q=1-merges-the-first-arrival",
    ),
    # ---- best_effort
    pytest.param(
        Cell("best_effort", (arrive("gpt", 1), lose("claude", 2, "dropped"), arrive("gemini", 3)), BEFORE,
             DecisionStatus.MERGED, 3, cells("gpt", "gemini"), missing={"claude": "dropped"}),
        id="best_effort-merges-when-A+L=N-and-A>0",
    ),
    pytest.param(
        Cell("best_effort", (arrive("gpt", 1), arrive("claude", 2)), BEFORE, DecisionStatus.PENDING),
        id="best_effort-pending-before-deadline",
    ),
    pytest.param(
        Cell("best_effort",
             (lose("gpt", 1, "dropped"), lose("claude", 2, "error:TimeoutError"),
              lose("gemini", 3, "task_skipped")),
             BEFORE, DecisionStatus.FAILED, 3, reason=FailureReason.ALL_BRANCHES_LOST,
             missing={"gpt": "dropped", "claude": "error:TimeoutError", "gemini": "task_skipped"},
             details={"lost": {"gpt": "dropped", "claude": "error:TimeoutError", "gemini": "task_skipped"}}),
        id="best_effort-fails-all_branches_lost-when-A+L=N-and-A=0",
    ),
    pytest.param(
        Cell("best_effort", (arrive("gpt", 1), arrive("claude", 11)), AFTER,
             DecisionStatus.MERGED, D, cells("gpt"),
             missing={"claude": LATE_AFTER_MERGE, "gemini": NOT_ARRIVED}, late=("claude",)),
        id="best_effort-merges-what-arrived-at-the-deadline",
    ),
    pytest.param(
        Cell("best_effort", (lose("gpt", 1, "dropped"),), AFTER,
             DecisionStatus.FAILED, D, reason=FailureReason.BEST_EFFORT_TIMEOUT_NO_ARRIVALS,
             missing={"gpt": "dropped", "claude": NOT_ARRIVED, "gemini": NOT_ARRIVED},
             details={"lost": {"gpt": "dropped"}, "not_arrived": ["claude", "gemini"]}),
        id="best_effort-fails-best_effort_timeout_no_arrivals-at-the-deadline",
    ),
    # ---- first
    pytest.param(
        Cell("first", (arrive("claude", 3), arrive("gpt", 4), arrive("gemini", 5)), BEFORE,
             DecisionStatus.MERGED, 3, cells("claude"),
             missing={"gpt": LATE_AFTER_MERGE, "gemini": LATE_AFTER_MERGE}, late=("gpt", "gemini")),
        id="first-merges-the-first-arrival-only",
    ),
    pytest.param(
        Cell("first", (arrive("gemini", 2), arrive("claude", 2)), BEFORE,
             DecisionStatus.MERGED, 2, cells("claude"),
             missing={"gpt": NOT_ARRIVED, "gemini": LATE_AFTER_MERGE}, late=("gemini",)),
        id="first-same-time-arrivals-tie-broken-by-configured-order",
    ),
    pytest.param(
        Cell("first", (lose("gpt", 1, "error:ValueError"), arrive("gemini", 2)), BEFORE,
             DecisionStatus.MERGED, 2, cells("gemini"),
             missing={"gpt": "error:ValueError", "claude": NOT_ARRIVED}),
        id="first-losses-before-the-first-arrival-do-not-fail",
    ),
    pytest.param(
        Cell("first", (lose("gpt", 1, "error:ValueError"),), BEFORE, DecisionStatus.PENDING),
        id="first-pending-before-deadline",
    ),
    pytest.param(
        Cell("first",
             (lose("gpt", 1, "dropped"), lose("claude", 1, "dropped"), lose("gemini", 2, "task_failed")),
             BEFORE, DecisionStatus.FAILED, 2, reason=FailureReason.ALL_BRANCHES_LOST,
             missing={"gpt": "dropped", "claude": "dropped", "gemini": "task_failed"}),
        id="first-fails-all_branches_lost-when-L=N",
    ),
    pytest.param(
        Cell("first", (lose("gpt", 2, "dropped"), arrive("gemini", 15)), AFTER,
             DecisionStatus.FAILED, D, reason=FailureReason.FIRST_TIMEOUT_NO_ARRIVALS,
             missing={"gpt": "dropped", "claude": NOT_ARRIVED, "gemini": LATE_AFTER_FAILURE},
             late=("gemini",)),
        id="first-fails-first_timeout_no_arrivals-at-the-deadline",
    ),
    # ---- select
    pytest.param(
        Cell("require_all", (arrive("gpt", 1), arrive("claude", 2), arrive("gemini", 3)), BEFORE,
             DecisionStatus.MERGED, 3, cells(*BRANCHES), merge="select", select_branch="claude"),
        id="select-require_all-merges-with-the-selected-branch",
    ),
    pytest.param(
        Cell("quorum", (arrive("claude", 1), arrive("gemini", 2), arrive("gpt", 3)), BEFORE,
             DecisionStatus.MERGED, 2, cells("claude", "gemini"), quorum=2, merge="select",
             select_branch="claude",
             missing={"gpt": LATE_AFTER_MERGE}, late=("gpt",)),
        id="select-quorum-merges-when-selected-is-among-the-first-q",
    ),
    pytest.param(
        Cell("quorum", (arrive("gpt", 1), arrive("claude", 2), arrive("gemini", 3)), BEFORE,
             DecisionStatus.FAILED, 2, reason=FailureReason.SELECT_BRANCH_NOT_ARRIVED, quorum=2,
             merge="select", select_branch="gemini",
             missing={"gemini": LATE_AFTER_FAILURE}, late=("gemini",),
             details={"select_branch": "gemini", "consumed": ["gpt", "claude"]}),
        id="select-quorum-fails-select_branch_not_arrived-never-substitutes",
    ),
    pytest.param(
        Cell("first", (arrive("claude", 1), arrive("gpt", 2)), BEFORE,
             DecisionStatus.FAILED, 1, reason=FailureReason.SELECT_BRANCH_NOT_ARRIVED,
             merge="select", select_branch="gpt",
             missing={"gpt": LATE_AFTER_FAILURE, "gemini": NOT_ARRIVED}, late=("gpt",)),
        id="select-first-fails-when-another-branch-arrives-first",
    ),
    pytest.param(
        Cell("best_effort", (lose("gpt", 1, "dropped"), arrive("claude", 2), arrive("gemini", 3)), BEFORE,
             DecisionStatus.FAILED, 3, reason=FailureReason.SELECT_BRANCH_NOT_ARRIVED,
             merge="select", select_branch="gpt",
             missing={"gpt": "dropped"}),
        id="select-best_effort-fails-when-the-selected-branch-is-lost",
    ),
    pytest.param(
        Cell("best_effort", (arrive("gpt", 1),), AFTER,
             DecisionStatus.FAILED, D, reason=FailureReason.SELECT_BRANCH_NOT_ARRIVED, merge="select",
             select_branch="gemini", missing={"claude": NOT_ARRIVED, "gemini": NOT_ARRIVED}),
        id="select-best_effort-at-the-deadline-without-the-selected-branch",
    ),
]
# fmt: on


def run(cell: Cell, events: tuple[BranchEvent, ...] | None = None) -> Decision:
    return replay(
        cell.config(),
        cell.events if events is None else events,
        deadline=t(DEADLINE_S),
        now=t(cell.now),
    )


@pytest.mark.parametrize("cell", CASES)
def test_design_table_cell(cell: Cell) -> None:
    decision = run(cell)
    assert decision.status is cell.status
    assert decision.failure_reason is cell.reason
    assert decision.is_final == (cell.status is not DecisionStatus.PENDING)
    if cell.status is DecisionStatus.PENDING:
        assert decision.decided_at is None
        return
    expected_at = t(DEADLINE_S) if cell.decided_at == D else t(cell.decided_at)  # type: ignore[arg-type]
    assert decision.decided_at == expected_at
    assert decision.at_deadline is cell.at_deadline
    assert frozenset(decision.consumed) == cell.consumed
    assert dict(decision.missing) == dict(cell.missing)
    assert decision.late == cell.late
    for key, value in cell.details.items():
        assert decision.details[key] == value, key
    # The input order of the events never matters.
    assert run(cell, tuple(reversed(cell.events))) == decision


def test_the_table_produces_every_failure_reason() -> None:
    produced = {run(p.values[0]).failure_reason for p in CASES} - {None}
    # Resolutions (coalesce_task_<state>) are not policy outcomes: resolve_ended produces them.
    # field_collision depends on the outputs, not the log (tests/unit/test_contract.py).
    assert produced == {
        reason
        for reason in FailureReason
        if not reason.is_resolution and reason is not FailureReason.FIELD_COLLISION
    }


def test_the_table_covers_every_policy_and_status() -> None:
    covered = {(p.values[0].policy, run(p.values[0]).status) for p in CASES}
    assert covered == {(policy.value, status) for policy in Policy for status in DecisionStatus}


def test_a_decision_holds_after_later_events_and_later_reads() -> None:
    """The deadline passing after a quorum merge changes nothing; a late loss is reported as that loss."""
    config = coalesce_config(branches=BRANCHES, policy="quorum", quorum=2, timeout=DEADLINE_S)
    events = [arrive("gpt", 1), arrive("claude", 2)]
    early = replay(config, events, deadline=t(DEADLINE_S), now=t(3))
    later = replay(config, [*events, lose("gemini", 12, "task_failed")], deadline=t(DEADLINE_S), now=t(AFTER))
    assert early.status is later.status is DecisionStatus.MERGED
    assert early.decided_at == later.decided_at == t(2)
    assert not later.at_deadline
    assert early.missing == {"gemini": NOT_ARRIVED}
    assert later.missing == {"gemini": "task_failed"}


def test_unknown_branch_in_the_log_is_rejected() -> None:
    config = coalesce_config(branches=BRANCHES, policy="first", timeout=DEADLINE_S)
    with pytest.raises(ValueError, match="GPT"):
        replay(config, [arrive("GPT", 1)], deadline=t(DEADLINE_S), now=t(2))


def test_a_policy_without_a_rule_is_an_error_not_another_policy() -> None:
    """A policy the replay has no rule for (one added to ``Policy`` and not to ``core.policy``) is an
    error, never decided by ``first``'s rule (which would merge this row at the first arrival)."""
    config = replace(
        coalesce_config(branches=BRANCHES, policy="first", timeout=DEADLINE_S),
        policy="majority",  # type: ignore[arg-type]
    )
    with pytest.raises(ElspethConfigError, match="majority"):
        replay(config, [arrive("gpt", 1)], deadline=t(DEADLINE_S), now=t(2))


@pytest.mark.parametrize(
    ("policy", "quorum", "words"),
    [
        ("require_all", None, "require_all (3 of 3)"),
        ("quorum", 2, "quorum 2 of 3"),
        ("best_effort", None, "best_effort (any of 3)"),
        ("first", None, "first of 3"),
    ],
)
def test_policy_text_puts_every_policy_into_words(policy: str, quorum: int | None, words: str) -> None:
    assert policy_text(policy, len(BRANCHES), quorum) == words


def test_policy_text_covers_every_policy() -> None:
    for policy in Policy:
        assert policy_text(policy, len(BRANCHES), 2).startswith(policy.value)


def test_an_unknown_policy_has_no_words() -> None:
    """An unknown policy is an error where it is put into words, never described as best_effort."""
    with pytest.raises(ElspethConfigError, match="majority"):
        policy_text("majority", len(BRANCHES), None)


def test_a_loss_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="claude"):
        BranchEvent("claude", t(1), EventKind.LOSS)


def test_event_kind_given_as_text_is_not_silently_a_loss() -> None:
    config = coalesce_config(branches=BRANCHES, policy="require_all", timeout=DEADLINE_S)
    try:
        events = [BranchEvent(b, t(1), "arrival") for b in BRANCHES]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return  # rejecting a text kind is an acceptable fix
    decision = replay(config, events, deadline=t(DEADLINE_S), now=t(2))
    assert decision.status is DecisionStatus.MERGED


# ---- merges

OUTPUTS = {
    "gpt": {"answer": "A", "score": 0.9, "gpt_only": 1},
    "claude": {"answer": "B", "score": 0.8},
    "gemini": {"answer": "C", "gemini_only": True},
}
# fmt: off
MERGES = [
    pytest.param(
        "union", None, ("gemini", "gpt", "claude"),
        {"answer": "C", "score": 0.8, "gpt_only": 1, "gemini_only": True},
        {"answer": ["gpt", "claude", "gemini"], "score": ["gpt", "claude"]},
        id="union-later-configured-wins-not-later-arrived",
    ),
    pytest.param(
        "union", None, ("claude", "gpt"),
        {"answer": "B", "score": 0.8, "gpt_only": 1},
        {"answer": ["gpt", "claude"], "score": ["gpt", "claude"]},
        id="union-ignores-non-consumed-outputs",
    ),
    pytest.param(
        "nested", None, ("gemini", "gpt"),
        {"gpt": OUTPUTS["gpt"], "gemini": OUTPUTS["gemini"]}, {},
        id="nested-consumed-branches-only",
    ),
    pytest.param(
        "select", "claude", ("gpt", "claude"), OUTPUTS["claude"], {},
        id="select-the-selected-row-unchanged",
    ),
]
# fmt: on


@pytest.mark.parametrize(("merge", "select_branch", "consumed", "row", "collisions"), MERGES)
def test_merge_cell(
    merge: str,
    select_branch: str | None,
    consumed: tuple[str, ...],
    row: dict[str, Any],
    collisions: dict[str, list[str]],
) -> None:
    config = coalesce_config(
        branches=BRANCHES, policy="best_effort", merge=merge, select_branch=select_branch, timeout=DEADLINE_S
    )
    result = merge_outputs(config, consumed, OUTPUTS)
    assert result.row == row
    assert result.collisions == collisions


def test_select_merge_refuses_to_substitute() -> None:
    config = coalesce_config(
        branches=BRANCHES,
        policy="best_effort",
        merge=MergeStrategy.SELECT,
        select_branch="gemini",
        timeout=60,
    )
    with pytest.raises(ValueError, match="gemini"):
        merge_outputs(config, ("gpt", "claude"), OUTPUTS)


def test_merge_without_an_output_for_a_consumed_branch_fails() -> None:
    config = coalesce_config(branches=BRANCHES, policy="best_effort", timeout=60)
    with pytest.raises(ValueError, match="claude"):
        merge_outputs(config, ("gpt", "claude"), {"gpt": {}})
