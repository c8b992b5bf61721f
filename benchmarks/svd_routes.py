"""The float32 factorisation behind the CCA family, route by route, on this backend.

    python benchmarks/svd_routes.py [N D]

The CCA family, Procrustes and predictivity need the thin SVD of each centered layer
(n x d, n > d). This times the candidates on one layer (default 10000 x 500, float32):
the SVD with each of JAX's algorithms, a Householder QR followed by the SVD of the small
R factor, and, for reference, the covariance eigendecomposition that jaxsim no longer
uses (it squares the condition number). It also reports each route's singular values
against the float64 SVD, on a layer with a k^-2 covariance spectrum, and on a
rank-deficient one (3/4 of its units independent, one dead) how far each route's
left singular vectors of the nonzero singular values are from spanning the layer's range
(``max |(I - P) U_r|``, P the float64 projector on it): the polar route (gesvdp) is fast
but wrong there, which is why jaxsim does not use it.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import timeit  # noqa: E402

ALG = jax.lax.linalg.SvdAlgorithm


def qr_then_svd(a):
    q, r = jnp.linalg.qr(a)
    u, s, vh = jax.lax.linalg.svd(r, full_matrices=False)
    return jnp.matmul(q, u, precision="highest"), s, vh


def covariance(a):
    w, v = jnp.linalg.eigh(jnp.matmul(a.T, a, precision="highest"))
    return jnp.sqrt(jnp.maximum(w[::-1], 0))


ROUTES = {
    **{
        f"svd {alg.name.lower()}": (
            lambda a, alg=alg: jax.lax.linalg.svd(a, full_matrices=False, algorithm=alg)
        )
        for alg in (ALG.DEFAULT, ALG.QR, ALG.JACOBI, ALG.POLAR)
    },
    "qr + svd(R)": qr_then_svd,
    "covariance eigh": covariance,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    n, d = (int(argv[0]), int(argv[1])) if argv else (10_000, 500)
    rng = np.random.default_rng(0)
    lam = np.arange(1, d + 1) ** -2.0
    x = (rng.normal(size=(n, d)) * np.sqrt(lam)) @ np.linalg.qr(rng.normal(size=(d, d)))[0]
    x -= x.mean(0)
    ref = np.linalg.svd(x, compute_uv=False)
    a = jnp.asarray(x, jnp.float32)
    print(f"{n} x {d} float32 on {jax.devices()[0].device_kind}")
    for name, route in ROUTES.items():
        f = jax.jit(route)
        try:
            out = f(a)
        except Exception as e:  # an algorithm this backend lacks
            print(f"  {name:16s} unavailable: {type(e).__name__}: {str(e)[:80]}")
            continue
        s = np.asarray(out if name == "covariance eigh" else out[1], np.float64)
        err = np.max(np.abs(s - ref) / ref[0])
        small = np.abs(s[-1] - ref[-1]) / ref[-1]
        print(
            f"  {name:16s} {timeit(f, a) * 1e3:8.1f} ms   max |s - s64| / s_max {err:.1e}"
            f"   smallest singular value off by {small:.1e} (relative)"
        )
    rank = d * 3 // 4
    low = x[:, :rank] @ rng.normal(size=(rank, d))
    low[:, 0] = 0  # a dead unit
    low -= low.mean(0)
    q = np.linalg.svd(low, full_matrices=False)[0][:, :rank]
    b = jnp.asarray(low, jnp.float32)
    print(f"rank {rank} of {d}, one dead unit: range of U_r (float64 reference)")
    for name, route in ROUTES.items():
        if name == "covariance eigh":
            continue
        try:
            u = np.asarray(jax.jit(route)(b)[0], np.float64)[:, :rank]
        except Exception:
            continue
        print(f"  {name:16s} max |(I - P) U_r| {np.abs(u - q @ (q.T @ u)).max():.1e}")


if __name__ == "__main__":
    main()
