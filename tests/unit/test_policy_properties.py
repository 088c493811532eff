"""Property tests of the coalesce replay (docs/ARCHITECTURE.md, "Decision semantics") and the merges.

Every scenario is a random coalesce (2 to 6 branches, any policy with a valid quorum, any merge with a random
``select_branch``), one event or none per branch with random kinds, times (ties are frequent, events fall
before, at and after the deadline) and input order, and a reading time ``now`` before or after the deadline.

The expectations come from a small oracle written from the policy table, not from the implementation: the log
is ordered by time with ties in configured branch order, the deadline is one more step after every event
stamped at or before it, and a policy resolves at the earliest of its trigger steps (e.g. for quorum: the q-th
arrival, the (N - q + 1)-th loss, the deadline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_elspeth.core.config import CoalesceConfig, MergeStrategy, Policy, coalesce_config
from airflow_elspeth.core.merge import merge_outputs
from airflow_elspeth.core.policy import (
    BranchEvent,
    Decision,
    EventKind,
    order_events,
    replay,
    resolve_ended,
)
from airflow_elspeth.core.vocabulary import (
    LATE_AFTER_FAILURE,
    LATE_AFTER_MERGE,
    NOT_ARRIVED,
    DecisionStatus,
    FailureReason,
)

BASE = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
TICK = timedelta(microseconds=1)
LOSS_REASONS = ("dropped", "error:TimeoutError", "error:KeyError", "task_failed", "task_skipped")

PROPERTY = settings(max_examples=300, deadline=None)


def at(seconds: int) -> datetime:
    return BASE + timedelta(seconds=seconds)


# ---- strategies

BRANCH_NAMES = st.lists(
    # Small alphabet with both cases: names such as "a" and "A" are distinct branches, kept verbatim.
    st.text(alphabet="abAB_", min_size=1, max_size=3),
    min_size=2,
    max_size=6,
    unique=True,
)


@st.composite
def configs(
    draw: st.DrawFn, policy: Policy | None = None, merge: MergeStrategy | None = None
) -> CoalesceConfig:
    branches = draw(BRANCH_NAMES)
    policy = policy if policy is not None else draw(st.sampled_from(list(Policy)))
    merge = merge if merge is not None else draw(st.sampled_from(list(MergeStrategy)))
    quorum = draw(st.integers(1, len(branches))) if policy is Policy.QUORUM else None
    select_branch = draw(st.sampled_from(branches)) if merge is MergeStrategy.SELECT else None
    return coalesce_config(
        branches=branches,
        policy=policy,
        merge=merge,
        timeout=timedelta(seconds=60),
        quorum=quorum,
        select_branch=select_branch,
    )


@dataclass(frozen=True)
class Scenario:
    config: CoalesceConfig
    events: tuple[BranchEvent, ...]  # in the (random) order the store happened to return them
    deadline: datetime
    now: datetime


@st.composite
def scenarios(draw: st.DrawFn, policy: Policy | None = None, merge: MergeStrategy | None = None) -> Scenario:
    config = draw(configs(policy=policy, merge=merge))
    deadline = at(draw(st.integers(1, 10)))
    events = []
    for branch in config.branches:
        kind = draw(st.sampled_from(["arrival", "arrival", "loss", "none"]))
        if kind == "none":
            continue
        when = at(draw(st.integers(0, 12)))  # narrow range: ties in time and with the deadline are common
        if kind == "arrival":
            events.append(BranchEvent(branch, when, EventKind.ARRIVAL))
        else:
            events.append(BranchEvent(branch, when, EventKind.LOSS, draw(st.sampled_from(LOSS_REASONS))))
    events = draw(st.permutations(events))
    now = draw(
        st.one_of(
            st.just(deadline),
            st.just(deadline - TICK),
            st.integers(0, 14).map(at),
        )
    )
    return Scenario(config, tuple(events), deadline, now)


# ---- oracle

DEADLINE_STEP = "<deadline>"
Step = BranchEvent | str


def log_steps(s: Scenario) -> list[Step]:
    """The ordered log as "Decision semantics" defines it (plus the deadline once ``now >= deadline``)."""
    order = {b: i for i, b in enumerate(s.config.branches)}
    ordered: list[Step] = sorted(s.events, key=lambda e: (e.at, order[e.branch]))
    if s.now >= s.deadline:
        before = [e for e in ordered if isinstance(e, BranchEvent) and e.at <= s.deadline]
        ordered.insert(len(before), DEADLINE_STEP)
    return ordered


def is_arrival(step: Step) -> bool:
    return isinstance(step, BranchEvent) and step.kind is EventKind.ARRIVAL


def is_loss(step: Step) -> bool:
    return isinstance(step, BranchEvent) and step.kind is EventKind.LOSS


def is_event(step: Step) -> bool:
    return isinstance(step, BranchEvent)


def nth(steps: Sequence[Step], pred: Any, n: int) -> int | None:
    """Index of the n-th (1-based) step matching ``pred``, or None."""
    if n < 1:
        return None
    seen = 0
    for index, step in enumerate(steps):
        if pred(step):
            seen += 1
            if seen == n:
                return index
    return None


@dataclass(frozen=True)
class Expected:
    status: DecisionStatus
    index: int | None = None  # the decision step in log_steps
    consumed: frozenset[str] = frozenset()
    reason: FailureReason | None = None


def oracle(config: CoalesceConfig, steps: Sequence[Step]) -> Expected:
    """The policy table of docs/ARCHITECTURE.md ("Decision semantics") as "earliest trigger wins"."""
    n = len(config.branches)
    deadline_index = steps.index(DEADLINE_STEP) if DEADLINE_STEP in steps else None
    triggers: list[tuple[int | None, DecisionStatus, FailureReason | None]]
    if config.policy is Policy.REQUIRE_ALL:
        triggers = [
            (nth(steps, is_arrival, n), DecisionStatus.MERGED, None),
            (nth(steps, is_loss, 1), DecisionStatus.FAILED, FailureReason.BRANCH_LOST),
            (deadline_index, DecisionStatus.FAILED, FailureReason.INCOMPLETE_BRANCHES),
        ]
    elif config.policy is Policy.QUORUM:
        q = config.quorum
        assert q is not None
        triggers = [
            (nth(steps, is_arrival, q), DecisionStatus.MERGED, None),
            (nth(steps, is_loss, n - q + 1), DecisionStatus.FAILED, FailureReason.QUORUM_IMPOSSIBLE),
            (deadline_index, DecisionStatus.FAILED, FailureReason.QUORUM_NOT_MET_AT_TIMEOUT),
        ]
    elif config.policy is Policy.FIRST:
        triggers = [
            (nth(steps, is_arrival, 1), DecisionStatus.MERGED, None),
            (nth(steps, is_loss, n), DecisionStatus.FAILED, FailureReason.ALL_BRANCHES_LOST),
            (deadline_index, DecisionStatus.FAILED, FailureReason.FIRST_TIMEOUT_NO_ARRIVALS),
        ]
    else:  # best_effort: resolves once every branch is accounted for, or at the deadline
        all_in = nth(steps, is_event, n)
        candidates = [i for i in (all_in, deadline_index) if i is not None]
        if not candidates:
            return Expected(DecisionStatus.PENDING)
        index = min(candidates)
        arrived = frozenset(s.branch for s in steps[: index + 1] if is_arrival(s))  # type: ignore[union-attr]
        if arrived:
            triggers = [(index, DecisionStatus.MERGED, None)]
        elif index == all_in:
            triggers = [(index, DecisionStatus.FAILED, FailureReason.ALL_BRANCHES_LOST)]
        else:
            triggers = [(index, DecisionStatus.FAILED, FailureReason.BEST_EFFORT_TIMEOUT_NO_ARRIVALS)]

    fired = [t for t in triggers if t[0] is not None]
    if not fired:
        return Expected(DecisionStatus.PENDING)
    index, status, reason = min(fired, key=lambda t: t[0])  # type: ignore[arg-type,return-value]
    assert index is not None
    consumed: frozenset[str] = frozenset()
    if status is DecisionStatus.MERGED:
        consumed = frozenset(s.branch for s in steps[: index + 1] if is_arrival(s))  # type: ignore[union-attr]
        if config.merge is MergeStrategy.SELECT and config.select_branch not in consumed:
            status, reason, consumed = (
                DecisionStatus.FAILED,
                FailureReason.SELECT_BRANCH_NOT_ARRIVED,
                frozenset(),
            )
    return Expected(status, index, consumed, reason)


def decided_time(s: Scenario, step: Step) -> datetime:
    return s.deadline if step == DEADLINE_STEP else step.at  # type: ignore[union-attr]


def replay_s(
    s: Scenario, events: Sequence[BranchEvent] | None = None, now: datetime | None = None
) -> Decision:
    return replay(
        s.config,
        s.events if events is None else events,
        deadline=s.deadline,
        now=s.now if now is None else now,
    )


def stable_part(d: Decision) -> tuple[Any, ...]:
    """What may not change once a row is decided, whenever the log is read."""
    return (
        d.status,
        d.decided_at,
        d.consumed,
        d.arrived,
        d.failure_reason,
        dict(d.details),
        d.at_deadline,
        d.arrival_order,
        d.wait_from_first_arrival_ms,
    )


# ---- properties


@PROPERTY
@given(scenarios())
def test_replay_matches_the_design_table(s: Scenario) -> None:
    steps = log_steps(s)
    expected = oracle(s.config, steps)
    decision = replay_s(s)

    assert decision.status is expected.status
    if expected.status is DecisionStatus.PENDING:
        assert decision.decided_at is None
        assert decision.failure_reason is None
        return
    assert expected.index is not None
    step = steps[expected.index]
    assert decision.decided_at == decided_time(s, step)
    assert decision.at_deadline == (step == DEADLINE_STEP)
    assert decision.failure_reason is expected.reason
    assert set(decision.consumed) == expected.consumed
    assert len(decision.consumed) == len(set(decision.consumed))
    arrived_before = [e.branch for e in steps[: expected.index + 1] if is_arrival(e)]  # type: ignore[union-attr]
    assert list(decision.arrived) == arrived_before
    # The arrival record: those arrivals in log order, offsets from the first, and the first's wait.
    arrival_times = [e.at for e in steps[: expected.index + 1] if is_arrival(e)]  # type: ignore[union-attr]
    assert [a.branch for a in decision.arrival_order] == arrived_before
    ms = timedelta(milliseconds=1)
    assert [a.offset_ms for a in decision.arrival_order] == [
        (at - arrival_times[0]) // ms for at in arrival_times
    ]
    assert decision.wait_from_first_arrival_ms == (
        (decision.decided_at - arrival_times[0]) // ms if arrival_times else None
    )
    if decision.status is DecisionStatus.MERGED:
        assert decision.failure_reason is None
        # Nothing that arrived by the decision is left out of a merge.
        assert set(decision.consumed) == set(arrived_before)
    else:
        assert decision.consumed == ()


@PROPERTY
@given(scenarios())
def test_prefix_stability(s: Scenario) -> None:
    """Reading the log at any later point gives the same decision: replay does not depend on poll time."""
    steps = log_steps(s)
    decisions = []
    for k in range(len(steps) + 1):
        prefix = steps[:k]
        events = [e for e in prefix if isinstance(e, BranchEvent)]
        now = s.deadline if DEADLINE_STEP in prefix else s.deadline - TICK
        decisions.append(replay_s(s, events, now))

    decided = [k for k, d in enumerate(decisions) if d.is_final]
    if not decided:
        assert all(d.status is DecisionStatus.PENDING for d in decisions)
        return
    first = decided[0]
    assert first >= 1
    # The first prefix that decides ends exactly at the decision step...
    assert decisions[first].decided_at == decided_time(s, steps[first - 1])
    # ...every shorter prefix is pending, and every longer prefix gives the same decision.
    assert all(d.status is DecisionStatus.PENDING for d in decisions[:first])
    for later in decisions[first + 1 :]:
        assert stable_part(later) == stable_part(decisions[first])
    # Late arrivals only accumulate as the log grows.
    for shorter, longer in pairwise(decisions[first:]):
        assert longer.late[: len(shorter.late)] == shorter.late


@PROPERTY
@given(scenarios())
def test_every_row_resolves_once_the_deadline_is_in_the_log(s: Scenario) -> None:
    decision = replay_s(s)
    if s.now >= s.deadline:
        assert decision.status is not DecisionStatus.PENDING
        assert decision.decided_at is not None
        assert decision.decided_at <= s.deadline
    else:
        assert not decision.at_deadline
    if decision.at_deadline:
        assert decision.decided_at == s.deadline


@PROPERTY
@given(scenarios())
def test_a_row_resolves_at_most_once(s: Scenario) -> None:
    """Along the log, the status goes pending ... pending, then one final status that never changes."""
    steps = log_steps(s)
    statuses = []
    for k in range(len(steps) + 1):
        prefix = steps[:k]
        events = [e for e in prefix if isinstance(e, BranchEvent)]
        now = s.deadline if DEADLINE_STEP in prefix else s.deadline - TICK
        statuses.append(replay_s(s, events, now).status)
    changes = sum(1 for a, b in pairwise(statuses) if a is not b)
    assert changes <= 1
    assert statuses[0] is DecisionStatus.PENDING


@PROPERTY
@given(scenarios())
def test_replay_does_not_depend_on_the_order_events_are_read(s: Scenario) -> None:
    assert replay_s(s, tuple(reversed(s.events))) == replay_s(s)
    assert replay_s(s, sorted(s.events, key=lambda e: e.branch)) == replay_s(s)


@PROPERTY
@given(scenarios(), st.integers(1, 5))
def test_only_a_branchs_first_event_counts(s: Scenario, delay: int) -> None:
    """A second, later event for a branch (e.g. a retry's output) changes nothing."""
    if not s.events:
        return
    first = s.events[0]
    other = EventKind.LOSS if first.kind is EventKind.ARRIVAL else EventKind.ARRIVAL
    echo = BranchEvent(first.branch, first.at + timedelta(seconds=delay), other, "dropped")
    assert replay_s(s, (*s.events, echo)) == replay_s(s)


@PROPERTY
@given(scenarios(policy=Policy.REQUIRE_ALL))
def test_require_all_never_merges_a_partial_set(s: Scenario) -> None:
    decision = replay_s(s)
    if decision.status is DecisionStatus.MERGED:
        assert set(decision.consumed) == set(s.config.branches)
        assert len(decision.consumed) == len(s.config.branches)
        assert decision.missing == {}
    # It merges exactly when every branch arrived at or before the deadline step (and nothing was lost).
    steps = log_steps(s)
    cut = steps.index(DEADLINE_STEP) if DEADLINE_STEP in steps else len(steps)
    in_time = [e for e in steps[:cut] if isinstance(e, BranchEvent)]
    all_arrived = len(in_time) == len(s.config.branches) and all(is_arrival(e) for e in in_time)
    assert (decision.status is DecisionStatus.MERGED) == all_arrived


@PROPERTY
@given(scenarios(policy=Policy.QUORUM))
def test_quorum_consumes_exactly_the_first_q_arrivals(s: Scenario) -> None:
    decision = replay_s(s)
    q = s.config.quorum
    assert q is not None
    steps = log_steps(s)
    arrivals = [e for e in steps if is_arrival(e)]
    if decision.status is DecisionStatus.MERGED:
        first_q = arrivals[:q]
        assert set(decision.consumed) == {e.branch for e in first_q}  # type: ignore[union-attr]
        assert len(decision.consumed) == q
        assert decision.decided_at == first_q[-1].at  # type: ignore[union-attr]
    if decision.failure_reason is FailureReason.QUORUM_IMPOSSIBLE:
        lost = len(decision.details["lost"])
        assert decision.details["need"] == q
        assert decision.details["max_possible"] == len(s.config.branches) - lost
        assert decision.details["max_possible"] == q - 1  # fails at the first loss making q unreachable
        assert len(decision.arrived) < q


@PROPERTY
@given(scenarios(policy=Policy.FIRST))
def test_first_consumes_exactly_the_first_arrival(s: Scenario) -> None:
    decision = replay_s(s)
    arrivals = [e for e in log_steps(s) if is_arrival(e)]
    if decision.status is DecisionStatus.MERGED:
        first = arrivals[0]
        assert isinstance(first, BranchEvent)
        assert decision.consumed == (first.branch,)
        assert decision.decided_at == first.at
        # Same-time arrivals of later-configured branches are late, not consumed.
        assert {e.branch for e in arrivals[1:]} == set(decision.late)  # type: ignore[union-attr]


@PROPERTY
@given(scenarios(merge=MergeStrategy.SELECT))
def test_select_never_substitutes_another_branch(s: Scenario) -> None:
    decision = replay_s(s)
    selected = s.config.select_branch
    if decision.status is DecisionStatus.MERGED:
        assert selected in decision.consumed
    # What the policy alone would consume at its decision:
    policy_only = coalesce_config(
        branches=s.config.branches,
        policy=s.config.policy,
        quorum=s.config.quorum,
        merge=MergeStrategy.UNION,
        timeout=s.config.timeout,
    )
    unselected = replay(policy_only, s.events, deadline=s.deadline, now=s.now)
    if unselected.status is DecisionStatus.MERGED and selected not in unselected.consumed:
        assert decision.status is DecisionStatus.FAILED
        assert decision.failure_reason is FailureReason.SELECT_BRANCH_NOT_ARRIVED
        assert decision.decided_at == unselected.decided_at
        assert decision.consumed == ()
    else:
        # select changes nothing else about the decision.
        assert decision.status is unselected.status
        assert decision.consumed == unselected.consumed
        assert decision.failure_reason is unselected.failure_reason


@PROPERTY
@given(scenarios())
def test_late_and_missing_branches(s: Scenario) -> None:
    steps = log_steps(s)
    expected = oracle(s.config, steps)
    decision = replay_s(s)
    if expected.index is None:
        assert decision.late == ()
        assert decision.missing == {}
        return
    before, after = steps[: expected.index + 1], steps[expected.index + 1 :]
    # Late arrivals are exactly the arrivals ordered after the decision step, in log order.
    assert decision.late == tuple(e.branch for e in after if is_arrival(e))  # type: ignore[union-attr]
    assert not set(decision.late) & set(decision.consumed)

    arrived_before = {e.branch for e in before if is_arrival(e)}  # type: ignore[union-attr]
    losses = {e.branch: e.reason for e in steps if is_loss(e)}  # type: ignore[union-attr]
    late_outcome = LATE_AFTER_MERGE if decision.status is DecisionStatus.MERGED else LATE_AFTER_FAILURE
    expected_missing = {}
    for branch in s.config.branches:
        if branch in decision.consumed:
            continue
        if decision.status is DecisionStatus.FAILED and branch in arrived_before:
            continue
        if branch in losses:
            expected_missing[branch] = losses[branch]
        elif branch in decision.late:
            expected_missing[branch] = late_outcome
        else:
            expected_missing[branch] = NOT_ARRIVED
    assert dict(decision.missing) == expected_missing
    if decision.status is DecisionStatus.MERGED:
        # Every branch is accounted for exactly once: consumed or missing.
        assert set(decision.consumed) | set(decision.missing) == set(s.config.branches)
        assert not set(decision.consumed) & set(decision.missing)
    if decision.failure_reason is FailureReason.BRANCH_LOST:
        lost_before = {e.branch: e.reason for e in before if is_loss(e)}  # type: ignore[union-attr]
        assert decision.details["lost"] == lost_before
        assert len(lost_before) == 1


# ---- merging

FIELD = st.sampled_from(["answer", "score", "id", "model", "x"])
VALUE = st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none(), st.booleans())
ROW = st.dictionaries(FIELD, VALUE, max_size=4)


