r"""Canonical correlation analysis and its descendants: mean CCA, SVCCA, PWCCA.

Activations are ``(n, features)`` arrays; google/svcca takes the transpose, so
``jaxsim.cca(x, y)`` corresponds to ``cca_core.get_cca_similarity(x.T, y.T, epsilon)``.
``epsilon`` has google/svcca's meaning (units below it dropped, it added to the scaled
diagonal). Every measure works from the thin SVD of each centered layer (Bjorck & Golub),
never a covariance, so float32 stays accurate; docs/numerics.md has the details (rank,
epsilon, examples per unit).

References:
  Raghu, Gilmer, Yosinski & Sohl-Dickstein, SVCCA, NeurIPS 2017.
  Morcos, Raghu & Bengio, Insights on representational similarity in neural networks with
  canonical correlation, NeurIPS 2018 (PWCCA).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxsim import _linalg as _la
from jaxsim import _programs
from jaxsim import _validation as _v
from jaxsim._cca_checks import UnderdeterminedWarning, check_keep_dims, warn_examples
from jaxsim._measure import (
    TRACE_COUNT,
    Measure,
    bounded_ratio,
    dot,
    evaluate,
    poison,
    safe_ratio,
    safe_sqrt,
    unit_scaled,
)

__all__ = ["CCAResult", "UnderdeterminedWarning", "cca", "mean_cca", "pwcca", "svcca"]


class CCAResult(NamedTuple):
    """Result of :func:`cca` (a pytree).

    Attributes:
      coefficients: ``(k,)`` canonical correlations, descending, ``k = min(d1, d2)``;
        entries past ``rank`` are 0.
      rank: number of meaningful coefficients, ``min`` of the units kept on each side
        (``k`` unless ``epsilon`` dropped low-variance units).
      x_weights: ``(d1, k)``; the canonical variates of x are ``(x - mean(x)) @ x_weights``.
      y_weights: ``(d2, k)``, likewise for y.
      x_variates: ``(n, k)`` canonical variates (directions in example space) of x, unit
        variance; ``corr(x_variates[:, i], y_variates[:, i]) == coefficients[i]``.
      y_variates: ``(n, k)``, likewise for y.
    """

    coefficients: Array
    rank: Array
    x_weights: Array
    y_weights: Array
    x_variates: Array
    y_variates: Array


class CCASummary(NamedTuple):
    """A layer prepared for the CCA family: the thin SVD of its centered activations.

    With ``X_s = U S V^T`` the centered activations of the kept units, scaled so that the
    largest unit variance is 1, the canonical correlations of two layers a, b are the
    singular values of ``(U F)_a^T (U F)_b`` (:func:`_cross`): an orthogonal
    factorization of the data, whose condition number is that of X, not its square.
    In float64 with ``n >= d`` the whitened directions are kept as the product
    ``basis @ weights`` (``X_s`` and ``V F / S``), never formed: see :func:`_prepare_cca`.
    """

    basis: Array  # (n, k) U F, k = min(n, d): whitened directions, 0 where F is 0; or X_s
    values: Array  # (k,) S, descending
    right: Array  # (k, d) V^T, zero columns for dropped units
    factor: Array  # (k,) F = sqrt(lam / (lam + eps)), lam = S^2; 0 past the effective rank
    offset: Array  # (d,) unit means in the units of S (for PWCCA's directions); 0 if dropped
    kept: Array  # (d,) bool, units kept by the epsilon rule
    rank: Array  # () effective rank: number of directions with F > 0
    weights: Array | None = None  # (d, k) V F / S when basis is X_s (d, k): directions X_s V F / S


class Subspace(NamedTuple):
    """What mean CCA and SVCCA need of a prepared layer: its whitened directions and
    their number. Zero columns appended to ``basis`` add only zero canonical correlations,
    past the effective rank, so the pair's value does not change (see :func:`_widen`)."""

    basis: Array  # (n, k) as CCASummary.basis
    rank: Array  # () effective rank
    weights: Array | None = None  # as CCASummary.weights


