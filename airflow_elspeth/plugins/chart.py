"""Geometry of the arrivals chart: numbers only, drawn as inline SVG by ``templates/_chart.html``.

Cumulative arrivals per branch and rows decided over time (seconds since the fork completed), with
the deadline. When arrivals come long after the deadline, the time axis is split: the time up to
the deadline keeps most of the width and the rest is compressed, so neither part becomes a sliver.
Names never go through here; the template prints them (escaped).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT = 1040, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 18, 40
# Categorical colours that stay apart for the common kinds of colour blindness (Okabe-Ito based).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#6A3D9A", "#8C6D31")
DECIDED_COLOUR = "#57606a"
# Split the time axis when the data runs past this many timeouts; the deadline then sits here.
SPLIT_AFTER = 2.5
SPLIT_AT = 0.68


def colours(branches: Sequence[str]) -> dict[str, str]:
    return {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(branches)}


def seconds_label(seconds: float) -> str:
    """``+1.5 s``, ``+2 min``, ``+1.2 h`` (relative to the fork's completion)."""
    sign = "-" if seconds < 0 else "+"
    value = abs(seconds)
    if value < 1e-9:
        return "0"
    if value < 1:
        return f"{sign}{value * 1000:.0f} ms"
    if value < 120:
        return f"{sign}{value:g} s" if value == int(value) else f"{sign}{value:.1f} s"
    if value < 7200:
        return f"{sign}{value / 60:.3g} min"
    return f"{sign}{value / 3600:.3g} h"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


@dataclass(frozen=True)
class TimeScale:
    start: float
    end: float
    deadline: float
    split: bool

    def __call__(self, seconds: float) -> float:
        left, right = LEFT, WIDTH - RIGHT
        span = right - left
        if not self.split:
            return left + span * (seconds - self.start) / (self.end - self.start)
        at = left + span * SPLIT_AT
        if seconds <= self.deadline:
            return left + (at - left) * (seconds - self.start) / (self.deadline - self.start)
        return at + (right - at) * (seconds - self.deadline) / (self.end - self.deadline)

    def ticks(self) -> list[float]:
        if not self.split:
            return nice_ticks(self.start, self.end, 6)
        before = nice_ticks(self.start, self.deadline, 4)
        after = [v for v in nice_ticks(self.deadline, self.end, 3) if v > self.deadline]
        # Keep labels apart where the two halves meet.
        if after and self(after[0]) - self(self.deadline) < 40:
            after = after[1:]
        return [*before, *after]


def arrivals_chart(
    series: Mapping[str, Any], branches: Sequence[str], palette: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """Everything ``_chart.html`` draws, in SVG user units; None when nothing has arrived yet.

    :param palette: branch -> colour, to match the rest of the page (default: :func:`colours`).
    """
    xs: list[float] = series.get("x_s") or []
    if not xs:
        return None
    start, end, timeout = series["start_s"], series["end_s"], series["timeout_s"]
    rows_total = max(series["rows_total"], 1)
    scale = TimeScale(start, end, timeout, split=end > timeout * SPLIT_AFTER and timeout > start)
    bottom, top = HEIGHT - BOTTOM, TOP

    def y(count: float) -> float:
        return bottom - (bottom - top) * count / rows_total

    def polyline(points: Sequence[int]) -> str:
        coords = [(scale(start), y(0))]
        previous = 0
        for x_value, count in zip(xs, points, strict=True):
            if count != previous:
                # A step: the count changed within this column.
                coords.append((scale(x_value), y(previous)))
            coords.append((scale(x_value), y(count)))
            previous = count
        return " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)

    palette = {**colours(branches), **(palette or {})}
    deadline_index = max((i for i, x in enumerate(xs) if x <= timeout + 1e-9), default=None)
    lines = []
    for branch in branches:
        data = series["branches"].get(branch)
        if data is None:
            continue
        by_deadline = data["points"][deadline_index] if deadline_index is not None else 0
        lines.append(
            {
                "branch": branch,
                "colour": palette[branch],
                "points": polyline(data["points"]),
                "total": data["total"],
                "by_deadline": by_deadline,
                "after_deadline": data["total"] - by_deadline,
                "share": data["total"] / rows_total,
                "last_s": data["last_s"],
            }
        )
    decided_points = [0] * len(xs)
    decided_total = 0
    for data in series["decisions"].values():
        decided_points = [a + b for a, b in zip(decided_points, data["points"], strict=True)]
        decided_total += data["total"]
    y_ticks = [
        {"y": round(y(v), 1), "label": f"{int(v):,}"}
        for v in nice_ticks(0, rows_total, 4)
        if float(v).is_integer() and v <= rows_total
    ]
    x_ticks = [{"x": round(scale(v), 1), "label": seconds_label(v)} for v in scale.ticks()]
    deadline_x = round(scale(timeout), 1)
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "top": top,
        "bottom": bottom,
        "deadline_x": deadline_x,
        "deadline_label": seconds_label(timeout),
        "late_width": round(WIDTH - RIGHT - deadline_x, 1),
        "split": scale.split,
        "lines": lines,
        "decided": {"points": polyline(decided_points), "total": decided_total, "colour": DECIDED_COLOUR},
        "rows_total": series["rows_total"],
        "x_ticks": x_ticks,
        "y_ticks": y_ticks,
    }
