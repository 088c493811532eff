"""Coalesce configuration validation: every error names the parameter and the bad value."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from airflow_elspeth.core.config import (
    CoalesceConfig,
    MergeStrategy,
    Policy,
    coalesce_config,
    validate_branches,
)
from airflow_elspeth.exceptions import ElspethConfigError

BRANCHES = ["gpt", "claude", "gemini"]


def build(**overrides: Any) -> CoalesceConfig:
    params: dict[str, Any] = {"branches": BRANCHES, "policy": "require_all", "timeout": 60}
    params.update(overrides)
    return coalesce_config(**params)


def assert_names(err: pytest.ExceptionInfo[ElspethConfigError], *fragments: str) -> None:
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---- what is accepted


def test_a_valid_configuration_is_kept_as_given() -> None:
    config = coalesce_config(
        branches=("GPT", "gpt", "Claude 3"),
        policy="quorum",
        quorum=2,
        merge="select",
        select_branch="gpt",
        timeout=90,
    )
    assert config.branches == ("GPT", "gpt", "Claude 3")  # verbatim, in order, never normalised
    assert config.policy is Policy.QUORUM
    assert config.merge is MergeStrategy.SELECT
    assert config.quorum == 2
    assert config.select_branch == "gpt"
    assert config.timeout == timedelta(seconds=90)
    assert config.as_dict() == {
        "branches": ["GPT", "gpt", "Claude 3"],
        "policy": "quorum",
        "merge": "select",
        "timeout_seconds": 90.0,
        "quorum": 2,
        "select_branch": "gpt",
        "on_collision": "record",
    }


@pytest.mark.parametrize("quorum", [1, 2, 3], ids=lambda q: f"quorum={q}")
def test_quorum_bounds_are_inclusive(quorum: int) -> None:
    assert build(policy="quorum", quorum=quorum).quorum == quorum


@pytest.mark.parametrize(
    "policy",
    [*Policy, *(p.value for p in Policy)],
    ids=lambda p: f"{type(p).__name__}:{getattr(p, 'value', p)}",
)
def test_policy_accepts_enum_or_text(policy: Policy | str) -> None:
    quorum = 2 if Policy(policy) is Policy.QUORUM else None
    assert build(policy=policy, quorum=quorum).policy is Policy(policy)


def test_defaults_and_timeout_forms() -> None:
    assert build().merge is MergeStrategy.UNION
    assert build(timeout=timedelta(minutes=30)).timeout == timedelta(minutes=30)
    assert build(timeout=0.5).timeout == timedelta(milliseconds=500)


def test_coalesce_over_a_subset_of_the_fork_branches_is_valid() -> None:
    config = build(branches=["gpt", "gemini"], fork_branches=BRANCHES)
    assert config.branches == ("gpt", "gemini")


def test_validate_branches_keeps_names_verbatim() -> None:
    assert validate_branches(["GPT", "gpt", " gpt"]) == ("GPT", "gpt", " gpt")


# ---- branches


@pytest.mark.parametrize(
    ("branches", "fragments"),
    [
        pytest.param([], ["branches", "at least 2", "[]"], id="no-branches"),
        pytest.param(["gpt"], ["branches", "at least 2", "['gpt']"], id="one-branch"),
        pytest.param(["gpt", "claude", "gpt"], ["branches", "duplicate", "'gpt'"], id="duplicate"),
        pytest.param(["a", "b", "b", "a"], ["branches", "duplicate", "'a'", "'b'"], id="two-duplicates"),
        pytest.param(["gpt", 1], ["branches", "1"], id="non-string-int"),
        pytest.param(["gpt", None], ["branches", "None"], id="non-string-none"),
        pytest.param(["gpt", b"claude"], ["branches", "b'claude'"], id="non-string-bytes"),
        pytest.param(["gpt", ""], ["branches", "''"], id="empty-name"),
        pytest.param("gpt,claude", ["branches", "'gpt,claude'"], id="a-string-not-a-list"),
        pytest.param(None, ["branches", "None"], id="none"),
    ],
)
def test_invalid_branches(branches: Any, fragments: list[str]) -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(branches=branches)
    assert_names(err, *fragments)
    with pytest.raises(ElspethConfigError) as err:
        validate_branches(branches, param="fork_branches")
    assert_names(err, "fork_branches", *fragments[1:])


def test_duplicate_message_names_only_the_duplicates() -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(branches=["GPT", "gpt", "claude", "gpt"])
    assert_names(err, "['gpt']")
    assert "'GPT'" not in str(err.value)


def test_coalesced_branches_must_be_fork_branches() -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(branches=["gpt", "mistral"], fork_branches=BRANCHES)
    assert_names(err, "branches", "'mistral'", "fork")
    assert "'gpt'" not in str(err.value).split("fork")[0]


def test_fork_branch_names_are_not_normalised() -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(branches=["GPT", "claude"], fork_branches=BRANCHES)
    assert_names(err, "branches", "'GPT'")


# ---- quorum


def test_quorum_missing_for_policy_quorum() -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(policy="quorum")
    assert_names(err, "quorum", "required")


@pytest.mark.parametrize(
    ("quorum", "shown"),
    [
        pytest.param(0, "0", id="zero"),
        pytest.param(-1, "-1", id="negative"),
        pytest.param(4, "4", id="above-N"),
        pytest.param(True, "True", id="bool-true"),
        pytest.param(False, "False", id="bool-false"),
        pytest.param(2.0, "2.0", id="float"),
        pytest.param("2", "'2'", id="text"),
    ],
)
def test_quorum_outside_1_to_n(quorum: Any, shown: str) -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(policy="quorum", quorum=quorum)
    assert_names(err, "quorum", "1..3", shown)


@pytest.mark.parametrize("policy", ["require_all", "best_effort", "first"])
def test_quorum_with_another_policy(policy: str) -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(policy=policy, quorum=2)
    assert_names(err, "quorum", "2", "policy")


# ---- select_branch


def test_select_without_select_branch() -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(merge="select")
    assert_names(err, "select_branch", "select")


@pytest.mark.parametrize(
    ("select_branch", "shown"),
    [
        pytest.param("mistral", "'mistral'", id="unknown"),
        pytest.param("GPT", "'GPT'", id="different-case"),
        pytest.param("", "''", id="empty"),
        pytest.param(0, "0", id="index-not-name"),
    ],
)
def test_select_with_invalid_select_branch(select_branch: Any, shown: str) -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(merge="select", select_branch=select_branch)
    assert_names(err, "select_branch", shown)


@pytest.mark.parametrize("merge", ["union", "nested"])
def test_select_branch_with_another_merge(merge: str) -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(merge=merge, select_branch="gpt")
    assert_names(err, "select_branch", "'gpt'", "merge")


# ---- timeout, policy, merge


@pytest.mark.parametrize(
    ("timeout", "shown"),
    [
        pytest.param(0, "0", id="zero"),
        pytest.param(-5, "-5", id="negative-seconds"),
        pytest.param(0.0, "0.0", id="zero-float"),
        pytest.param(timedelta(0), "timedelta(0)", id="zero-timedelta"),
        pytest.param(timedelta(seconds=-1), "timedelta(days=-1, seconds=86399)", id="negative-timedelta"),
        pytest.param(True, "True", id="bool"),
        pytest.param("30", "'30'", id="text"),
        pytest.param(None, "None", id="none"),
    ],
)
def test_non_positive_or_invalid_timeout(timeout: Any, shown: str) -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(timeout=timeout)
    assert_names(err, "timeout", shown)


def test_non_finite_timeout_is_a_config_error_naming_timeout() -> None:
    for timeout, shown in [(float("nan"), "nan"), (float("inf"), "inf")]:
        with pytest.raises(ElspethConfigError) as err:
            build(timeout=timeout)
        assert_names(err, "timeout", shown)


@pytest.mark.parametrize(
    ("param", "value", "shown"),
    [
        pytest.param("policy", "majority", "'majority'", id="policy-unknown"),
        pytest.param("policy", "Quorum", "'Quorum'", id="policy-wrong-case"),
        pytest.param("policy", None, "None", id="policy-none"),
        pytest.param("policy", MergeStrategy.UNION, "MergeStrategy.UNION", id="policy-given-a-merge"),
        pytest.param("merge", "concat", "'concat'", id="merge-unknown"),
        pytest.param("merge", "Union", "'Union'", id="merge-wrong-case"),
        pytest.param("merge", Policy.FIRST, "Policy.FIRST", id="merge-given-a-policy"),
    ],
)
def test_unknown_policy_or_merge(param: str, value: Any, shown: str) -> None:
    with pytest.raises(ElspethConfigError) as err:
        build(**{param: value})
    assert_names(err, param, shown)
    allowed = Policy if param == "policy" else MergeStrategy
    for member in allowed:
        assert member.value in str(err.value)  # the message lists the valid choices


def test_config_errors_are_value_errors() -> None:
    assert issubclass(ElspethConfigError, ValueError)