class Units(NamedTuple):
    """PWCCA's prepared layer: the mask of its units first (a grid reads a summary's width,
    here the number of units, from its first leaf), then its :class:`CCASummary`.
    :func:`_widen_units` pads it with units that no PWCCA value sees."""

    kept: Array  # (d,) as CCASummary.kept
    layer: CCASummary


def _widen_units(s: Units, d: int) -> Units:
    """The same layer with ``d - width`` absent units and as many null directions (up to
    ``min(n, d)``): zero columns of the data and of ``V^T``, zero means, not kept (so
    cropped from the reference's matrix and never a side's unit), zero directions (zero
    canonical correlations past the rank, which weigh nothing; QR and the SVD treat
    zero rows and columns exactly)."""
    layer = s.layer
    n, k = layer.basis.shape[0], layer.values.shape[0]
    extra_d, extra_k = d - layer.kept.shape[0], min(n, d) - k
    pad = lambda a, widths: jnp.pad(a, widths)
    basis_extra = extra_d if layer.weights is not None else extra_k  # X_s (n, d) or U F (n, k)
    widened = layer._replace(
        basis=pad(layer.basis, [(0, 0), (0, basis_extra)]),
        values=pad(layer.values, [(0, extra_k)]),
        right=pad(layer.right, [(0, extra_k), (0, extra_d)]),
        factor=pad(layer.factor, [(0, extra_k)]),
        offset=pad(layer.offset, [(0, extra_d)]),
        kept=pad(layer.kept, [(0, extra_d)]),
        weights=None if layer.weights is None else pad(layer.weights, [(0, extra_d), (0, extra_k)]),
    )
    return Units(widened.kept, widened)


def _subspace(s: CCASummary) -> Subspace:
    return Subspace(s.basis, s.rank, s.weights)


def _widen(s: Subspace, k: int) -> Subspace:
    """The same layer with ``k - width`` zero directions appended (grids pad close widths
    to one shape: one compiled pair step for them)."""
    extra = k - s.basis.shape[1]
    weights = None if s.weights is None else jnp.pad(s.weights, [(0, extra), (0, extra)])
    return s._replace(basis=jnp.pad(s.basis, [(0, 0), (0, extra)]), weights=weights)


# ----------------------------------------------------------------------------- prepare


def _whitening_input(x: Array, epsilon: float) -> tuple[Array, Array, Array, Array]:
    """The matrix whose SVD prepares a layer for CCA: centered, the units that the epsilon
    rule drops zeroed, scaled so that its Gram is google/svcca's scaled covariance (each
    covariance block divided by its largest entry, the largest unit variance). Returns it,
    the unit means in its units, the kept units, and the overall factor applied to the
    centered activations."""
    n = x.shape[0]
    xs, big = unit_scaled(x)
    var = jnp.sum(xs * xs, axis=0) / (n - 1)
    top = jnp.max(var)
    kept = safe_ratio(var, top) >= epsilon
    norm = jnp.sqrt(jnp.where(top > 0, top, 1) * (n - 1))
    offset = jnp.where(kept, jnp.mean(x, axis=0) / big, 0) / norm
    return jnp.where(kept, xs, 0) / norm, offset, kept, 1 / (big * norm)


def _summary(
    u: Array, s: Array, vh: Array, live: Array, offset: Array, kept: Array, eps: float
) -> CCASummary:
    """A prepared layer from the SVD of its scaled activations (``live``: the directions
    above the rank cut-off of :func:`jaxsim._linalg.data_svd`); google/svcca's epsilon
    shrinks direction i by ``sqrt(lam_i / (lam_i + eps))``, as ``(Sigma + eps I)^(-1/2)``
    does in the reference."""
    f = _shrink(s, live, eps)
    return CCASummary(u * f, s, vh, f, offset, kept, jnp.sum(live).astype(jnp.int32))


