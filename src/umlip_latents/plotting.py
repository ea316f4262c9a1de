"""Figures shared by the notebooks, sized to be read on the built book's pages.

The book's text column is about :data:`PAGE_WIDTH_PX` pixels wide, so a figure
:data:`FIGURE_WIDTH_IN` inches wide at :data:`FIGURE_DPI` is shown close to 1:1 and every
text in it is at least :data:`MIN_TEXT_PX` pixels tall on the page. Figures carry no
provenance in their titles: the notebook that made a figure is named in its caption.
"""

from __future__ import annotations

import math

import numpy as np

#: width in pixels of the book's text column (at a 1400 px browser window)
PAGE_WIDTH_PX = 800
#: resolution of the figures made here (the inline backend saves at the figure's dpi)
FIGURE_DPI = 100
#: width of a page-wide figure: 780 px at :data:`FIGURE_DPI`, shown unscaled in the column
FIGURE_WIDTH_IN = 7.8
#: smallest text height, in pixels on the page, of any label or annotation
MIN_TEXT_PX = 10

#: display names of the metrics of :func:`umlip_latents.metrics.reconstruction_matrix`
METRIC_LABELS = {"gfre": "GFRE", "gfrd": "GFRD", "lfre": "LFRE", "lfre_min_d": "LFRE, k = min(D)", "cka": "CKA",
                 "nonlinear_gfre": "nonlinear GFRE"}

_LABEL_PT = 10.0  # tick and axis labels, before the page-size floor
_MAX_ANNOTATION_PT = 11.0
_CBAR_IN = 1.05  # colour bar, its ticks and its label
_ABOVE_ONE = ("Reds", 0.35, 0.9)  # colour ramp of values above 1 (cmap, first, last)


def min_font_points(fig) -> float:
    """Smallest font size (points) whose text is :data:`MIN_TEXT_PX` tall once ``fig`` is on the page.

    A figure wider than :data:`PAGE_WIDTH_PX` is scaled down by the browser, so its fonts
    must be larger in proportion.
    """
    width_px = fig.get_figwidth() * fig.dpi
    shown = min(1.0, PAGE_WIDTH_PX / width_px)
    return math.ceil(MIN_TEXT_PX * 72 / (fig.dpi * shown) * 4) / 4  # rounded up to 0.25 pt


def _grids(matrix, metric: str, order):
    """Value and interval half-width grids, rows = source, columns = target, in ``order``."""
    m = matrix[matrix.metric == metric]
    if m.empty:
        raise ValueError(f"no rows with metric {metric!r}; the table has {sorted(set(matrix.metric))}")
    names = list(order) if order else list(dict.fromkeys([*m.source, *m.target]))

    def grid(column):
        return m.pivot(index="source", columns="target", values=column).reindex(index=names, columns=names)

    values = grid("value").to_numpy(float)
    half = np.full_like(values, np.nan)
    if {"ci_low", "ci_high"} <= set(m.columns):
        half = (grid("ci_high").to_numpy(float) - grid("ci_low").to_numpy(float)) / 2
    return names, values, half


