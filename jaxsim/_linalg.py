"""Matrix decompositions with finite derivatives, that never deadlock XLA's CPU pool.

* **Deadlock.** A *batched* LAPACK decomposition on the CPU splits the batch over XLA's
  intra-op pool and blocks a pool thread until the pieces finish; as many such calls at
  once as the pool has threads hang the process. On the CPU each decomposition is
  therefore applied one matrix at a time under ``vmap`` (``sequential_vmap``); GPU and
  TPU keep the vendors' batched solvers.
* **Derivatives at degenerate points.** JAX's SVD and QR rules divide by differences of
  singular values and by singular values; here those divisions are made safe: null
  directions, and rotations within a subspace of equal singular values, carry no
  derivative. Every measure is invariant to such rotations, so the derivative is exact
  wherever the measure is differentiable and finite everywhere.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Matrix product at full precision: on recent GPUs a float32 product defaults to TF32
    (10-bit mantissa, ~1e-3 relative error) and on TPUs to bfloat16 passes; every product
    in jaxsim goes through here or :func:`inner` (a test reads the compiled programs)."""
    return jnp.matmul(a, b, precision=HIGHEST)


def inner(a: jax.Array, b: jax.Array) -> jax.Array:
    """``sum(a * b)`` over all entries (flattened), at full precision."""
    return jnp.vdot(a, b, precision=HIGHEST)


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


@functools.lru_cache(maxsize=None)
def _sequential(fn: Callable[[jax.Array], Any]) -> Callable[[jax.Array], Any]:
    return jax.custom_batching.sequential_vmap(fn)