def _shrink(s: Array, live: Array, eps: float) -> Array:
    lam = s * s
    f = safe_sqrt(safe_ratio(lam, lam + eps)) if eps else jnp.ones_like(s)
    return jnp.where(live, f, 0)


def _prepare_cca(x: Array, epsilon: float) -> CCASummary:
    """A layer's :class:`CCASummary`. In float64 with at least as many examples as units
    (:func:`jaxsim._linalg.uses_gram`) the whitened directions ``U F = X_s V F / S`` are
    not formed: a pair multiplies ``X_s^T X_s'`` (the n-sized product it needs anyway)
    by the d x d factors, which saves the n x d x d product per layer."""
    xk, offset, kept, _ = _whitening_input(x, epsilon)
    if _la.uses_gram(xk):
        s, v, live = _la.gram_svd(xk)
        f = _shrink(s, live, epsilon)
        rank = jnp.sum(live).astype(jnp.int32)
        return CCASummary(xk, s, v.T, f, offset, kept, rank, v * safe_ratio(f, s))
    u, s, vh, live = _la.data_svd(xk)
    return _summary(u, s, vh, live, offset, kept, epsilon)


def _prepare_svcca(
    x: Array,
    keep_dims: int | None,
    keep_variance: float,
    epsilon: float,
    cap_keep_dims: bool = False,
) -> CCASummary:
    n, d = x.shape
    m = min(n, d) if keep_dims is None else keep_dims
    if cap_keep_dims:
        m = min(m, n, d)
    u, s, _, live = _la.data_svd(unit_scaled(x)[0], keep=m)
    s, live = s[:m], live[:m]
    if keep_dims is None:
        w = s * s
        frac = jnp.cumsum(w) / jnp.where(jnp.sum(w) > 0, jnp.sum(w), 1)
        # fewest directions whose variance reaches keep_variance of the total; the small
        # slack absorbs rounding when keep_variance is 1
        count = jnp.sum(frac < keep_variance - 16 * jnp.finfo(w.dtype).eps) + 1
        mask = jnp.arange(m) < count
    else:
        mask = jnp.ones(m, bool)
    # the reduced layer U_m S_m has the diagonal covariance S_m^2 / (n - 1): its CCA
    # basis is U_m itself, and the epsilon rule acts on S_m^2 / S_1^2
    rel = safe_ratio(s, s[0])
    kept = mask & (rel * rel >= epsilon)
    return _summary(
        u, rel, jnp.eye(m, dtype=x.dtype), live & kept, jnp.zeros(m, x.dtype), kept, epsilon
    )


# -------------------------------------------------------------------------------- pair


def _cross(a: CCASummary | Subspace, b: CCASummary | Subspace) -> Array:
    """``(U F)_a^T (U F)_b``: the whitened cross-covariance in the layers' SVD bases."""
    c = dot(a.basis.T, b.basis)
    if a.weights is not None:
        c = dot(a.weights.T, c)
    return c if b.weights is None else dot(c, b.weights)


def _directions(s: CCASummary) -> Array:
    """The whitened directions ``U F`` (n, k)."""
    return s.basis if s.weights is None else dot(s.basis, s.weights)


def _rank(a: CCASummary, b: CCASummary) -> Array:
    return jnp.minimum(a.rank, b.rank)


def _valid(s: Array, rank: Array) -> Array:
    return jnp.where(jnp.arange(s.shape[0]) < rank, jnp.clip(s, 0, 1), 0)


def _coefficients(a: CCASummary, b: CCASummary) -> Array:
    return _valid(_la.singular_values(_cross(a, b)), _rank(a, b))


def _mean_pair(a: CCASummary, b: CCASummary) -> Array:
    """Mean over the effective rank (the canonical directions both layers have)."""
    return bounded_ratio(jnp.sum(_coefficients(a, b)), _rank(a, b).astype(a.basis.dtype), 0.0)


