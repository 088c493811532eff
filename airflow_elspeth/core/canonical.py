"""Canonical JSON (RFC 8785) and the hashes and identifiers derived from it."""

from __future__ import annotations

import hashlib
import json
import math
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

import rfc8785

from airflow_elspeth.exceptions import ElspethConfigError, PayloadError, PayloadLimitExceeded

# The longest row key, in UTF-8 bytes. The audit store indexes (run_id, row_key); PostgreSQL
# refuses a btree index entry above about 2.7 KB, SQLite has no such limit. One limit, well below
# PostgreSQL's, keeps what a fork accepts the same on both backends.
MAX_ROW_KEY_BYTES = 1000

# The deepest nesting of objects and arrays a bounded payload may have, the payload itself counting
# as one level. Far beyond any record's shape; well within what rfc8785's recursion, the readers'
# ``json.loads`` and Python's stack take, and it stops a structure that contains itself.
MAX_PAYLOAD_DEPTH = 100


@dataclass(frozen=True)
class PayloadLimit:
    """The most bytes a payload may take as canonical JSON, and what sets that limit (for errors).

    :param max_bytes: the limit, a positive number of bytes.
    :param source: names the limit in error messages, e.g. ``"[elspeth] max_row_bytes"``: "row 'r4'
        is larger than 1048576 bytes as canonical JSON ([elspeth] max_row_bytes)".
    """

    max_bytes: int
    source: str

    def __post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ElspethConfigError(
                f"{self.source} must be a positive number of bytes, got {self.max_bytes!r}"
            )


_ROW_KEY_LIMIT = PayloadLimit(MAX_ROW_KEY_BYTES, "the longest row key")


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


_END = object()


def _text_size(text: str, room: int) -> int:
    """Bytes of ``text`` as a canonical JSON string, quotes included; a text that cannot fit in
    ``room`` bytes (a character is at least one byte) is not encoded, and its lower bound returned."""
    if len(text) + 2 > room:
        return len(text) + 2
    # json's escapes are RFC 8785's (see _stdlib_is_canonical); a lone surrogate, which
    # canonical_json refuses after the walk, is counted rather than raised here.
    return len(encode_basestring(text).encode("utf-8", "surrogatepass"))


def _scalar_size(value: Any, room: int) -> int:
    """Bytes of a non-container ``value`` as canonical JSON, as rfc8785 tells the types apart.

    A value canonical JSON refuses (NaN, an integer beyond 2**53, a set, a date...) counts one byte:
    the walk only bounds the work, and :func:`canonical_json` raises the error that names it.
    """
    if value is None:
        return 4
    if isinstance(value, bool):
        return 4 if value else 5
    if isinstance(value, int):
        integer = int(value)
        return len(str(integer)) if -_INT_MAX <= integer <= _INT_MAX else 1
    if isinstance(value, str):
        return _text_size(value, room)
    if isinstance(value, float):
        number = float(value)
        if not math.isfinite(number):
            return 1
        if _FLOAT_MIN <= abs(number) < _FLOAT_MAX and not number.is_integer():
            return len(repr(number))  # what both encoders write in this range
        return len(rfc8785.dumps(number))
    return 1


