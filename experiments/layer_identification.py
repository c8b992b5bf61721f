"""Layer identification across seeds (Kornblith et al. 2019, the sanity check of Table 2).

Trains several seeds of one architecture. For each layer of one model and each other
model, a measure passes if the most similar layer of the other model is the corresponding
one. Prints the accuracy of each measure (linear CKA, RBF CKA, mean CCA, SVCCA, PWCCA) as
a table, saves it as JSON and a figure of one pair's grids under every measure.

    python experiments/layer_identification.py [--quick] [--seeds 5] [--depth 8]
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import jaxsim  # noqa: E402
from jaxsim.flax import collect_activations  # noqa: E402
from jaxsim.plot import heatmap_panel  # noqa: E402
from jaxsim.sweeps import layer_identification  # noqa: E402

MEASURES = {
    "linear CKA": ("linear_cka", {}),
    "RBF CKA": ("rbf_cka", {"threshold": 0.8}),
    "mean CCA": ("mean_cca", {"epsilon": 1e-6}),
    "SVCCA": ("svcca", {"keep_variance": 0.99, "epsilon": 1e-6}),
    "PWCCA": ("pwcca", {"epsilon": 1e-6}),
}


# Kornblith et al. 2019, Table 2 (10-layer CNNs on CIFAR-10, 10 seeds): linear CKA finds
# the corresponding layer 99.3% of the time; the CCA family 1-15%
PUBLISHED = {"linear CKA": 0.993, "CCA family at most": 0.15}
CCA_FAMILY = ("mean CCA", "SVCCA", "PWCCA")


def verdict(accuracy: dict[str, float], layers: int) -> tuple[bool, str]:
    """Reproduced when linear CKA identifies layers near-perfectly (>= 90%) and every CCA
    measure does worse."""
    cka = accuracy["linear CKA"]
    cca = max(accuracy[k] for k in CCA_FAMILY)
    ok = cka >= 0.9 and cca < cka
    return ok, C.verdict_line(
        ok,
        "linear CKA identifies corresponding layers across seeds, the CCA family less often",
        f"here linear CKA {cka:.0%}, best of the CCA family {cca:.0%}; published (Table 2) "
        f"{PUBLISHED['linear CKA']:.1%} vs <= {PUBLISHED['CCA family at most']:.0%}",
        f"chance is {1 / layers:.0%} with {layers} layers; the paper used 10-layer CNNs on "
        "CIFAR-10",
    )


def main(argv=None) -> dict:
    p = C.parser(__doc__, "out/layer_identification")
    p.add_argument(
        "--model",
        default="mlp",
        choices=["mlp", "cnn"],
        help="MLP, or a plain CNN as in the paper (its layers average-pooled)",
    )
    p.add_argument(
        "--reduce",
        default="average",
        choices=["average", "none"],
        help="conv layers: average-pool the positions, or flatten each example",
    )
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--depth", type=int, default=6, help="hidden layers")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument(
        "--probe",
        type=int,
        default=None,
        help="examples the layers are compared on (default: all images)",
    )
    args, data, out = C.setup(
        p, argv, {"seeds": 2, "depth": 3, "width": 16, "epochs": 1, "probe": 300}
    )
    x = np.concatenate([data["train"][0], data["test"][0]])  # a probe set, labels unused
    x = x[: args.probe]
    in_dim = int(np.prod(x.shape[1:]))

    acts = []
    for seed in range(args.seeds):
        if args.model == "cnn":
            model = C.create(
                C.PlainCNN, x.shape[-1], args.width, args.depth, data.num_classes, seed=seed
            )
        else:
            model = C.create(C.MLP, in_dim, (args.width,) * args.depth, data.num_classes, seed=seed)
        C.train(
            model,
            data,
            epochs=args.epochs,
            seed=seed,
            desc=f"seed {seed}",
            progress=not args.no_progress,
        )
        acts.append(
            collect_activations(
                model,
                C.batches(x, None, 512),
                filter=lambda path, m: path.startswith("layers/"),
                progress=False,
            )
        )

    reduce = None if args.reduce == "none" or args.model == "mlp" else args.reduce
    # the seeds as one sweep: every layer of every seed prepared once, all pairs at once
    stacked = {k: np.stack([a[k] for a in acts]) for k in acts[0]}
    accuracy, example = {}, {}
    for label, (metric, opts) in MEASURES.items():
        sweep = jaxsim.similarity_grid(
            stacked, metric=metric, reduce=reduce, model_axis=0, progress=False, **opts
        )
        accuracy[label] = float(layer_identification(sweep).accuracy)
        example[label] = sweep.pair(0, 1)

    heatmap_panel(example, title="seed 0 (rows) vs seed 1 (columns)").savefig(
        os.path.join(out, "grids.png"), dpi=130
    )
    summary = {
        "data": args.data,
        "seeds": args.seeds,
        "depth": args.depth,
        "width": args.width,
        "accuracy": accuracy,
        "example_grids": {k: C.grid_json(g) for k, g in example.items()},
    }
    ok, line = verdict(accuracy, args.depth)
    summary.update(reproduced=ok, verdict=line)
    C.save_json(os.path.join(out, "results.json"), summary)
    print(
        f"\nLayer identification, {args.seeds} seeds of a {args.model.upper()} with {args.depth} "
        f"layers of width {args.width}, {args.data} (n={len(x)}):"
    )
    print(f"{'measure':>12} {'accuracy':>9}")
    for label, acc in accuracy.items():
        print(f"{label:>12} {acc:9.3f}")
    print(line)
    print(f"figure and results.json in {out}")
    return summary


if __name__ == "__main__":
    main()