def _pad_columns(m: Array, k: int) -> Array:
    return jnp.pad(m, [(0, 0), (0, max(0, k - m.shape[1]))])[:, :k]


def _cca_result(a: CCASummary, b: CCASummary, scale_a: Array, scale_b: Array) -> CCAResult:
    """``scale_*``: the factor that took the centered activations to the SVD's input."""
    n = a.basis.shape[0]
    k = min(a.right.shape[1], b.right.shape[1])
    p, s, qh = _la.svd(_cross(a, b))
    rank = _rank(a, b)
    root = math.sqrt(n - 1)
    xv = dot(_directions(a), p) * root
    yv = dot(_directions(b), qh.T) * root
    # variates = X_c W: W = V (F / S) P / scale, the pseudo-inverse on null directions
    xw = dot(a.right.T * (safe_ratio(a.factor, a.values) * scale_a), p) * root
    yw = dot(b.right.T * (safe_ratio(b.factor, b.values) * scale_b), qh.T) * root
    return CCAResult(
        jnp.pad(_valid(s, rank), (0, k - s.shape[0])),
        rank,
        _pad_columns(xw, k),
        _pad_columns(yw, k),
        _pad_columns(xv, k),
        _pad_columns(yv, k),
    )


def _kept_first(s: CCASummary) -> CCASummary:
    """The same layer with its kept units moved to the front (order kept), as google/svcca
    crops the dropped ones: then unit i's mean lines up with direction i."""
    order = jnp.argsort(~s.kept, stable=True)
    return s._replace(right=s.right[:, order], offset=s.offset[order], kept=s.kept[order])


def _first(v: Array, count: int) -> Array:
    return jnp.pad(v, (0, max(0, count - v.shape[0])))[:count]


def _pw_side(s: CCASummary, vecs: Array, coefs: Array) -> Array:
    """PWCCA from one side, as google/svcca's compute_pwcca does it.

    ``vecs`` (k, r) are that side's singular vectors ``u`` of the whitened cross-covariance
    (in the units' basis, as the reference computes them) expressed in the layer's SVD
    basis, ``V^T u``. The reference forms directions ``D = X_c u + 1 mu^T`` (unit i's mean
    added to direction i; ``X_c u = U S V^T u``), orthonormalizes them by QR and
    weights direction i by ``sum_j |Q^T X|_ij`` over the raw activations X of the kept
    units. Both D and X lie in the span of ``[U, 1/sqrt(n)]``, so the QR and the
    projections are done on ``(k + 1)``-row coordinates: no n-sized work beyond CCA's.
    Because of the added mean the result depends on the SVD's signs, as the reference's
    does. Directions past the side's effective rank (null directions of a rank-deficient
    layer) get zero weight.
    """
    n = s.basis.shape[0]
    r = vecs.shape[1]
    root = math.sqrt(n)
    directions = jnp.concatenate([s.values[:, None] * vecs, root * _first(s.offset, r)[None, :]])
    q, _ = _la.qr(directions)
    units = jnp.concatenate([s.values[:, None] * s.right, root * s.offset[None, :]])
    weights = jnp.sum(jnp.abs(dot(q.T, units)), axis=1)
    return _weighted(weights, s.rank, coefs)


def _pw_variates(s: CCASummary, vecs: Array, coefs: Array) -> Array:
    """PWCCA in the paper's whitened-variates reading: direction i is the canonical variate
    ``h_i = U F vecs_i`` (normalized) and its weight is ``sum_j |<h_i, x_j>|`` over the
    kept units' activations (``X_c = U S V^T``; the means are orthogonal to h_i)."""
    a = s.factor[:, None] * vecs
    norms = jnp.linalg.norm(a, axis=0)
    weights = safe_ratio(jnp.sum(jnp.abs(dot(a.T, s.values[:, None] * s.right)), axis=1), norms)
    return _weighted(weights, s.rank, coefs)


