"""The error fingerprint (core/errors.py): the same error on different rows is one fingerprint, a
different error type or message shape is another, and the value itself never changes."""

from __future__ import annotations

import hashlib
import uuid

from hypothesis import given
from hypothesis import strategies as st

from airflow_elspeth.core.errors import error_fingerprint, message_shape, recorded_error_fingerprint

WORDS = st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz "), min_size=1, max_size=30)


def test_message_shapes() -> None:
    assert message_shape("429 Too Many Requests for doc-010") == "<n> Too Many Requests for doc-<n>"
    assert message_shape("timeout after 3.25 s") == "timeout after <n> s"
    assert message_shape("no such key 'abc'  in  \"table\"") == "no such key '<str>' in \"<str>\""
    assert message_shape(f"token {uuid.UUID(int=7)} gone") == "token <uuid> gone"
    assert message_shape("object 9f3ac0de12 missing") == "object <hex> missing"
    # A plain word of hexadecimal letters is not an id.
    assert message_shape("deadbeefcafe failed") == "deadbeefcafe failed"


@given(WORDS, st.integers(), st.integers(), st.text(alphabet="xyz-", max_size=8))
def test_row_specific_numbers_do_not_change_the_fingerprint(prefix: str, a: int, b: int, key: str) -> None:
    first = error_fingerprint("RateLimitError", f"{prefix} {a} for doc-{abs(a)} '{key}'")
    second = error_fingerprint("RateLimitError", f"{prefix} {b} for doc-{abs(b)} '{key}x'")
    assert first == second


@given(WORDS, WORDS)
def test_the_type_and_the_words_tell_errors_apart(message: str, other: str) -> None:
    assert error_fingerprint("ValueError", message) != error_fingerprint("KeyError", message)
    if message_shape(message) != message_shape(other):
        assert error_fingerprint("ValueError", message) != error_fingerprint("ValueError", other)


def test_the_fingerprint_is_stable_across_versions() -> None:
    # Stored fingerprints of earlier runs group with new ones only while this value holds.
    assert (
        error_fingerprint("RateLimitError", "429 Too Many Requests for doc-010")
        == error_fingerprint("RateLimitError", "429 Too Many Requests for doc-015")
        == hashlib.sha256(b'[1,"RateLimitError","<n> Too Many Requests for doc-<n>"]').hexdigest()
        == "f09c4100019cb255dca065330461dfb8da92296b2fc2a162f642ae680c0041dd"
    )


def test_a_recorded_error_without_a_type_is_an_exception() -> None:
    assert recorded_error_fingerprint(None) is None
    assert recorded_error_fingerprint({"message": "boom"}) == error_fingerprint("Exception", "boom")
    assert recorded_error_fingerprint({"type": "KeyError"}) == error_fingerprint("KeyError", "")
