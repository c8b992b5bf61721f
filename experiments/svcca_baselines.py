"""SVCCA and its baselines (Raghu et al. 2017; the SVCCA tutorial; Morcos et al. 2018).

Trains an MLP with three hidden layers from two seeds and asks, with one figure each:
  1. is the mean CCA between the two seeds' layers above that of random Gaussian
     activations of the same shapes?
  2. how does mean CCA depend on the number of datapoints? (the tutorial's falling curve:
     with few datapoints per neuron even unrelated activations look correlated)
  3. top-k mean CCA, SVCCA (20 directions) and PWCCA of trained layers against the same
     measures on the Gaussian baseline.

    python experiments/svcca_baselines.py [--quick] [--data cifar10 --data-dir DIR]
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import jaxsim  # noqa: E402
from jaxsim.flax import collect_activations  # noqa: E402
from jaxsim.plot import line  # noqa: E402


def hidden(path: str, module) -> bool:
    return path.startswith("layers/")


# the SVCCA tutorial's seed comparison (google/svcca): SVCCA with 20 directions between
# two trained MLPs' layers vs the same measure on Gaussian activations of those shapes
PUBLISHED = {"trained": 0.73, "gaussian": 0.035}


def verdict(svcca_trained: list[float], svcca_gaussian: float, keep_dims: int) -> tuple[bool, str]:
    """Reproduced when trained seeds agree far above the Gaussian baseline: mean SVCCA
    >= 0.5 and >= 5x the baseline (published: 0.73 vs 0.035)."""
    mean = float(np.mean(svcca_trained))
    ok = mean >= 0.5 and mean >= 5 * svcca_gaussian
    return ok, C.verdict_line(
        ok,
        "SVCCA between two seeds' layers far above the Gaussian baseline",
        f"here {mean:.2f} vs {svcca_gaussian:.3f} with {keep_dims} directions, published "
        f"{PUBLISHED['trained']} vs {PUBLISHED['gaussian']} (20 directions)",
        "" if keep_dims == 20 else f"{keep_dims} directions here, not 20",
    )


def main(argv=None) -> dict:
    p = C.parser(__doc__, "out/svcca_baselines")
    p.add_argument("--width", type=int, default=96, help="neurons per hidden layer")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--keep-dims", type=int, default=20, help="SVCCA directions")
    p.add_argument(
        "--curve-points",
        type=int,
        default=8,
        help="numbers of datapoints on the mean-CCA-vs-datapoints curve",
    )
    args, data, out = C.setup(
        p, argv, {"width": 24, "epochs": 1, "keep_dims": 10, "curve_points": 2}
    )
    progress = not args.no_progress
    x_all = np.concatenate([data["train"][0], data["test"][0]])
    in_dim = int(np.prod(x_all.shape[1:]))

    acts, accs = [], []
    for seed in (0, 1):
        model = C.create(C.MLP, in_dim, (args.width,) * 3, data.num_classes, seed=seed)
        accs.append(
            C.train(
                model, data, epochs=args.epochs, seed=seed, desc=f"seed {seed}", progress=progress
            )
        )
        acts.append(
            collect_activations(model, C.batches(x_all, None, 512), filter=hidden, progress=False)
        )
    layers = list(acts[0])
    n = len(x_all)
    key = jax.random.key(0)
    gauss = lambda k, m: np.asarray(jax.random.normal(k, (m, args.width)))

    # 1. mean CCA per layer, trained pair versus a Gaussian pair of the same shapes
    trained = [float(jaxsim.mean_cca(acts[0][k], acts[1][k], epsilon=1e-10)) for k in layers]
    keys = jax.random.split(key, 2 * len(layers))
    baseline = [
        float(jaxsim.mean_cca(gauss(keys[2 * i], n), gauss(keys[2 * i + 1], n)))
        for i in range(len(layers))
    ]
    line(
        range(1, len(layers) + 1),
        {"trained seeds": trained, "Gaussian baseline": baseline},
        xlabel="hidden layer",
        ylabel="mean CCA",
        title="Q1: mean CCA between seeds",
        dashed=["Gaussian baseline"],
    ).savefig(os.path.join(out, "q1_mean_cca_vs_baseline.png"), dpi=130)

    # 2. mean CCA against the number of datapoints
    sizes = sorted({int(s) for s in np.geomspace(args.width + 8, n, args.curve_points)})
    k1, k2 = jax.random.split(jax.random.key(1))
    g1, g2 = gauss(k1, n), gauss(k2, n)
    last = layers[-1]
    # this curve shows what too few datapoints per neuron do: no warning needed
    curve_random = [float(jaxsim.mean_cca(g1[:s], g2[:s], warn=False)) for s in sizes]
    curve_trained = [
        float(jaxsim.mean_cca(acts[0][last][:s], acts[1][last][:s], epsilon=1e-10, warn=False))
        for s in sizes
    ]
    line(
        sizes,
        {"Gaussian": curve_random, f"trained ({last})": curve_trained},
        xlabel="datapoints",
        ylabel="mean CCA",
        logx=True,
        dashed=["Gaussian"],
        title=f"Q2: mean CCA vs datapoints ({args.width} neurons)",
    ).savefig(os.path.join(out, "q2_cca_vs_datapoints.png"), dpi=130)

    # 3. top-k mean CCA, SVCCA and PWCCA against the baselines
    coef_t = np.asarray(jaxsim.cca(acts[0][last], acts[1][last], epsilon=1e-10).coefficients)
    coef_g = np.asarray(jaxsim.cca(g1, g2).coefficients)
    ks = np.arange(1, args.width + 1)
    topk_t = np.cumsum(coef_t) / ks
    topk_g = np.cumsum(coef_g) / ks
    line(
        ks,
        {f"trained ({last})": topk_t, "Gaussian": topk_g},
        xlabel="k",
        ylabel="mean of the top-k CCA coefficients",
        title="Q3a: top-k mean CCA",
        dashed=["Gaussian"],
    ).savefig(os.path.join(out, "q3a_topk_cca.png"), dpi=130)
    svcca_t = [
        float(jaxsim.svcca(acts[0][k], acts[1][k], keep_dims=args.keep_dims)) for k in layers
    ]
    pwcca_t = [float(jaxsim.pwcca(acts[0][k], acts[1][k], epsilon=1e-10)) for k in layers]
    svcca_g = float(jaxsim.svcca(g1, g2, keep_dims=args.keep_dims))
    pwcca_g = float(jaxsim.pwcca(g1, g2))
    idx = range(1, len(layers) + 1)
    line(
        idx,
        {
            f"SVCCA ({args.keep_dims} dims)": svcca_t,
            "PWCCA": pwcca_t,
            "SVCCA, Gaussian": [svcca_g] * len(layers),
            "PWCCA, Gaussian": [pwcca_g] * len(layers),
        },
        xlabel="hidden layer",
        ylabel="similarity",
        dashed=["SVCCA, Gaussian", "PWCCA, Gaussian"],
        title="Q3b: SVCCA and PWCCA between seeds vs Gaussian",
    ).savefig(os.path.join(out, "q3b_svcca_pwcca.png"), dpi=130)

    summary = {
        "data": args.data,
        "width": args.width,
        "test_accuracy": accs,
        "layers": layers,
        "mean_cca": trained,
        "mean_cca_gaussian": baseline,
        "datapoints": sizes,
        "mean_cca_vs_n_gaussian": curve_random,
        "mean_cca_vs_n_trained": curve_trained,
        "topk_trained": topk_t,
        "topk_gaussian": topk_g,
        "svcca": svcca_t,
        "svcca_gaussian": svcca_g,
        "pwcca": pwcca_t,
        "pwcca_gaussian": pwcca_g,
    }
    ok, line_ = verdict(svcca_t, svcca_g, args.keep_dims)
    summary.update(reproduced=ok, verdict=line_)
    C.save_json(os.path.join(out, "results.json"), summary)
    print(
        f"\nSVCCA baselines, {args.data}, MLP {args.width}x3, test accuracy "
        f"{accs[0]:.3f} / {accs[1]:.3f}, n={n}"
    )
    print(f"{'layer':>10} {'meanCCA':>8} {'Gauss':>6} {'SVCCA':>6} {'PWCCA':>6}")
    for i, k in enumerate(layers):
        print(f"{k:>10} {trained[i]:8.3f} {baseline[i]:6.3f} {svcca_t[i]:6.3f} {pwcca_t[i]:6.3f}")
    print(f"{'Gaussian':>10} {'':8} {'':6} {svcca_g:6.3f} {pwcca_g:6.3f}")
    print(
        "mean CCA of Gaussian pairs vs datapoints: "
        + ", ".join(f"n={s}: {v:.2f}" for s, v in zip(sizes, curve_random))
    )
    print(line_)
    print(f"figures and results.json in {out}")
    return summary


if __name__ == "__main__":
    main()