@st.composite
def merge_cases(
    draw: st.DrawFn, merge: MergeStrategy
) -> tuple[CoalesceConfig, list[str], dict[str, dict[str, Any]]]:
    config = draw(configs(merge=merge))
    if merge is MergeStrategy.SELECT:
        assert config.select_branch is not None
        rest = [b for b in config.branches if b != config.select_branch]
        consumed = [config.select_branch, *draw(st.lists(st.sampled_from(rest), unique=True))]
    else:
        consumed = draw(st.lists(st.sampled_from(config.branches), min_size=1, unique=True))
    consumed = draw(st.permutations(consumed))  # arrival order, unrelated to configured order
    # Outputs may include branches that were not consumed (late arrivals): they must never leak in.
    producers = draw(st.lists(st.sampled_from(config.branches), unique=True))
    outputs = {b: draw(ROW) for b in {*consumed, *producers}}
    return config, list(consumed), outputs


@PROPERTY
@given(merge_cases(MergeStrategy.UNION))
def test_union_later_configured_branch_wins_and_collisions_are_recorded(
    case: tuple[CoalesceConfig, list[str], dict[str, dict[str, Any]]],
) -> None:
    config, consumed, outputs = case
    snapshot = {b: dict(r) for b, r in outputs.items()}
    result = merge_outputs(config, consumed, outputs)

    fields = {f for b in consumed for f in outputs[b]}
    suppliers = {f: [b for b in config.branches if b in consumed and f in outputs[b]] for f in fields}
    assert set(result.row) == fields
    for f, names in suppliers.items():
        assert result.row[f] == outputs[names[-1]][f], f"the last configured supplier of {f!r} wins"
    assert result.collisions == {f: names for f, names in suppliers.items() if len(names) >= 2}
    assert outputs == snapshot  # inputs are not mutated
    # Arrival order does not matter, only configured order.
    assert merge_outputs(config, list(reversed(consumed)), outputs) == result


