"""``airflow_elspeth.read_merged_rows``: a coalesce's merged rows, for downstream tasks.

The shell side of :mod:`airflow_elspeth.audit.read.rows`: finds the audit store the way the
operators do (``ElspethAuditHook``) when no Engine is given.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Engine

from airflow_elspeth.audit.read.rows import merged_rows_of, summary_ref


def read_merged_rows(
    summary_or_ref: Mapping[str, Any], *, audit_conn_id: str | None = None, engine: Engine | None = None
) -> Iterator[dict[str, Any]]:
    """Stream a coalesce's merged rows from the audit store, for downstream tasks.

    :param summary_or_ref: the coalesce's ``coalesce_summary`` / return value, or any mapping with
        ``audit_run_id`` and ``coalesce``.
    :param audit_conn_id: the audit connection, when it is not the default one.
    :param engine: the audit store's Engine (then no connection is looked up).
    """
    summary_ref(summary_or_ref)  # a bad argument fails before any connection is looked up
    if engine is None:
        from airflow_elspeth.hooks.audit import ElspethAuditHook

        engine = ElspethAuditHook(audit_conn_id=audit_conn_id).get_engine()
    yield from merged_rows_of(engine, summary_or_ref)
