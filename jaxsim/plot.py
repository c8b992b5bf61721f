"""Pictures of similarity grids (needs matplotlib: ``pip install "jaxsim[plot]"``).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global
backend state); save it with ``fig.savefig("grid.png")`` (or ``.pdf``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxsim._result import Grid, SweepGrid

# how each measure is written in titles and color bars
__all__ = ["alignment", "heatmap", "heatmap_panel", "line", "sweep_heatmap"]

NAMES = {
    "linear_cka": "linear CKA",
    "cka": "linear CKA",
    "rbf_cka": "RBF CKA",
    "minibatch_cka": "linear CKA (minibatch)",
    "mean_cca": "mean CCA",
    "svcca": "SVCCA",
    "pwcca": "PWCCA",
    "procrustes": "Procrustes similarity",
    "rsa": "RSA",
    "mutual_knn": "mutual kNN",
    "linear_predictivity": "linear predictivity (R\u00b2)",
}

_DPI = 150


def _figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError('jaxsim.plot needs matplotlib: pip install "jaxsim[plot]"') from None
    return Figure(figsize=figsize, dpi=_DPI, layout="constrained")


def measure_name(grid: Grid) -> str:
    """The grid's measure as a reader would write it ("linear CKA", "PWCCA", ...)."""
    return NAMES.get(grid.metric, grid.metric or "similarity")


def _side(label: str) -> str:
    return f"layer of {label}" if label else "layer"


def _draw(
    ax: Any, grid: Grid, vmin: float, vmax: float, cmap: str, annotate: bool | None, labels: bool
) -> Any:
    values = grid.to_numpy()
    image = ax.imshow(
        values,
        origin="lower",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
    )
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
                ax.text(
                    j,
                    i,
                    f"{values[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if values[i, j] > mid else "white",
                )
    _mark_underdetermined(ax, grid)
    return image


def _mark_underdetermined(ax: Any, grid: Grid) -> None:
    """Hatches the cells of layers that CCA saw on too few examples per unit (their values
    are inflated toward 1), with a legend saying so."""
    short_rows, short_cols = grid.underdetermined
    if not (short_rows or short_cols):
        return
    from matplotlib.patches import Rectangle

    rows, cols = grid.shape
    cells = [(i, j) for i in range(rows) for j in range(cols) if i in short_rows or j in short_cols]
    for k, (i, j) in enumerate(cells):
        ax.add_patch(
            Rectangle(
                (j - 0.5, i - 0.5),
                1,
                1,
                fill=False,
                hatch="///",
                edgecolor="0.6",
                linewidth=0,
                label="under 5 examples per unit" if k == 0 else None,
            )
        )
    ax.figure.legend(
        handles=ax.patches[-len(cells) :][:1], loc="outside lower left", fontsize=7, frameon=False
    )


def heatmap(
    grid: Grid | SweepGrid,
    *,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "magma",
    annotate: bool | None = None,
    colorbar: bool = True,
    xlabel: str | None = None,
    ylabel: str | None = None,
    figsize: tuple[float, float] | None = None,
) -> Any:
    """A grid as a heatmap: row layers on the y axis, column layers on the x axis, layer 0
    at the bottom-left as in Kornblith et al. and Nguyen et al.

    Args:
      grid: from :func:`jaxsim.similarity_grid` or :func:`jaxsim.minibatch_cka_result`;
        a :class:`jaxsim.SweepGrid` is drawn by :func:`sweep_heatmap`.
      title: default: the measure and what is compared, e.g. "linear CKA: layers of seed 0
        vs seed 1" (from the grid's metric and labels).
      vmin: the color scale's lower end.
      vmax: its upper end.
      annotate: write each value in its cell (default: grids of at most 12 x 12).
      xlabel: default "layer of <label>", from the grid's column label.
      ylabel: default "layer of <label>", from the grid's row label.
      figsize: inches; the default fits the grid and is at least 5 x 4.2 (750 x 630
        pixels at the figure's 150 dpi), legible in a paper at column width.
    Returns:
      A matplotlib Figure.
    """
    if isinstance(grid, SweepGrid):
        return sweep_heatmap(grid, title=title, vmin=vmin, vmax=vmax, cmap=cmap)
    rows, cols = grid.shape
    fig = _figure(figsize or (max(5.0, 0.32 * cols + 2.6), max(4.2, 0.32 * rows + 2.0)))
    ax = fig.add_subplot()
    image = _draw(ax, grid, vmin, vmax, cmap, annotate, labels=True)
    if title is None:
        pair = (
            grid.row_label
            if grid.row_label == grid.col_label
            else f"{grid.row_label or 'rows'} vs {grid.col_label or 'columns'}"
        )
        title = f"{measure_name(grid)} between layers" + (f" of {pair}" if pair else "")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel or _side(grid.col_label))
    ax.set_ylabel(ylabel or _side(grid.row_label))
    if colorbar:
        fig.colorbar(image, ax=ax, shrink=0.85, label=measure_name(grid))
    return fig