def payload_size(value: Any, limit: PayloadLimit, *, what: str = "value") -> int:
    """The length of ``canonical_json(value)`` in bytes, found without serialising it.

    The walk keeps a running count and stops as soon as it passes ``limit.max_bytes``: every value
    visited (a shared reference each time it is reached) adds at least one byte, so it visits at
    most ``max_bytes + 1`` values whatever the shape, and its memory is one iterator per level.

    For a value :func:`canonical_json` accepts, the size returned equals the length of its bytes
    (tests/unit/test_canonical.py checks it). For one it refuses, the size is only the walk's count
    (such a value counts a byte) and the error is left to :func:`canonical_json`.

    :param limit: the most bytes allowed.
    :param what: names the value in the error message, e.g. ``"row 'a-17'"``.
    :raises PayloadLimitExceeded: over ``limit.max_bytes``, or objects and arrays nested more than
        :data:`MAX_PAYLOAD_DEPTH` deep (which a structure containing itself always is).
    """
    budget = limit.max_bytes
    size = 0
    levels: list[Iterator[Any]] = []  # the values still to visit of each enclosing object or array
    item = value
    while True:
        if isinstance(item, (dict, list, tuple)):
            if len(levels) >= MAX_PAYLOAD_DEPTH:
                raise PayloadLimitExceeded(
                    f"{what} is nested too deeply: more than {MAX_PAYLOAD_DEPTH} levels of objects "
                    "and arrays (or it contains itself)"
                )
            count = len(item)
            # Brackets and count - 1 commas; an object's count colons too, and its keys now.
            size += 2 + max(count - 1, 0)
            if isinstance(item, dict):
                size += count
                for key in item:
                    if size > budget:
                        break
                    size += _text_size(key, budget - size) if isinstance(key, str) else 1
                levels.append(iter(item.values()))
            else:
                levels.append(iter(item))
        else:
            size += _scalar_size(item, budget - size)
        if size > budget:
            raise PayloadLimitExceeded(
                f"{what} is larger than {limit.max_bytes} bytes as canonical JSON ({limit.source})"
            )
        while levels:
            item = next(levels[-1], _END)
            if item is not _END:
                break
            levels.pop()
        else:
            return size


def canonical_json(value: Any, *, what: str = "value", limit: PayloadLimit | None = None) -> bytes:
    """Serialise ``value`` as RFC 8785 canonical JSON.

    Values the standard library's C encoder writes identically (:func:`_stdlib_is_canonical`: in
    practice almost every row) take that path; the others the pure-Python ``rfc8785``.

    :param what: names the value in the error message, e.g. ``"row 'a-17'"``.
    :param limit: when given, :func:`payload_size` checks ``value`` against it first, so nothing
        over it is ever serialised (a shared-reference structure expanding to 2**50 values costs
        the walk to the limit, not its expansion).
    :raises PayloadLimitExceeded: over ``limit`` (size or nesting).
    :raises PayloadError: for NaN/Infinity, integers outside the JSON-safe range, non-JSON types,
        text that is not valid Unicode (lone surrogates) and values nested too deeply to
        serialise (or containing themselves).
    """
    if limit is not None:
        payload_size(value, limit, what=what)
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
    except ValueError as err:
        # rfc8785 writes an out-of-range integer into its error message, which Python refuses for
        # one of more than 4,300 digits: still a value JSON cannot hold, not a source failure.
        raise PayloadError(f"{what} is not canonical JSON: {err}") from err


def content_hash(canonical: bytes) -> str:
    """SHA-256 hex digest of canonical JSON bytes (the payload address)."""
    return hashlib.sha256(canonical).hexdigest()


def hash_value(value: Any, *, what: str = "value", limit: PayloadLimit | None = None) -> tuple[str, str]:
    """Return ``(hash, canonical_text)`` for a JSON value (``limit``: see :func:`canonical_json`)."""
    body = canonical_json(value, what=what, limit=limit)
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

    :raises PayloadLimitExceeded: for a composite key over the limit as canonical JSON (found
        without serialising it) or nested more than :data:`MAX_PAYLOAD_DEPTH` deep.
    :raises PayloadError: for a missing key (``None``), a key that is not canonical JSON, and a
        stored key that contains a NUL character (PostgreSQL text cannot hold one), is not valid
        Unicode, or is longer than :data:`MAX_ROW_KEY_BYTES` UTF-8 bytes.
    """
    if key is None:
        raise PayloadError("row key is missing (None)")
    text = (
        key
        if isinstance(key, str)
        else canonical_json(key, what=f"row key {short_repr(key)}", limit=_ROW_KEY_LIMIT).decode()
    )
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