def _colours(values):
    """Colour map and norm: viridis over [min(0, data), 1], a red ramp above 1 up to the maximum.

    The norm is linear, so the colour bar shows every value at its true position; the two
    ramps meet exactly at 1.0 and a value of exactly 1.0 is still drawn in viridis.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, Normalize

    finite = values[np.isfinite(values)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    base = plt.get_cmap("viridis")
    if hi <= 1.0:
        cmap, norm = base, Normalize(lo, 1.0)
    else:
        per_unit = 256 if hi - lo <= 16 else max(16, 4096 // math.ceil(hi - lo))
        n_low = max(2, round(per_unit * (1.0 - lo)))
        n_high = max(2, math.ceil(per_unit * (hi - 1.0)))
        name, first, last = _ABOVE_ONE
        low = base(np.linspace(0, 1, n_low))
        high = plt.get_cmap(name)(np.linspace(first, last, n_high))
        cmap = ListedColormap(np.vstack([low, high]), name="viridis_above_one")
        top = 1.0 + n_high / per_unit
        # the tiny margin puts 1.0 itself in the last viridis bin (bins are closed on the left)
        norm = Normalize(1.0 - n_low / per_unit, top + 1e-9 * (top - lo))
    return cmap.with_extremes(bad="0.85"), norm


def _relative_luminance(rgba) -> float:
    """WCAG relative luminance of an sRGB colour."""
    c = np.asarray(rgba[:3], float)
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(c @ [0.2126, 0.7152, 0.0722])


def text_colour(rgba) -> str:
    """``"black"`` or ``"white"``, whichever contrasts more with a cell of colour ``rgba``."""
    lum = _relative_luminance(rgba)
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def cell_text(value: float, half_width: float = np.nan) -> str:
    """Annotation of one cell: the value to 2 decimals and, if known, ``±`` the interval half-width."""
    if not np.isfinite(value):
        return "–"
    text = f"{value:.2f}"
    if text == "-0.00":
        text = "0.00"
    if np.isfinite(half_width):
        text += f"\n±{half_width:.2f}"
    return text


def _text_width_in(text: str, points: float, weight: str = "normal") -> float:
    """Width in inches of the widest line of ``text`` in the default font at ``points``."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    font = FontProperties(size=points, weight=weight)
    return max(TextToPath().get_text_width_height_descent(line, font, ismath=False)[0]
               for line in str(text).split("\n")) / 72


def _page_size(n: int, label_in: float) -> tuple[float, float]:
    """Figure (width, height) in inches: at most page width, about square cells up to 1 in."""
    y_labels = label_in + 0.4  # tick labels, axis label, pads
    x_labels = label_in * math.sin(math.radians(45)) + 0.45
    cell = min(1.0, (FIGURE_WIDTH_IN - y_labels - _CBAR_IN) / n)
    return min(FIGURE_WIDTH_IN, y_labels + n * cell + _CBAR_IN), n * cell + x_labels + 0.45


def _ticks(lo: float, top: float) -> list[float]:
    """Colour-bar ticks over [lo, top] that always include 1.0 when the bar goes past 1."""
    from matplotlib.ticker import MaxNLocator

    ticks = [t for t in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, top) if lo - 1e-9 <= t <= top + 1e-9]
    if top > 1.0:
        ticks = [t for t in ticks if abs(t - 1.0) > 0.08 * (top - lo)] + [1.0]
    return sorted(ticks)


def _fit_annotations(ax, texts, n: int, floor: float) -> None:
    """Largest annotation font (at most 11 pt, at least ``floor``) that fits the cells once laid out."""
    fig = ax.figure
    fig.draw_without_rendering()  # runs the layout engine, so the axes have their final size
    box = ax.get_window_extent()
    cell_w, cell_h = box.width / fig.dpi / n, box.height / fig.dpi / n
    per_point = max(_text_width_in(t.get_text(), 1.0, t.get_fontweight()) for t in texts)
    lines = max(t.get_text().count("\n") + 1 for t in texts)
    fit = min(0.8 * cell_w / per_point, 0.8 * cell_h * 72 / (1.3 * lines))
    size = max(floor, min(_MAX_ANNOTATION_PT, math.floor(fit * 4) / 4))
    for t in texts:
        t.set_fontsize(size)