def _primal(fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
    return _sequential(fn)(x) if _on_cpu() else fn(x)


def _lapack_svd(x: jax.Array, algorithm: Any = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    u, s, vh = jax.lax.linalg.svd(x, full_matrices=False, algorithm=algorithm)
    return u, s, vh


def _svd_thin(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """JAX's default thin SVD on every platform (batched Jacobi on CUDA up to 1024 a side,
    gesvd beyond). On the CPU, where LAPACK's divide-and-conquer SVD (gesdd) can fail to
    converge on a finite matrix (JAX then returns NaN factors), the QR-iteration SVD
    (gesvd) is taken instead for that matrix. Not cuSOLVER's polar-decomposition SVD
    (gesvdp), although faster: on rank-deficient layers (dead units, constant units) its
    factors are wrong, and the CCA family and Procrustes with them
    (``benchmarks/svd_routes.py`` reports both on such a layer)."""
    u, s, vh = _lapack_svd(x)
    if not _on_cpu():
        return u, s, vh
    failed = jnp.any(jnp.isnan(s)) & jnp.all(jnp.isfinite(x))
    return jax.lax.cond(
        failed, lambda: _lapack_svd(x, jax.lax.linalg.SvdAlgorithm.QR), lambda: (u, s, vh)
    )


def _eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    w, v = jnp.linalg.eigh(x)
    return w, v


def _qr_reduced(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    q, r = jnp.linalg.qr(x)
    return q, r


def _tolerance(s_max: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """numpy's matrix_rank cut-off: size times the dtype's resolution, relative to the
    largest singular value."""
    return s_max * max(shape[-2:]) * jnp.finfo(dtype).eps


def _safe_inverse(v: jax.Array, tol: jax.Array | float) -> jax.Array:
    live = jnp.abs(v) > tol
    return jnp.where(live, 1 / jnp.where(live, v, 1), 0)


def _numpy_left_vectors(
    left: jax.Array, core: jax.Array, right: jax.Array, rows: jax.Array, cols: jax.Array
) -> jax.Array:
    """The left singular vectors that NumPy's float64 LAPACK gives the matrix
    ``T = left^T core right`` cropped to the ``rows`` and ``cols`` marked True (its full
    SVD, as google/svcca takes it), with ``T`` formed on the host in float64 from the
    factors; put back in place (0 in the cropped rows, and in the columns past the
    cropped matrix's own) and returned in float32 (only their orientation is used). Host
    LAPACK calls are made one at a time: several devices calling into a threaded BLAS at
    once starve each other."""
    d_a, d_b = left.shape[1], right.shape[1]
    shape = jax.ShapeDtypeStruct((d_a, min(d_a, d_b)), np.float32)

    def run(lf, c, rt, keep_rows, keep_cols):
        keep_rows, keep_cols = np.asarray(keep_rows), np.asarray(keep_cols)
        u = np.zeros(shape.shape, np.float32)
        if keep_rows.any() and keep_cols.any():
            f64 = lambda m: np.asarray(m, np.float64)
            t = f64(lf)[:, keep_rows].T @ f64(c) @ f64(rt)[:, keep_cols]
            with _HOST_LAPACK:
                cropped = np.linalg.svd(t)[0]
            r = min(u.shape[1], cropped.shape[1])
            u[keep_rows, :r] = cropped[:, :r]
        return u

    stop = jax.lax.stop_gradient
    return jax.pure_callback(
        run, shape, stop(left), stop(core), stop(right), rows, cols, vmap_method="sequential"
    )


_HOST_LAPACK = threading.Lock()


def _with_safe_jvp(primal: Callable[[jax.Array], Any]) -> Callable[[jax.Array], Any]:
    """A thin SVD computed by ``primal``, differentiated by the safe rule below."""

    @jax.custom_jvp
    def run(x):
        return primal(x)

    @run.defjvp
    def jvp(primals, tangents):
        (a,), (da,) = primals, tangents
        out = run(a)
        return out, _svd_tangents(a, da, *out)

    return run


svd = _with_safe_jvp(lambda x: _primal(_svd_thin, x))
svd.__doc__ = """Thin SVD ``(u, s, vh)`` of a real matrix (see the module docstring)."""


def core_svd_reference_signs(
    left: jax.Array, core: jax.Array, right: jax.Array, rows: jax.Array, cols: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``(p, s, qh)`` of ``core`` (k_a x k_b), oriented so that ``left^T p`` are
    the left singular vectors of ``T = left^T core right`` (rows of ``left`` and ``right``
    orthonormal) as NumPy's float64 LAPACK orients those of ``T`` cropped to the ``rows``
    and ``cols`` marked True (looked up on the host), whatever the dtype and backend: for
    results that, like google/svcca's PWCCA, depend on those signs. ``T``'s columns
    outside the kept ones must be 0. The decomposition and its derivative are the
    device's, of the small ``core``; only the signs come from the host."""
    p, s, qh = svd(core)
    u_ref = _numpy_left_vectors(left, core, right, rows, cols).astype(p.dtype)
    r = min(p.shape[1], u_ref.shape[1])
    agree = jnp.sum(p[:, :r] * dot(left, u_ref[:, :r]), axis=0)
    sign = jnp.sign(jnp.pad(agree, (0, p.shape[1] - r)))
    sign = jax.lax.stop_gradient(jnp.where(sign == 0, 1, sign))
    return p * sign, s, qh * sign[:, None]


def _svd_tangents(a, da, u, s, vh):
    v = vh.T
    m, n = a.shape
    ds_mat = dot(dot(u.T, da), v)
    ds = jnp.diagonal(ds_mat)
    tol = _tolerance(s[0], a.shape, a.dtype)
    s_inv = _safe_inverse(s, tol)
    # F_ij = 1 / (s_j^2 - s_i^2), 0 on the diagonal and between (numerically) equal values
    diffs = (s[None, :] + s[:, None]) * (s[None, :] - s[:, None])
    f = _safe_inverse(diffs, 2 * tol * s[0])
    dss = ds_mat * s[None, :]
    sds = s[:, None] * ds_mat
    du = dot(u, f * (dss + dss.T))
    dv = dot(v, f * (sds + sds.T))
    if m > n:
        dav = dot(da, v)
        du = du + (dav - dot(u, dot(u.T, dav))) * s_inv[None, :]
    if n > m:
        dau = dot(da.T, u)
        dv = dv + (dau - dot(v, dot(v.T, dau))) * s_inv[None, :]
    return du, ds, dv.T


@jax.custom_jvp
def eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric real matrix (see the module
    docstring)."""
    return _primal(_eigh, x)


@eigh.defjvp
def _eigh_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    w, v = eigh(a)
    vdv = dot(dot(v.T, (da + da.T) / 2), v)
    tol = jnp.max(jnp.abs(w)) * a.shape[-1] * jnp.finfo(a.dtype).eps
    # F_ij = 1 / (w_j - w_i), 0 on the diagonal and between (numerically) equal values
    f = _safe_inverse(w[None, :] - w[:, None], tol)
    return (w, v), (jnp.diagonal(vdv), dot(v, f * vdv))


def data_svd(
    x: jax.Array, keep: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``(u, s, vh)`` of a (centered, scaled) data matrix, descending, and the mask
    of its numerically nonzero singular values; with ``keep``, only the first ``keep``
    columns of ``u`` (and rows of ``vh``), all singular values.

    float32 (and anything narrower): LAPACK's SVD of the data, accurate to the dtype's
    resolution relative to the largest singular value; null below numpy's ``matrix_rank``
    cut-off ``s_max * max(n, d) * eps``. float64: through the eigendecomposition of the
    smaller Gram matrix (``x^T x`` or ``x x^T``) and one product, faster than the SVD,
    and, at float64's resolution, exact to ~1e-10 for condition numbers up to ~1e3 (the
    covariance route of the published code, which float64 results must equal); null
    below the same cut-off applied to the eigenvalues, ``max(n, d) * eps * lambda_max``.
    Null directions have zero columns in ``u`` (float64) or arbitrary ones (float32);
    callers mask them.
    """
    n, d = x.shape
    k = min(n, d) if keep is None else keep
    if x.dtype != jnp.float64:
        u, s, vh = svd(x)
        return u[:, :k], s, vh[:k], s > s[0] * max(n, d) * jnp.finfo(x.dtype).eps
    tall = n >= d
    s, vecs, live = _gram_eigen(dot(x.T, x) if tall else dot(x, x.T), max(n, d))
    inv = _safe_inverse(s, 0)[:k]
    vecs = vecs[:, :k]
    if tall:  # only the kept columns of u are formed: n d k, not n d^2
        return dot(x, vecs) * inv, s, vecs.T, live
    return vecs * live[:k], s, (dot(x.T, vecs) * inv).T, live


def _gram_eigen(gram: jax.Array, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Singular values (descending), eigenvectors and live mask of a data matrix from its
    Gram, with :func:`data_svd`'s float64 cut-off ``size * eps * lambda_max``."""
    w, vecs = eigh(gram)
    w, vecs = w[::-1], vecs[:, ::-1]
    live = w > w[0] * size * jnp.finfo(w.dtype).eps
    return jnp.where(live, jnp.sqrt(jnp.where(live, w, 1)), 0), vecs, live


def uses_gram(x: jax.Array) -> bool:
    """Whether :func:`gram_svd` serves ``x`` (n, d): float64 with ``n >= d``."""
    return x.dtype == jnp.float64 and x.shape[0] >= x.shape[1]


def gram_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(s, v, live)`` of :func:`data_svd` without its left vectors, for a float64 ``x``
    with ``n >= d`` (:func:`uses_gram`): the left vectors are ``x v / s``, which callers
    that only need their products apply to smaller matrices instead (two d x d products
    in place of one n x d x d)."""
    return _gram_eigen(dot(x.T, x), x.shape[0])


def _values_only(x: jax.Array) -> jax.Array:
    s = jax.lax.linalg.svd(x, full_matrices=False, compute_uv=False)
    if not _on_cpu():
        return s
    failed = jnp.any(jnp.isnan(s)) & jnp.all(jnp.isfinite(x))
    return jax.lax.cond(failed, lambda: _svd_thin(x)[1], lambda: s)


@jax.custom_jvp
def singular_values(x: jax.Array) -> jax.Array:
    """Singular values, descending, without forming the vectors (half an SVD's time);
    their derivative ``diag(u^T dx v)`` is always finite."""
    return _primal(_values_only, x)


@singular_values.defjvp
def _singular_values_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    u, s, vh = svd(x)
    return s, jnp.sum(dot(u.T, dx) * vh, axis=1)


@jax.custom_jvp
def qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reduced QR of a tall real matrix (see the module docstring)."""
    return _primal(_qr_reduced, x)


@qr.defjvp
def _qr_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    q, r = qr(x)
    diag = jnp.diagonal(r)
    tol = _tolerance(jnp.max(jnp.abs(diag)), x.shape, x.dtype)
    # dx R^{-1}, with the columns of dependent directions (|r_jj| ~ 0) left without
    # derivative instead of divided by zero
    live = jnp.abs(diag) > tol
    r_safe = r + jnp.diag(jnp.where(live, 0, 1 - diag))
    dx_rinv = jax.scipy.linalg.solve_triangular(r_safe, dx.T, trans="T", lower=False).T
    dx_rinv = dx_rinv * live[None, :]
    qt_dx_rinv = dot(q.T, dx_rinv)
    lower = jnp.tril(qt_dx_rinv, -1)
    do = lower - lower.T
    dq = dot(q, do - qt_dx_rinv) + dx_rinv
    dr = dot(qt_dx_rinv - do, r)
    return (q, r), (dq, dr)