@PROPERTY
@given(merge_cases(MergeStrategy.NESTED))
def test_nested_has_exactly_the_consumed_branches(
    case: tuple[CoalesceConfig, list[str], dict[str, dict[str, Any]]],
) -> None:
    config, consumed, outputs = case
    result = merge_outputs(config, consumed, outputs)
    assert set(result.row) == set(consumed)
    for branch in consumed:
        assert result.row[branch] == outputs[branch]
    assert result.collisions == {}


@PROPERTY
@given(merge_cases(MergeStrategy.SELECT))
def test_select_returns_the_selected_row_unchanged(
    case: tuple[CoalesceConfig, list[str], dict[str, dict[str, Any]]],
) -> None:
    config, consumed, outputs = case
    assert config.select_branch is not None
    expected = dict(outputs[config.select_branch])
    result = merge_outputs(config, consumed, outputs)
    assert result.row == expected
    assert result.collisions == {}
    result.row["__mutated__"] = True
    assert outputs[config.select_branch] == expected  # the merged row is a copy


@PROPERTY
@given(scenarios())
def test_merging_a_decision_uses_only_its_consumed_branches(s: Scenario) -> None:
    """As the shell does: merge the consumed set from every output seen so far (late ones included)."""
    decision = replay_s(s)
    arrived = {e.branch for e in s.events if e.kind is EventKind.ARRIVAL}
    outputs = {b: {"from": b, f"only_{b}": 1} for b in arrived}
    if decision.status is not DecisionStatus.MERGED:
        return
    result = merge_outputs(s.config, decision.consumed, outputs)
    if s.config.merge is MergeStrategy.SELECT:
        assert result.row == outputs[s.config.select_branch]  # type: ignore[index]
    elif s.config.merge is MergeStrategy.NESTED:
        assert set(result.row) == set(decision.consumed)
    else:
        last = [b for b in s.config.branches if b in decision.consumed][-1]
        assert result.row["from"] == last
        assert {k for k in result.row if k.startswith("only_")} == {f"only_{b}" for b in decision.consumed}
        if len(decision.consumed) >= 2:
            assert result.collisions == {"from": [b for b in s.config.branches if b in decision.consumed]}


