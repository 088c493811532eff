"""Canonical JSON (RFC 8785) and the hashes and identifiers derived from it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785


class PayloadError(ValueError):
    """A row or output that cannot be stored as canonical JSON (NaN, Infinity, non-JSON types)."""


def canonical_json(value: Any, *, what: str = "value") -> bytes:
    """Serialise ``value`` as RFC 8785 canonical JSON.

    :param what: names the value in the error message, e.g. ``"row 'a-17'"``.
    :raises PayloadError: for NaN/Infinity, integers outside the JSON-safe range and non-JSON types.
    """
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as err:
        raise PayloadError(f"{what} is not canonical JSON: {err}") from err


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
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            kind, data = b"s", part.encode("utf-8")
        else:
            kind, data = b"j", json.dumps(part, sort_keys=True, default=str).encode("utf-8")
        digest.update(kind + str(len(data)).encode() + b":" + data)
    return digest.hexdigest()[:32]


def row_key_text(key: Any) -> str:
    """How a user's row key is stored: strings verbatim, anything else as canonical JSON."""
    if isinstance(key, str):
        return key
    return canonical_json(key, what=f"row key {key!r}").decode("utf-8")
