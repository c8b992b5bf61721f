"""Permutation test of linear CKA: batched permutations versus a loop of metric calls.

    python benchmarks/stats.py [--quick]

1000 permutations at n=1024, d=256 (float32), against 1000 plain ``jaxsim.linear_cka``
calls on permuted data in a Python loop, timed in the same run (the loop on a sample of
calls, extrapolated).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import timeit  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import jaxsim
    from jaxsim import stats

    n, d, num = (256, 64, 200) if args.quick else (1024, 256, 1000)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (0.05 * x @ rng.normal(size=(d, d)) + rng.normal(size=(n, d))).astype(np.float32)
    key = jax.random.key(0)
    print(f"permutation test of linear CKA, n={n}, d={d}, {num} permutations")
    for method in ("features", "gram"):
        t = timeit(
            lambda: stats.permutation_test(
                "linear_cka", x, y, key=key, num_permutations=num, method=method
            ),
            repeat=2,
        )
        print(f"  batched ({method} route): {t:.2f} s")
        if method == "features":
            best = t
    sample = 100
    jaxsim.linear_cka(x, y).block_until_ready()
    t0 = time.perf_counter()
    for k in jax.random.split(key, sample):
        v = jaxsim.linear_cka(x, y[np.asarray(jax.random.permutation(k, n))])
    v.block_until_ready()
    loop = (time.perf_counter() - t0) / sample * num
    print(f"  loop of {num} linear_cka calls: ~{loop:.1f} s (from {sample} timed)")
    print(f"  speed-up of the batched test: {loop / best:.1f}x")


if __name__ == "__main__":
    main()
