r"""Canonical correlation analysis and its descendants: mean CCA, SVCCA, PWCCA.

Activations are ``(n, features)`` arrays, axis 0 the n examples. google/svcca's code takes
the transpose, ``(neurons, n)``: ``jaxsim.cca(x, y)`` corresponds to
``cca_core.get_cca_similarity(x.T, y.T, epsilon)``.

``epsilon`` has google/svcca's meaning: each covariance block is divided by its largest
absolute entry, units whose scaled variance is below ``epsilon`` are dropped, and
``epsilon`` is added to the scaled diagonal. With ``epsilon=0`` nothing is dropped or
added, and rank-deficient covariances are inverted as pseudo-inverses (eigenvalues below
``d * eps(dtype)`` of the largest are treated as 0), so a layer with dead units gives a
finite answer rather than the square root of a negative eigenvalue.

Every measure here is ``pair(prepare(x), prepare(y))``: ``prepare`` centers a layer and
computes its whitening matrix once (a ``d x d`` covariance and its eigendecomposition);
``pair`` forms the ``d1 x d2`` cross-covariance in the whitened bases and takes its
singular values. ``similarity_grid`` reuses the prepared layers across all pairs.

References:
  Hotelling, Relations between two sets of variates, 1936.
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

from jaxsim import _linalg as _la
from jaxsim import _validation as _v
from jaxsim._measure import Measure, center_features, dot, evaluate, inv_sqrt, safe_ratio

Array = jax.Array


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
    """A layer prepared for CCA: the cross-covariance of two prepared layers a, b in their
    whitened bases is ``a.whiten.T @ a.centered.T @ b.centered @ b.whiten``."""

    centered: Array  # (n, m) centered activations (or their top singular directions)
    mean: Array  # (m,) feature means of the raw activations
    whiten: Array  # (m, m) (scaled covariance + eps I)^(-1/2) / sqrt(scale (n - 1)), masked
    kept: Array  # (m,) bool, units kept by the epsilon rule (and SVCCA's truncation)
    # PWCCA needs the kept units' covariance, (n - 1) * scale * V diag(max(w - eps, 0)) V^T:
    eigvecs: Array  # (m, m) V
    eigvals: Array  # (m,) w, eigenvalues of the scaled, masked, regularised covariance
    scale: Array  # (n - 1) * the largest absolute covariance entry


# ----------------------------------------------------------------------------- prepare


def _summary(centered: Array, mean: Array, eigvecs: Array, eigvals: Array, kept: Array,
             scale: Array, n: int) -> CCASummary:
    """A prepared layer from the eigendecomposition of its scaled (by ``scale``), masked,
    epsilon-regularised covariance."""
    both = kept[:, None] & kept[None, :]
    total = jnp.where(scale > 0, scale, 1) * (n - 1)
    whiten = jnp.where(both, dot(eigvecs * inv_sqrt(eigvals), eigvecs.T), 0) / jnp.sqrt(total)
    return CCASummary(centered, mean, whiten, kept, eigvecs, eigvals, total)


def _prepare_cca(x: Array, epsilon: float) -> CCASummary:
    n, d = x.shape
    mean = jnp.mean(x, axis=0)
    xc = x - mean
    cov = dot(xc.T, xc) / (n - 1)
    scale = jnp.max(jnp.abs(cov))
    s = safe_ratio(cov, scale)
    kept = jnp.diagonal(s) >= epsilon
    s = jnp.where(kept[:, None] & kept[None, :], s, 0) + epsilon * jnp.diag(kept.astype(x.dtype))
    w, v = _la.eigh(s)
    return _summary(xc, mean, v, w, kept, scale, n)


def _top_directions(x: Array, m: int) -> tuple[Array, Array]:
    """Centered x projected on its top-m principal directions, and all squared singular
    values (descending). Uses the smaller of the d x d covariance and the n x n Gram."""
    n, d = x.shape
    xc = center_features(x)
    if n >= d:
        w, v = _la.eigh(dot(xc.T, xc))
        w, v = w[::-1], v[:, ::-1]
        z = dot(xc, v[:, :m])
    else:
        w, u = _la.eigh(dot(xc, xc.T))
        w, u = w[::-1], u[:, ::-1]
        z = u[:, :m] * jnp.sqrt(jnp.maximum(w[:m], 0))
    return z, jnp.maximum(w, 0)


def _prepare_svcca(x: Array, keep_dims: int | None, keep_variance: float,
                   epsilon: float) -> CCASummary:
    n, d = x.shape
    m = keep_dims if keep_dims is not None else min(n, d)
    z, w = _top_directions(x, m)
    if keep_dims is None:
        frac = jnp.cumsum(w) / jnp.sum(w)
        # fewest directions whose variance reaches keep_variance of the total; the small
        # slack absorbs rounding when keep_variance is 1
        count = jnp.sum(frac < keep_variance - 16 * jnp.finfo(w.dtype).eps) + 1
        mask = jnp.arange(m) < count
    else:
        mask = jnp.ones(m, bool)
    # The projected directions are uncorrelated, so their covariance is the diagonal
    # w / (n - 1): whitening is a rescaling, no second eigendecomposition needed.
    lam = w[:m] / (n - 1)
    scale = lam[0]
    s = safe_ratio(lam, scale)
    kept = mask & (s >= epsilon)
    return _summary(z, jnp.zeros(m, x.dtype), jnp.eye(m, dtype=x.dtype),
                    jnp.where(kept, s + epsilon, 0), kept, scale, n)


# -------------------------------------------------------------------------------- pair


def _cross(a: CCASummary, b: CCASummary) -> Array:
    return dot(dot(a.whiten.T, dot(a.centered.T, b.centered)), b.whiten)


def _rank(a: CCASummary, b: CCASummary) -> Array:
    return jnp.minimum(jnp.sum(a.kept), jnp.sum(b.kept))


def _valid(s: Array, rank: Array) -> Array:
    return jnp.where(jnp.arange(s.shape[0]) < rank, jnp.clip(s, 0, 1), 0)


def _coefficients(a: CCASummary, b: CCASummary) -> Array:
    return _valid(_la.singular_values(_cross(a, b)), _rank(a, b))


def _mean_pair(a: CCASummary, b: CCASummary) -> Array:
    return safe_ratio(jnp.sum(_coefficients(a, b)), _rank(a, b).astype(a.centered.dtype))


def _cca_result(a: CCASummary, b: CCASummary) -> CCAResult:
    n = a.centered.shape[0]
    k = min(a.whiten.shape[0], b.whiten.shape[0])
    u, s, vh = _la.svd(_cross(a, b), full_matrices=False)
    rank = _rank(a, b)
    root = math.sqrt(n - 1)
    xw = dot(a.whiten, u[:, :k]) * root
    yw = dot(b.whiten, vh[:k].T) * root
    return CCAResult(_valid(s[:k], rank), rank, xw, yw, dot(a.centered, xw), dot(b.centered, yw))


def _kept_first(s: CCASummary) -> CCASummary:
    """The same layer with its kept units moved to the front (order kept)."""
    order = jnp.argsort(~s.kept, stable=True)
    return CCASummary(s.centered[:, order], s.mean[order], s.whiten[order][:, order],
                      s.kept[order], s.eigvecs[order], s.eigvals, s.scale)


def _pw_side(s: CCASummary, vecs: Array, coefs: Array, epsilon: float) -> Array:
    """PWCCA from the narrower side, as google/svcca's compute_pwcca does it.

    ``vecs`` are that side's singular vectors (columns) of the whitened cross-covariance.
    The reference forms directions ``D = X_c vecs + 1 mu^T`` (unit i's mean added to
    direction i), orthonormalises them by QR, ``D = Q R``, and weights direction i by
    ``sum_j |Q^T X|_ij`` over the raw activations X of the kept units. Because of that
    added mean the result depends on the SVD's sign convention, as the reference's does.

    Both D and X lie in the span of ``[P, 1/sqrt(n)]``, where ``X_c = P L^(1/2) V^T`` comes
    from the covariance eigendecomposition already at hand, so the QR and the projections
    are done on ``(d + 1) x d`` coordinates in that basis: no n-sized work beyond CCA's.
    """
    d = s.whiten.shape[0]
    n = s.centered.shape[0]
    mean = jnp.where(s.kept, s.mean, 0)
    root = jnp.sqrt(jnp.maximum(s.eigvals - epsilon, 0) * s.scale)[:, None] * s.eigvecs.T
    offset = math.sqrt(n) * mean[None, :]
    q, _ = _la.qr(jnp.concatenate([dot(root, vecs), offset]))
    weights = jnp.sum(jnp.abs(dot(q.T, jnp.concatenate([root, offset]))), axis=1)
    weights = jnp.where(jnp.arange(d) < jnp.sum(s.kept), weights, 0)
    k = coefs.shape[0]
    weights = jnp.pad(weights, (0, max(0, k - d)))[:k]
    return safe_ratio(jnp.sum(weights * coefs), jnp.sum(weights))


def _pw_variates(s: CCASummary, vecs: Array, coefs: Array, epsilon: float) -> Array:
    """PWCCA in the paper's whitened-variates reading: direction i is the canonical variate
    ``h_i = X_c W vecs_i`` (normalised) and its weight is ``sum_j |<h_i, x_j>|`` over the
    kept units' activations. With ``X_c^T X_c = R^T R`` from the covariance
    eigendecomposition, every inner product is a d x d product: no n-sized work."""
    d = s.whiten.shape[0]
    root = jnp.sqrt(jnp.maximum(s.eigvals - epsilon, 0) * s.scale)[:, None] * s.eigvecs.T
    a = dot(root, dot(s.whiten, vecs))  # h_i = P a_i for an orthonormal P
    norms = jnp.linalg.norm(a, axis=0)
    weights = safe_ratio(jnp.sum(jnp.abs(dot(a.T, root)), axis=1), norms)
    weights = jnp.where(jnp.arange(d) < jnp.sum(s.kept), weights, 0)
    k = coefs.shape[0]
    weights = jnp.pad(weights, (0, max(0, k - d)))[:k]
    return safe_ratio(jnp.sum(weights * coefs), jnp.sum(weights))


def _pwcca_pair(a: CCASummary, b: CCASummary, *, epsilon: float,
                directions: str = "reference") -> Array:
    side = _pw_side if directions == "reference" else _pw_variates
    static_sides = epsilon == 0
    if not static_sides:
        # Units dropped by epsilon go last, so the SVD sees the reference's cropped
        # matrix followed by zero rows and columns, and the kept units' i-th mean lines up
        # with the i-th direction as in the reference.
        a, b = _kept_first(a), _kept_first(b)
    u, s, vh = _la.svd(_cross(a, b), full_matrices=True)
    coefs = _valid(s, _rank(a, b))
    x_side = lambda: side(a, u, coefs, epsilon)
    y_side = lambda: side(b, vh.T, coefs, epsilon)
    if static_sides:  # epsilon == 0: nothing dropped, the narrower side is known statically
        return x_side() if a.whiten.shape[0] <= b.whiten.shape[0] else y_side()
    return jnp.where(jnp.sum(a.kept) <= jnp.sum(b.kept), x_side(), y_side())


# ---------------------------------------------------------------------------- measures


@functools.lru_cache(maxsize=None)
def cca_measure(*, epsilon: float = 0.0) -> Measure:
    """Mean CCA as a :class:`Measure`."""
    epsilon = _v.non_negative(epsilon, "epsilon")
    return Measure("mean_cca", functools.partial(_prepare_cca, epsilon=epsilon), _mean_pair)


@functools.lru_cache(maxsize=None)
def svcca_measure(*, keep_dims: int | None = None, keep_variance: float = 0.99,
                  epsilon: float = 0.0) -> Measure:
    """SVCCA as a :class:`Measure` (keep_dims is checked against each layer's shape by
    :func:`check_keep_dims`)."""
    prepare = functools.partial(_prepare_svcca, keep_dims=keep_dims,
                                keep_variance=_check_keep(keep_dims, keep_variance),
                                epsilon=_v.non_negative(epsilon, "epsilon"))
    return Measure("svcca", prepare, _mean_pair)


@functools.lru_cache(maxsize=None)
def pwcca_measure(*, epsilon: float = 0.0, directions: str = "reference") -> Measure:
    """PWCCA as a :class:`Measure` (asymmetric when the two widths are equal)."""
    _v.choice(directions, "directions", ("reference", "variates"))
    epsilon = _v.non_negative(epsilon, "epsilon")
    pair = functools.partial(_pwcca_pair, epsilon=epsilon, directions=directions)
    return Measure("pwcca", functools.partial(_prepare_cca, epsilon=epsilon), pair,
                   symmetric=False)


# ---------------------------------------------------------------------- public functions


def _checked(x: Any, y: Any, epsilon: float, check_finite: bool) -> tuple[Array, Array, float]:
    x, y = _v.pair(x, y, min_n=2, check_finite=check_finite)
    return x, y, _v.non_negative(epsilon, "epsilon")


@functools.partial(jax.jit, static_argnames="epsilon")
def _cca(x: Array, y: Array, epsilon: float) -> CCAResult:
    return _cca_result(_prepare_cca(x, epsilon), _prepare_cca(y, epsilon))


def cca(x: Any, y: Any, *, epsilon: float = 0.0, check_finite: bool = True) -> CCAResult:
    r"""Canonical correlation analysis of two activation arrays.

    With :math:`\Sigma` the (scaled, regularised) covariance blocks, the coefficients are the
    singular values of :math:`\Sigma_{xx}^{-1/2} \Sigma_{xy} \Sigma_{yy}^{-1/2}`.

    Args:
      x: activations, shape ``(n, ...)`` (google/svcca's ``acts1.T``).
      y: activations, shape ``(n, ...)``, the same examples.
      epsilon: google/svcca's regulariser (see the module docstring); >= 0.
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
    return _cca(*_checked(x, y, epsilon, check_finite))


def mean_cca(x: Any, y: Any, *, epsilon: float = 0.0, check_finite: bool = True) -> Array:
    r"""Mean canonical correlation, :math:`\frac{1}{k} \sum_i \rho_i` over the ``rank``
    coefficients of :func:`cca`.

    Returns:
      Scalar array in [0, 1].
    """
    x, y, epsilon = _checked(x, y, epsilon, check_finite)
    return evaluate(cca_measure, x, y, epsilon=epsilon)


def _check_keep(keep_dims: Any, keep_variance: Any) -> float:
    """Types and ranges of SVCCA's options; returns keep_variance as a float."""
    if keep_dims is not None and (isinstance(keep_dims, bool) or not isinstance(keep_dims, int)):
        raise TypeError(f"keep_dims: expected an int or None, got {keep_dims!r}")
    try:
        kv = float(keep_variance)
    except (TypeError, ValueError):
        raise TypeError(f"keep_variance: expected a number in (0, 1], got {keep_variance!r}") from None
    if keep_dims is None and not 0 < kv <= 1:
        raise ValueError(f"keep_variance: must lie in (0, 1], got {keep_variance!r}")
    return kv


def check_keep_dims(keep_dims: int | None, named: dict[str, Array]) -> None:
    """keep_dims must fit every layer: at most min(n, features) directions exist."""
    if keep_dims is None:
        return
    for name, a in named.items():
        limit = min(a.shape)
        if not 1 <= keep_dims <= limit:
            raise ValueError(
                f"keep_dims: {keep_dims} directions requested but {name} has shape "
                f"{tuple(a.shape)}, which has at most min(n, features) = {limit}"
            )


def svcca(x: Any, y: Any, *, keep_dims: int | None = None, keep_variance: float = 0.99,
          epsilon: float = 0.0, check_finite: bool = True) -> Array:
    r"""Singular vector CCA: mean CCA of each layer's top principal directions.

    Each feature is centered, the layer is reduced to its top ``keep_dims`` singular
    directions (``x_c V_k = U_k S_k``), or to the fewest whose squared singular values
    (variances) reach ``keep_variance`` of the total, and :func:`mean_cca` compares the
    reduced layers. ``keep_dims=20`` reproduces the SVCCA tutorial's recipe.

    Args:
      x, y: activations, shapes ``(n, ...)``.
      keep_dims: number of directions kept on each side; overrides ``keep_variance``.
      keep_variance: fraction of variance to keep, in (0, 1].
      epsilon: CCA regulariser, as in :func:`cca`.
    Returns:
      Scalar array in [0, 1].
    References:
      Raghu et al., SVCCA, NeurIPS 2017.
    """
    x, y, epsilon = _checked(x, y, epsilon, check_finite)
    keep_variance = _check_keep(keep_dims, keep_variance)
    check_keep_dims(keep_dims, {"x": x, "y": y})
    return evaluate(svcca_measure, x, y, keep_dims=keep_dims, keep_variance=keep_variance,
                    epsilon=epsilon)


def pwcca(x: Any, y: Any, *, epsilon: float = 0.0, directions: str = "reference",
          check_finite: bool = True) -> Array:
    r"""Projection-weighted CCA (Morcos et al. 2018), as google/svcca computes it.

    .. math:: \mathrm{PWCCA} = \sum_i \alpha_i \rho_i, \qquad
       \alpha_i \propto \sum_j \lvert \langle h_i, z_j \rangle \rvert

    The weights come from the narrower side (the first argument when widths are equal):
    ``h_i`` are the CCA directions of that side (the SVD's singular vectors applied to the
    centered activations, plus the means, orthonormalised by QR) and ``z_j`` its raw
    activations of unit j. Matches ``pwcca.compute_pwcca(x.T, y.T, epsilon)[0]`` with
    upstream PR #9's fix (the y branch reads y).

    ``directions="variates"`` takes the paper's other reading instead: ``h_i`` the
    normalised whitened canonical variates, which are orthogonal already, weighed by their
    summed absolute inner products with the units' activations. It differs from the
    reference by up to a few hundredths on ReLU layers and does not depend on SVD signs.

    Returns:
      Scalar array in [0, 1]. Not symmetric when the two widths are equal.
    References:
      Morcos, Raghu & Bengio, NeurIPS 2018.
    """
    x, y, epsilon = _checked(x, y, epsilon, check_finite)
    return evaluate(pwcca_measure, x, y, epsilon=epsilon, directions=directions)
