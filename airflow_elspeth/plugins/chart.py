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
# Share of the width of the detailed part of a split time axis.
SPLIT_AT = 0.68


def colours(branches: Sequence[str]) -> dict[str, str]:
    return {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(branches)}


_UNITS = (("ms", 0.001), ("s", 1.0), ("min", 60.0), ("h", 3600.0))


def _unit(span: float) -> tuple[str, float]:
    """The unit to label times up to ``span`` seconds in."""
    if span < 1:
        return _UNITS[0]
    if span < 120:
        return _UNITS[1]
    if span < 7200:
        return _UNITS[2]
    return _UNITS[3]


def seconds_label(seconds: float, unit: tuple[str, float] | None = None) -> str:
    """``+1.5 s``, ``+2 min``, ``+1.25 h`` (relative to the fork's completion)."""
    if abs(seconds) < 1e-9:
        return "0"
    name, size = unit or _unit(abs(seconds))
    value = seconds / size
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return ("+" if seconds > 0 else "") + f"{text} {name}"


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
    """Seconds -> x, piecewise linear over the series' segments; a compressed segment gets a
    third of the width (or what is left after the detailed ones)."""

    segments: tuple[tuple[float, float, bool], ...]

    def knots(self) -> list[tuple[float, float, float, float, bool]]:
        left, right = LEFT, WIDTH - RIGHT
        if len(self.segments) == 1:
            low, high, compressed = self.segments[0]
            return [(low, high, left, right, compressed)]
        share = {False: SPLIT_AT, True: 1 - SPLIT_AT}
        x, result = float(left), []
        for low, high, compressed in self.segments:
            width = (right - left) * share[compressed]
            result.append((low, high, x, x + width, compressed))
            x += width
        return result

    def __call__(self, seconds: float) -> float:
        knots = self.knots()
        for low, high, x0, x1, _ in knots:
            if seconds <= high:
                return x0 + (x1 - x0) * (max(seconds, low) - low) / ((high - low) or 1.0)
        return knots[-1][3]

    def breaks(self) -> list[float]:
        """x of each place where the scale changes (drawn as a break mark)."""
        return [x0 for _, _, x0, _, compressed in self.knots() if compressed and x0 > LEFT]

    def ticks(self) -> list[tuple[float, str]]:
        result: list[tuple[float, str]] = []
        for low, high, _, _, compressed in self.knots():
            unit = _unit(max(abs(low), abs(high)))
            size = unit[1]
            count = 3 if compressed else (8 if len(self.segments) == 1 else 6)
            for value in nice_ticks(low / size, high / size, count):
                seconds = value * size
                if seconds < low - 1e-9 or (result and self(seconds) - self(result[-1][0]) < 46):
                    continue
                result.append((seconds, seconds_label(seconds, unit)))
        return result


def arrivals_chart(
    series: Mapping[str, Any], branches: Sequence[str], palette: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """Everything ``_chart.html`` draws, in SVG user units; None when nothing has arrived yet.

    :param palette: branch -> colour, to match the rest of the page (default: :func:`colours`).
    """
    xs: list[float] = series.get("x_s") or []
    if not xs:
        return None
    start, timeout = series["start_s"], series["timeout_s"]
    rows_total = max(series["rows_total"], 1)
    segments = tuple((x["from_s"], x["to_s"], x["compressed"]) for x in series.get("segments") or [])
    scale = TimeScale(segments or ((start, series["end_s"], False),))
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
    present = [b for b in branches if b in series["branches"]]
    for branch in branches:
        data = series["branches"].get(branch)
        if data is None:
            continue
        by_deadline = data["points"][deadline_index] if deadline_index is not None else 0
        lines.append(
            {
                "branch": branch,
                "colour": palette[branch],
                # Earlier branches drawn wider underneath, so lines on top of each other stay visible.
                "width": round(2 + 1.3 * (len(present) - 1 - present.index(branch)), 1),
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
    x_ticks = [{"x": round(scale(v), 1), "label": label} for v, label in scale.ticks()]
    deadline_x = round(scale(timeout), 1)
    right_x = WIDTH - RIGHT
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "left": LEFT,
        "right": WIDTH - RIGHT,
        "top": top,
        "bottom": bottom,
        "deadline_x": deadline_x,
        "deadline_label": seconds_label(timeout),
        "deadline_shown": deadline_x <= right_x,
        "late_width": round(WIDTH - RIGHT - deadline_x, 1),
        "breaks": [round(x, 1) for x in scale.breaks()],
        "lines": lines,
        "decided": {"points": polyline(decided_points), "total": decided_total, "colour": DECIDED_COLOUR},
        "rows_total": series["rows_total"],
        "x_ticks": x_ticks,
        "y_ticks": y_ticks,
    }
