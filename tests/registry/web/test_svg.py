"""The server-side charts (registry/web/svg.py): escaped labels, scales that cover the
data, colours that say better or worse, and empty data drawn as such."""

from __future__ import annotations

import datetime as dt
import itertools
import xml.etree.ElementTree as ET

import pytest

from registry.web import svg

SVG = "{http://www.w3.org/2000/svg}"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def parse(markup: str) -> ET.Element:
    return ET.fromstring(str(markup))


def series(name: str, values: list[float], baseline: float | None = None) -> svg.Series:
    points = [
        svg.Point(at=T0 + dt.timedelta(days=i), value=v, label=f"{name}: {v:.4f}")
        for i, v in enumerate(values)
    ]
    return svg.Series(name=name, points=points, baseline=baseline)


def test_labels_and_titles_are_escaped() -> None:
    hostile = '<script>alert(1)</script>"&'
    chart = svg.line_chart([series(hostile, [1.0, 2.0])])
    assert "<script>" not in chart
    tree = parse(chart)  # well-formed: the quote and ampersand are escaped too
    group = next(g for g in tree.iter(f"{SVG}g") if g.get("data-text-set"))
    assert group.get("data-text-set") == hostile
    heat = svg.heatmap(
        rows=[("e1", hostile)],
        columns=[("e1", hostile)],
        cells={("e1", "e1"): svg.HeatCell(1.0, -0.1, '/x?a=1&b="2"', hostile)},
        base_row={"e1": 1.1},
    )
    assert "<script>" not in heat
    cell = next(r for r in parse(heat).iter(f"{SVG}rect") if r.get("class") == "cell")
    assert "".join(cell.itertext()) == hostile
    assert "<script>" not in svg.heatmap_legend(0.1)


def test_the_chart_draws_one_polyline_per_series_inside_its_axes() -> None:
    chart = parse(svg.line_chart([series("a", [1.2, 1.0, 1.4], baseline=1.5), series("b", [2.0])]))
    lines = list(chart.iter(f"{SVG}polyline"))
    assert len(lines) == 2
    ys = [float(p.split(",")[1]) for p in lines[0].get("points", "").split()]
    assert len(ys) == 3
    assert ys[1] > ys[0] > ys[2]  # lower bits per byte is drawn lower (larger y)
    tick_labels = [
        float("".join(t.itertext()))
        for g in chart.iter(f"{SVG}g")
        if g.get("class") == "tick y"
        for t in g.iter(f"{SVG}text")
    ]
    assert min(tick_labels) <= 1.0
    assert max(tick_labels) >= 2.0  # the axis covers every value and the baseline
    dashed = [ln for ln in chart.iter(f"{SVG}line") if ln.get("class") == "baseline"]
    assert len(dashed) == 1
    assert dashed[0].get("stroke-dasharray")


def test_empty_data_is_a_chart_that_says_so() -> None:
    chart = parse(svg.line_chart([series("a", [])]))
    assert list(chart.iter(f"{SVG}polyline")) == []
    assert "no evaluations yet" in "".join(chart.itertext())
    heat = parse(svg.heatmap(rows=[("e", "E")], columns=[("e", "E")], cells={}, base_row={}))
    rects = list(heat.iter(f"{SVG}rect"))
    assert [r.get("class") for r in rects] == ["empty"]
    assert rects[0].get("data-value") is None
    assert list(heat.iter(f"{SVG}a")) == []
    queued = parse(
        svg.heatmap(
            rows=[("e", "E")], columns=[("e", "E")], cells={}, base_row={}, pending={("e", "e")}
        )
    )
    rect = next(queued.iter(f"{SVG}rect"))
    assert rect.get("class") == "empty pending"
    assert "queued" in "".join(rect.itertext())


@pytest.mark.parametrize(
    ("low", "high"), [(1.0, 2.0), (0.91, 0.93), (3.0, 3.0), (0.0, 1234.5), (-2.0, 5.0)]
)
def test_ticks_are_round_and_cover_the_range(low: float, high: float) -> None:
    ticks = svg.nice_ticks(low, high)
    assert ticks[0] <= low
    assert ticks[-1] >= high
    assert 2 <= len(ticks) <= 12
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1


def test_colours_diverge_from_white_by_sign_and_size() -> None:
    assert svg.colour_for(0.0, 0.1) == "#f6f6f6"
    better, much_better = svg.colour_for(-0.02, 0.1), svg.colour_for(-0.1, 0.1)
    worse = svg.colour_for(0.1, 0.1)
    assert much_better == "#2457c5"  # the full hue at the scale's end
    assert worse == "#b3261e"
    assert svg.colour_for(-5.0, 0.1) == much_better  # clamped
    r, _, b = (int(better[i : i + 2], 16) for i in (1, 3, 5))
    assert b > r  # towards blue, not yet all the way
    assert svg.colour_for(None, 0.1) == "#f6f6f6"
    assert svg.change_limit([-0.03, 0.01]) == 0.05
    assert svg.change_limit([-0.3]) == 0.5
    assert svg.change_limit([]) == 0.05


def test_a_filled_cell_links_and_carries_its_value() -> None:
    heat = parse(
        svg.heatmap(
            rows=[("e1", "One"), ("e2", "Two")],
            columns=[("e1", "One"), ("e2", "Two")],
            cells={("e1", "e2"): svg.HeatCell(1.23456, -0.2, "/experts/e1#evaluation-7", "t")},
            base_row={"e2": 1.5},
        )
    )
    links = list(heat.iter(f"{SVG}a"))
    assert [a.get("href") for a in links] == ["/experts/e1#evaluation-7"]
    cell = links[0].find(f"{SVG}rect")
    assert cell is not None
    assert (cell.get("data-expert-id"), cell.get("data-text-set"), cell.get("data-value")) == (
        "e1",
        "e2",
        "1.2346",
    )
    assert len([r for r in heat.iter(f"{SVG}rect") if r.get("class") == "empty"]) == 3
    base = [r for r in heat.iter(f"{SVG}rect") if r.get("class") == "base-cell"]
    assert [b.get("data-base-value") for b in base] == ["1.5000"]
    legend = parse(svg.heatmap_legend(0.2))
    assert legend.get("id") == "matrix-legend"
    texts = ["".join(t.itertext()) for t in legend.iter(f"{SVG}text")]
    assert "−20%" in texts
    assert "+20%" in texts
