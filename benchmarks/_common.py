"""Timing helpers and the straightforward NumPy baselines the benchmarks compare against."""

from __future__ import annotations

import time

import jax
import numpy as np


def timeit(fn, *args, repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``fn(*args)`` in seconds, blocking on JAX results."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def one_blas_thread():
    """A context in which the BLAS libraries loaded in this process (NumPy's and SciPy's
    OpenBLAS; the latter serves jaxlib's LAPACK kernels on the CPU) run on one thread: the
    setting docs/performance.md recommends for the CCA family on a CPU, where XLA's own
    threads do the parallel work. Needs threadpoolctl (installed with scikit-learn, in the
    [test] and [experiments] extras)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def matmul_rate(
    dtype, size: int | None = None, precision: str = "highest", repeat: int = 5
) -> float:
    """The machine's measured matmul rate in FLOP/s (jax, this dtype), at the precision
    jaxsim computes in (``"highest"``: true float32, not TF32, on a GPU). ``size``: 2048
    on a CPU, 8192 on an accelerator (a smaller product does not fill it)."""
    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.numpy.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
    f = jax.jit(lambda m: jax.numpy.matmul(m, m, precision=precision))
    return 2 * size**3 / timeit(f, a, repeat=repeat)


def paired_fraction(fn, flops: float, repeat: int = 3, warmup: bool = True) -> tuple[float, float]:
    """(best seconds of ``fn()``, median of ``flops / seconds / rate``), each run read
    against the float32 matmul rate measured just before it: on a shared machine whose
    rate drifts (55-139 GFLOP/s within an hour on the 2-core CI class), a ratio of two
    bests taken minutes apart reads the workload and the rate at different moments.
    ``warmup``: ``fn`` is run once first (compiles)."""
    if warmup:
        jax.block_until_ready(fn())
    times, ratios = [], []
    for _ in range(repeat):
        rate = matmul_rate(np.float32, repeat=1)
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        ratios.append(flops / times[-1] / rate)
    return min(times), float(np.median(ratios))


def relu_lowrank(rng, n: int, d: int, rank: int = 50) -> np.ndarray:
    """ReLU-like activations of low intrinsic dimension: relu(Z W + b), Z of width rank."""
    z = rng.normal(size=(n, rank))
    return np.maximum(z @ rng.normal(size=(rank, d)) + 0.5 * rng.normal(size=d), 0)


# ----------------------------------------------------------- classic NumPy algorithms
# The original SVCCA/PWCCA recipe: covariance, pseudo-inverse square roots, SVD.


def _inv_sqrt(s):
    w, v = np.linalg.eigh(np.linalg.pinv(s))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def classic_cca(x, y):
    """(n, d) inputs; coefficients, left/right singular vectors."""
    d1 = x.shape[1]
    cov = np.cov(x.T, y.T)
    sxx, syy, sxy = cov[:d1, :d1], cov[d1:, d1:], cov[:d1, d1:]
    xm, ym = np.abs(sxx).max(), np.abs(syy).max()
    t = _inv_sqrt(sxx / xm) @ (sxy / np.sqrt(xm * ym)) @ _inv_sqrt(syy / ym)
    u, s, vh = np.linalg.svd(t)
    return s, u, vh


def classic_svcca(x, y, k=20):
    def reduce(a):
        u, s, _ = np.linalg.svd(a - a.mean(0), full_matrices=False)
        return u[:, :k] * s[:k]

    return classic_cca(reduce(x), reduce(y))[0].mean()


def classic_pwcca(x, y):
    s, u, vh = classic_cca(x, y)
    acts, vecs = (x, u) if x.shape[1] <= y.shape[1] else (y, vh.T)
    mean = acts.mean(0)
    q, _ = np.linalg.qr((acts - mean) @ vecs + mean)
    w = np.abs(q.T @ acts).sum(1)
    return np.sum(w / w.sum() * s)


# ------------------------------------------------ the covariance route, in JAX (jaxsim 0.1)
# Whitening through an eigendecomposition of X^T X, pseudo-inverting eigenvalues below
# d * eps * max: what jaxsim did before its SVD-based preparation, and what google/svcca
# does. Kept here to measure, in one run, what the stable route costs and what it fixes.


def _cov_whiten(x):
    import jax.numpy as jnp

    n, d = x.shape
    xc = x - x.mean(0)
    cov = xc.T @ xc / (n - 1)
    scale = jnp.max(jnp.abs(cov))
    w, v = jnp.linalg.eigh(cov / scale)
    tol = jnp.max(w) * d * jnp.finfo(w.dtype).eps
    inv = jnp.where(w > tol, 1 / jnp.sqrt(jnp.where(w > tol, w, 1)), 0)
    return xc, (v * inv) @ v.T / jnp.sqrt(scale * (n - 1)), jnp.sum(w > tol)


def covariance_mean_cca(x, y):
    import jax.numpy as jnp

    xc, wx, rx = _cov_whiten(x)
    yc, wy, ry = _cov_whiten(y)
    s = jnp.linalg.svd(wx.T @ (xc.T @ yc) @ wy, compute_uv=False)
    k = min(x.shape[1], y.shape[1])
    return jnp.sum(jnp.clip(s, 0, 1)) / k


def covariance_pwcca(x, y):
    import jax.numpy as jnp

    xc, wx, _ = _cov_whiten(x)
    yc, wy, _ = _cov_whiten(y)
    u, s, vh = jnp.linalg.svd(wx.T @ (xc.T @ yc) @ wy, full_matrices=False)
    acts, vecs = (x, u) if x.shape[1] <= y.shape[1] else (y, vh.T)
    mean = acts.mean(0)
    q, _ = jnp.linalg.qr((acts - mean) @ vecs + mean[: vecs.shape[1]])
    w = jnp.abs(q.T @ acts).sum(1)
    return jnp.sum(w / w.sum() * jnp.clip(s, 0, 1))


def covariance_svcca(x, y, k=20):
    import jax.numpy as jnp

    def reduce(a):
        ac = a - a.mean(0)
        w, v = jnp.linalg.eigh(ac.T @ ac)
        return ac @ v[:, ::-1][:, :k]

    return covariance_mean_cca(reduce(x), reduce(y))
