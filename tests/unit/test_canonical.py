"""Canonical JSON (RFC 8785), payload hashes and deterministic identifiers.

See docs/ARCHITECTURE.md, "The audit schema".
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_elspeth.core.canonical import (
    MAX_PAYLOAD_DEPTH,
    PayloadLimit,
    _stdlib_is_canonical,
    canonical_json,
    content_hash,
    derive_id,
    hash_value,
    payload_size,
    row_key_text,
)
from airflow_elspeth.exceptions import ElspethConfigError, PayloadError, PayloadLimitExceeded


class Colour(str, enum.Enum):
    """A str enum: canonical JSON writes its value."""

    RED = "red"
    BLUE = "blu\u00e9"
    BROKEN = "\ud800"


class Level(int):
    """An int subclass: canonical JSON writes its number."""


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53) + 1, 2**53 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(), inner, max_size=4)),
    max_leaves=20,
)


def reorder(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's keys inserted in a different order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: reorder(v, rng) for k, v in items}
    if isinstance(value, list):
        return [reorder(v, rng) for v in value]
    return value


# ---- canonical JSON


@settings(max_examples=200, deadline=None)
@given(JSON, st.randoms(use_true_random=False))
def test_canonical_json_does_not_depend_on_key_order(value: Any, rng: random.Random) -> None:
    body = canonical_json(value)
    assert canonical_json(reorder(value, rng)) == body
    assert hash_value(reorder(value, rng)) == hash_value(value)
    # It is JSON for the same value (numbers are doubles: 3.756491778787673e16 is written 37564917787876730).
    assert json.loads(body, parse_int=float) == value


def test_canonical_json_known_bytes() -> None:
    value = {"b": 1, "a": [True, None, "x", 1.0, 1e21, -0.0], "é": "ü"}
    assert canonical_json(value) == '{"a":[true,null,"x",1,1e+21,0],"b":1,"é":"ü"}'.encode()


def test_canonical_json_sorts_keys_by_utf16_code_units() -> None:
    # U+FF61 sorts before U+1F600 by code point, but after it by UTF-16 code unit (0xD83D < 0xFF61).
    value = {"\uff61": 1, "\U0001f600": 2}
    assert canonical_json(value) == '{"\U0001f600":2,"\uff61":1}'.encode()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(math.nan, id="nan"),
        pytest.param(math.inf, id="infinity"),
        pytest.param(-math.inf, id="minus-infinity"),
        pytest.param({"score": [1, {"deep": math.nan}]}, id="nested-nan"),
        pytest.param(2**60, id="unsafe-integer"),
        pytest.param({1: "a"}, id="non-string-key"),
        pytest.param({"s": {1, 2}}, id="set"),
        pytest.param(b"bytes", id="bytes"),
    ],
)
def test_non_canonical_values_are_rejected_naming_what(bad: Any) -> None:
    with pytest.raises(PayloadError) as err:
        canonical_json(bad, what="output of branch 'gpt' for row 'a-17'")
    assert "output of branch 'gpt' for row 'a-17'" in str(err.value)
    with pytest.raises(PayloadError, match=re.escape("row 'a-17'")):
        hash_value(bad, what="row 'a-17'")


def test_payload_error_is_a_value_error() -> None:
    assert issubclass(PayloadError, ValueError)


def test_content_hash_is_sha256_of_the_canonical_bytes() -> None:
    digest, text = hash_value({"b": [1, 2], "a": "x"})
    assert text == '{"a":"x","b":[1,2]}'
    assert digest == content_hash(text.encode()) == hashlib.sha256(b'{"a":"x","b":[1,2]}').hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


def test_different_values_hash_differently() -> None:
    assert hash_value({"a": 1})[0] != hash_value({"a": "1"})[0]
    assert hash_value([1, 2])[0] != hash_value([2, 1])[0]


# ---- derive_id

PART = st.one_of(st.text(max_size=3), st.integers(0, 200))


def test_derive_id_is_deterministic_32_hex() -> None:
    first = derive_id("run-1", "row-17", "gpt")
    assert first == derive_id("run-1", "row-17", "gpt")
    assert re.fullmatch(r"[0-9a-f]{32}", first)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        pytest.param(("a", "bc"), ("ab", "c"), id="split-point"),
        pytest.param(("a", "b"), ("a\x1fb",), id="separator-inside-a-part"),
        pytest.param(("a", "b"), (["a", "b"],), id="parts-vs-list"),
        pytest.param((1,), ("1",), id="int-vs-text"),
        pytest.param((1, 2), (12,), id="int-parts"),
        pytest.param((17, "gpt"), (1, "7", "gpt"), id="row-index-parts"),
        pytest.param(("",), ("", ""), id="empty-parts"),
        pytest.param(("GPT",), ("gpt",), id="case"),
        pytest.param(("run", "row", "gpt"), ("run", "gpt", "row"), id="order"),
    ],
)
def test_derive_id_is_separator_safe(left: tuple[Any, ...], right: tuple[Any, ...]) -> None:
    assert derive_id(*left) != derive_id(*right)


@settings(max_examples=300, deadline=None)
@given(st.lists(PART, max_size=4), st.lists(PART, max_size=4))
def test_derive_id_distinct_parts_give_distinct_ids(left: list[str | int], right: list[str | int]) -> None:
    assert (derive_id(*left) == derive_id(*right)) == (left == right)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(), st.booleans()))
def test_derive_id_of_a_number_is_the_id_earlier_versions_derived(part: int) -> None:
    """Integers skip the JSON encoder; the id is still the JSON text's, so an attempt's node state
    id written by an earlier version is the one a retry derives now."""
    text = json.dumps(part).encode()
    expected = hashlib.sha256(b"j%d:%s" % (len(text), text)).hexdigest()[:32]
    assert derive_id(part) == expected


def test_derive_id_dict_parts_ignore_key_order() -> None:
    assert derive_id({"a": 1, "b": 2}) == derive_id({"b": 2, "a": 1})


# ---- row_key_text


@pytest.mark.parametrize(
    ("key", "text"),
    [
        pytest.param("a-17", "a-17", id="text-verbatim"),
        pytest.param("GPT", "GPT", id="text-case-kept"),
        pytest.param(" 17 ", " 17 ", id="text-whitespace-kept"),
        pytest.param("é", "é", id="text-unicode-not-escaped"),
        pytest.param('"quoted"', '"quoted"', id="text-not-json-encoded"),
        pytest.param(17, "17", id="int"),
        pytest.param(1.5, "1.5", id="float"),
        pytest.param(True, "true", id="bool"),
        pytest.param([2, "a"], '[2,"a"]', id="composite-list"),
        pytest.param({"z": 1, "a": [1, 2]}, '{"a":[1,2],"z":1}', id="composite-dict-canonical"),
    ],
)
def test_row_key_text(key: Any, text: str) -> None:
    assert row_key_text(key) == text


def test_row_key_text_rejects_non_canonical_keys_naming_the_key() -> None:
    with pytest.raises(PayloadError, match="row key"):
        row_key_text(math.nan)


# ---- the standard-library fast path is byte-identical to rfc8785

# Weighted towards what the fast path takes (ASCII keys, in-range floats and integers) and what it
# must hand over (non-ASCII and astral keys, integral or tiny or huge floats, out-of-range integers,
# control characters, lone surrogates, str subclasses).
FAST_KEYS = st.one_of(st.text(alphabet=st.characters(max_codepoint=127), max_size=6), st.text(max_size=4))
FAST_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53) + 1, 2**53 - 1),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=1e-5, max_value=1e17),
    st.sampled_from([1e-4, 1e16, 9999999999999998.0, 0.1, -0.0, 1e21, 1e-7, 4503599627370497.5]),
    st.text(),
    st.text(alphabet=st.characters(max_codepoint=0x7F)),
    st.sampled_from(["\ud800", "\x7f", "\u2028", "\U0001f600", "\ue000"]),
)
FAST_JSON = st.recursive(
    FAST_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(FAST_KEYS, inner, max_size=4)),
    max_leaves=20,
)


def reference(value: Any) -> bytes | None:
    """rfc8785's bytes, or None where it refuses the value."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, UnicodeError):
        return None


