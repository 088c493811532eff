"""Reads of one run's events shaped as the compatibility views' rows, for the read models on a
hot or whole-run path.

A view joins its events to ``runs`` and computes ids from the keys; a join of two views on such
an id is quadratic on SQLite. These selects read the event tables by the run's number and compute
the same columns (``audit/ids.py``), so a page or an aggregate is an index range. SQL, no Airflow.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Text, and_, case, cast, literal, select

from airflow_elspeth.audit import schema as t
from airflow_elspeth.audit.model import CoalesceSpec, RunInfo
from airflow_elspeth.core.vocabulary import DecisionStatus

d, sr, st = t.decisions.c, t.source_rows.c, t.step_results.c


def row_id_of(table: Any) -> Any:
    """The SQL of a row id (``ids.row_id``) from an event table's columns (``table.c``)."""
    return cast(table.run_no, Text) + "." + cast(table.row_no, Text)


def of_source_row(table: Any) -> Any:
    """The join of an event table (``step_results``, ``decisions``) to its row's ``source_rows``
    row: same run, chunk and row number (a key prefix of both)."""
    return and_(sr.run_no == table.c.run_no, sr.chunk == table.c.chunk, sr.row_no == table.c.row_no)


SOURCE_OF_DECISION = of_source_row(t.decisions)
DECISION_OF_RESULT = and_(d.run_no == st.run_no, d.chunk == st.chunk, d.row_no == st.row_no)


def decision_rows_of(run: RunInfo, spec: CoalesceSpec) -> Any:
    """A select of a coalesce's decisions in one run with the ``coalesce_decisions`` view's columns
    (add conditions on ``schema.decisions`` and ``schema.source_rows`` columns)."""
    row = row_id_of(d)
    return (
        select(
            literal(run.run_id).label("run_id"),
            d.node_id,
            row.label("row_id"),
            sr.row_key,
            d.chunk,
            d.decision,
            d.failure_reason,
            d.details_json,
            literal(spec.config.policy.value).label("policy"),
            literal(spec.config.merge.value).label("merge_strategy"),
            d.consumed,
            d.missing_json,
            d.late_json,
            d.collisions_json,
            case((d.decision == DecisionStatus.MERGED.value, row + ":m:" + d.node_id), else_=None).label(
                "merged_token_id"
            ),
            d.decided_at,
            d.wait_ms,
            d.wait_from_first_arrival_ms,
            d.recorded_at,
        )
        .join_from(t.decisions, t.source_rows, SOURCE_OF_DECISION)
        .where(d.run_no == run.run_no, d.node_id == spec.node_id)
    )