# ---- resolutions: a row closed because its coalesce task ended


@PROPERTY
@given(s=scenarios(), state=st.sampled_from(["failed", "skipped", "upstream_failed", "success", "removed"]))
def test_resolve_ended_closes_a_row_with_what_arrived_and_why_the_rest_is_missing(
    s: Scenario, state: str
) -> None:
    decision = resolve_ended(s.config, s.events, at=s.now, task_state=state)
    seen = [e for e in order_events(s.config, s.events) if e.at <= s.now]
    arrived = [e.branch for e in seen if e.kind is EventKind.ARRIVAL]
    lost = {e.branch: e.reason for e in seen if e.kind is EventKind.LOSS}
    assert decision.status is DecisionStatus.FAILED and decision.decided_at == s.now
    assert decision.failure_reason is FailureReason(f"coalesce_task_{state}")
    assert decision.failure_reason.is_resolution and not decision.consumed
    assert list(decision.arrived) == arrived == decision.details["arrived"]
    assert set(decision.missing) == set(s.config.branches) - set(arrived)
    for branch, reason in decision.missing.items():
        assert reason == lost.get(branch, NOT_ARRIVED)
    assert decision.details["coalesce_task_state"] == state


@PROPERTY
@given(s=scenarios(merge=MergeStrategy.SELECT))
def test_a_select_failure_keeps_the_branches_that_did_arrive(s: Scenario) -> None:
    decision = replay(s.config, s.events, deadline=s.deadline, now=s.now)
    if decision.failure_reason is not FailureReason.SELECT_BRANCH_NOT_ARRIVED:
        return
    assert decision.details["arrived"] == list(decision.arrived)
    assert decision.details["arrived"], "select fails only once another branch was merged in its place"
    assert s.config.select_branch not in decision.details["arrived"]
