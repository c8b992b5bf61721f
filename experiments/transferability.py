"""Does representational similarity predict transferability?

Trains one model per source task (class subsets and an input transformation of the data),
fine-tunes each on every target task from a small labelled sample, and measures the
transfer gain over training the same architecture from scratch on that sample. The
similarity of a source model to a target is the mean linear CKA (or SVCCA) between
corresponding hidden layers of the source model and of the target task's own model, on a
shared probe set; the per-layer rows are saved too. Prints Spearman and Pearson
correlations (scipy.stats, with p-values) between similarity and transfer gain over all
source != target pairs, and saves heatmaps of both matrices.

    python experiments/transferability.py [--quick] [--metric svcca]
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from flax import nnx
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import jaxsim  # noqa: E402
from jaxsim.flax import collect_activations  # noqa: E402
from jaxsim.plot import heatmap  # noqa: E402


def make_tasks(data: C.Data) -> dict[str, callable]:
    """Each task maps (x, y) to its inputs and labels (relabelled 0..k-1)."""

    def subset(classes):
        classes = np.asarray(classes)

        def f(x, y):
            keep = np.isin(y, classes)
            return x[keep], np.searchsorted(classes, y[keep]).astype(np.int32)

        return f

    k = data.num_classes
    return {
        f"0-{k // 2 - 1}": subset(range(k // 2)),
        f"{k // 2}-{k - 1}": subset(range(k // 2, k)),
        "even": subset(range(0, k, 2)),
        "odd": subset(range(1, k, 2)),
        "all, mirrored": lambda x, y: (x[:, :, ::-1], y),
        "all": lambda x, y: (x, y),
    }


def hidden(path: str, module) -> bool:
    return path.startswith("layers/")


def verdict(r: float, p: float, pairs: int) -> tuple[bool, str]:
    """Reproduced when similarity and transfer gain are positively rank-correlated at the
    5% level (the claim that more similar representations transfer better)."""
    ok = r > 0 and p < 0.05
    return ok, C.verdict_line(
        ok,
        "more similar source models transfer better (positive rank correlation)",
        f"Spearman r={r:.2f}, p={p:.2g} over {pairs} pairs",
        "" if pairs >= 20 else f"only {pairs} pairs: little power",
    )


def main(argv=None) -> dict:
    p = C.parser(__doc__, "out/transferability")
    p.add_argument("--metric", default="linear_cka", choices=["linear_cka", "svcca"])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument(
        "--finetune-examples",
        type=int,
        default=60,
        help="labelled target examples for fine-tuning and the scratch baseline",
    )
    p.add_argument("--finetune-epochs", type=int, default=40)
    args, data, out = C.setup(p, argv, {"width": 16, "epochs": 1, "finetune_epochs": 1})
    progress = not args.no_progress
    tasks = make_tasks(data)
    names = list(tasks)
    in_dim = int(np.prod(data["train"][0].shape[1:]))
    split = {
        name: C.Data(train=f(*data["train"]), test=f(*data["test"])) for name, f in tasks.items()
    }
    for d in split.values():
        d.num_classes = int(d["train"][1].max() + 1)

    def model_for(task, seed):
        return C.create(C.MLP, in_dim, (args.width,) * 3, split[task].num_classes, seed=seed)

    sources = {}
    for i, name in enumerate(names):
        sources[name] = model_for(name, i)
        C.train(
            sources[name],
            split[name],
            epochs=args.epochs,
            seed=i,
            desc=f"source {name}",
            progress=progress,
        )

    probe = data["test"][0]
    acts = {
        name: collect_activations(m, C.batches(probe, None, 512), filter=hidden, progress=False)
        for name, m in sources.items()
    }
    layers = list(acts[names[0]])
    # corresponding hidden layers share their width: one vmapped call per pair of models
    measure = jax.vmap(jaxsim.linear_cka if args.metric == "linear_cka" else jaxsim.svcca)
    stacked = {name: np.stack([a[layer] for layer in layers]) for name, a in acts.items()}
    per_layer = np.array(
        [[np.asarray(measure(stacked[s], stacked[t])) for t in names] for s in names]
    )
    similarity = per_layer.mean(axis=2)

    gain = np.zeros((len(names), len(names)))
    for j, t in enumerate(names):
        xs, ys = split[t]["train"]
        sample = (xs[: args.finetune_examples], ys[: args.finetune_examples])
        scratch = model_for(t, 100 + j)
        base = C.train(
            scratch,
            split[t],
            epochs=args.finetune_epochs,
            train_subset=sample,
            batch_size=20,
            progress=False,
        )
        for i, s in enumerate(names):
            model = model_for(t, 200 + j)
            # keep the source's hidden layers, a fresh head for the target's classes
            model.layers = nnx.clone(sources[s].layers)
            acc = C.train(
                model,
                split[t],
                epochs=args.finetune_epochs,
                train_subset=sample,
                batch_size=20,
                progress=False,
            )
            gain[i, j] = acc - base

    off = ~np.eye(len(names), dtype=bool)
    spearman = stats.spearmanr(similarity[off], gain[off])
    pearson = stats.pearsonr(similarity[off], gain[off])
    sim_grid = jaxsim.Grid(similarity, tuple(names), tuple(names), f"mean {args.metric}")
    gain_grid = jaxsim.Grid(gain, tuple(names), tuple(names), "transfer gain")
    heatmap(
        sim_grid,
        title=f"similarity (mean {args.metric} over hidden layers)",
        xlabel="target task model",
        ylabel="source model",
    ).savefig(os.path.join(out, "similarity.png"), dpi=130)
    heatmap(
        gain_grid,
        title="transfer gain (accuracy: fine-tuned - scratch)",
        xlabel="target task",
        ylabel="source model",
        vmin=float(min(gain.min(), 0)),
        vmax=float(max(gain.max(), 1e-6)),
    ).savefig(os.path.join(out, "transfer_gain.png"), dpi=130)
    summary = {
        "data": args.data,
        "tasks": names,
        "metric": args.metric,
        "similarity": similarity,
        "similarity_per_layer": per_layer,
        "layers": layers,
        "transfer_gain": gain,
        "spearman": {"r": float(spearman.statistic), "p": float(spearman.pvalue)},
        "pearson": {"r": float(pearson.statistic), "p": float(pearson.pvalue)},
    }
    ok, line = verdict(float(spearman.statistic), float(spearman.pvalue), int(off.sum()))
    summary.update(reproduced=ok, verdict=line)
    C.save_json(os.path.join(out, "results.json"), summary)
    print(
        f"\nTransferability vs similarity ({args.metric}), {args.data}, {len(names)} tasks, "
        f"{args.finetune_examples} fine-tuning examples:"
    )
    print(sim_grid)
    print(gain_grid)
    print(
        f"over {int(off.sum())} source != target pairs: Spearman r={spearman.statistic:.3f} "
        f"(p={spearman.pvalue:.3g}), Pearson r={pearson.statistic:.3f} (p={pearson.pvalue:.3g})"
    )
    print(line)
    print(f"figures and results.json in {out}")
    return summary


if __name__ == "__main__":
    main()
