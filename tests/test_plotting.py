"""The reconstruction heatmap reads at page width: annotated cells, legible fonts, values above 1 visible."""

from __future__ import annotations

import inspect
import re

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from umlip_latents import plotting
from umlip_latents.plotting import PAGE_WIDTH_PX, heatmap_alt_text, matrix_heatmap

LONG_NAMES = ["mace-mp-0a-medium", "mace-off23-large", "orb-v3-conservative-inf-omat", "chgnet-0.3.0",
              "mattersim-v1.0.0-5m", "dpa-3.1-3m-omat24", "pet-mad", "uma-s-1p1"]


@pytest.fixture(autouse=True)
def _agg_backend():
    """Draw off-screen and close what each test opened."""
    plt.switch_backend("Agg")
    yield
    plt.close("all")


def table(values, names=None, half=None, metric="gfre"):
    """Tidy table as made by ``reconstruction_matrix``: rows of ``values`` are sources, columns targets."""
    values = np.asarray(values, float)
    names = names or [f"model-{i}" for i in range(len(values))]
    rows = []
    for i, s in enumerate(names):
        for j, t in enumerate(names):
            h = np.nan if half is None else half[i][j]
            rows.append({"source": s, "target": t, "metric": metric, "value": values[i, j],
                         "ci_low": values[i, j] - h, "ci_high": values[i, j] + h})
    return pd.DataFrame(rows, columns=["source", "target", "metric", "value", "ci_low", "ci_high"])


def spread(n, seed=0, high=None):
    """An ``n`` x ``n`` matrix with zeros on the diagonal and, optionally, one value ``high`` off it."""
    values = np.random.default_rng(seed).uniform(0.05, 0.95, (n, n))
    np.fill_diagonal(values, 0.0)
    if high is not None:
        values[0, 1] = high
    return values


def annotations(ax):
    """Cell texts as a grid, read back from the axes (row = source, column = target)."""
    n = len(ax.get_yticks())
    grid = [[None] * n for _ in range(n)]
    for t in ax.texts:
        x, y = t.get_position()
        grid[round(y)][round(x)] = t
    return grid


def page_px(text, fig):
    """Height in pixels on the book's page of a text of the figure (wide figures are scaled down)."""
    width_px = fig.get_figwidth() * fig.dpi
    return text.get_fontsize() * fig.dpi / 72 * min(1.0, PAGE_WIDTH_PX / width_px)


def colourbar(ax):
    return ax.images[0].colorbar


def test_cells_show_rounded_values_and_interval_half_widths():
    values = [[0.0, 0.634, 0.1049], [0.2961, 0.0, 0.997], [1.3, 0.5, 0.004]]
    half = [[0.001, 0.0213, 0.05], [0.0149, 0.0, 0.1], [0.2, 0.03, 0.0]]
    ax = matrix_heatmap(table(values, half=half), "gfre")
    got = [[t.get_text() for t in row] for row in annotations(ax)]
    assert got == [["0.00\n±0.00", "0.63\n±0.02", "0.10\n±0.05"],
                   ["0.30\n±0.01", "0.00\n±0.00", "1.00\n±0.10"],
                   ["1.30\n±0.20", "0.50\n±0.03", "0.00\n±0.00"]]


def test_cells_without_intervals_show_only_the_value():
    values = [[0.0, 0.634], [0.2961, -0.0001]]
    for m in (table(values), table(values).drop(columns=["ci_low", "ci_high"])):
        ax = matrix_heatmap(m, "gfre")
        assert [[t.get_text() for t in row] for row in annotations(ax)] == [["0.00", "0.63"], ["0.30", "0.00"]]


def test_values_above_one_extend_the_colour_bar_in_a_distinct_colour():
    values = spread(4, high=1.3)
    values[2, 3] = 1.0
    ax = matrix_heatmap(table(values), "gfre")
    im, cbar = ax.images[0], colourbar(ax)
    assert cbar.vmax >= 1.3 and cbar.ax.get_ylim()[1] >= 1.3
    assert 1.0 in [round(t, 9) for t in cbar.get_ticks()]
    at_one, above = im.to_rgba(1.0)[:3], im.to_rgba(1.3)[:3]
    assert np.abs(np.subtract(at_one, above)).max() > 0.3
    # 1.0 itself keeps the top colour of the 0-1 scale; just above 1 already changes colour
    assert np.allclose(at_one, plt.get_cmap("viridis")(1.0)[:3], atol=0.02)
    assert np.abs(np.subtract(at_one, im.to_rgba(1.01)[:3])).max() > 0.3


def test_colour_bar_is_zero_to_one_when_no_value_exceeds_one():
    ax = matrix_heatmap(table(spread(5)), "gfre")
    cbar = colourbar(ax)
    assert (cbar.vmin, cbar.vmax) == (0.0, 1.0)


