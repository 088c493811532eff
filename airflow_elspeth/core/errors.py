"""The fingerprint of a row error: which errors are "the same error" across rows and audit runs.

A branch callable's exception is recorded with its type and message. Messages carry the row they
failed on (``429 Too Many Requests for doc-010``, ``timeout after 3.2 s``, ``id 9f3a...``), so two
rows failing for one cause differ in text. The fingerprint hashes the type with the message's
*shape*: every number, quoted literal, UUID and long hexadecimal run replaced by a placeholder.
It is stable across versions of this package as long as :data:`FINGERPRINT_VERSION` is unchanged
(the stored hashes of earlier runs then still group with new ones).

Nothing here knows about Airflow or SQL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from airflow_elspeth.core.canonical import hash_value

FINGERPRINT_VERSION = 1

# Order matters: a UUID or a hex run would otherwise be cut into numbers first.
_VARIABLE_PARTS = (
    (re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"), "<uuid>"),
    (re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,}\b"), "<hex>"),
    (re.compile(r"'[^'\n]*'"), "'<str>'"),
    (re.compile(r'"[^"\n]*"'), '"<str>"'),
    # A sign belongs to a number only after a space or a bracket: ``doc-010`` is ``doc-<n>``.
    (re.compile(r"(?:(?<![\w.])[-+])?\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?"), "<n>"),
    (re.compile(r"\s+"), " "),
)


def message_shape(message: str) -> str:
    """``message`` with its row-specific parts replaced: ``429 Too Many Requests for doc-010`` is
    ``<n> Too Many Requests for doc-<n>``."""
    for pattern, placeholder in _VARIABLE_PARTS:
        message = pattern.sub(placeholder, message)
    return message.strip()


def error_fingerprint(error_type: str, message: str) -> str:
    """SHA-256 of canonical JSON ``[version, type, message shape]``: equal for the same error."""
    shape = [FINGERPRINT_VERSION, error_type, message_shape(message)]
    return hash_value(shape, what="error fingerprint")[0]


def recorded_error_fingerprint(error: Mapping[str, Any] | None) -> str | None:
    """The fingerprint of a recorded error (``{"type": ..., "message": ...}``; no type is
    ``Exception``, as in :func:`~airflow_elspeth.core.vocabulary.error_reason`), None without one."""
    if error is None:
        return None
    return error_fingerprint(str(error.get("type") or "Exception"), str(error.get("message") or ""))
