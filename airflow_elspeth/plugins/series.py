"""The arrivals chart's data: cumulative arrivals per branch and rows decided over time, resampled
to a fixed number of points (what ``chart.arrivals_chart`` then turns into geometry).

The counts per time slot come from the read models (:mod:`airflow_elspeth.audit.read.decisions`);
only the resampling and the choice of where the chart zooms live here, next to the chart.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine

from airflow_elspeth.audit.read import decisions
from airflow_elspeth.audit.read.cache import CoalesceRef, coalesce_ref, run_reads
from airflow_elspeth.audit.read.records import AuditRunView, CoalescePage

CHART_COLUMNS = 240
# The chart zooms on the events when they all happen before this share of the timeout, and
# compresses what comes after the deadline when events run past this many timeouts.
EARLY_SHARE = 0.3
LATE_FACTOR = 2.5


def coalesce_page_overview(
    engine: Engine, audit_run: AuditRunView, node_id: str, *, ref: CoalesceRef | None = None
) -> CoalescePage:
    """What the coalesce section of the page and ``/api/.../coalesces/{coalesce}`` show: the
    coalesce overview (the summary extended for the page) plus the arrival curves (``arrivals``)."""
    ref = ref or coalesce_ref(engine, audit_run.audit_run_id, node_id)
    # The arrivals scan runs beside the overview's (on PostgreSQL); the series then reads it cached.
    overview, _ = run_reads(
        engine,
        lambda: decisions.coalesce_overview(engine, audit_run, node_id, ref=ref),
        lambda: decisions.arrival_slots(ref, audit_run),
    )
    return CoalescePage.of(overview, arrival_series(ref, audit_run))


def arrival_series(ref: CoalesceRef, audit_run: AuditRunView) -> dict[str, Any]:
    """Cumulative arrivals per branch and cumulative decisions over time, against the deadline.

    Times are seconds since the fork completed (the deadline is at ``timeout_s``). One grouped scan
    per table at a fine resolution (the read models' time slots, :func:`decisions.slot_seconds`),
    resampled here to ``CHART_COLUMNS`` points, so the series' size does not grow with the run.
    """
    spec = ref.spec
    timeout = spec.config.timeout.total_seconds()
    resolution = decisions.slot_seconds(spec)
    empty: dict[str, Any] = {
        "timeout_s": timeout,
        "start_s": 0.0,
        "end_s": timeout,
        "resolution_s": resolution,
        "x_s": [],
        "segments": [],
        "rows_total": audit_run.rows_total or 0,
        "branches": {},
        "decisions": {},
    }
    if audit_run.completed_at is None:
        return empty
    arrivals, decided = run_reads(
        ref.engine, lambda: decisions.arrival_slots(ref, audit_run), lambda: decisions.decision_slots(ref)
    )
    every = [s for series in [*arrivals.values(), *decided.values()] for s in series]
    if not every:
        return empty
    start = min(0.0, min(every) * resolution)
    last = (max(every) + 1) * resolution
    end = max(timeout * 1.1, last)
    # Where the action is gets most of the points (and of the chart's width): everything happened
    # long before the deadline, or long after it, or the time scale is plain.
    if last < timeout * EARLY_SHARE:
        knee = max(last * 1.15, start + resolution * 2)
        segments = [(start, knee, False), (knee, end, True)]
    elif last > timeout * LATE_FACTOR and timeout > start:
        segments = [(start, timeout, False), (timeout, end, True)]
    else:
        segments = [(start, end, False)]
    xs: list[float] = []
    for low, high, compressed in segments:
        count = (
            CHART_COLUMNS
            if len(segments) == 1
            else (CHART_COLUMNS // 3 if compressed else CHART_COLUMNS * 2 // 3)
        )
        xs += [low + (high - low) * (i + 1) / count for i in range(count)]

    def cumulative(series: Mapping[int, int]) -> dict[str, Any]:
        ends = sorted(series)
        running, totals = 0, []
        for slot in ends:
            running += series[slot]
            totals.append(running)
        points = []
        for x in xs:
            # Everything in slots ending at or before x: slot s ends at (s + 1) x resolution.
            i = bisect_right(ends, x / resolution - 1 + 1e-9)
            points.append(totals[i - 1] if i else 0)
        first = (min(ends) * resolution) if ends else None
        last = ((max(ends) + 1) * resolution) if ends else None
        return {"total": running, "points": points, "first_s": first, "last_s": last}

    return {
        "timeout_s": timeout,
        "start_s": start,
        "end_s": end,
        "resolution_s": resolution,
        "x_s": xs,
        "segments": [
            {"from_s": low, "to_s": high, "compressed": compressed} for low, high, compressed in segments
        ],
        "rows_total": audit_run.rows_total or 0,
        "branches": {b: cumulative(s) for b, s in arrivals.items()},
        "decisions": {d: cumulative(s) for d, s in decided.items()},
    }
