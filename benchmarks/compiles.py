"""First calls (compiles included) against warm calls, per metric, in one run.

    python benchmarks/compiles.py [--quick]

A 5 x 5 cross-grid of a small CNN's layers (n=400 examples; flattened widths 1024, 1024,
512, 64 and 10, as the digits CNN of the issue reproducers), float32, each metric in a
fresh process so that no compiled program carries over: what a user waits for the first
time, and after. PWCCA's per-pair host SVDs (google/svcca's signs) show here; its
sign-free reading (``directions="variates"``) runs on the device alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import sys, time, numpy as np, jax, jaxsim
metric, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
shapes = [(8, 8, 16), (8, 8, 16), (4, 4, 32), (64,), (10,)]
z = rng.normal(size=(n, 32))
def model(seed):
    r = np.random.default_rng(seed)
    return [np.maximum(z @ r.normal(size=(32, int(np.prod(s)))), 0).reshape(n, *s)
            .astype(np.float32) for s in shapes]
a, b = model(1), model(2)
options = {"svcca": {"keep_dims": 10}, "pwcca_variates": {"directions": "variates"}}.get(
    metric, {})
metric = metric.split("_variates")[0]
grid = lambda: jaxsim.similarity_grid(a, b, metric=metric, warn=False, progress=False,
                                      **options).values
t0 = time.perf_counter(); jax.block_until_ready(grid()); first = time.perf_counter() - t0
warm = min((lambda t: (jax.block_until_ready(grid()), time.perf_counter() - t)[1])(
    time.perf_counter()) for _ in range(3))
print(first, warm)
"""

METRICS = [
    "linear_cka", "rbf_cka", "mean_cca", "svcca", "pwcca", "pwcca_variates", "procrustes", "rsa"
]  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples, a smoke test")
    args = parser.parse_args(argv)
    n = 100 if args.quick else 400
    print(f"5 x 5 cross-grid of a small CNN's layers, n={n}, float32; each metric in a fresh "
          "process")  # fmt: skip
    print(f"  {'metric':12s} {'first call s':>13s} {'warm s':>8s} {'compile share':>14s}")
    results = {}
    for metric in ["mean_cca", "pwcca", "pwcca_variates"] if args.quick else METRICS:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, metric, str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        first, warm = (float(v) for v in out.stdout.split()[-2:])
        results[metric] = (first, warm)
        print(f"  {metric:12s} {first:13.2f} {warm:8.3f} {1 - warm / first:14.0%}")
    for name in ["pwcca", "pwcca_variates"]:
        if "mean_cca" in results and name in results:
            ratio = results[name][1] / results["mean_cca"][1]
            print(f"  {name} / mean CCA, warm: {ratio:.1f}x (goal: within 3x)")
    return results


if __name__ == "__main__":
    main()