@settings(max_examples=1500, deadline=None)
@given(FAST_JSON)
def test_canonical_json_is_byte_identical_to_rfc8785(value: Any) -> None:
    expected = reference(value)
    if expected is None:
        with pytest.raises(PayloadError):
            canonical_json(value)
    else:
        assert canonical_json(value) == expected


def test_the_fast_path_takes_plain_rows_and_hands_over_the_rest() -> None:
    assert (
        _stdlib_is_canonical({"id": "row-1", "n": 3, "x": 0.25, "tags": ["a", None, True], "é": "ü"}) is False
    )
    assert _stdlib_is_canonical({"id": "row-1", "n": 3, "x": 0.25, "tags": ["a", None, True, "ü"]})
    for value in (2.0, 1e-5, 1e16, 2**53, {1: "a"}, {"é": "ü"}, ("a",), {"k": {"k": 1e300}}):
        assert not _stdlib_is_canonical(value), value
    assert canonical_json({"b": 2.0, "a": 1e-7}) == b'{"a":1e-7,"b":2}'


# ---- payload_size: the canonical length, found by a walk that stops at the limit

BIG = PayloadLimit(10**9, "a test limit")
ODD_SCALARS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 2**53, -(2**53), 10**400, {1, 2}, b"bytes", object()]),
    st.sampled_from(list(Colour)),
    st.builds(Level, st.integers(-(2**60), 2**60)),
)
WITH_ODD = st.recursive(
    st.one_of(FAST_SCALARS, ODD_SCALARS),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(FAST_KEYS, st.integers(0, 3)), inner, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=1500, deadline=None)