def _weighted(weights: Array, rank: Array, coefs: Array) -> Array:
    k = coefs.shape[0]
    weights = jnp.pad(weights, (0, max(0, k - weights.shape[0])))[:k]
    weights = jnp.where(jnp.arange(k) < rank, weights, 0)
    return bounded_ratio(jnp.sum(weights * coefs), jnp.sum(weights), 0.0)


def _pwcca_pair(
    a: CCASummary, b: CCASummary, *, epsilon: float, directions: str = "reference"
) -> Array:
    side = _pw_side if directions == "reference" else _pw_variates
    if epsilon:
        a, b = _kept_first(a), _kept_first(b)
    # The singular vectors of the whitened cross-covariance T = V_a C V_b^T (units' basis,
    # d_a x d_b) are V_a P and V_b Q for the SVD P S Q^T of C (k_a x k_b, k = min(n, d)):
    # the sides need them in the layers' SVD bases, which is P and Q themselves. The
    # reference's directions also depend on the signs of T's singular vectors, which
    # LAPACK implementations choose differently (jax's float32 and float64 SVDs disagree,
    # GPUs differ again): those signs are NumPy's float64 LAPACK's for T, looked up on the
    # host, so every dtype and backend gives the reference's value. The sign-free variates
    # reading needs no such care and runs on the device alone.
    c = _cross(a, b)
    if directions == "reference":  # the signs of the reference's cropped matrix
        p, s, qh = _la.core_svd_reference_signs(a.right, c, b.right, a.kept, b.kept)
    else:
        p, s, qh = _la.svd(c)
    coefs = _valid(s, _rank(a, b))
    x_side = lambda: side(a, p, coefs)
    y_side = lambda: side(b, qh.T, coefs)
    # the side with fewer kept units (every unit at epsilon = 0; padded units are never
    # kept), the first on a tie
    first = jnp.sum(a.kept) <= jnp.sum(b.kept)
    if a.right.shape == b.right.shape:  # one shape: pick the side's arrays, compute once
        pick = lambda u, v: jnp.where(first, u, v)
        fields = ("values", "right", "factor", "offset", "rank")
        chosen = a._replace(**{f: pick(getattr(a, f), getattr(b, f)) for f in fields})
        return side(chosen, pick(p, qh.T), coefs)
    if epsilon == 0:  # nothing dropped, widths differ: the narrower side is known statically
        return x_side() if a.right.shape[1] < b.right.shape[1] else y_side()
    return jnp.where(first, x_side(), y_side())


# ---------------------------------------------------------------------------- measures


@functools.lru_cache(maxsize=None)
def cca_measure(*, epsilon: float = 0.0) -> Measure:
    """Mean CCA as a :class:`Measure`."""
    epsilon = _v.non_negative(epsilon, "epsilon")
    prepare = lambda x: _subspace(_prepare_cca(x, epsilon))
    return Measure("mean_cca", prepare, _mean_pair, widen=_widen)


@functools.lru_cache(maxsize=None)
def svcca_measure(
    *,
    keep_dims: int | None = None,
    keep_variance: float = 0.99,
    epsilon: float = 0.0,
    cap_keep_dims: bool = False,
) -> Measure:
    """SVCCA as a :class:`Measure` (keep_dims is checked against each layer's shape by
    :func:`check_keep_dims`)."""
    summary = functools.partial(
        _prepare_svcca,
        keep_dims=keep_dims,
        keep_variance=_check_keep(keep_dims, keep_variance),
        epsilon=_v.non_negative(epsilon, "epsilon"),
        cap_keep_dims=bool(cap_keep_dims),
    )
    return Measure("svcca", lambda x: _subspace(summary(x)), _mean_pair, widen=_widen)


