"""Branch output contracts (airflow_elspeth/core/contract.py) and on_collision (core config, policy, merge).

The properties: a union of compatible contracts accepts exactly the rows every one of them accepts;
conflicts are found whatever the branch order; a contract's per-row check names the first field, in
declared order, that breaks it.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_elspeth.core.config import coalesce_config
from airflow_elspeth.core.contract import (
    KINDS,
    Contract,
    contract_of,
    merge_contracts,
    normalised_kinds,
    value_kind,
)
from airflow_elspeth.core.merge import merge_outputs
from airflow_elspeth.core.policy import BranchEvent, EventKind, replay
from airflow_elspeth.core.vocabulary import (
    CONTRACT_VIOLATION,
    LATE_AFTER_FAILURE,
    DecisionStatus,
    FailureReason,
    failed_state_reason,
    failure_reason_text,
    missing_reason_text,
)
from airflow_elspeth.exceptions import ElspethConfigError

PROPERTY = settings(max_examples=300, deadline=None)
BASE = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
TYPE_OF_KIND = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "dict": dict,
    "list": list,
    "None": None,
}

# ---- strategies

KIND_SETS = st.sets(st.sampled_from(KINDS), min_size=1, max_size=3)
FIELD_NAMES = st.sampled_from(["a", "b", "c", "d"])
CONTRACTS = st.dictionaries(FIELD_NAMES, KIND_SETS, max_size=4).map(
    lambda d: contract_of({name: tuple(TYPE_OF_KIND[k] for k in kinds) for name, kinds in d.items()})
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(-5, 5, allow_nan=False),
    st.text(max_size=3),
    st.just({"x": 1}),
    st.just([1]),
)
ROWS = st.dictionaries(FIELD_NAMES, VALUES, max_size=4)


def _accepts(contract: Contract, row: dict[str, Any]) -> bool:
    return contract.violation(row) is None


# ---- declaring


def test_types_follow_json() -> None:
    declared = {"n": int, "x": float, "s": str | None, "o": Optional[dict], "l": (list, bool)}  # noqa: UP045
    contract = contract_of(declared)
    assert contract.as_dict() == {
        "n": ["int"],
        "x": ["float", "int"],  # canonical JSON writes 1.0 as 1: a stored float may read back as int
        "s": ["None", "str"],
        "o": ["None", "dict"],
        "l": ["bool", "list"],
    }
    row = {"n": 1, "x": 2, "s": None, "o": {"k": 1}, "l": True, "extra": object()}
    assert contract.violation(row) is None  # undeclared fields pass
    assert contract.violation({**row, "n": True}).field == "n"  # bool is no int
    assert contract.violation({**row, "n": 1.0}).field == "n"
    assert contract.violation({**row, "x": False}).field == "x"


def test_the_first_field_in_declared_order_is_named_with_its_value() -> None:
    contract = contract_of({"b": int, "a": str})
    violation = contract.violation({"a": 1, "b": "x"})
    assert violation is not None
    assert (violation.field, violation.value, violation.expected, violation.missing) == (
        "b",
        "x",
        ("int",),
        False,
    )
    assert violation.message == "field 'b' is str, the contract says int"
    missing = contract.violation({"b": 1})
    assert missing is not None and missing.missing and missing.field == "a"
    assert "has no field 'a'" in missing.message


def test_none_passes_only_where_declared() -> None:
    assert contract_of({"v": int}).violation({"v": None}) is not None
    assert contract_of({"v": int | None}).violation({"v": None}) is None
    assert contract_of({"v": None}).violation({"v": None}) is None


@pytest.mark.parametrize(
    ("declared", "fragment"),
    [
        ([("v", int)], "must be a mapping"),
        ({"": int}, "non-empty strings"),
        ({"v": "int"}, "output_fields['v']: type 'int' is not one of"),
        ({"v": set}, "type <class 'set'>"),
        ({"v": ()}, "empty tuple"),
        ({"v": int | bytes}, "bytes"),
    ],
)
def test_invalid_declarations_name_the_parameter_and_the_field(declared: Any, fragment: str) -> None:
    with pytest.raises(ElspethConfigError, match="output_fields") as err:
        contract_of(declared)
    assert fragment in str(err.value)


@given(VALUES)
def test_value_kinds_are_json_kinds(value: Any) -> None:
    kind = value_kind(value)
    assert kind in KINDS
    assert contract_of({"v": TYPE_OF_KIND[kind]}).violation({"v": value}) is None


# ---- merging


@PROPERTY
@given(st.lists(CONTRACTS, min_size=2, max_size=4), ROWS)
def test_a_union_of_compatible_contracts_accepts_exactly_the_rows_all_accept(
    contracts: list[Contract], row: dict[str, Any]
) -> None:
    by_branch = {f"b{i}": c for i, c in enumerate(contracts)}
    merged = merge_contracts(by_branch, by_branch)
    if merged.conflicts:
        return
    assert _accepts(merged.contract, row) == all(_accepts(c, row) for c in contracts)
    assert merged.untyped == ()


@PROPERTY
@given(st.lists(CONTRACTS, min_size=2, max_size=4), st.data())
def test_conflicts_are_found_whatever_the_branch_order(
    contracts: list[Contract], data: st.DataObject
) -> None:
    by_branch = {f"b{i}": c for i, c in enumerate(contracts)}
    order = data.draw(st.permutations(list(by_branch)))
    first = merge_contracts(by_branch, list(by_branch))
    second = merge_contracts(by_branch, order)
    assert {c.field: dict(c.declared) for c in first.conflicts} == {
        c.field: dict(c.declared) for c in second.conflicts
    }
    # A conflict is exactly a field declared with different kinds by two branches.
    expected = {
        name
        for x, y in itertools.combinations(contracts, 2)
        for name in set(x.fields) & set(y.fields)
        if x.fields[name] != y.fields[name]
    }
    assert {c.field for c in first.conflicts} == expected
    assert set(first.contract.fields).isdisjoint(expected)


def test_a_conflict_names_the_field_and_both_branches() -> None:
    merged = merge_contracts(
        {"scorer": contract_of({"value": int}), "labeller": contract_of({"value": str}), "free": None},
        ["scorer", "labeller", "free"],
    )
    (conflict,) = merged.conflicts
    assert conflict.message == "field 'value' is declared int in branch 'scorer', str in branch 'labeller'"
    assert merged.untyped == ("free",)
    assert merged.as_dict() == {"fields": {}, "untyped_branches": ["free"]}


def test_float_and_int_or_float_agree() -> None:
    assert normalised_kinds(float) == normalised_kinds((int, float))
    merged = merge_contracts(
        {"a": contract_of({"x": float}), "b": contract_of({"x": int | float})}, ["a", "b"]
    )
    assert merged.conflicts == () and merged.contract.as_dict() == {"x": ["float", "int"]}


# ---- on_collision


def _config(**kwargs: Any) -> Any:
    return coalesce_config(branches=["a", "b", "c"], policy="require_all", timeout=60, **kwargs)


def test_on_collision_is_record_by_default_and_validated() -> None:
    assert _config().on_collision == "record"
    assert _config(on_collision="prefer:b").preferred_branch == "b"
    assert _config(on_collision="fail_row").fails_on_collision
    with pytest.raises(ElspethConfigError, match=r"prefer one of the branches \['a', 'b', 'c'\], got 'z'"):
        _config(on_collision="prefer:z")
    with pytest.raises(
        ElspethConfigError, match="on_collision must be 'record', 'fail_row' or 'prefer:<branch>'"
    ):
        _config(on_collision="last")
    with pytest.raises(ElspethConfigError, match="only valid with merge='union'"):
        _config(on_collision="fail_row", merge="nested")
    with pytest.raises(ElspethConfigError, match="only valid with merge='union'"):
        _config(on_collision="prefer:a", merge="select", select_branch="a")


def test_prefer_makes_its_branch_win_and_lists_it_last() -> None:
    outputs = {"a": {"v": 1, "x": 1}, "b": {"v": 2}, "c": {"v": 3, "x": 3}}
    merged = merge_outputs(_config(on_collision="prefer:a"), ("a", "b", "c"), outputs)
    assert merged.row == {"v": 1, "x": 1}
    assert merged.collisions == {"v": ["b", "c", "a"], "x": ["c", "a"]}
    assert merge_outputs(_config(), ("a", "b", "c"), outputs).row == {"v": 3, "x": 3}


def _events() -> list[BranchEvent]:
    return [BranchEvent(b, BASE + timedelta(seconds=i), EventKind.ARRIVAL) for i, b in enumerate("abc")]


@pytest.mark.parametrize("on_collision", ["record", "fail_row", "prefer:c"])
def test_fail_row_fails_a_colliding_merge_at_the_same_step(on_collision: str) -> None:
    config = _config(on_collision=on_collision)
    outputs = {"a": {"v": 1}, "b": {"w": 2}, "c": {"v": 3}}

    def collisions(consumed: tuple[str, ...]) -> Any:
        return merge_outputs(config, consumed, outputs).collisions

    late = [*_events()[:2], BranchEvent("c", BASE + timedelta(seconds=2), EventKind.ARRIVAL)]
    decision = replay(config, late, deadline=BASE + timedelta(minutes=1), now=BASE, collisions=collisions)
    assert decision.decided_at == BASE + timedelta(seconds=2)
    if on_collision != "fail_row":
        assert decision.status is DecisionStatus.MERGED and decision.consumed == ("a", "b", "c")
        return
    assert decision.status is DecisionStatus.FAILED
    assert decision.failure_reason is FailureReason.FIELD_COLLISION
    assert decision.consumed == () and decision.arrived == ("a", "b", "c") and decision.missing == {}
    expected_collisions = {"v": ["a", "c"]}
    assert decision.details == {
        "collisions": expected_collisions,
        "consumed": ["a", "b", "c"],
        "arrived": ["a", "b", "c"],
        "lost": {},
        "not_arrived": [],
    }
    # Without the outputs at hand the decision is the log's alone.
    assert (
        replay(config, late, deadline=BASE + timedelta(minutes=1), now=BASE).status is DecisionStatus.MERGED
    )


def test_a_late_branch_after_a_collision_failure_is_late_after_failure() -> None:
    config = coalesce_config(
        branches=["a", "b", "c"], policy="quorum", quorum=2, timeout=60, on_collision="fail_row"
    )
    outputs = {"a": {"v": 1}, "b": {"v": 2}, "c": {"v": 3}}
    decision = replay(
        config,
        _events(),
        deadline=BASE + timedelta(minutes=1),
        now=BASE + timedelta(seconds=5),
        collisions=lambda consumed: merge_outputs(config, consumed, outputs).collisions,
    )
    assert decision.failure_reason is FailureReason.FIELD_COLLISION
    assert decision.missing == {"c": LATE_AFTER_FAILURE}


# ---- words


def test_contract_losses_and_collisions_have_their_words() -> None:
    error = {"type": CONTRACT_VIOLATION, "message": "m", "contract": {"field": "value", "value": "x"}}
    assert failed_state_reason(error) == "contract:value"
    assert failed_state_reason({"type": "KeyError"}) == "error:KeyError"
    assert failed_state_reason(None) == "error:Exception"
    assert missing_reason_text("contract:value") == "its output broke the branch's contract at field 'value'"
    assert "fail_row" in failure_reason_text(FailureReason.FIELD_COLLISION)
