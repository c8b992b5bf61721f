"""Figures from grids."""


import jaxsim
from jaxsim.plot import alignment, heatmap, heatmap_panel, line


def grid(rng, rows=4, cols=3):
    v = rng.uniform(size=(rows, cols))
    return jaxsim.Grid(v, tuple(f"r{i}" for i in range(rows)), tuple(f"c{j}" for j in range(cols)),
                       "linear_cka")


def test_heatmap_layout_and_files(tmp_path, rng):
    g = grid(rng)
    fig = heatmap(g)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo < hi  # origin at the bottom-left: layer 0 at the bottom
    assert [t.get_text() for t in ax.get_yticklabels()] == list(g.rows)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(g.cols)
    assert len(ax.texts) == 12  # annotated cells for a small grid
    for ext in ("png", "pdf"):
        fig.savefig(tmp_path / f"h.{ext}")
        assert (tmp_path / f"h.{ext}").stat().st_size > 1000


def test_alignment_and_panel(tmp_path, rng):
    g = grid(rng)
    fig = alignment(g, top_k=2)
    assert len(fig.axes[0].lines) == 4 * 2
    widths = sorted(l.get_linewidth() for l in fig.axes[0].lines)
    assert widths[0] < widths[-1]  # stronger similarity, thicker line
    fig.savefig(tmp_path / "a.png")
    panel = heatmap_panel({"x": g, "y": grid(rng, 5, 5), "z": g}, shape=(2, 2))
    panel.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    line([1, 2, 3], {"s": [0.1, 0.2, 0.3]}, xlabel="x", ylabel="y").savefig(tmp_path / "l.png")
