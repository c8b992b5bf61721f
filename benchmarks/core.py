"""Core measures against the classic NumPy algorithms, in one run.

    python benchmarks/core.py [--quick]

SVCCA (20 dims) and PWCCA on 500 neurons x 10000 examples of low-rank ReLU-like
activations (float64), versus the original recipe in NumPy (covariance, pseudo-inverse
square roots, SVD); linear CKA's Gram route versus its feature-space route at n=10000,
d=512 (float32).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import classic_pwcca, classic_svcca, matmul_rate, relu_lowrank, timeit  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = parser.parse_args(argv)
    n, d = (2000, 100) if args.quick else (10_000, 500)

    jax.config.update("jax_enable_x64", True)
    import jaxsim

    rng = np.random.default_rng(0)
    x, y = relu_lowrank(rng, n, d), relu_lowrank(rng, n, d)
    x = x + 0.1 * rng.normal(size=x.shape)  # keep the covariance invertible
    y = y + 0.1 * rng.normal(size=y.shape)
    print(f"machine: float64 matmul {matmul_rate(np.float64) / 1e9:.0f} GFLOP/s, "
          f"float32 {matmul_rate(np.float32) / 1e9:.0f} GFLOP/s (jax, 2048^3)")
    print(f"\nCCA family, {d} neurons x {n} examples, float64")
    rows = []
    for name, ours, base in [
        ("svcca(keep_dims=20)", lambda: jaxsim.svcca(x, y, keep_dims=20),
         lambda: classic_svcca(x, y, 20)),
        ("pwcca", lambda: jaxsim.pwcca(x, y), lambda: classic_pwcca(x, y)),
        ("mean_cca", lambda: jaxsim.mean_cca(x, y), None),
    ]:
        t = timeit(ours)
        if base is None:
            print(f"  {name:22s} jaxsim {t:7.3f} s")
            continue
        tb = timeit(base, repeat=2, warmup=0)
        diff = abs(float(ours()) - float(base()))
        rows.append((name, t, tb))
        print(f"  {name:22s} jaxsim {t:7.3f} s   classic NumPy {tb:7.3f} s   "
              f"speed-up {tb / t:6.1f}x   |diff| {diff:.1e}")

    n2, d2 = (2000, 128) if args.quick else (10_000, 512)
    jax.config.update("jax_enable_x64", False)
    a = relu_lowrank(rng, n2, d2).astype(np.float32)
    b = relu_lowrank(rng, n2, d2).astype(np.float32)
    print(f"\nlinear CKA, n={n2}, d={d2}, float32")
    tg = timeit(lambda: jaxsim.linear_cka(a, b, method="gram"))
    tf = timeit(lambda: jaxsim.linear_cka(a, b, method="features"))
    vg = float(jaxsim.linear_cka(a, b, method="gram"))
    vf = float(jaxsim.linear_cka(a, b, method="features"))
    print(f"  Gram route {tg:.3f} s   feature route {tf:.3f} s   feature speed-up {tg / tf:.1f}x"
          f"   values {vg:.6f} / {vf:.6f}")
    return rows


if __name__ == "__main__":
    main()
