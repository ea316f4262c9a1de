"""Figures shared by the notebooks. Every figure says which notebook made it."""

from __future__ import annotations

import numpy as np


def matrix_heatmap(matrix, metric: str, ax=None, notebook: str = "", order: list | None = None, vmax: float = 1.0):
    """Heatmap of a tidy reconstruction table: rows = source (reconstructs), columns = target.

    Cells show the value and, when bootstrap intervals exist, the 95% interval below it.
    """
    import matplotlib.pyplot as plt

    m = matrix[matrix.metric == metric]
    names = order or list(dict.fromkeys(m.source))
    grid = m.pivot(index="source", columns="target", values="value").reindex(index=names, columns=names)
    lo = m.pivot(index="source", columns="target", values="ci_low").reindex(index=names, columns=names)
    hi = m.pivot(index="source", columns="target", values="ci_high").reindex(index=names, columns=names)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.75 * len(names), 0.6 + 0.65 * len(names)))
    im = ax.imshow(grid.to_numpy(float), vmin=0, vmax=vmax, cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            v = grid.iat[i, j]
            text = f"{v:.2f}"
            if np.isfinite(lo.iat[i, j]):
                text += f"\n[{lo.iat[i, j]:.2f},{hi.iat[i, j]:.2f}]"
            ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if v < 0.6 * vmax else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("target (reconstructed)")
    ax.set_ylabel("source (reconstructs)")
    ax.set_title(f"{metric.upper()}: source → target" + (f" ({notebook})" if notebook else ""), fontsize=9)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return ax
