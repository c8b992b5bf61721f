"""Block structure in wide and deep networks (Nguyen, Raghu & Kornblith 2020), with a verdict.

The paper: as a ResNet grows wider or deeper relative to its training set, a large
contiguous set of its layers becomes nearly identical under linear CKA (the "block
structure"), those layers' representations are dominated by their first principal
component (removing it removes the block), and the block is not where it is in a network
trained from another seed. Narrow, shallow networks show no block.

This script trains ResNets (batch norm, SGD with momentum, as in the paper) over a grid
of depths and widths on a subset of the training images, computes each model's exact CKA
self-grid on every held-out image, and looks for the paper's block in each model:

  block   the longest run of >= max(3, L/4) consecutive layers whose pairwise CKA all
          exceed 0.9, whose layers put >= 50% of their variance on the first principal
          component, at least 1.5x the share of the layers outside it.

For every model it prints whether a block was found, its extent, the first-PC share
inside vs outside, the block's mean CKA after the first PC is removed from each layer,
and the CKA between corresponding block layers of two seeds; then one line saying
whether the run reproduces the finding (a block in the largest model, none in the
smallest). It exits normally either way. What the default data (scikit-learn's 8x8
digits) shows is recorded in experiments/README.md.

    python experiments/width_depth.py            # digits, under 10 minutes on 2 CPU cores
    python experiments/width_depth.py --quick    # seconds, for CI
    python experiments/width_depth.py --data cifar10 --data-dir ~/cifar-10-batches-py \
        --depths 2 8 --widths 16 128 --train-size 10000 --epochs 30
"""

from __future__ import annotations

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


def block_layers(path: str, module) -> bool:
    """The representations compared: stem, each residual block's output, downsampling."""
    return path in ("stem", "down") or isinstance(module, (C.NormBlock, C.ResidualBlock))


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


def first_pc_share(x: np.ndarray) -> float:
    """Fraction of a layer's variance along its first principal component."""
    x = x.reshape(len(x), -1)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return float(s[0] / s.sum())


