"""The rows themselves, streamed: a coalesce's merged rows (for downstream tasks) and a run's input
rows, ``batch_size`` at a time in row order. Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Engine, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.ids import merged_token_id, row_id
from airflow_elspeth.audit.model import run_number
from airflow_elspeth.audit.read.events import SOURCE_OF_DECISION
from airflow_elspeth.core.vocabulary import DecisionStatus


def iter_merged_rows(
    engine: Engine, run_id: str, node_id: str, *, with_lineage: bool = False, batch_size: int = 1000
) -> Iterator[dict[str, Any]]:
    """Stream the merged rows of one coalesce in row order, ``batch_size`` rows in memory at a time.

    :param with_lineage: yield ``{"row_key", "merged_token_id", "row"}`` instead of the bare row.
    """
    d, sr = t.decisions.c, t.source_rows.c
    with engine.connect() as conn:
        run_no = run_number(conn, run_id)
        query = (
            select(sr.row_key, d.row_no, d.merged_body)
            .join_from(t.decisions, t.source_rows, SOURCE_OF_DECISION)
            .where(d.run_no == run_no, d.node_id == node_id, d.decision == DecisionStatus.MERGED.value)
            .order_by(d.row_no)
            .execution_options(yield_per=batch_size)
        )
        for row_key, row_no, body in conn.execute(query):
            row = json.loads(body)
            if with_lineage:
                yield {
                    "row_key": row_key,
                    "merged_token_id": merged_token_id(row_id(run_no, row_no), node_id),
                    "row": row,
                }
            else:
                yield row


def iter_source_rows(
    engine: Engine, run_id: str, *, batch_size: int = 1000
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream a run's input rows as (row key, row) in fork order, ``batch_size`` rows at a time."""
    sr = t.source_rows.c
    with engine.connect() as conn:
        query = (
            select(sr.row_key, sr.body)
            .where(sr.run_no == run_number(conn, run_id))
            .order_by(sr.row_no)
            .execution_options(yield_per=batch_size)
        )
        for row_key, body in conn.execute(query):
            yield row_key, json.loads(body)


def summary_ref(summary_or_ref: Mapping[str, Any]) -> tuple[str, str]:
    """(audit run id, coalesce) of a coalesce summary or any mapping with ``audit_run_id`` and
    ``coalesce``. :raises ValueError: it has neither."""
    try:
        return summary_or_ref["audit_run_id"], summary_or_ref["coalesce"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            "read_merged_rows needs a coalesce summary (with 'audit_run_id' and 'coalesce'), "
            f"got {summary_or_ref!r}"
        ) from err


def merged_rows_of(engine: Engine, summary_or_ref: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Stream the merged rows of the coalesce a summary (or reference) names, from ``engine``."""
    run_id, node_id = summary_ref(summary_or_ref)
    yield from iter_merged_rows(engine, run_id, node_id)
