"""Branch output contracts: the fields a branch step promises in every output, and their types.

A DAG author declares a contract as a mapping ``field -> type`` on the step
(``BranchOperator(output_fields={"score": float, "label": str | None})``): plain Python types,
because DAG files are Python, the check needs no new dependency, and the outputs are JSON anyway.
A type is one of ``str``, ``int``, ``float``, ``bool``, ``dict``, ``list`` or ``None``, a tuple of
them, or a union (``int | None``, ``Optional[int]``). The checks follow JSON, which is what the audit
store keeps:

* ``bool`` is not an ``int`` (in Python it is a subclass; in JSON it is not a number);
* ``float`` admits ``int`` (canonical JSON writes ``1.0`` as ``1``, so a stored float may read back
  as an int);
* ``None`` passes only where declared; a declared field must be present; undeclared fields pass.

For ``merge="union"`` the branches' contracts are merged: a field declared by several branches must
have the same type in each, since the merged row keeps one branch's value (the later-configured
branch, or the preferred one) and its type is only known when every supplier agrees. Nothing here
knows about Airflow or SQL.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_elspeth.exceptions import ElspethConfigError

# The JSON kinds a field may be declared with, by the Python type that declares them.
KIND_OF_TYPE: Mapping[object, str] = {
    str: "str",
    int: "int",
    float: "float",
    bool: "bool",
    dict: "dict",
    list: "list",
    type(None): "None",
}
KINDS = tuple(KIND_OF_TYPE.values())
FieldKinds = frozenset[str]


def value_kind(value: object) -> str:
    """The JSON kind of an output value (``bool`` before ``int``: it is a subclass of it)."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _kinds_of(declared: object, where: str) -> set[str]:
    if declared is None:
        return {"None"}
    if isinstance(declared, tuple):
        kinds: set[str] = set()
        for member in declared:
            kinds |= _kinds_of(member, where)
        return kinds
    if isinstance(declared, types.UnionType) or typing.get_origin(declared) is typing.Union:
        return _kinds_of(typing.get_args(declared), where)
    kind = KIND_OF_TYPE.get(declared) if isinstance(declared, type) else None
    if kind is None:
        raise ElspethConfigError(
            f"{where}: type {declared!r} is not one of str, int, float, bool, dict, list or None "
            "(or a tuple or union of them)"
        )
    return {kind}


def normalised_kinds(declared: object, where: str = "output_fields") -> FieldKinds:
    """The kinds a declared type accepts (``float`` brings ``int``).

    :raises ElspethConfigError: a type that is not a JSON kind, or an empty tuple.
    """
    kinds = _kinds_of(declared, where)
    if not kinds:
        raise ElspethConfigError(f"{where}: an empty tuple of types accepts no value")
    if "float" in kinds:
        kinds.add("int")
    return frozenset(kinds)


@dataclass(frozen=True)
class Violation:
    """The first field of an output that breaks its contract: its value (None when ``missing``)
    and the kinds the contract accepts there."""

    field: str
    value: Any
    expected: tuple[str, ...]
    missing: bool = False

    @property
    def message(self) -> str:
        if self.missing:
            return f"output has no field {self.field!r} (contract: {' | '.join(self.expected)})"
        return (
            f"field {self.field!r} is {value_kind(self.value)}, the contract says {' | '.join(self.expected)}"
        )


@dataclass(frozen=True)
class Contract:
    """A validated output contract: field -> the kinds it accepts, in declared order."""

    fields: Mapping[str, FieldKinds] = field(default_factory=dict)

    def violation(self, output: Mapping[str, Any]) -> Violation | None:
        """The first declared field (in declared order) that ``output`` lacks or has of another
        kind; None when the output keeps the contract."""
        for name, kinds in self.fields.items():
            if name not in output:
                return Violation(name, None, tuple(sorted(kinds)), missing=True)
            value = output[name]
            if value_kind(value) not in kinds:
                return Violation(name, value, tuple(sorted(kinds)))
        return None

    def as_dict(self) -> dict[str, list[str]]:
        """JSON form: field -> sorted kind names."""
        return {name: sorted(kinds) for name, kinds in self.fields.items()}


def contract_of(declared: Mapping[str, object], *, param: str = "output_fields") -> Contract:
    """Validate a declared ``field -> type`` mapping.

    :param declared: the author's mapping (see the module docstring for the types allowed).
    :param param: the parameter name errors name.
    :raises ElspethConfigError: not a mapping, a field name that is not a non-empty string, or a
        type that is not a JSON kind.
    """
    if not isinstance(declared, Mapping):
        raise ElspethConfigError(f"{param} must be a mapping of field name -> type, got {declared!r}")
    fields: dict[str, FieldKinds] = {}
    for name, kinds in declared.items():
        if not isinstance(name, str) or not name:
            raise ElspethConfigError(f"{param}: field names must be non-empty strings, got {name!r}")
        fields[name] = normalised_kinds(kinds, f"{param}[{name!r}]")
    return Contract(fields)


@dataclass(frozen=True)
class Conflict:
    """A field several branches declare with different types: branch -> its kinds, in branch order."""

    field: str
    declared: Mapping[str, FieldKinds]

    @property
    def message(self) -> str:
        said = ", ".join(f"{' | '.join(sorted(k))} in branch {b!r}" for b, k in self.declared.items())
        return f"field {self.field!r} is declared {said}"


@dataclass(frozen=True)
class MergedContract:
    """The contract of a union's merged row: the typed branches' fields; the branches without a
    contract (their outputs may carry any field); the conflicts, if any."""

    contract: Contract
    untyped: tuple[str, ...] = ()
    conflicts: tuple[Conflict, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"fields": self.contract.as_dict(), "untyped_branches": list(self.untyped)}


def merge_contracts(contracts: Mapping[str, Contract | None], order: Iterable[str]) -> MergedContract:
    """Merge the contracts of the branches of a union, in the coalesce's branch ``order``.

    A field declared by several branches with different kinds is a conflict (whatever the branch
    order); a field declared alike by all that declare it is in the merged contract once.

    :param contracts: branch -> its delivering step's contract, None for an untyped branch.
    :param order: the coalesce's branches (those missing from ``contracts`` count as untyped).
    """
    branches = list(order)
    declared: dict[str, dict[str, FieldKinds]] = {}
    for branch in branches:
        contract = contracts.get(branch)
        for name, kinds in (contract.fields if contract is not None else {}).items():
            declared.setdefault(name, {})[branch] = kinds
    merged = {name: next(iter(by.values())) for name, by in declared.items() if len(set(by.values())) == 1}
    conflicts = tuple(Conflict(name, by) for name, by in declared.items() if len(set(by.values())) > 1)
    return MergedContract(
        contract=Contract(merged),
        untyped=tuple(b for b in branches if contracts.get(b) is None),
        conflicts=conflicts,
    )