@functools.lru_cache(maxsize=None)
def pwcca_measure(*, epsilon: float = 0.0, directions: str = "reference") -> Measure:
    """PWCCA as a :class:`Measure` (asymmetric when the two widths are equal)."""
    _v.choice(directions, "directions", ("reference", "variates"))
    epsilon = _v.non_negative(epsilon, "epsilon")
    pair = functools.partial(_pwcca_pair, epsilon=epsilon, directions=directions)
    return Measure(
        "pwcca",
        functools.partial(_prepare_units, epsilon=epsilon),
        lambda a, b: pair(a.layer, b.layer),
        symmetric=False,
        widen=_widen_units,
    )


def _prepare_units(x: Array, epsilon: float) -> Units:
    s = _prepare_cca(x, epsilon)
    return Units(s.kept, s)


# ---------------------------------------------------------------------- public functions


def _checked(
    x: Any, y: Any, epsilon: float, check_finite: bool, warn: bool, keep_dims: int | None = None
) -> tuple[Array, Array, float]:
    x, y = _v.pair(x, y, min_n=2, check_finite=check_finite)
    units = lambda a: a.shape[1] if keep_dims is None else min(keep_dims, a.shape[1])
    warn_examples(x.shape[0], {"x": units(x), "y": units(y)}, warn, stacklevel=4)
    return x, y, _v.non_negative(epsilon, "epsilon")


