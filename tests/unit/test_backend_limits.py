"""What the audit backends cannot store is refused up front, identically on SQLite and PostgreSQL.

Row keys (``row_key_text``): none missing, no NUL, valid Unicode, at most 1000 UTF-8 bytes (the
(run_id, row_key) btree index of PostgreSQL refuses entries above about 2.7 KB). Branch names
(``validate_branches``): at most 250 characters (the NAME columns), no NUL. Rows nested deeper than
canonical JSON can serialise: a PayloadError naming the row, never a RecursionError.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from airflow_elspeth.core.canonical import MAX_ROW_KEY_BYTES, canonical_json, hash_value, row_key_text
from airflow_elspeth.core.config import coalesce_config, validate_branches
from airflow_elspeth.exceptions import ElspethConfigError, PayloadError, PayloadLimitExceeded


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def shared_references(levels: int) -> Any:
    """``[x, x]`` ``levels`` times over: a few objects that expand to 2**levels leaves."""
    value: Any = [1]
    for _ in range(levels):
        value = [value, value]
    return value


# ---- row keys


def test_a_none_key_is_a_missing_key() -> None:
    with pytest.raises(PayloadError, match=r"row key is missing \(None\)"):
        row_key_text(None)


def test_none_inside_a_composite_key_is_a_value() -> None:
    assert row_key_text([None, 1]) == "[null,1]"


@pytest.mark.parametrize("key", ["a\x00b", "\x00", "r\x004"])
def test_a_key_with_nul_is_refused_naming_the_key(key: str) -> None:
    with pytest.raises(PayloadError) as err:
        row_key_text(key)
    message = str(err.value)
    assert "NUL character" in message and repr(key) in message, message


def test_a_composite_key_with_nul_text_is_stored_escaped() -> None:
    assert row_key_text(["a\x00b"]) == '["a\\u0000b"]'


def test_the_longest_key_is_1000_utf8_bytes() -> None:
    assert MAX_ROW_KEY_BYTES == 1000
    assert row_key_text("k" * 1000) == "k" * 1000
    assert row_key_text("é" * 500) == "é" * 500  # 1000 bytes, 500 characters


@pytest.mark.parametrize(
    ("key", "size"),
    [
        pytest.param("k" * 1001, 1001, id="ascii-1001"),
        pytest.param("é" * 501, 1002, id="two-byte-chars"),
        pytest.param("k" * 3000, 3000, id="3000-chars"),
    ],
)
def test_a_key_over_1000_utf8_bytes_is_refused_naming_its_size(key: Any, size: int) -> None:
    with pytest.raises(PayloadError) as err:
        row_key_text(key)
    message = str(err.value)
    assert f"is {size} UTF-8 bytes" in message and "more than the 1000 allowed" in message, message
    assert len(message) < 200, "the key is shown cut short"


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(["k" * 999], id="1003-bytes-of-canonical-text"),
        pytest.param(shared_references(50), id="2**50-shared-references"),
    ],
)
def test_a_composite_key_over_1000_bytes_is_refused_without_serialising_it(key: Any) -> None:
    with pytest.raises(PayloadLimitExceeded) as err:
        row_key_text(key)
    message = str(err.value)
    assert "is larger than 1000 bytes as canonical JSON (the longest row key)" in message, message
    assert message.startswith("row key [") and len(message) < 200, "the key is shown cut short"


def test_a_key_that_is_not_valid_unicode_is_refused() -> None:
    with pytest.raises(PayloadError, match="not valid Unicode"):
        row_key_text("r\ud800")


def test_a_key_nested_too_deeply_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="nested too deeply") as err:
        row_key_text(nested(sys.getrecursionlimit() * 2))
    assert len(str(err.value)) < 200


# ---- deep nesting and other rows canonical JSON cannot hold


def test_a_row_nested_deeper_than_json_can_serialise_is_a_payload_error_naming_the_row() -> None:
    row = {"id": "r7", "tree": nested(sys.getrecursionlimit() * 2)}
    with pytest.raises(PayloadError) as err:
        hash_value(row, what="row 'r7'")
    assert not isinstance(err.value, RecursionError)
    assert isinstance(err.value.__cause__, RecursionError)
    assert "row 'r7'" in str(err.value) and "nested too deeply" in str(err.value)


def test_a_row_that_contains_itself_is_a_payload_error() -> None:
    row: dict[str, Any] = {"id": "r8"}
    row["self"] = row
    with pytest.raises(PayloadError, match=r"row 'r8'.*contains itself"):
        canonical_json(row, what="row 'r8'")


def test_an_integer_of_more_digits_than_python_prints_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match=r"row 'r9' is not canonical JSON: .*4300 digits"):
        hash_value({"id": "r9", "n": 10**5000}, what="row 'r9'")


def test_moderate_nesting_is_fine() -> None:
    assert canonical_json(nested(100)) == b"[" * 100 + b"1" + b"]" * 100


def test_a_lone_surrogate_in_an_object_key_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match=r"row 'r9'.*not valid Unicode"):
        canonical_json({"\ud800": 1}, what="row 'r9'")


# ---- branch names


def test_the_longest_branch_name_is_250_characters() -> None:
    names = ("a" * 250, "é" * 250)
    assert validate_branches(names) == names


@pytest.mark.parametrize("param", ["branches", "fork branches"])
def test_a_branch_name_over_250_characters_is_refused_naming_the_parameter_and_the_name(param: str) -> None:
    long_name = "gpt-" + "x" * 247
    with pytest.raises(ElspethConfigError) as err:
        validate_branches(["gpt", long_name], param=param)
    message = str(err.value)
    assert message.startswith(f"{param}: branch name 'gpt-xxx"), message
    assert "is 251 characters, more than the 250 allowed" in message
    assert long_name not in message and len(message) < 200, "the name is shown cut short"


def test_a_branch_name_with_nul_is_refused() -> None:
    with pytest.raises(ElspethConfigError) as err:
        validate_branches(["gpt", "clau\x00de"])
    assert str(err.value) == "branches: branch name 'clau\\x00de' contains a NUL character"


def test_a_branch_name_that_is_not_valid_unicode_is_refused() -> None:
    with pytest.raises(ElspethConfigError, match="branches: branch name 'gpt\\\\ud800' is not valid Unicode"):
        validate_branches(["gpt\ud800", "claude"])


def test_the_coalesce_checks_its_branches_the_same_way() -> None:
    with pytest.raises(ElspethConfigError, match=r"branches: branch name .* more than the 250 allowed"):
        coalesce_config(branches=["a", "b" * 251], policy="require_all", timeout=60)
