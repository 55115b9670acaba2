"""Usage charts as inline SVG, drawn on the server: bars per day, stacked by series.

Only the geometry is computed here; the template (``_chart.html``) writes the elements.
Colours come from the stylesheet by class (``s0`` … ``s7``), never from inline styles,
which the console's Content-Security-Policy forbids. No script draws anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta

# Series drawn in their own colour; the rest are summed as one, "other".
MAX_SERIES = 8
WIDTH, HEIGHT = 960, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 8, 10, 28
_MAX_DAY_LABELS = 10


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: int
    # What a pointer over the bar shows (an SVG <title>).
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    width: int
    height: int
    bars: tuple[Bar, ...]
    # (y, text) of the horizontal grid lines, and (x, text) of the day labels.
    ticks: tuple[tuple[float, str], ...]
    days: tuple[tuple[float, str], ...]
    # (series, name, total) in the legend.
    legend: tuple[tuple[int, str, str], ...]
    plot_left: int = _LEFT
    plot_right: int = WIDTH - _RIGHT
    plot_bottom: int = HEIGHT - _BOTTOM


def days_from(start: date, end: date) -> list[str]:
    """Every day from `start` to `end`, both included, as ISO dates."""
    count = max(0, (end - start).days) + 1
    return [(start + timedelta(days=n)).isoformat() for n in range(count)]


def short(value: float) -> str:
    """A compact axis label: 950, 1.2k, 3.4M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if not float(value).is_integer() else str(int(value))


def _ceiling(value: float) -> float:
    """A round number at least `value`: 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 5.0):
        if value <= step * power:
            return step * power
    return 10.0 * power


def stacked_by_day(
    title: str, days: list[str], values: Mapping[str, Mapping[str, float]], unit: str
) -> Chart:
    """A chart of `values` (series name -> day -> amount), one stacked bar per day of
    `days`; the series with the largest totals get colours of their own."""
    totals = {name: sum(per_day.values()) for name, per_day in values.items()}
    ranked = sorted(totals, key=lambda name: (-totals[name], name))
    named = ranked if len(ranked) <= MAX_SERIES else ranked[: MAX_SERIES - 1]
    series: list[tuple[str, dict[str, float]]] = [(n, dict(values[n])) for n in named]
    rest = ranked[len(named) :]
    if rest:
        other: dict[str, float] = {}
        for name in rest:
            for day, amount in values[name].items():
                other[day] = other.get(day, 0.0) + amount
        series.append((f"other ({len(rest)})", other))
    day_totals = [sum(per_day.get(day, 0.0) for _, per_day in series) for day in days]
    top = _ceiling(max(day_totals, default=0.0))
    plot_w = WIDTH - _LEFT - _RIGHT
    plot_h = HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(1, len(days))
    width = max(1.0, slot * 0.7)
    bars: list[Bar] = []
    for i, day in enumerate(days):
        x = _LEFT + i * slot + (slot - width) / 2
        base = float(HEIGHT - _BOTTOM)
        for index, (name, per_day) in enumerate(series):
            amount = per_day.get(day, 0.0)
            if amount <= 0:
                continue
            height = amount / top * plot_h
            base -= height
            label = f"{day} · {name}: {short(amount)} {unit}"
            bars.append(
                Bar(round(x, 2), round(base, 2), round(width, 2), round(height, 2), index, label)
            )
    # Grid lines at round steps: 50 in fives of 10, 20 in fours of 5.
    lead = round(top / 10.0 ** math.floor(math.log10(top)))
    steps = 4 if lead == 2 else 5
    ticks = tuple(
        (round(HEIGHT - _BOTTOM - plot_h * k / steps, 2), short(top * k / steps))
        for k in range(steps + 1)
    )
    every = max(1, math.ceil(len(days) / _MAX_DAY_LABELS))
    labels = tuple(
        (round(_LEFT + i * slot + slot / 2, 2), day[5:])
        for i, day in enumerate(days)
        if i % every == 0
    )
    legend = tuple(
        (index, name, short(sum(per_day.values()))) for index, (name, per_day) in enumerate(series)
    )
    return Chart(title, WIDTH, HEIGHT, tuple(bars), ticks, labels, legend)
