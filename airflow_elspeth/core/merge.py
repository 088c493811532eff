"""Merge the consumed branch outputs of one row: union, nested or select."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_elspeth.core.config import CoalesceConfig, MergeStrategy


@dataclass(frozen=True)
class MergeResult:
    """The merged row and, for ``union``, every field more than one branch supplied."""

    row: dict[str, Any]
    collisions: dict[str, list[str]] = field(default_factory=dict)


def merge_outputs(
    config: CoalesceConfig, consumed: Sequence[str], outputs: Mapping[str, Mapping[str, Any]]
) -> MergeResult:
    """Merge the outputs of the ``consumed`` branches.

    Branches are applied in configured order (not arrival order), so for ``union`` the
    later-configured branch wins a field, unless ``on_collision="prefer:<branch>"`` names the branch
    that wins (applied last); a collision lists every branch that supplied the field, the winner last.

    :raises ValueError: a consumed branch without an output, or ``select`` whose branch was not
        consumed (the policy replay fails such rows; merging must never substitute another branch).
    """
    missing_outputs = [b for b in consumed if b not in outputs]
    if missing_outputs:
        raise ValueError(f"no output for consumed branches {missing_outputs!r}")
    preferred = config.preferred_branch
    ordered = [b for b in config.branches if b in consumed and b != preferred]
    if preferred is not None and preferred in consumed:
        ordered.append(preferred)
    if config.merge is MergeStrategy.SELECT:
        selected = config.select_branch
        if selected is None or selected not in consumed:
            raise ValueError(f"select_branch {selected!r} was not consumed: {list(consumed)!r}")
        return MergeResult(row=dict(outputs[selected]))
    if config.merge is MergeStrategy.NESTED:
        return MergeResult(row={b: dict(outputs[b]) for b in ordered})
    merged: dict[str, Any] = {}
    suppliers: dict[str, list[str]] = {}
    for branch in ordered:
        for key, value in outputs[branch].items():
            merged[key] = value
            suppliers.setdefault(key, []).append(branch)
    collisions = {key: names for key, names in suppliers.items() if len(names) > 1}
    return MergeResult(row=merged, collisions=collisions)
