"""Charts drawn on the server as inline SVG (docs/web.md, "Experts" and "Matrix").

Pure functions: data in, ``Markup`` out. Every label and title is escaped here (a name or
text set a contributor chose is text, never markup); numbers are formatted, never copied.
Colours are SVG attributes (the pages' Content-Security-Policy allows no inline style).

``line_chart``: bits per byte over time, one ``polyline`` per series (a text set), points
with a hover ``<title>``, the base's bits per byte as a dashed line where known, axes with
ticks and a legend. ``heatmap``: one ``rect.cell`` per filled cell, coloured by its
relative change against the base (diverging: better is blue, worse is red), wrapped in a
link to the evaluation behind it; empty cells drawn grey (pale yellow while an evaluation
is queued for them) without a value.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from markupsafe import Markup, escape

# Series colours, in order (a colour-blind-safe palette).
PALETTE = ("#2457c5", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#6b6b6b", "#8c564b")
BETTER_RGB = (36, 87, 197)  # blue: lower bits per byte than the base
WORSE_RGB = (179, 38, 30)  # red: higher
NEUTRAL_RGB = (246, 246, 246)
EMPTY_FILL = "#e4e7ec"
PENDING_FILL = "#fdf3d7"


@dataclass(frozen=True)
class Point:
    at: dt.datetime
    value: float
    label: str  # the hover text


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[Point]
    baseline: float | None = None  # the base's bits per byte on this text set


@dataclass(frozen=True)
class HeatCell:
    value: float
    change: float | None  # (value - base) / base
    href: str
    title: str


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (about ``count`` of them)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.05 or 0.5
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks: list[float] = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _scale(value: float, lo: float, hi: float, out_lo: float, out_hi: float) -> float:
    if hi == lo:
        return (out_lo + out_hi) / 2
    return out_lo + (value - lo) / (hi - lo) * (out_hi - out_lo)


def _num(value: float) -> str:
    return f"{value:.1f}"


def _fmt_tick(value: float, step: float) -> str:
    decimals = max(0, min(4, -math.floor(math.log10(step)) + 1)) if step > 0 else 2
    return f"{value:.{decimals}f}"


# -- line chart -----------------------------------------------------------------------------

_W, _H = 720, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 16, 44
_LEGEND_ROW = 18


def line_chart(
    series: Sequence[Series], *, element_id: str = "eval-chart", title: str = "Bits per byte"
) -> Markup:
    """Bits per byte over time, one polyline per series; an empty chart says so."""
    filled = [s for s in series if s.points]
    legend_h = _LEGEND_ROW * (len(filled) + 1)
    height = _H + legend_h
    head = (
        f'<svg id="{escape(element_id)}" class="chart" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
    )
    if not filled:
        empty = (
            f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="empty">'
            "no evaluations yet</text>"
        )
        return Markup(head + empty + "</svg>")  # noqa: S704 (every part escaped above)
    times = [p.at.timestamp() for s in filled for p in s.points]
    values = [p.value for s in filled for p in s.points]
    values += [s.baseline for s in filled if s.baseline is not None]
    y_ticks = nice_ticks(min(values), max(values))
    t_lo, t_hi = min(times), max(times)
    if t_lo == t_hi:
        t_lo, t_hi = t_lo - 3600, t_hi + 3600
    box = _Box(t_lo, t_hi, y_ticks[0], y_ticks[-1])
    parts = [head, _axes(box, y_ticks)]
    for i, s in enumerate(filled):
        parts.append(_series(box, s, PALETTE[i % len(PALETTE)]))
    parts.append(_legend(filled))
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 (every part escaped where made)


@dataclass(frozen=True)
class _Box:
    t_lo: float
    t_hi: float
    v_lo: float
    v_hi: float

    def x(self, t: float) -> float:
        return _scale(t, self.t_lo, self.t_hi, _LEFT, _W - _RIGHT)

    def y(self, v: float) -> float:
        return _scale(v, self.v_lo, self.v_hi, _H - _BOTTOM, _TOP)


def _axes(box: _Box, y_ticks: Sequence[float]) -> str:
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP
    step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 0.0
    out = [
        f'<g class="axes" stroke="#5d6677" fill="none">'
        f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>'
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/></g>'
    ]
    for v in y_ticks:
        y = _num(box.y(v))
        out.append(
            f'<g class="tick y"><line x1="{x0 - 4}" y1="{y}" x2="{x1}" y2="{y}" '
            f'stroke="#dde2ea"/><text x="{x0 - 6}" y="{y}" text-anchor="end" '
            f'dominant-baseline="middle" font-size="11">{_fmt_tick(v, step)}</text></g>'
        )
    for i in range(5):
        t = box.t_lo + (box.t_hi - box.t_lo) * i / 4
        x = _num(box.x(t))
        label = dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M")
        out.append(
            f'<g class="tick x"><line x1="{x}" y1="{y0}" x2="{x}" y2="{y0 + 4}" '
            f'stroke="#5d6677"/><text x="{x}" y="{y0 + 16}" text-anchor="middle" '
            f'font-size="10">{label}</text></g>'
        )
    out.append(
        f'<text x="12" y="{(y0 + y1) / 2}" font-size="11" transform="rotate(-90 12 '
        f'{(y0 + y1) / 2})" text-anchor="middle">bits per byte</text>'
    )
    return "".join(out)


def _series(box: _Box, s: Series, colour: str) -> str:
    ordered = sorted(s.points, key=lambda p: p.at)
    coords = " ".join(f"{_num(box.x(p.at.timestamp()))},{_num(box.y(p.value))}" for p in ordered)
    name = escape(s.name)
    out = [f'<g class="series" data-text-set="{name}">']
    if s.baseline is not None:
        y = _num(box.y(s.baseline))
        out.append(
            f'<line class="baseline" x1="{_LEFT}" y1="{y}" x2="{_W - _RIGHT}" y2="{y}" '
            f'stroke="{colour}" stroke-dasharray="6 4" stroke-width="1.2">'
            f"<title>base on {name}: {s.baseline:.4f} bits/byte</title></line>"
        )
    out.append(
        f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2">'
        f"<title>{name}</title></polyline>"
    )
    for p in ordered:
        out.append(
            f'<circle cx="{_num(box.x(p.at.timestamp()))}" cy="{_num(box.y(p.value))}" r="3.5" '
            f'fill="{colour}"><title>{escape(p.label)}</title></circle>'
        )
    out.append("</g>")
    return "".join(out)


def _legend(series: Sequence[Series]) -> str:
    out = ['<g class="legend" font-size="12">']
    for i, s in enumerate(series):
        y = _H + _LEGEND_ROW * i
        colour = PALETTE[i % len(PALETTE)]
        out.append(
            f'<line x1="{_LEFT}" y1="{y}" x2="{_LEFT + 24}" y2="{y}" stroke="{colour}" '
            f'stroke-width="2"/><text x="{_LEFT + 30}" y="{y}" dominant-baseline="middle">'
            f"{escape(s.name)}</text>"
        )
    if any(s.baseline is not None for s in series):
        y = _H + _LEGEND_ROW * len(series)
        out.append(
            f'<line x1="{_LEFT}" y1="{y}" x2="{_LEFT + 24}" y2="{y}" stroke="#5d6677" '
            f'stroke-dasharray="6 4"/><text x="{_LEFT + 30}" y="{y}" '
            'dominant-baseline="middle">dashed: the base alone</text>'
        )
    out.append("</g>")
    return "".join(out)


# -- heatmap --------------------------------------------------------------------------------

_CELL_W, _CELL_H = 84, 30
_LABEL_W, _HEAD_H = 190, 120


def change_limit(changes: Sequence[float]) -> float:
    """The colour scale's end (both ways): the largest change, rounded up, at least 5%."""
    biggest = max((abs(c) for c in changes if math.isfinite(c)), default=0.0)
    for limit in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0):
        if biggest <= limit:
            return limit
    return float(math.ceil(biggest))


