"""Core measures against the classic NumPy algorithms, in one run.

    python benchmarks/core.py [--quick]

1. SVCCA (20 dims), PWCCA and mean CCA on 500 neurons x 10000 examples of low-rank
   ReLU-like activations (float64), versus the original recipe in NumPy (covariance,
   pseudo-inverse square roots, SVD); then self-grids of them against a loop of the
   recipe. jaxsim is timed twice: as installed, and with the BLAS libraries on one
   thread (``threadpoolctl``; docs/performance.md, "BLAS threads on a CPU"); the recipe
   keeps NumPy's default threads, its fastest here.
2. float32 speed of the CCA family: jaxsim (thin SVD of the centered data) versus the
   covariance route it replaced (eigendecomposition of X^T X, in JAX), same data.
3. float32 error against float64 on realistic spectra (power laws k^-1..k^-2, post-ReLU,
   rank-deficient, dead units), jaxsim versus the covariance route.
4. Linear CKA's Gram route versus its feature-space route at n=10000, d=512 (float32).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import (  # noqa: E402
    classic_cca,
    classic_pwcca,
    classic_svcca,
    covariance_mean_cca,
    covariance_pwcca,
    covariance_svcca,
    matmul_rate,
    one_blas_thread,
    relu_lowrank,
    timeit,
)


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
    print(
        f"machine: float64 matmul {matmul_rate(np.float64) / 1e9:.0f} GFLOP/s, "
        f"float32 {matmul_rate(np.float32) / 1e9:.0f} GFLOP/s (jax, full precision) on "
        f"{jax.devices()[0].device_kind}"
    )
    print(f"\nCCA family, {d} neurons x {n} examples, float64")
    rows = []
    for name, ours, base in [
        (
            "svcca(keep_dims=20)",
            lambda: jaxsim.svcca(x, y, keep_dims=20),
            lambda: classic_svcca(x, y, 20),
        ),
        ("pwcca", lambda: jaxsim.pwcca(x, y), lambda: classic_pwcca(x, y)),
        ("mean_cca", lambda: jaxsim.mean_cca(x, y), lambda: classic_cca(x, y)[0].mean()),
    ]:
        t = timeit(ours)
        with one_blas_thread():
            t1 = timeit(ours)
        tb = timeit(base, repeat=2, warmup=0)
        diff = abs(float(ours()) - float(base()))
        rows.append((name, t, t1, tb))
        print(
            f"  {name:22s} jaxsim {t:7.3f} s ({t1:.3f} s one BLAS thread)   classic NumPy "
            f"{tb:7.3f} s   speed-up {tb / t:4.1f}x ({tb / t1:.1f}x)   |diff| {diff:.1e}"
        )

    grid_vs_loop(rng, args.quick)

    jax.config.update("jax_enable_x64", False)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    print(f"\nCCA family in float32, {d} neurons x {n} examples: the stable route's price")
    for name, ours, cov in [
        ("mean_cca", jaxsim.mean_cca, covariance_mean_cca),
        ("svcca(keep_dims=20)", lambda a, b: jaxsim.svcca(a, b, keep_dims=20), covariance_svcca),
        ("pwcca", jaxsim.pwcca, covariance_pwcca),
    ]:
        cov = jax.jit(cov)
        t, tc = timeit(ours, x32, y32), timeit(cov, x32, y32)
        with one_blas_thread():
            t1 = timeit(ours, x32, y32)
        print(
            f"  {name:22s} jaxsim {t:7.3f} s ({t1:.3f} s one BLAS thread)   covariance route "
            f"{tc:7.3f} s   jaxsim / covariance {t / tc:5.2f}x"
        )

    print("\nfloat32 error |f32 - f64| on realistic spectra (1e-3 is the promise)")
    print(f"  {'layers':36s} {'measure':10s} {'jaxsim':>9s} {'covariance route':>17s}")
    for label, (a, b) in spectra(rng, args.quick).items():
        for name, ours, cov in [  # n < 5 d on some: the values are compared, not read
            ("mean_cca", functools.partial(jaxsim.mean_cca, warn=False), covariance_mean_cca),
            ("pwcca", functools.partial(jaxsim.pwcca, warn=False), covariance_pwcca),
        ]:
            with jax.enable_x64(True):  # each route against its own float64 value
                ref, ref_cov = float(ours(a, b)), float(jax.jit(cov)(a, b))
            a32, b32 = a.astype(np.float32), b.astype(np.float32)
            e_ours = abs(float(ours(a32, b32)) - ref)
            e_cov = abs(float(jax.jit(cov)(a32, b32)) - ref_cov)
            print(f"  {label:36s} {name:10s} {e_ours:9.1e} {e_cov:17.1e}")

    n2, d2 = (2000, 128) if args.quick else (10_000, 512)
    a = relu_lowrank(rng, n2, d2).astype(np.float32)
    b = relu_lowrank(rng, n2, d2).astype(np.float32)
    print(f"\nlinear CKA, n={n2}, d={d2}, float32")
    tg = timeit(lambda: jaxsim.linear_cka(a, b, method="gram"))
    tf = timeit(lambda: jaxsim.linear_cka(a, b, method="features"))
    vg = float(jaxsim.linear_cka(a, b, method="gram"))
    vf = float(jaxsim.linear_cka(a, b, method="features"))
    print(
        f"  Gram route {tg:.3f} s   feature route {tf:.3f} s   feature speed-up {tg / tf:.1f}x"
        f"   values {vg:.6f} / {vf:.6f}"
    )
    return rows


def grid_vs_loop(rng, quick):
    """A self-grid of the CCA family against a loop of the classic recipe over its pairs
    (float64; PWCCA's grid computes both orders, as the loop does)."""
    import jaxsim

    n, widths = (1000, (32, 48, 64)) if quick else (5000, (128, 256, 384, 512))
    layers = [relu_lowrank(rng, n, w) + 0.1 * rng.normal(size=(n, w)) for w in widths]
    print(f"\nself-grids of {len(layers)} layers (widths {widths}), n={n}, float64")
    pairs = [(a, b) for i, a in enumerate(layers) for b in layers[i:]]
    ordered = [(a, b) for a in layers for b in layers]
    for name, options, loop in [
        ("mean_cca", {}, lambda: [classic_cca(a, b)[0].mean() for a, b in pairs]),
        ("svcca", {"keep_dims": 20}, lambda: [classic_svcca(a, b, 20) for a, b in pairs]),
        ("pwcca", {}, lambda: [classic_pwcca(a, b) for a, b in ordered]),
    ]:
        grid = lambda: (
            jaxsim.similarity_grid(
                layers, metric=name, progress=False, warn=False, **options
            ).values
        )
        t = timeit(grid)
        with one_blas_thread():
            t1 = timeit(grid)
        tl = timeit(loop, repeat=1, warmup=0)
        print(
            f"  {name:10s} jaxsim grid {t:7.3f} s ({t1:.3f} s one BLAS thread)   loop of the "
            f"recipe {tl:7.3f} s   speed-up {tl / t:5.1f}x ({tl / t1:.1f}x)"
        )


def power_law(rng, n, d1, d2, alpha, offset=5.0):
    lam = np.arange(1, d1 + 1) ** -alpha
    z = rng.normal(size=(n, d1)) * np.sqrt(lam)
    q1 = np.linalg.qr(rng.normal(size=(d1, d1)))[0]
    q2 = np.linalg.qr(rng.normal(size=(d2, d2)))[0]
    y = z[:, :d2] + 0.1 * rng.normal(size=(n, d2)) * np.sqrt(lam[:d2])
    return z @ q1 + offset, y @ q2 - offset


def spectra(rng, quick):
    s = 4 if quick else 1
    x, y = power_law(rng, 2000 // s, 512 // s, 256 // s, 1.0, offset=0.0)
    dead_x, dead_y = power_law(rng, 1500 // s, 96, 64, 1.5, offset=0.0)
    dead_x[:, ::7] = 0
    dead_y[:, ::5] = 0
    low_x, low_y = power_law(rng, 1500 // s, 48, 48, 1.0, offset=0.0)
    return {
        f"k^-2, {2000 // s} x {512 // s}/{256 // s}, offset 5": power_law(
            rng, 2000 // s, 512 // s, 256 // s, 2.0
        ),
        f"k^-1.5, {4000 // s} x {1024 // s}/{512 // s}, offset 5": power_law(
            rng, 4000 // s, 1024 // s, 512 // s, 1.5
        ),
        f"k^-1, {2000 // s} x {512 // s}/{256 // s}, post-ReLU": (
            np.maximum(x + 0.05, 0),
            np.maximum(y + 0.02, 0),
        ),
        "rank 48 of width 64": (low_x @ rng.normal(size=(48, 64)), low_y),
        "dead units, offsets 3/-2": (dead_x + 3, dead_y - 2),
    }


if __name__ == "__main__":
    main()