@given(WITH_ODD)
def test_payload_size_is_the_length_of_the_canonical_bytes(value: Any) -> None:
    """Equal, not a bound, for every value canonical_json accepts (str and int enums, tuples,
    every float form included); a value it refuses still gets a size, and canonical_json the error."""
    size = payload_size(value, BIG)
    try:
        body = canonical_json(value)
    except PayloadError:
        return
    assert size == len(body)
    assert canonical_json(value, limit=PayloadLimit(size, "exact")) == body
    if size > 1:
        with pytest.raises(PayloadLimitExceeded, match=rf"larger than {size - 1} bytes as canonical JSON"):
            canonical_json(value, limit=PayloadLimit(size - 1, "one byte short"))


class Counted(list):  # type: ignore[type-arg]
    """A JSON array (rfc8785 and the walk take list subclasses) that counts the items read from it."""

    reads = 0

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            Counted.reads += 1
            yield item


@st.composite
def shared_graphs(draw: st.DrawFn) -> Any:
    """Arrays built from earlier arrays by reference (a DAG: one object reached by many paths,
    2**depth leaves from a few dozen objects), sometimes with an array containing itself."""
    nodes: list[Any] = [Counted(draw(st.lists(FAST_SCALARS, max_size=3)))]
    for _ in range(draw(st.integers(1, 60))):
        picks = draw(st.lists(st.integers(0, len(nodes) - 1), min_size=1, max_size=4))
        nodes.append(Counted(nodes[i] for i in picks))
    if draw(st.booleans()):
        nodes[draw(st.integers(0, len(nodes) - 1))].append(nodes[-1])  # a cycle, or a shared tail
    return nodes[-1]


@settings(max_examples=300, deadline=None)
@given(shared_graphs(), st.integers(1, 5000))
def test_payload_size_reads_at_most_the_limit_plus_one_values_whatever_the_shape(
    value: Any, max_bytes: int
) -> None:
    """Each value read adds at least a byte, so the walk stops within max_bytes + 1 reads: a
    shared-reference structure is paid for as it expands, up to the limit and no further."""
    Counted.reads = 0
    try:
        size = payload_size(value, PayloadLimit(max_bytes, "the test limit"))
    except PayloadLimitExceeded:
        pass
    else:
        assert size <= max_bytes
    assert Counted.reads <= max_bytes + 1


def test_a_shared_reference_bomb_stops_at_the_limit() -> None:
    """The tester's row: 2**50 leaves from 51 lists. Read up to the limit, never serialised."""
    bomb: Any = Counted([1])
    for _ in range(50):
        bomb = Counted([bomb, bomb])
    limit = PayloadLimit(1024 * 1024, "[elspeth] max_row_bytes")
    Counted.reads = 0
    with pytest.raises(PayloadLimitExceeded) as err:
        canonical_json({"id": "r4", "tree": bomb}, what="row 'r4'", limit=limit)
    assert str(err.value) == (
        "row 'r4' is larger than 1048576 bytes as canonical JSON ([elspeth] max_row_bytes)"
    )
    assert Counted.reads <= limit.max_bytes + 1


def test_nesting_is_bounded_at_max_payload_depth_levels() -> None:
    limit = PayloadLimit(10**6, "a test limit")
    deepest: Any = 1
    for _ in range(MAX_PAYLOAD_DEPTH - 1):
        deepest = [deepest]
    assert payload_size({"tree": deepest}, limit) == len(canonical_json({"tree": deepest}))
    with pytest.raises(
        PayloadLimitExceeded, match=rf"row 'r1' is nested too deeply: more than {MAX_PAYLOAD_DEPTH}"
    ):
        canonical_json({"tree": [deepest]}, what="row 'r1'", limit=limit)


def test_a_payload_containing_itself_is_stopped_by_the_depth_guard() -> None:
    row: dict[str, Any] = {"id": "r2"}
    row["self"] = row
    with pytest.raises(PayloadLimitExceeded, match=r"row 'r2' is nested too deeply.*contains itself"):
        hash_value(row, what="row 'r2'", limit=PayloadLimit(10**6, "a test limit"))


def test_a_huge_container_or_text_is_refused_before_it_is_read() -> None:
    limit = PayloadLimit(100, "a test limit")
    wide = Counted(range(10**6))
    Counted.reads = 0
    with pytest.raises(PayloadLimitExceeded):
        payload_size(wide, limit)
    assert Counted.reads == 0, "a million commas are over 100 bytes: no item is read"
    with pytest.raises(PayloadLimitExceeded):
        payload_size({"x" * 10**7: 1}, limit)


@pytest.mark.parametrize("max_bytes", [0, -1, 1.5, True, "10"])
def test_a_limit_is_a_positive_number_of_bytes(max_bytes: Any) -> None:
    with pytest.raises(
        ElspethConfigError, match=r"\[elspeth\] max_row_bytes must be a positive number of bytes"
    ):
        PayloadLimit(max_bytes, "[elspeth] max_row_bytes")
