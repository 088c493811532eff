"""Coalesce configuration and its validation (called by the operators at DAG parse time)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

from airflow_elspeth.exceptions import ElspethConfigError


class Policy(str, Enum):
    REQUIRE_ALL = "require_all"
    QUORUM = "quorum"
    BEST_EFFORT = "best_effort"
    FIRST = "first"


class MergeStrategy(str, Enum):
    UNION = "union"
    NESTED = "nested"
    SELECT = "select"


# ``on_collision``: what a union does with a field more than one consumed branch supplied.
ON_COLLISION_RECORD = "record"  # the later-configured branch wins; the collision is recorded
ON_COLLISION_FAIL_ROW = "fail_row"  # the row fails ``field_collision`` instead of merging
ON_COLLISION_PREFER = "prefer:"  # ``prefer:<branch>``: that branch wins; the collision is recorded


def validate_branches(branches: Sequence[str], *, param: str = "branches") -> tuple[str, ...]:
    """Branch names: at least two, unique, non-empty strings, kept verbatim (never normalised)."""
    if isinstance(branches, str) or not isinstance(branches, Sequence):
        raise ElspethConfigError(f"{param} must be a list of branch names, got {branches!r}")
    names = tuple(branches)
    # The audit store keeps branch names in NAME columns (VARCHAR(250)); PostgreSQL refuses longer
    # names and any NUL character, SQLite neither: checked here so both backends take the same names.
    max_chars = 250
    for name in names:
        if not isinstance(name, str) or not name:
            raise ElspethConfigError(f"{param} must contain non-empty strings, got {name!r}")
        shown = repr(name[:40] + "...") if len(name) > 40 else repr(name)
        if len(name) > max_chars:
            raise ElspethConfigError(
                f"{param}: branch name {shown} is {len(name)} characters, more than the {max_chars} allowed"
            )
        if "\x00" in name:
            raise ElspethConfigError(f"{param}: branch name {shown} contains a NUL character")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ElspethConfigError(
                f"{param}: branch name {shown} is not valid Unicode ({err.reason})"
            ) from err
    if len(names) < 2:
        raise ElspethConfigError(f"{param} needs at least 2 branches, got {len(names)}: {list(names)!r}")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ElspethConfigError(f"{param} has duplicate branch names: {duplicates!r}")
    return names


def _enum_value(enum: type[Policy] | type[MergeStrategy], value: object, param: str) -> str:
    allowed = [m.value for m in enum]
    raw = value.value if isinstance(value, Enum) else value
    if raw not in allowed:
        raise ElspethConfigError(f"{param} must be one of {allowed}, got {value!r}")
    return str(raw)


@dataclass(frozen=True)
class CoalesceConfig:
    """A validated coalesce configuration. Build it with :func:`coalesce_config`."""

    branches: tuple[str, ...]
    policy: Policy
    merge: MergeStrategy
    timeout: timedelta
    quorum: int | None = None
    select_branch: str | None = None
    on_collision: str = ON_COLLISION_RECORD

    @property
    def preferred_branch(self) -> str | None:
        """The branch whose value wins a union collision (``on_collision="prefer:<branch>"``)."""
        if self.on_collision.startswith(ON_COLLISION_PREFER):
            return self.on_collision[len(ON_COLLISION_PREFER) :]
        return None

    @property
    def fails_on_collision(self) -> bool:
        return self.on_collision == ON_COLLISION_FAIL_ROW

    def branch_index(self, branch: str) -> int:
        return self.branches.index(branch)

    def as_dict(self) -> dict[str, object]:
        return {
            "branches": list(self.branches),
            "policy": self.policy.value,
            "merge": self.merge.value,
            "timeout_seconds": self.timeout.total_seconds(),
            "quorum": self.quorum,
            "select_branch": self.select_branch,
            "on_collision": self.on_collision,
        }


def coalesce_config(
    *,
    branches: Sequence[str],
    policy: Policy | str,
    merge: MergeStrategy | str = MergeStrategy.UNION,
    timeout: timedelta | float | int,
    quorum: int | None = None,
    select_branch: str | None = None,
    on_collision: str = ON_COLLISION_RECORD,
    fork_branches: Sequence[str] | None = None,
) -> CoalesceConfig:
    """Validate a coalesce's parameters and return the frozen configuration.

    :param branches: the branches this coalesce joins (its fork's, unless a subset is given).
    :param on_collision: ``record``, ``fail_row`` or ``prefer:<branch>`` (one of ``branches``); other
        than ``record`` only with ``merge="union"``, the one merge with collisions.
    :param fork_branches: the fork's branches; every coalesced branch must be one of them.
    :raises ElspethConfigError: naming the parameter and the bad value.
    """
    names = validate_branches(branches)
    if fork_branches is not None:
        fork_branches = validate_branches(fork_branches, param="fork branches")
        unknown = [b for b in names if b not in fork_branches]
        if unknown:
            raise ElspethConfigError(
                f"branches {unknown!r} are not branches of the fork (fork has {list(fork_branches)!r})"
            )
    policy_value = Policy(_enum_value(Policy, policy, "policy"))
    merge_value = MergeStrategy(_enum_value(MergeStrategy, merge, "merge"))

    if isinstance(timeout, bool) or not isinstance(timeout, (timedelta, int, float)):
        raise ElspethConfigError(f"timeout must be a timedelta or seconds, got {timeout!r}")
    if not isinstance(timeout, timedelta) and not math.isfinite(timeout):
        raise ElspethConfigError(f"timeout must be finite, got {timeout!r}")
    try:
        timeout_td = timeout if isinstance(timeout, timedelta) else timedelta(seconds=timeout)
    except OverflowError as err:
        raise ElspethConfigError(f"timeout is too large, got {timeout!r}") from err
    if timeout_td <= timedelta(0):
        raise ElspethConfigError(f"timeout must be positive, got {timeout!r}")

    if policy_value is Policy.QUORUM:
        if quorum is None:
            raise ElspethConfigError("quorum is required when policy='quorum'")
        if isinstance(quorum, bool) or not isinstance(quorum, int) or not 1 <= quorum <= len(names):
            raise ElspethConfigError(f"quorum must be an integer in 1..{len(names)}, got {quorum!r}")
    elif quorum is not None:
        raise ElspethConfigError(f"quorum is only valid with policy='quorum', got quorum={quorum!r}")

    if merge_value is MergeStrategy.SELECT:
        if select_branch is None:
            raise ElspethConfigError("select_branch is required when merge='select'")
        if select_branch not in names:
            raise ElspethConfigError(
                f"select_branch must be one of the branches {list(names)!r}, got {select_branch!r}"
            )
    elif select_branch is not None:
        raise ElspethConfigError(
            f"select_branch is only valid with merge='select', got select_branch={select_branch!r}"
        )

    _check_on_collision(on_collision, merge_value, names)
    return CoalesceConfig(
        branches=names,
        policy=policy_value,
        merge=merge_value,
        timeout=timeout_td,
        quorum=quorum,
        select_branch=select_branch,
        on_collision=on_collision,
    )


def _check_on_collision(on_collision: object, merge: MergeStrategy, names: tuple[str, ...]) -> None:
    allowed = f"{ON_COLLISION_RECORD!r}, {ON_COLLISION_FAIL_ROW!r} or '{ON_COLLISION_PREFER}<branch>'"
    if not isinstance(on_collision, str):
        raise ElspethConfigError(f"on_collision must be {allowed}, got {on_collision!r}")
    if on_collision.startswith(ON_COLLISION_PREFER):
        preferred = on_collision[len(ON_COLLISION_PREFER) :]
        if preferred not in names:
            raise ElspethConfigError(
                f"on_collision={on_collision!r} must prefer one of the branches {list(names)!r}, "
                f"got {preferred!r}"
            )
    elif on_collision not in (ON_COLLISION_RECORD, ON_COLLISION_FAIL_ROW):
        raise ElspethConfigError(f"on_collision must be {allowed}, got {on_collision!r}")
    if on_collision != ON_COLLISION_RECORD and merge is not MergeStrategy.UNION:
        raise ElspethConfigError(
            f"on_collision={on_collision!r} is only valid with merge='union' (only a union has "
            f"collisions), got merge={merge.value!r}"
        )