def without_first_pc(x: np.ndarray) -> np.ndarray:
    """The centered layer with its first principal component projected out."""
    x = x.reshape(len(x), -1)
    xc = x - x.mean(0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    return xc - s[0] * np.outer(u[:, 0], vt[0])


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


def analyse(acts: dict, twin_acts: dict | None) -> dict:
    """CKA self-grid, first-PC shares, the block and its evidence for one model; with a
    second seed, both seeds as one sweep (each layer prepared once) for cross-seed CKA."""
    if twin_acts is None:
        grid = jaxsim.similarity_grid(acts, metric="linear_cka", labels=("seed 0", "seed 0"))
    else:
        stacked = {k: np.stack([acts[k], twin_acts[k]]) for k in acts}
        sweep = jaxsim.similarity_grid(
            stacked, metric="linear_cka", model_axis=0, labels=("seed", "seed")
        )  # pair(i, j) is labelled "seed i" and "seed j"
        grid, cross = sweep.pair(0, 0), sweep.pair(0, 1)
    values = grid.to_numpy()
    names = list(grid.rows)
    share = [first_pc_share(acts[k]) for k in names]
    block = find_block(values, share)
    inside = names[block["start"] : block["stop"]]
    removed = jaxsim.similarity_grid([without_first_pc(acts[k]) for k in inside]).to_numpy()
    out = {
        "layers": names,
        "grid": grid,
        "first_pc_share": share,
        "block": block,
        "block_cka": mean_offdiag(
            values[block["start"] : block["stop"], block["start"] : block["stop"]]
        ),
        "block_cka_without_first_pc": mean_offdiag(removed),
    }
    if twin_acts is not None:
        diag = np.asarray(corresponding_layers(sweep).mean)  # seed 0 layer l vs seed 1 layer l
        mask = np.zeros(len(diag), bool)
        mask[block["start"] : block["stop"]] = True
        out.update(
            cross=cross,
            cross_seed_block=float(diag[mask].mean()),
            cross_seed_outside=float(diag[~mask].mean()) if (~mask).any() else None,
        )
    return out


# ---------------------------------------------------------------------------- figures


def _short(name: str) -> str:
    return name.replace("stage", "s").replace("/", ".")


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


# ------------------------------------------------------------------------------- main


def _fmt(v: float | None) -> str:
    return "   -" if v is None else f"{v:4.2f}"


def main(argv=None) -> dict:
    p = C.parser(__doc__, "out/width_depth")
    p.add_argument(
        "--depths", type=int, nargs="+", default=[1, 6], help="residual blocks per stage"
    )
    p.add_argument(
        "--widths", type=int, nargs="+", default=[8, 32], help="channels of the first stage"
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=200,
        help="training images (the rest are held out for CKA); the paper finds "
        "blocks sooner with less data",
    )
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--seeds",
        type=int,
        default=2,
        choices=[1, 2],
        help="2: also train a second seed of every model, for cross-seed CKA",
    )
    t0 = time.time()
    args, data, out = C.setup(
        p, argv, {"depths": [1, 2], "widths": [4], "epochs": 1, "train_size": 200, "seeds": 1}
    )
    progress = not args.no_progress
    x_train, y_train = data["train"]
    size = min(args.train_size, len(x_train))
    subset = (x_train[:size], y_train[:size])
    # every image not trained on: the held-out training images and the test split
    probe = np.concatenate([x_train[size:], data["test"][0]])
    channels = probe.shape[-1]

    def trained(depth, width, seed):
        model = C.create(C.NormResNet, channels, width, depth, data.num_classes, seed=seed)
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
        )
        acts = collect_activations(
            model, C.batches(probe, None, 256), filter=block_layers, progress=False
        )
        return acc, acts

    results = {}
    for depth in args.depths:
        for width in args.widths:
            name = f"depth {depth}, width {width}"
            acc, acts = trained(depth, width, 0)
            twin = trained(depth, width, 1)[1] if args.seeds == 2 else None
            r = analyse(acts, twin)
            r.update(depth=depth, width=width, test_accuracy=acc, values=r["grid"].to_numpy())
            results[name] = r
    ok, line = verdict(results)

    figure_models(results, args.depths, args.widths, args.data).savefig(
        os.path.join(out, "cka_grids.png")
    )
    largest = max(results, key=lambda k: (results[k]["depth"], results[k]["width"]))
    if "cross" in results[largest]:
        figure_cross_seed(results[largest], largest).savefig(os.path.join(out, "cross_seed.png"))

    keep = (
        "depth",
        "width",
        "test_accuracy",
        "layers",
        "first_pc_share",
        "block",
        "block_cka",
        "block_cka_without_first_pc",
        "cross_seed_block",
        "cross_seed_outside",
    )
    summary = {
        "data": args.data,
        "train_size": size,
        "probe_examples": len(probe),
        "epochs": args.epochs,
        "reproduced": ok,
        "verdict": line,
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

    print(
        f"\nBlock structure, {args.data}: {size} training images, CKA on {len(probe)} "
        f"held-out images (exact, not minibatch)"
    )
    print(
        f"{'model':>20} {'acc':>5} {'L':>3}  {'block':>5} {'extent':>16}  "
        f"{'1st-PC in/out':>13}  {'CKA in / -PC1':>13}  {'cross-seed in/out':>17}"
    )
    for name, r in results.items():
        b = r["block"]
        extent = f"{_short(r['layers'][b['start']])}..{_short(r['layers'][b['stop'] - 1])}"
        print(
            f"{name:>20} {r['test_accuracy']:5.3f} {len(r['layers']):3d}  "
            f"{'yes' if b['found'] else 'no':>5} {extent:>16}  "
            f"{_fmt(b['share_in'])} / {_fmt(b['share_out'])}  "
            f"{_fmt(r['block_cka'])} / {_fmt(r['block_cka_without_first_pc'])}  "
            f"{_fmt(r.get('cross_seed_block')):>8} / {_fmt(r.get('cross_seed_outside'))}"
        )
        if not b["found"]:
            print(f"{'':>22}(no block: {b['reason']})")
    print(line)
    print(f"figures and grids.json in {out}   ({time.time() - t0:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
