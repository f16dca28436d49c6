"""The run report's charts as inline SVG: lines and points on two linear axes, nothing more.

report.html drew them with matplotlib as PNGs; importing pyplot and rendering three figures took
longer than training the head of a linear probe (benchmarks/results/bench-epyc-zen5-2026-11-27.md).
These few shapes need no plotting library: the page builds in milliseconds, stays one file, and the
charts scale without blur. matplotlib still draws the LR finder's, compare's and tune's plots.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
BANDS = ("#2ca02c", "#d62728")  # alternate phases
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 24, 40  # margins around the plot area, px


@dataclass
class Series:
    """Points (x, y) named in the legend; a None or NaN y leaves a gap. `style`: "line" (with markers),
    "dashed" (a reference line) or "points" (a scatter)."""

    name: str
    xs: list[float]
    ys: list[float | None]
    style: str = "line"
    colour: str | None = None


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi], about `count` of them (steps of 1, 2, 2.5 or 5 times a power of 10)."""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def chart(
    series: list[Series],
    xlabel: str,
    ylabel: str,
    title: str = "",
    xlim: tuple | None = None,
    ylim: tuple | None = None,
    bands: list[tuple[float, float, str]] = (),
    integer_x: bool = False,
    size: tuple[int, int] = (470, 330),
) -> str:
    """An <svg> chart of `series`; `bands`: shaded x ranges (start, end, label), e.g. a run's phases;
    limits default to the data's range."""
    width, height = size
    finite = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if _finite(y)]
    xlim = xlim or _padded([x for x, _ in finite] + [v for b in bands for v in b[:2]], 0.0 if integer_x else 0.04)
    ylim = ylim or _padded([y for _, y in finite], 0.06)
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - xlim[0]) / (xlim[1] - xlim[0]) * plot_w

    def sy(y: float) -> float:
        return TOP + plot_h - (y - ylim[0]) / (ylim[1] - ylim[0]) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="system-ui, sans-serif" font-size="11">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="white" stroke="#999"/>',
    ]
    for n, (start, end, label) in enumerate(bands):
        x0, x1 = max(sx(start), LEFT), min(sx(end), LEFT + plot_w)
        out.append(
            f'<rect class="band" x="{x0:.1f}" y="{TOP}" width="{max(x1 - x0, 0):.1f}" height="{plot_h}" '
            f'fill="{BANDS[n % 2]}" fill-opacity="0.1"/>'
            f'<text x="{x0 + 3:.1f}" y="{TOP + 12}">{html.escape(label)}</text>'
        )
    for value in nice_ticks(*xlim, integer=integer_x):
        out.append(
            f'<line x1="{sx(value):.1f}" y1="{TOP + plot_h}" x2="{sx(value):.1f}" y2="{TOP + plot_h + 4}" '
            f'stroke="#555"/><text x="{sx(value):.1f}" y="{TOP + plot_h + 15}" text-anchor="middle">'
            f"{value:g}</text>"
        )
    for value in nice_ticks(*ylim):
        out.append(
            f'<line x1="{LEFT}" y1="{sy(value):.1f}" x2="{LEFT + plot_w}" y2="{sy(value):.1f}" stroke="#eee"/>'
            f'<text x="{LEFT - 5}" y="{sy(value) + 4:.1f}" text-anchor="end">{value:g}</text>'
        )
    out.append(
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>'
        f'<text transform="translate(12 {TOP + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
        f"{html.escape(ylabel)}</text>"
    )
    if title:
        out.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{TOP - 8}" text-anchor="middle">{html.escape(title)}</text>')
    drawn = []  # every point in px, for the legend to avoid
    for n, s in enumerate(series):
        colour = _colour(s, n)
        points = [(sx(x), sy(y)) if _finite(y) else None for x, y in zip(s.xs, s.ys)]
        drawn += filter(None, points)
        out.append(f'<g class="series" data-name="{html.escape(s.name)}">')
        if s.style == "points":
            out += [
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{colour}" fill-opacity="0.5"/>'
                for x, y in filter(None, points)
            ]
        else:
            dash = ' stroke-dasharray="5 4"' if s.style == "dashed" else ""
            out += [
                f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in run)}" fill="none" '
                f'stroke="{colour}" stroke-width="{1 if dash else 1.5}"{dash}/>'
                for run in _runs(points)
            ]
            if s.style == "line":
                out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in filter(None, points)]
        out.append("</g>")
    out += _legend(series, (LEFT, TOP, plot_w, plot_h), drawn + _along(series, sx, sy))
    out.append("</svg>")
    return "".join(out)


def _legend(series: list[Series], area: tuple, points: list[tuple[float, float]]) -> list[str]:
    """The legend box in the corner of the plot area that covers the fewest drawn points (top right on a tie)."""
    if not series:
        return []
    names = [s.name for s in series]
    left, top, plot_w, plot_h = area
    w, h = 34 + 6.2 * max(len(name) for name in names), 6 + 15 * len(names)
    corners = [
        (left + plot_w - w - 6, top + 4),
        (left + 6, top + 4),
        (left + plot_w - w - 6, top + plot_h - h - 4),
        (left + 6, top + plot_h - h - 4),
    ]
    x0, y0 = min(corners, key=lambda c: sum(c[0] <= x <= c[0] + w and c[1] <= y <= c[1] + h for x, y in points))
    out = [
        f'<rect class="legend" x="{x0:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{h}" fill="white" '
        f'fill-opacity="0.85" stroke="#ccc"/>'
    ]
    for n, s in enumerate(series):
        y = y0 + 15 + 15 * n - 4
        dash = ' stroke-dasharray="5 4"' if s.style == "dashed" else ""
        out.append(
            f'<line x1="{x0 + 6:.1f}" y1="{y - 4:.1f}" x2="{x0 + 24:.1f}" y2="{y - 4:.1f}" '
            f'stroke="{_colour(s, n)}" stroke-width="2"{dash}/><text x="{x0 + 28:.1f}" y="{y:.1f}">'
            f"{html.escape(s.name)}</text>"
        )
    return out


def _along(series: list[Series], sx, sy, steps: int = 20) -> list[tuple[float, float]]:
    """Points along each drawn line segment, so the legend avoids lines as well as markers."""
    out = []
    for s in series:
        if s.style == "points":
            continue
        for (xa, ya), (xb, yb) in zip(zip(s.xs, s.ys), zip(s.xs[1:], s.ys[1:])):
            if _finite(ya) and _finite(yb):
                out += [(sx(xa + (xb - xa) * t / steps), sy(ya + (yb - ya) * t / steps)) for t in range(1, steps)]
    return out


def _colour(s: Series, n: int) -> str:
    return s.colour or COLOURS[n % len(COLOURS)]


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _padded(values: list[float], share: float) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    pad = (hi - lo) * share or max(abs(lo) * 0.05, 0.5)
    return lo - pad, hi + pad


def _runs(points: list) -> list[list[tuple[float, float]]]:
    """The stretches of consecutive points between gaps (None)."""
    runs, current = [], []
    for point in points + [None]:
        if point is None:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(point)
    return runs