@functools.partial(jax.jit, static_argnames="epsilon")
def _cca(x: Array, y: Array, epsilon: float) -> CCAResult:
    TRACE_COUNT["cca"] += 1
    scale = lambda a: _whitening_input(a, epsilon)[3]
    res = _cca_result(_prepare_cca(x, epsilon), _prepare_cca(y, epsilon), scale(x), scale(y))
    bad = poison(x) + poison(y)
    return jax.tree.map(
        lambda v: v + bad.astype(v.dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, res
    )


def cca(
    x: Any, y: Any, *, epsilon: float = 0.0, check_finite: bool = True, warn: bool = True
) -> CCAResult:
    r"""Canonical correlation analysis of two activation arrays.

    With :math:`\Sigma` the (scaled, regularized) covariance blocks, the coefficients are the
    singular values of :math:`\Sigma_{xx}^{-1/2} \Sigma_{xy} \Sigma_{yy}^{-1/2}`.

    Args:
      x: activations, shape ``(n, ...)`` (google/svcca's ``acts1.T``).
      y: activations, shape ``(n, ...)``, the same examples.
      epsilon: google/svcca's regularizer (see docs/numerics.md); >= 0.
      check_finite: raise on NaN/inf (skipped automatically for traced values).
    Returns:
      :class:`CCAResult`; ``coefficients`` match
      ``cca_core.get_cca_similarity(x.T, y.T, epsilon)["cca_coef1"]``. A zero-variance
      input gives all-zero coefficients.

    Example:
      >>> import jax, jaxsim
      >>> x = jax.random.normal(jax.random.key(0), (500, 8))
      >>> jaxsim.cca(x, x @ jax.random.normal(jax.random.key(1), (8, 8))).coefficients.round(4)
      Array([1., 1., 1., 1., 1., 1., 1., 1.], dtype=float32)
    """
    compiled = _programs.traces()
    x, y, epsilon = _checked(x, y, epsilon, check_finite, warn)
    result = _cca(x, y, epsilon)
    if not isinstance(x, jax.core.Tracer) and not isinstance(y, jax.core.Tracer):
        _programs.relieve(compiled)
    return result


def mean_cca(
    x: Any, y: Any, *, epsilon: float = 0.0, check_finite: bool = True, warn: bool = True
) -> Array:
    r"""Mean canonical correlation, :math:`\frac{1}{k} \sum_i \rho_i` over the ``rank``
    coefficients of :func:`cca`.

    Returns:
      Scalar array in [0, 1].
    """
    x, y, epsilon = _checked(x, y, epsilon, check_finite, warn)
    return evaluate(cca_measure, x, y, epsilon=epsilon)


def _check_keep(keep_dims: Any, keep_variance: Any) -> float:
    """Types and ranges of SVCCA's options; returns keep_variance as a float."""
    if keep_dims is not None and (isinstance(keep_dims, bool) or not isinstance(keep_dims, int)):
        raise TypeError(f"keep_dims: expected an int or None, got {keep_dims!r}")
    try:
        kv = float(keep_variance)
    except (TypeError, ValueError):
        raise TypeError(
            f"keep_variance: expected a number in (0, 1], got {keep_variance!r}"
        ) from None
    if keep_dims is None and not 0 < kv <= 1:
        raise ValueError(f"keep_variance: must lie in (0, 1], got {keep_variance!r}")
    return kv


def svcca(
    x: Any,
    y: Any,
    *,
    keep_dims: int | None = None,
    keep_variance: float = 0.99,
    epsilon: float = 0.0,
    cap_keep_dims: bool = False,
    check_finite: bool = True,
    warn: bool = True,
) -> Array:
    r"""Singular vector CCA: mean CCA of each layer's top principal directions.

    Each feature is centered, the layer is reduced to its top ``keep_dims`` singular
    directions (``x_c V_k = U_k S_k``), or to the fewest whose squared singular values
    (variances) reach ``keep_variance`` of the total, and :func:`mean_cca` compares the
    reduced layers. ``keep_dims=20`` reproduces the SVCCA tutorial's recipe.

    Args:
      x: activations, shape ``(n, ...)``.
      y: activations of the same n examples, shape ``(n, ...)``.
      keep_dims: number of directions kept on each side; overrides ``keep_variance``.
      keep_variance: fraction of variance to keep, in (0, 1].
      cap_keep_dims: keep ``min(keep_dims, min(n, features))`` directions of a layer that
        has fewer than ``keep_dims`` (a logits layer of 10 units in a grid with
        ``keep_dims=20``), instead of raising.
      epsilon: CCA regularizer, as in :func:`cca`.
    Returns:
      Scalar array in [0, 1].
    References:
      Raghu et al., SVCCA, NeurIPS 2017.
    """
    keep_variance = _check_keep(keep_dims, keep_variance)
    x, y, epsilon = _checked(x, y, epsilon, check_finite, warn, keep_dims)
    check_keep_dims(keep_dims, {"x": x, "y": y}, cap_keep_dims)
    return evaluate(
        svcca_measure,
        x,
        y,
        keep_dims=keep_dims,
        keep_variance=keep_variance,
        epsilon=epsilon,
        cap_keep_dims=bool(cap_keep_dims),
    )


def pwcca(
    x: Any,
    y: Any,
    *,
    epsilon: float = 0.0,
    directions: str = "reference",
    check_finite: bool = True,
    warn: bool = True,
) -> Array:
    r"""Projection-weighted CCA (Morcos et al. 2018), as google/svcca computes it.

    .. math:: \mathrm{PWCCA} = \sum_i \alpha_i \rho_i, \qquad
       \alpha_i \propto \sum_j \lvert \langle h_i, z_j \rangle \rvert

    The weights come from the narrower side (the first argument when widths are equal):
    ``h_i`` are the CCA directions of that side (the SVD's singular vectors applied to the
    centered activations, plus the means, orthonormalized by QR) and ``z_j`` its raw
    activations of unit j. Matches ``pwcca.compute_pwcca(x.T, y.T, epsilon)[0]`` with
    upstream PR #9's fix (the y branch reads y).

    ``directions="variates"`` takes the paper's other reading instead: ``h_i`` the
    normalized whitened canonical variates, which are orthogonal already, weighed by their
    summed absolute inner products with the units' activations. It differs from the
    reference by up to a few hundredths on ReLU layers and does not depend on SVD signs.

    Returns:
      Scalar array in [0, 1]. Not symmetric when the two widths are equal.
    References:
      Morcos, Raghu & Bengio, NeurIPS 2018.
    """
    x, y, epsilon = _checked(x, y, epsilon, check_finite, warn)
    return evaluate(pwcca_measure, x, y, epsilon=epsilon, directions=directions)