def matrix_heatmap(matrix, metric: str, ax=None, *, order: list | None = None, title: str | None = None):
    """Annotated heatmap of one metric of a tidy reconstruction table, one matrix per figure.

    Rows are the source model (it reconstructs), columns the target (it is reconstructed).
    Every cell shows its value to two decimals and, when the table has bootstrap intervals,
    ``±`` half the width of the 95% interval below it. The colours are viridis over
    [0, 1]; when a value exceeds 1 the colour bar extends to the largest value with a red
    ramp above a marked 1.0 tick, and such cells are annotated in bold. Missing pairs are
    grey with "–".

    Parameters
    ----------
    matrix : pandas.DataFrame
        The table of :func:`umlip_latents.metrics.reconstruction_matrix`: columns ``source,
        target, metric, value`` and optionally ``ci_low, ci_high``.
    metric : str
        The metric to draw (one of the table's ``metric`` values).
    ax : matplotlib.axes.Axes, optional
        Axes to draw into. By default a new figure at most page wide (:data:`FIGURE_WIDTH_IN`
        in at :data:`FIGURE_DPI` dpi; narrower for a few models) is made. Fonts never go below :func:`min_font_points` of the
        figure and annotations are sized to the laid-out cells, but a figure that holds several
        matrices leaves less room per cell.
    order : list of str, optional
        Model order of rows and columns; default the table's order.
    title : str, optional
        Axes title; default the metric's name (e.g. ``"GFRE"``), ``""`` for none. Name the
        notebook in the caption, not here.

    Returns
    -------
    matplotlib.axes.Axes
        The heatmap's axes (the figure is ``ax.figure``; the colour bar ``ax.images[0].colorbar``).
    """
    import matplotlib.pyplot as plt

    names, values, half = _grids(matrix, metric, order)
    n = len(names)
    label = METRIC_LABELS.get(metric, metric.upper())
    if ax is None:
        size = _page_size(n, max(_text_width_in(name, _LABEL_PT) for name in names))
        _, ax = plt.subplots(figsize=size, dpi=FIGURE_DPI, layout="constrained")
    fig = ax.figure
    floor = min_font_points(fig)
    label_pt = max(_LABEL_PT, floor)

    cmap, norm = _colours(values)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    texts = []
    for i in range(n):
        for j in range(n):
            v = values[i, j]
            colour = text_colour(cmap(norm(v)) if np.isfinite(v) else cmap.get_bad())
            texts.append(ax.text(j, i, cell_text(v, half[i, j]), ha="center", va="center", color=colour,
                                 fontweight="bold" if v > 1 else "normal", linespacing=1.1))
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=label_pt)
    ax.set_yticks(range(n), names, fontsize=label_pt)
    ax.set_xlabel("target (reconstructed)", fontsize=label_pt)
    ax.set_ylabel("source (reconstructs)", fontsize=label_pt)
    ax.tick_params(length=0)
    ax.set_title(label if title is None else title, fontsize=label_pt + 2)

    cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    lo, top = norm.vmin, norm.vmax
    cbar.set_ticks(_ticks(lo, top))
    cbar.ax.tick_params(labelsize=label_pt)
    if top > 1.0:
        cbar.ax.axhline(1.0, color="black", linewidth=1.5)
        cbar.set_label(f"{label} (red: above 1)", fontsize=label_pt)
    else:
        cbar.set_label(label, fontsize=label_pt)
    _fit_annotations(ax, texts, n, floor)
    return ax


def heatmap_alt_text(matrix, metric: str, order: list | None = None) -> str:
    """One or two sentences that describe :func:`matrix_heatmap` of the same table, for image alt text.

    Names the matrix size and the smallest and largest off-diagonal values with their
    source → target pairs, and how many cells exceed 1.
    """
    names, values, _ = _grids(matrix, metric, order)
    n = len(names)
    label = METRIC_LABELS.get(metric, metric.upper())
    head = f"{label} heatmap of {n} × {n} models, each row's model reconstructing each column's"
    off = ~np.eye(n, dtype=bool) & np.isfinite(values)
    if not off.any():
        return head + "; no off-diagonal values."
    masked = np.where(off, values, np.nan)
    i_min, j_min = np.unravel_index(np.nanargmin(masked), values.shape)
    i_max, j_max = np.unravel_index(np.nanargmax(masked), values.shape)
    above = int(np.sum(values[np.isfinite(values)] > 1))
    text = (f"{head}. Off-diagonal values range from {values[i_min, j_min]:.2f} "
            f"({names[i_min]} → {names[j_min]}) to {values[i_max, j_max]:.2f} ({names[i_max]} → {names[j_max]})")
    if above:
        text += f"; {above} cell{'s' if above > 1 else ''} {'are' if above > 1 else 'is'} above 1"
    return text + "."
