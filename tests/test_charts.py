"""The report's SVG charts: valid XML, points where the data puts them, gaps where it has none."""

from xml.etree import ElementTree

import pytest

from transferkit.evaluation.charts import BOTTOM, LEFT, RIGHT, TOP, Series, chart, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize(
    "lo, hi, integer, want",
    [
        (0.0, 1.0, False, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0.5, 10.5, True, [2, 4, 6, 8, 10]),
        (0.5, 3.5, True, [1, 2, 3]),
        (0.2927, 0.4622, False, [0.3, 0.35, 0.4, 0.45]),
        (3.0, 3.0, False, [2.6, 2.8, 3.0, 3.2, 3.4]),  # one value: a unit range around it
    ],
)
def test_ticks_are_round_and_cover_the_range(lo, hi, integer, want):
    assert nice_ticks(lo, hi, integer=integer) == pytest.approx(want)


def _points(polyline) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]


def test_points_land_where_the_data_puts_them_and_gaps_split_the_line():
    size = (400, 300)
    svg = ElementTree.fromstring(
        chart(
            [Series("val", [1, 2, 3, 4], [0.0, 1.0, None, 0.5])],
            "epoch",
            "accuracy",
            xlim=(1, 4),
            ylim=(0, 1),
            size=size,
        )
    )
    lines = svg.findall(f"{SVG}g[@class='series']/{SVG}polyline")
    assert len(lines) == 2  # the None splits the line in two
    (x1, y1), (x2, y2) = _points(lines[0])
    plot_w, plot_h = size[0] - LEFT - RIGHT, size[1] - TOP - BOTTOM
    assert (x1, y1) == pytest.approx((LEFT, TOP + plot_h), abs=0.1)  # (1, 0): bottom left
    assert (x2, y2) == pytest.approx((LEFT + plot_w / 3, TOP), abs=0.1)  # (2, 1): a third across, at the top
    assert _points(lines[1]) == [pytest.approx((LEFT + plot_w, TOP + plot_h / 2), abs=0.1)]
    assert len(svg.findall(f"{SVG}g[@class='series']/{SVG}circle")) == 3  # markers only where there is data


def test_bands_legend_and_labels_escape_their_text():
    svg = chart(
        [Series("<train>", [1, 2], [1.0, 2.0]), Series("ref", [1, 2], [1, 2], "dashed")],
        "epoch",
        "a & b",
        bands=[(0.5, 1.5, "probe"), (1.5, 2.5, "fine-tune")],
        integer_x=True,
    )
    root = ElementTree.fromstring(svg)  # would raise on an unescaped < or &
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert {"probe", "fine-tune", "<train>", "ref", "a & b", "epoch"} <= set(texts)
    assert len(root.findall(f"{SVG}rect[@class='band']")) == 2
    assert root.find(f"{SVG}g[@data-name='ref']/{SVG}polyline").get("stroke-dasharray")
    assert not root.findall(f"{SVG}g[@data-name='ref']/{SVG}circle")  # a reference line has no markers


def test_a_scatter_draws_one_dot_per_point_and_no_line():
    root = ElementTree.fromstring(
        chart([Series("source", [0.1, 0.5, 0.9], [1.0, -1.0, 0.0], "points")], "PC 1", "PC 2")
    )
    assert len(root.findall(f"{SVG}g/{SVG}circle")) == 3
    assert not root.findall(f"{SVG}g/{SVG}polyline")
