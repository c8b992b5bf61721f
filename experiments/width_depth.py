"""Block structure in wide and deep networks (Nguyen, Raghu & Kornblith 2020).

Trains small ResNets over a grid of depths and widths, computes each model's layer-by-layer
CKA self-grid with streaming minibatch CKA over the test set, and a cross-seed grid for the
largest model. Writes a figure of heatmaps laid out depth x width on one colour scale, the
cross-seed heatmap, a JSON of every grid, and prints a summary of block structure: the
largest contiguous block of layers whose pairwise CKA all exceed 0.9, and the share of
variance of the first principal component of those layers (which the paper ties to the
block structure), against the layers outside the block.

    python experiments/width_depth.py            # digits, under 5 minutes on 2 CPU cores
    python experiments/width_depth.py --quick    # seconds, for CI
    python experiments/width_depth.py --data cifar10 --data-dir ~/cifar-10-batches-py \
        --depths 2 4 8 --widths 16 64 128 --epochs 30
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from jaxsim.flax import collect_activations, minibatch_grid  # noqa: E402
from jaxsim.plot import heatmap, heatmap_panel  # noqa: E402


def block_layers(path: str, module) -> bool:
    """The representations compared: stem, each residual block's output, downsampling."""
    return path in ("stem", "down") or isinstance(module, C.ResidualBlock)


def largest_block(values: np.ndarray, threshold: float = 0.9) -> tuple[int, int]:
    """(start, stop) of the longest run of consecutive layers whose pairwise similarities
    all exceed ``threshold``; a single layer when no two neighbours do."""
    best = (0, 1)
    for i in range(len(values)):
        for j in range(i + best[1] - best[0], len(values)):
            if values[i:j + 1, i:j + 1].min() > threshold:
                best = (i, j + 1)
    return best


def first_pc_share(x: np.ndarray) -> float:
    """Fraction of a layer's variance along its first principal component."""
    x = x.reshape(len(x), -1)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return float(s[0] / s.sum())


def main(argv=None) -> dict:
    p = C.parser(__doc__, "out/width_depth")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 3, 6],
                   help="residual blocks per stage")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32],
                   help="channels of the first stage")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cka-batch", type=int, default=120, help="minibatch size for CKA")
    t0 = time.time()
    args, data, out = C.setup(p, argv, {"depths": [1, 2], "widths": [4, 8], "epochs": 1})
    progress = not args.no_progress
    x_test = data["test"][0]
    channels = x_test.shape[-1]
    cka_batches = lambda: C.batches(x_test, None, args.cka_batch, drop_last=True)
    n_batches = len(x_test) // args.cka_batch

    def build(depth, width, seed):
        return C.create(C.ResNet, channels, width, depth, data.num_classes, seed=seed)

    results, grids, models = {}, {}, {}
    for depth in args.depths:
        for width in args.widths:
            name = f"depth {depth}, width {width}"
            model = build(depth, width, 0)
            acc = C.train(model, data, epochs=args.epochs, batch_size=args.batch_size,
                          desc=name, progress=progress)
            grid = minibatch_grid(model, cka_batches(), filter=block_layers, progress=progress,
                                  total=n_batches)
            values = grid.to_numpy()
            start, stop = largest_block(values)
            names = list(grid.rows)
            acts = collect_activations(model, C.batches(x_test, None, 256), filter=block_layers,
                                       progress=False)
            share = [first_pc_share(acts[k]) for k in names]
            inside = share[start:stop]
            outside = share[:start] + share[stop:]
            results[name] = {
                "depth": depth, "width": width, "test_accuracy": acc,
                "layers": len(names), "block": [names[start], names[stop - 1]],
                "block_size": stop - start,
                "first_pc_share_block": float(np.mean(inside)),
                "first_pc_share_outside": float(np.mean(outside)) if outside else None,
                "grid": C.grid_json(grid),
            }
            grids[name] = grid
            models[(depth, width)] = model

    depth, width = max(args.depths), max(args.widths)
    twin = build(depth, width, 1)
    C.train(twin, data, epochs=args.epochs, batch_size=args.batch_size, seed=1,
            desc="second seed", progress=progress)
    cross = minibatch_grid(models[(depth, width)], cka_batches(), twin, filter=block_layers,
                           progress=progress, total=n_batches)
    cross_diag = float(np.mean(np.diag(cross.to_numpy())))

    panel = heatmap_panel(grids, shape=(len(args.depths), len(args.widths)),
                          title=f"Linear CKA (minibatch) between layers, {args.data}; rows: "
                                "depth, columns: width")
    panel.savefig(os.path.join(out, "cka_grids.png"), dpi=130)
    heatmap(cross, title=f"Cross-seed CKA, depth {depth}, width {width}",
            xlabel="seed 1 layer", ylabel="seed 0 layer").savefig(
        os.path.join(out, "cross_seed.png"), dpi=130)
    summary = {"data": args.data, "epochs": args.epochs, "models": results,
               "cross_seed": {"depth": depth, "width": width, "mean_diagonal": cross_diag,
                              "grid": C.grid_json(cross)},
               "seconds": time.time() - t0}
    C.save_json(os.path.join(out, "grids.json"), summary)

    print(f"\nBlock structure (largest run of layers with pairwise CKA > 0.9), {args.data}:")
    print(f"{'model':>22} {'acc':>6} {'layers':>6} {'block':>6}  {'1st-PC share in / out':>22}")
    for name, r in results.items():
        out_share = "-" if r["first_pc_share_outside"] is None else f"{r['first_pc_share_outside']:.2f}"
        print(f"{name:>22} {r['test_accuracy']:6.3f} {r['layers']:6d} {r['block_size']:6d}  "
              f"{r['first_pc_share_block']:>13.2f} / {out_share}")
    print(f"cross-seed CKA of corresponding layers (depth {depth}, width {width}): "
          f"mean {cross_diag:.3f}")
    print(f"figures: {os.path.join(out, 'cka_grids.png')}, {os.path.join(out, 'cross_seed.png')}")
    print(f"grids:   {os.path.join(out, 'grids.json')}   ({time.time() - t0:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
