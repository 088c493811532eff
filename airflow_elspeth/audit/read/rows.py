"""The rows themselves, streamed: a coalesce's merged rows (for downstream tasks) and a run's input
rows, ``batch_size`` at a time in row order. Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Engine, and_, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.core.vocabulary import DecisionStatus


def iter_merged_rows(
    engine: Engine, run_id: str, node_id: str, *, with_lineage: bool = False, batch_size: int = 1000
) -> Iterator[dict[str, Any]]:
    """Stream the merged rows of one coalesce in row order, ``batch_size`` rows in memory at a time.

    :param with_lineage: yield ``{"row_key", "merged_token_id", "row"}`` instead of the bare row.
    """
    cd, ns, p, r = t.coalesce_decisions.c, t.node_states.c, t.payloads.c, t.rows.c
    query = (
        select(cd.row_key, cd.merged_token_id, p.body)
        .select_from(
            t.coalesce_decisions.join(
                t.node_states, and_(ns.token_id == cd.merged_token_id, ns.node_id == cd.node_id)
            )
            .join(t.payloads, p.hash == ns.output_ref)
            .join(t.rows, and_(r.run_id == cd.run_id, r.row_id == cd.row_id))
        )
        .where(cd.run_id == run_id, cd.node_id == node_id, cd.decision == DecisionStatus.MERGED.value)
        .order_by(r.row_index)
        .execution_options(yield_per=batch_size)
    )
    with engine.connect() as conn:
        for row_key, merged_id, body in conn.execute(query):
            row = json.loads(body)
            yield {"row_key": row_key, "merged_token_id": merged_id, "row": row} if with_lineage else row


def iter_source_rows(
    engine: Engine, run_id: str, *, batch_size: int = 1000
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream a run's input rows as (row key, row) in fork order, ``batch_size`` rows at a time."""
    r, p = t.rows.c, t.payloads.c
    query = (
        select(r.row_key, p.body)
        .select_from(t.rows.join(t.payloads, p.hash == r.payload_ref))
        .where(r.run_id == run_id)
        .order_by(r.row_index)
        .execution_options(yield_per=batch_size)
    )
    with engine.connect() as conn:
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
