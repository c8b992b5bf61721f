"""Pictures of similarity grids (needs matplotlib: ``pip install "jaxsim[plot]"``).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global
backend state); save it with ``fig.savefig("grid.png")`` (or ``.pdf``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxsim.grid import Grid


def _figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError('jaxsim.plot needs matplotlib: pip install "jaxsim[plot]"') from None
    return Figure(figsize=figsize, layout="constrained")


def _draw(ax: Any, grid: Grid, vmin: float, vmax: float, cmap: str, annotate: bool | None,
          labels: bool) -> Any:
    values = grid.to_numpy()
    image = ax.imshow(values, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax,
                      aspect="auto", interpolation="nearest")
    rows, cols = values.shape
    if labels:
        ax.set_yticks(range(rows), grid.rows, fontsize=7 if rows > 12 else 9)
        ax.set_xticks(range(cols), grid.cols, rotation=90, fontsize=7 if cols > 12 else 9)
    if annotate is None:
        annotate = rows * cols <= 144
    if annotate:
        mid = (vmin + vmax) / 2
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if values[i, j] > mid else "white")
    return image


def heatmap(grid: Grid, *, title: str | None = None, vmin: float = 0.0, vmax: float = 1.0,
            cmap: str = "magma", annotate: bool | None = None, colorbar: bool = True,
            xlabel: str | None = None, ylabel: str | None = None,
            figsize: tuple[float, float] | None = None) -> Any:
    """A grid as a heatmap: row layers on the y axis, column layers on the x axis, layer 0
    at the bottom-left as in Kornblith et al. and Nguyen et al.

    Args:
      grid: from :func:`jaxsim.similarity_grid` or :func:`jaxsim.minibatch_cka_result`.
      title: defaults to the metric's name.
      vmin, vmax: colour scale.
      annotate: write each value in its cell (default: grids of at most 12 x 12).
    Returns:
      A matplotlib Figure.
    """
    rows, cols = grid.shape
    fig = _figure(figsize or (max(3.5, 0.35 * cols + 2), max(3.0, 0.35 * rows + 1.5)))
    ax = fig.add_subplot()
    image = _draw(ax, grid, vmin, vmax, cmap, annotate, labels=True)
    ax.set_title(title if title is not None else grid.metric)
    ax.set_xlabel(xlabel or "layer")
    ax.set_ylabel(ylabel or "layer")
    if colorbar:
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def heatmap_panel(grids: Mapping[str, Grid], *, shape: tuple[int, int] | None = None,
                  title: str | None = None, vmin: float = 0.0, vmax: float = 1.0,
                  cmap: str = "magma", panel_size: float = 2.4) -> Any:
    """Several grids side by side on one colour scale (e.g. depth x width, as in Nguyen et
    al. 2020's figures); ``grids`` maps panel titles to grids, filled row by row."""
    count = len(grids)
    nrows, ncols = shape or (1, count)
    if nrows * ncols < count:
        raise ValueError(f"shape: {nrows} x {ncols} panels cannot hold {count} grids")
    fig = _figure((panel_size * ncols + 1, panel_size * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax, (name, grid) in zip(axes.flat, grids.items()):
        image = _draw(ax, grid, vmin, vmax, cmap, annotate=False, labels=False)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def alignment(grid: Grid, *, top_k: int | None = 3, threshold: float | None = None,
              title: str | None = None, figsize: tuple[float, float] | None = None) -> Any:
    """Two columns of layers (rows on the left, columns on the right) joined by lines whose
    width and opacity grow with similarity, as lucid's model-alignment picture.

    Args:
      grid: any grid; values are taken as similarities in [0, 1].
      top_k: for each left layer, draw only its ``top_k`` most similar right layers
        (None: all).
      threshold: draw only pairs at least this similar.
    Returns:
      A matplotlib Figure.
    """
    values = np.clip(grid.to_numpy(), 0, 1)
    rows, cols = values.shape
    height = max(rows, cols)
    fig = _figure(figsize or (5, max(3, 0.3 * height + 1)))
    ax = fig.add_subplot()
    y_left = np.linspace(height - 1, 0, rows) if rows > 1 else np.array([height / 2])
    y_right = np.linspace(height - 1, 0, cols) if cols > 1 else np.array([height / 2])
    for i in range(rows):
        order = np.argsort(-values[i])
        keep = order if top_k is None else order[:top_k]
        for j in keep:
            v = values[i, j]
            if threshold is not None and v < threshold:
                continue
            ax.plot([0, 1], [y_left[i], y_right[j]], color="tab:blue", linewidth=0.5 + 4 * v,
                    alpha=0.15 + 0.85 * v, solid_capstyle="round")
    for y, name in zip(y_left, grid.rows):
        ax.text(-0.03, y, name, ha="right", va="center", fontsize=8)
    for y, name in zip(y_right, grid.cols):
        ax.text(1.03, y, name, ha="left", va="center", fontsize=8)
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(-1, height)
    ax.axis("off")
    ax.set_title(title if title is not None else f"{grid.metric} alignment")
    return fig


def line(xs: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str,
         ylabel: str, title: str = "", logx: bool = False, dashed: Sequence[str] = ()) -> Any:
    """A small line plot of named series (used by the experiment scripts); the series named
    in ``dashed`` (baselines) are drawn dashed."""
    fig = _figure((5, 3.5))
    ax = fig.add_subplot()
    xs = list(xs)
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", markersize=3 if len(xs) > 20 else 5, label=name,
                linestyle="--" if name in dashed else "-")
    if logx:
        ax.set_xscale("log")
    elif len(xs) <= 12 and all(float(x).is_integer() for x in xs):
        ax.set_xticks(xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