def sweep_heatmap(
    sweep: SweepGrid,
    *,
    models: int = 6,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "magma",
    panel_size: float = 1.7,
) -> Any:
    """A sweep as a grid of grids: panel (i, j) is model i's layers (rows, layer 0 at the
    bottom) against model j's (columns), on one color scale; the diagonal of a self-sweep
    holds each model's own grid.

    Args:
      sweep: from ``similarity_grid(..., model_axis=0)``.
      models: draw at most this many models of each side (the first ones).
      title: default: the measure and the sweep's size.
      panel_size: inches per panel.
    Returns:
      A matplotlib Figure.
    """
    m_a, m_b = min(models, len(sweep.models_a)), min(models, len(sweep.models_b))
    fig = _figure((panel_size * m_b + 1.2, panel_size * m_a + 0.8))
    axes = fig.subplots(m_a, m_b, squeeze=False)
    image = None
    for i in range(m_a):
        for j in range(m_b):
            ax = axes[m_a - 1 - i, j]  # model 0 at the bottom left, as layer 0 in a panel
            image = _draw(ax, sweep.pair(i, j), vmin, vmax, cmap, annotate=False, labels=False)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"model {sweep.models_a[i]}", fontsize=8)
            if i == 0:
                ax.set_xlabel(f"model {sweep.models_b[j]}", fontsize=8)
    name = NAMES.get(sweep.metric, sweep.metric or "similarity")
    shown = "" if (m_a, m_b) == (len(sweep.models_a), len(sweep.models_b)) else (
        f", first {m_a} x {m_b} shown"
    )  # fmt: skip
    fig.suptitle(
        title
        or f"{name}: {len(sweep.models_a)} x {len(sweep.models_b)} models, "
        f"{len(sweep.rows)} x {len(sweep.cols)} layers each{shown}",
        fontsize=10,
    )
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=name)
    return fig


def heatmap_panel(
    grids: Mapping[str, Grid],
    *,
    shape: tuple[int, int] | None = None,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "magma",
    panel_size: float = 2.4,
) -> Any:
    """Several grids side by side on one color scale (e.g. depth x width, as in Nguyen et
    al. 2020's figures); ``grids`` maps panel titles to grids, filled row by row. The
    color bar is labelled with the first grid's measure."""
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
        fig.colorbar(image, ax=axes, shrink=0.8, label=measure_name(next(iter(grids.values()))))
    if title:
        fig.suptitle(title)
    return fig


def alignment(
    grid: Grid,
    *,
    top_k: int | None = 3,
    threshold: float | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    figsize: tuple[float, float] | None = None,
) -> Any:
    """Two columns of layers (rows on the left, columns on the right) joined by lines whose
    width and color grow with similarity, as lucid's model-alignment picture.

    Each left layer is joined to its ``top_k`` most similar right layers, and each right
    layer to its most similar left layer, so no layer is left without a line. Widths and
    colors span the range of the values drawn (a color bar shows the scale), so 0.6 and
    0.98 look different.

    Args:
      grid: any grid; values are taken as similarities (larger: more similar).
      top_k: lines per left layer (None: all pairs).
      threshold: draw only pairs at least this similar (may leave layers unjoined).
      title: default: the measure and the two labels.
      cmap: color map of the lines.
    Returns:
      A matplotlib Figure.
    """
    import matplotlib
    from matplotlib import cm, colors

    values = grid.to_numpy()
    rows, cols = values.shape
    pairs: set[tuple[int, int]] = set()
    for i in range(rows):
        order = np.argsort(-values[i], kind="stable")
        pairs.update((i, int(j)) for j in (order if top_k is None else order[:top_k]))
    pairs.update((int(np.argmax(values[:, j])), j) for j in range(cols))
    if threshold is not None:
        pairs = {(i, j) for i, j in pairs if values[i, j] >= threshold}
    drawn = np.array([values[i, j] for i, j in pairs]) if pairs else np.zeros(1)
    lo, hi = float(drawn.min()), float(drawn.max())
    norm = colors.Normalize(lo, hi if hi > lo else lo + 1e-9)
    colormap = matplotlib.colormaps[cmap]
    height = max(rows, cols)
    fig = _figure(figsize or (6.0, max(3.5, 0.32 * height + 1.4)))
    ax = fig.add_subplot()
    y_left = np.linspace(height - 1, 0, rows) if rows > 1 else np.array([(height - 1) / 2])
    y_right = np.linspace(height - 1, 0, cols) if cols > 1 else np.array([(height - 1) / 2])
    for i, j in sorted(pairs, key=lambda p: values[p]):  # strongest drawn last, on top
        t = float(norm(values[i, j]))
        ax.plot(
            [0, 1],
            [y_left[i], y_right[j]],
            color=colormap(t),
            linewidth=0.6 + 5.4 * t,
            solid_capstyle="round",
        )
    for y, name in zip(y_left, grid.rows):
        ax.text(-0.03, y, name, ha="right", va="center", fontsize=8)
    for y, name in zip(y_right, grid.cols):
        ax.text(1.03, y, name, ha="left", va="center", fontsize=8)
    ax.text(
        -0.03,
        height - 0.2,
        grid.row_label or "rows",
        ha="right",
        va="bottom",
        fontsize=9,
        fontweight="bold",
    )
    ax.text(
        1.03,
        height - 0.2,
        grid.col_label or "columns",
        ha="left",
        va="bottom",
        fontsize=9,
        fontweight="bold",
    )
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(-1, height + 0.5)
    ax.axis("off")
    fig.colorbar(
        cm.ScalarMappable(norm=norm, cmap=colormap), ax=ax, shrink=0.7, label=measure_name(grid)
    )
    ax.set_title(title if title is not None else f"{measure_name(grid)} alignment", fontsize=10)
    return fig


def line(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    dashed: Sequence[str] = (),
) -> Any:
    """A small line plot of named series (used by the experiment scripts); the series named
    in ``dashed`` (baselines) are drawn dashed."""
    fig = _figure((5.5, 3.8))
    ax = fig.add_subplot()
    xs = list(xs)
    for name, ys in series.items():
        ax.plot(
            xs,
            ys,
            marker="o",
            markersize=3 if len(xs) > 20 else 5,
            label=name,
            linestyle="--" if name in dashed else "-",
        )
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