@pytest.mark.parametrize("n", [2, 8, 12])
def test_fonts_are_at_least_10_px_on_the_page(n):
    names = (LONG_NAMES * 2)[:n]
    half = np.full((n, n), 0.02)
    ax = matrix_heatmap(table(spread(n, high=1.3), names=[f"{m}-{i}" for i, m in enumerate(names)], half=half),
                        "gfre")
    fig = ax.figure
    assert fig.get_figwidth() <= 8.0
    cbar_ax = colourbar(ax).ax
    texts = [*ax.texts, *ax.get_xticklabels(), *ax.get_yticklabels(), *cbar_ax.get_yticklabels(),
             ax.xaxis.label, ax.yaxis.label, cbar_ax.yaxis.label, ax.title]
    assert len(ax.texts) == n * n
    small = {t.get_text(): page_px(t, fig) for t in texts if t.get_text() and page_px(t, fig) < 10}
    assert not small


def test_fonts_grow_when_the_figure_is_wider_than_the_page():
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), dpi=100)
    ax = matrix_heatmap(table(spread(3), metric="lfre"), "lfre", ax=axes[1])
    assert ax is axes[1]
    assert all(page_px(t, fig) >= 10 for t in [*ax.texts, *ax.get_xticklabels(), *ax.get_yticklabels()])


def test_long_model_names_stay_inside_the_figure():
    ax = matrix_heatmap(table(spread(8), names=LONG_NAMES), "gfre")
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = fig.bbox.expanded(1.001, 1.001)
    for t in [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label]:
        box = t.get_window_extent(renderer)
        assert inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1), t.get_text()
    assert all(label.get_rotation() > 0 for label in ax.get_xticklabels())


def test_annotation_colour_contrasts_with_its_cell():
    ax = matrix_heatmap(table(spread(8, seed=3, high=2.5)), "gfre")
    im = ax.images[0]
    lum = plotting._relative_luminance
    for i, row in enumerate(annotations(ax)):
        for j, t in enumerate(row):
            cell = lum(im.to_rgba(im.get_array()[i, j]))
            text = lum(matplotlib.colors.to_rgba(t.get_color()))
            ratio = (max(cell, text) + 0.05) / (min(cell, text) + 0.05)
            assert ratio >= 4.5, (t.get_text(), ratio)


def test_titles_carry_no_provenance():
    assert "notebook" not in inspect.signature(matrix_heatmap).parameters
    ax = matrix_heatmap(table(spread(3)), "gfre")
    fig = ax.figure
    titles = [a.get_title(loc) for a in fig.axes for loc in ("left", "center", "right")]
    titles.append(fig.get_suptitle())
    assert not any("notebook" in t.lower() for t in titles)
    assert ax.get_title() == "GFRE"
    assert matrix_heatmap(table(spread(3)), "gfre", title="").get_title() == ""


def test_draws_one_metric_in_the_given_order():
    m = pd.concat([table(spread(3), names=["a", "b", "c"]), table(spread(3, seed=1), names=["a", "b", "c"], metric="lfre")])
    ax = matrix_heatmap(m, "lfre", order=["c", "a", "b"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["c", "a", "b"]
    assert annotations(ax)[1][2].get_text() == f"{spread(3, seed=1)[0, 1]:.2f}"
    with pytest.raises(ValueError, match="metric"):
        matrix_heatmap(m, "cka")


def test_missing_pairs_are_marked():
    m = table(spread(3)).iloc[1:]  # drop model-0 -> model-0
    ax = matrix_heatmap(m, "gfre")
    assert annotations(ax)[0][0].get_text() == "–"


def test_rendering_is_deterministic(tmp_path):
    pngs = []
    for k in range(2):
        ax = matrix_heatmap(table(spread(4, high=1.3), half=np.full((4, 4), 0.02)), "gfre")
        ax.figure.savefig(tmp_path / f"{k}.png", dpi=ax.figure.dpi)
        pngs.append((tmp_path / f"{k}.png").read_bytes())
    assert pngs[0] == pngs[1]


def test_alt_text_names_size_extremes_and_cells_above_one():
    values = np.array([[0.0, 0.4, 1.3], [0.12, 0.0, 0.5], [0.9, 0.7, 0.0]])
    text = heatmap_alt_text(table(values, names=["a", "b", "c"]), "gfre")
    assert "GFRE" in text and "3 × 3" in text
    assert "0.12 (b → a)" in text and "1.30 (a → c)" in text
    assert "1 cell is above 1" in text
    assert "above 1" not in heatmap_alt_text(table(spread(3)), "gfre")
    assert len(re.findall(r"\.(?:\s|$)", text)) <= 2  # at most two sentences
