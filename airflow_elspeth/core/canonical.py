"""Canonical JSON (RFC 8785) and the hashes and identifiers derived from it."""

from __future__ import annotations

import hashlib
import json
import reprlib
from typing import Any

import rfc8785

from airflow_elspeth.exceptions import PayloadError

# The longest row key, in UTF-8 bytes. The audit store indexes (run_id, row_key); PostgreSQL
# refuses a btree index entry above about 2.7 KB, SQLite has no such limit. One limit, well below
# PostgreSQL's, keeps what a fork accepts the same on both backends.
MAX_ROW_KEY_BYTES = 1000

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlevel = 3


def short_repr(value: Any) -> str:
    """A bounded ``repr`` for error messages: long strings cut, deep or huge containers elided."""
    return _short.repr(value)


# RFC 8785's integers are IEEE 754 doubles: beyond these, rfc8785 raises IntegerDomainError.
_INT_MAX = 2**53 - 1
# Non-integral floats in this range are written alike by Python's repr (shortest round-trip
# digits, positional notation from 1e-4 up to 1e16) and ECMAScript's Number::toString (the same
# digits, positional from 1e-6 up to 1e21); integral floats (ECMAScript writes 2.0 as 2) and the
# rest of the range go to rfc8785.
_FLOAT_MIN, _FLOAT_MAX = 1e-4, 1e16
_compact = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False, check_circular=False
).encode


def _stdlib_is_canonical(value: Any, depth: int = 0) -> bool:
    """Whether the C-accelerated ``json`` encoder writes ``value`` byte for byte as RFC 8785 does.

    It does for exact ``dict``/``list``/``str``/``int``/``bool``/``None`` values whose object keys
    are ASCII (sorting by code point then equals RFC 8785's sort by UTF-16 code unit), whose
    integers are within the double-precision range, and whose floats are non-integral and within
    :data:`_FLOAT_MIN`..:data:`_FLOAT_MAX` in magnitude; with ``ensure_ascii=False`` ``json``
    escapes exactly the characters RFC 8785 escapes, in the same forms. Anything else, including
    subclasses (e.g. ``str`` enums) and deep nesting, goes to ``rfc8785``; a hypothesis property
    in tests/unit/test_canonical.py checks the two agree byte for byte.
    """
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return True
    if kind is int:
        return bool(-_INT_MAX <= value <= _INT_MAX)
    if kind is float:
        return bool(_FLOAT_MIN <= abs(value) < _FLOAT_MAX and not value.is_integer())
    if depth > 64:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not key.isascii() or not _stdlib_is_canonical(item, depth + 1):
                return False
        return True
    if kind is list:
        return all(_stdlib_is_canonical(item, depth + 1) for item in value)
    return False


def canonical_json(value: Any, *, what: str = "value") -> bytes:
    """Serialise ``value`` as RFC 8785 canonical JSON.

    Values the standard library's C encoder writes identically (:func:`_stdlib_is_canonical`: in
    practice almost every row) take that path; the others the pure-Python ``rfc8785``.

    :param what: names the value in the error message, e.g. ``"row 'a-17'"``.
    :raises PayloadError: for NaN/Infinity, integers outside the JSON-safe range, non-JSON types,
        text that is not valid Unicode (lone surrogates) and values nested too deeply to
        serialise (or containing themselves).
    """
    if _stdlib_is_canonical(value):
        try:
            return _compact(value).encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: rfc8785 below raises the error that names it
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as err:
        raise PayloadError(f"{what} is not canonical JSON: {err}") from err
    except UnicodeError as err:  # a lone surrogate in an object key (values raise the error above)
        raise PayloadError(f"{what} is not canonical JSON: text is not valid Unicode ({err})") from err
    except RecursionError as err:
        # Raised with the stack unwound, so handling it here is safe; the limit is Python's stack.
        raise PayloadError(
            f"{what} is not canonical JSON: nested too deeply to serialise (or it contains itself)"
        ) from err


def content_hash(canonical: bytes) -> str:
    """SHA-256 hex digest of canonical JSON bytes (the payload address)."""
    return hashlib.sha256(canonical).hexdigest()


def hash_value(value: Any, *, what: str = "value") -> tuple[str, str]:
    """Return ``(hash, canonical_text)`` for a JSON value."""
    body = canonical_json(value, what=what)
    return content_hash(body), body.decode("utf-8")


def derive_id(*parts: object) -> str:
    """A deterministic 32-hex-digit identifier from its parts.

    Each part is fed to the hash with its kind and length, so ``("a", "bc")`` and ``("ab", "c")``,
    or ``1`` and ``"1"``, never collide. Retries derive the same ids and so write nothing twice.
    """
    pieces = []
    for part in parts:
        if isinstance(part, str):
            kind, data = b"s", part.encode("utf-8")
        elif type(part) is int:  # what json.dumps writes for an int, without its encoder (hot path)
            kind, data = b"j", b"%d" % part
        else:
            kind, data = b"j", json.dumps(part, sort_keys=True, default=str).encode("utf-8")
        pieces.append(b"%s%d:%s" % (kind, len(data), data))
    return hashlib.sha256(b"".join(pieces)).hexdigest()[:32]


def row_key_text(key: Any) -> str:
    """How a user's row key is stored: strings verbatim, anything else as canonical JSON.

    The same limits hold on every audit backend:

    :raises PayloadError: for a missing key (``None``), a key that is not canonical JSON, and a
        stored key that contains a NUL character (PostgreSQL text cannot hold one), is not valid
        Unicode, or is longer than :data:`MAX_ROW_KEY_BYTES` UTF-8 bytes.
    """
    if key is None:
        raise PayloadError("row key is missing (None)")
    text = key if isinstance(key, str) else canonical_json(key, what=f"row key {short_repr(key)}").decode()
    if "\x00" in text:
        raise PayloadError(f"row key {short_repr(text)} contains a NUL character")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise PayloadError(f"row key {short_repr(text)} is not valid Unicode ({err.reason})") from err
    if size > MAX_ROW_KEY_BYTES:
        raise PayloadError(
            f"row key {short_repr(text)} is {size} UTF-8 bytes, more than the {MAX_ROW_KEY_BYTES} allowed"
        )
    return text