def colour_for(change: float | None, limit: float) -> str:
    """White at no change, towards blue as bits per byte fall, red as they rise."""
    if change is None or not math.isfinite(change) or limit <= 0:
        r, g, b = NEUTRAL_RGB
        return f"#{r:02x}{g:02x}{b:02x}"
    t = min(abs(change) / limit, 1.0)
    target = BETTER_RGB if change < 0 else WORSE_RGB
    r, g, b = (round(n + (m - n) * t) for n, m in zip(NEUTRAL_RGB, target, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(
    *,
    rows: Sequence[tuple[str, str]],
    columns: Sequence[tuple[str, str]],
    cells: Mapping[tuple[str, str], HeatCell],
    base_row: Mapping[str, float],
    pending: Set[tuple[str, str]] = frozenset(),
    element_id: str = "matrix",
) -> Markup:
    """``rows`` and ``columns`` as (key, label); ``cells`` by (row key, column key); the
    base's bits per byte per column as a last row of its own (``rect.base-cell``); an empty
    cell in ``pending`` has an evaluation on its way (``rect.empty.pending``)."""
    limit = change_limit([c.change for c in cells.values() if c.change is not None])
    # Room on the right for the last column's label, rotated from its cell's middle: a
    # 28-character label at font size 11 reaches about 140 px to the right.
    width = _LABEL_W + _CELL_W * len(columns) + _CELL_W // 2 + 145
    height = _HEAD_H + _CELL_H * (len(rows) + 1) + 8
    # The head is cut to the longest column label: at -35 degrees and about 6.2 px a
    # character, it rises 0.57 x its length above the cells (plus a margin).
    longest = max((len(_clip(label, 28)) for _, label in columns), default=0)
    top = max(0, _HEAD_H - round(longest * 6.2 * 0.574) - 18)
    out = [
        f'<svg id="{escape(element_id)}" class="heatmap" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 {top} {width} {height - top}" width="{width}" height="{height - top}" '
        'role="img" '
        f'aria-label="bits per byte of each expert on each domain" '
        f'data-scale-limit="{limit:g}">'
    ]
    for j, (_, label) in enumerate(columns):
        x = _LABEL_W + _CELL_W * j + _CELL_W / 2
        y = _HEAD_H - 8
        out.append(
            f'<text class="column-label" x="{x}" y="{y}" font-size="11" '
            f'transform="rotate(-35 {x} {y})">{escape(_clip(label, 28))}'
            f"<title>{escape(label)}</title></text>"
        )
    for i, (row_key, row_label) in enumerate(rows):
        y = _HEAD_H + _CELL_H * i
        out.append(_row_label(y, row_label))
        for j, (col_key, col_label) in enumerate(columns):
            x = _LABEL_W + _CELL_W * j
            out.append(
                _cell(
                    x,
                    y,
                    row_key=row_key,
                    col_key=col_key,
                    cell=cells.get((row_key, col_key)),
                    pending=(row_key, col_key) in pending,
                    limit=limit,
                    row_label=row_label,
                    col_label=col_label,
                )
            )
    out.append(_base_row(len(rows), columns, base_row))
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 (every part escaped where made)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _row_label(y: float, label: str) -> str:
    return (
        f'<text class="row-label" x="{_LABEL_W - 8}" y="{y + _CELL_H / 2}" text-anchor="end" '
        f'dominant-baseline="middle" font-size="12">{escape(_clip(label, 26))}'
        f"<title>{escape(label)}</title></text>"
    )


def _cell(
    x: float,
    y: float,
    *,
    row_key: str,
    col_key: str,
    cell: HeatCell | None,
    pending: bool,
    limit: float,
    row_label: str,
    col_label: str,
) -> str:
    common = (
        f'x="{x + 1}" y="{y + 1}" width="{_CELL_W - 2}" height="{_CELL_H - 2}" '
        f'data-expert-id="{escape(row_key)}" data-text-set="{escape(col_key)}"'
    )
    if cell is None:
        state = "an evaluation is queued" if pending else "not evaluated yet"
        return (
            f'<rect class="{"empty pending" if pending else "empty"}" {common} '
            f'fill="{PENDING_FILL if pending else EMPTY_FILL}">'
            f"<title>{escape(row_label)} on {escape(col_label)}: {state}</title></rect>"
        )
    fill = colour_for(cell.change, limit)
    dark = cell.change is not None and abs(cell.change) > limit * 0.6
    return (
        f'<a href="{escape(cell.href)}"><rect class="cell" {common} '
        f'data-value="{cell.value:.4f}" fill="{fill}"><title>{escape(cell.title)}</title>'
        f'</rect><text x="{x + _CELL_W / 2}" y="{y + _CELL_H / 2}" text-anchor="middle" '
        f'dominant-baseline="middle" font-size="11" fill="{"#ffffff" if dark else "#1d2330"}" '
        f'pointer-events="none">{cell.value:.3f}</text></a>'
    )


def _base_row(
    n_rows: int, columns: Sequence[tuple[str, str]], base_row: Mapping[str, float]
) -> str:
    y = _HEAD_H + _CELL_H * n_rows
    out = [_row_label(y, "base alone")]
    for j, (col_key, col_label) in enumerate(columns):
        x = _LABEL_W + _CELL_W * j
        value = base_row.get(col_key)
        if value is None:
            continue
        out.append(
            f'<rect class="base-cell" x="{x + 1}" y="{y + 1}" width="{_CELL_W - 2}" '
            f'height="{_CELL_H - 2}" data-text-set="{escape(col_key)}" '
            f'data-base-value="{value:.4f}" fill="#ffffff" stroke="#5d6677">'
            f"<title>base alone on {escape(col_label)}: {value:.4f} bits/byte</title></rect>"
            f'<text x="{x + _CELL_W / 2}" y="{y + _CELL_H / 2}" text-anchor="middle" '
            f'dominant-baseline="middle" font-size="11" pointer-events="none">{value:.3f}</text>'
        )
    return "".join(out)


def heatmap_legend(limit: float, *, element_id: str = "matrix-legend", steps: int = 9) -> Markup:
    """The colour scale from ``-limit`` (better) to ``+limit`` (worse), with numbers."""
    width, bar_y, box = 460, 22, 40
    out = [
        f'<svg id="{escape(element_id)}" class="legend" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} 70" width="{width}" height="70" role="img" '
        f'aria-label="colour scale: change of bits per byte against the base">'
        f'<text x="10" y="12" font-size="11">better than the base</text>'
        f'<text x="{10 + box * steps}" y="12" font-size="11" text-anchor="end">'
        "worse than the base</text>"
    ]
    for i in range(steps):
        change = -limit + 2 * limit * i / (steps - 1)
        x = 10 + box * i
        out.append(
            f'<rect x="{x}" y="{bar_y}" width="{box}" height="16" '
            f'fill="{colour_for(change, limit)}" stroke="#dde2ea"/>'
        )
        if i % 2 == 0:
            label = f"{change * 100:+.1f}".removesuffix(".0").replace("-", "−") + "%"
            label = label if change else "0%"
            out.append(
                f'<text x="{x + box / 2}" y="{bar_y + 30}" font-size="11" '
                f'text-anchor="middle">{label}</text>'
            )
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 (numbers only)
