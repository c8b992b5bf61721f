"""Figures from grids."""

import numpy as np

import jaxsim
from jaxsim.plot import alignment, heatmap, heatmap_panel, line


def grid(rng, rows=4, cols=3, labels=("seed 0", "seed 1")):
    v = rng.uniform(size=(rows, cols))
    return jaxsim.Grid(
        v,
        tuple(f"r{i}" for i in range(rows)),
        tuple(f"c{j}" for j in range(cols)),
        "linear_cka",
        *labels,
    )


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


def test_informative_defaults(rng):
    fig = heatmap(grid(rng))
    ax = fig.axes[0]
    assert ax.get_title() == "linear CKA between layers of seed 0 vs seed 1"
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("layer of seed 0", "layer of seed 1")
    assert fig.axes[1].get_ylabel() == "linear CKA"  # the color bar says what it shows
    width, height = fig.get_size_inches() * fig.dpi
    assert width >= 700 and height >= 600
    acts = {"a": rng.normal(size=(20, 3)), "b": rng.normal(size=(20, 4))}
    own = jaxsim.similarity_grid(acts, metric="svcca", labels=("ResNet", "ResNet"))
    ax = heatmap(own).axes[0]
    assert ax.get_title() == "SVCCA between layers of ResNet"
    assert heatmap(jaxsim.similarity_grid(acts)).axes[0].get_ylabel() == "layer of acts_a"


def test_alignment_and_panel(tmp_path, rng):
    g = grid(rng)
    g = jaxsim.Grid(
        np.array([[0.98, 0.6, 0.62], [0.61, 0.97, 0.6], [0.6, 0.63, 0.96], [0.7, 0.65, 0.9]]),
        g.rows,
        g.cols,
        g.metric,
        "seed 0",
        "seed 1",
    )
    fig = alignment(g, top_k=1)
    ax = fig.axes[0]
    # every left layer's best match, and every right layer's: no layer without a line
    ends = {(round(l.get_ydata()[0], 6), round(l.get_ydata()[1], 6)) for l in ax.lines}
    assert len(ax.lines) == 4 and len({a for a, _ in ends}) == 4 and len({b for _, b in ends}) == 3
    widths = sorted(l.get_linewidth() for l in ax.lines)
    assert widths[-1] > 3 * widths[0]  # 0.7 and 0.98 must look different
    assert len({l.get_color() for l in ax.lines}) == 4  # color scales too
    assert fig.axes[1].get_ylabel() == "linear CKA"  # a color bar shows the scale
    texts = [t.get_text() for t in ax.texts]
    assert "seed 0" in texts and "seed 1" in texts  # the sides are named
    fig.savefig(tmp_path / "a.png")
    panel = heatmap_panel({"x": g, "y": grid(rng, 5, 5), "z": g}, shape=(2, 2))
    panel.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    line([1, 2, 3], {"s": [0.1, 0.2, 0.3]}, xlabel="x", ylabel="y").savefig(tmp_path / "l.png")


def test_heatmap_marks_underdetermined_cells(tmp_path, rng):
    """A CCA grid with layers under 5 examples per unit records them, its heatmap hatches
    exactly their rows and columns (with a legend), and the record survives save/load."""
    acts = {
        "wide": rng.normal(size=(40, 20)),
        "narrow": rng.normal(size=(40, 3)),
        "mid": rng.normal(size=(40, 10)),
    }
    g = jaxsim.similarity_grid(acts, metric="mean_cca", warn=False)
    assert g.underdetermined == ((0, 2), (0, 2))
    ax = heatmap(g).axes[0]
    hatched = {
        (round(p.get_x() + 0.5), round(p.get_y() + 0.5)) for p in ax.patches if p.get_hatch()
    }
    assert hatched == {(j, i) for i in range(3) for j in range(3) if i != 1 or j != 1}
    assert ax.figure.legends  # saying what the hatching means
    g.save(tmp_path / "g.npz")
    assert jaxsim.Grid.load(tmp_path / "g.npz").underdetermined == g.underdetermined
    assert not heatmap(jaxsim.similarity_grid(acts)).axes[0].patches  # CKA: nothing to mark
