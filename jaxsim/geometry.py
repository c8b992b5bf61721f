r"""More measures of representational similarity: Procrustes shape distance, RSA, mutual
nearest neighbours and linear predictivity, plus lucid-style helpers that relate single
directions and neurons of two layers.

All take ``(n, ...)`` activations (axis 0 the examples) and are pure, jit-able and
vmap-able; each is available in :func:`jaxsim.similarity_grid` by name ("procrustes",
"rsa", "mutual_knn", "linear_predictivity").

References:
  Williams, Kunz, Kornblith & Linderman, Generalized Shape Metrics on Neural
  Representations, NeurIPS 2021 (angular Procrustes distance, partial whitening).
  Kriegeskorte, Mur & Bandettini, Representational similarity analysis, 2008.
  Huh, Cheung, Wang & Isola, The Platonic Representation Hypothesis, ICML 2024 (mutual
  k-nearest-neighbour alignment).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array
from jax.scipy.stats import rankdata

from jaxsim import _linalg as _la
from jaxsim import _row_blocks
from jaxsim import _validation as _v
from jaxsim._distances import distance_block, masked_block, pad_rows
from jaxsim._measure import (
    GramBlocks,
    Measure,
    bounded_ratio,
    center_features,
    dot,
    evaluate,
    inner,
    max_scaled,
    safe_ratio,
    safe_sqrt,
    unit_scaled,
)

__all__ = [
    "linear_predictivity",
    "most_similar_neurons",
    "mutual_knn",
    "predict_direction",
    "procrustes_distance",
    "procrustes_similarity",
    "rdm",
    "rsa",
]


def _unit(m: Array) -> Array:
    norm = jnp.linalg.norm(m)
    return m / jnp.where(norm > 0, norm, 1)


def _shape_normalize(x: Array, alpha: float) -> Array:
    """Centered, partially whitened (``X (alpha I + (1 - alpha) C^(-1/2))``, C the
    covariance ``X^T X / n``), unit Frobenius norm; rotated to the basis of x's left
    singular vectors when whitening (which changes no Procrustes alignment).

    With ``X = U S V^T`` the whitened layer is ``U (alpha S + (1 - alpha) sqrt(n)) V^T``
    on the directions x has (its numerical rank): computed from the SVD of the data, not
    from the square root of a covariance whose condition number is squared.
    """
    xs, big = unit_scaled(x)
    if alpha == 1:
        return _unit(xs)
    u, s, _, live = _la.data_svd(xs)
    # in xs's units (the data divided by big) the whitening term is sqrt(n) / big
    d = alpha * s + (1 - alpha) * math.sqrt(xs.shape[0]) / big
    return _unit(u * jnp.where(live, d, 0))


def _procrustes_pair(a: Array, b: Array) -> Array:
    return jnp.minimum(jnp.sum(_la.singular_values(dot(a.T, b))), 1.0)


@functools.lru_cache(maxsize=None)
def procrustes_measure(*, alpha: float = 1.0) -> Measure:
    """Procrustes similarity (the cosine of the angular shape distance) as a Measure."""
    alpha = _check_alpha(alpha)
    prepare = functools.partial(_shape_normalize, alpha=alpha)
    return Measure("procrustes", prepare, _procrustes_pair, widen=_zero_columns)


def _zero_columns(s: Array, k: int) -> Array:
    """A normalized layer padded to width k (zero columns leave every nuclear norm)."""
    return jnp.pad(s, [(0, 0), (0, k - s.shape[1])])


def _check_alpha(alpha: Any) -> float:
    a = _v.non_negative(alpha, "alpha")
    if a > 1:
        raise ValueError(
            f"alpha: must lie in [0, 1] (1: no whitening, 0: full whitening), got {alpha!r}"
        )
    return a


def procrustes_similarity(
    x: Any, y: Any, *, alpha: float = 1.0, check_finite: bool = True
) -> Array:
    r"""Orthogonal Procrustes similarity :math:`\lVert \tilde X^\top \tilde Y \rVert_*` in [0, 1].

    :math:`\tilde X` is x centered, partially whitened with ``alpha`` and scaled to unit
    Frobenius norm; the nuclear norm is the best alignment over orthogonal maps (widths may
    differ: the narrower side is zero-padded). 1 means equal up to rotation (and, for
    ``alpha=0``, any invertible linear map).
    """
    x, y = _v.pair(x, y, check_finite=check_finite)
    return evaluate(procrustes_measure, x, y, alpha=_check_alpha(alpha))


def procrustes_distance(
    x: Any, y: Any, *, alpha: float = 1.0, angular: bool = True, check_finite: bool = True
) -> Array:
    r"""Shape distance of Williams et al. 2021.

    Angular: :math:`\arccos \lVert \tilde X^\top \tilde Y \rVert_*` (a metric, in
    [0, pi/2]); otherwise the Procrustes distance
    :math:`\min_Q \lVert \tilde X - \tilde Y Q \rVert_F
    = \sqrt{2 - 2 \lVert \tilde X^\top \tilde Y \rVert_*}`.
    ``alpha`` interpolates between no whitening (1) and full whitening (0, CCA-like).
    """
    s = procrustes_similarity(x, y, alpha=alpha, check_finite=check_finite)
    if not angular:
        return safe_sqrt(2 - 2 * s)
    # arccos has an infinite slope at 1 (identical shapes): distance 0 there, slope 0
    below = s < 1
    return jnp.where(below, jnp.arccos(jnp.where(below, s, 0)), 0)


_DISSIMILARITIES = ("correlation", "euclidean")


_COMPARISONS = ("spearman", "pearson", "kendall")


def rdm(x: Any, *, dissimilarity: str = "correlation", check_finite: bool = True) -> Array:
    """Representational dissimilarity matrix ``(n, n)``: 1 - Pearson correlation of two
    examples' activation patterns, or their Euclidean distance."""
    _v.choice(dissimilarity, "dissimilarity", _DISSIMILARITIES)
    x = _v.activations(x, "x", check_finite_values=check_finite)
    return _rdm(x, dissimilarity, in_units=True)


def _rdm_terms(x: Array, dissimilarity: str) -> tuple[Array, Array, Array]:
    """Per-example terms that RDM entries are formed from, computed from x divided by its
    largest (centered, for Euclidean) absolute value, so that no square of the raw values
    is formed (RSA's comparisons are scale-free: they never overflow or underflow): the
    unit-norm centered patterns (correlation; a constant pattern stays 0), or the centered,
    unit-scaled features and their squared norms (Euclidean; centering changes no distance
    and keeps the expansion from cancelling). Also returns the divisor (Euclidean
    distances in x's units are it times these)."""
    if dissimilarity == "correlation":
        xs, big = max_scaled(x)
        z = xs - jnp.mean(xs, axis=1, keepdims=True)
        norm = jnp.linalg.norm(z, axis=1, keepdims=True)
        return z / jnp.where(norm > 0, norm, 1), jnp.zeros(x.shape[:1], x.dtype), big
    xs, big = unit_scaled(x)
    return xs, jnp.sum(xs * xs, axis=1), big


def _rdm_entries(
    zr: Array, zc: Array, sq_r: Array, sq_c: Array, i: Array, j: Array, dissimilarity: str
) -> Array:
    """RDM entries between examples ``i`` and ``j`` from their :func:`_rdm_terms`."""
    if dissimilarity == "correlation":
        return 1 - dot(zr, zc.T)
    return jnp.sqrt(distance_block(zr, zc, sq_r, sq_c, i, j))


def _rdm(x: Array, dissimilarity: str, in_units: bool = False) -> Array:
    """The RDM, Euclidean distances in x's units only when ``in_units`` (comparisons do
    not need them)."""
    z, sq, big = _rdm_terms(x, dissimilarity)
    idx = jnp.arange(x.shape[0])
    d = _rdm_entries(z, z, sq, sq, idx, idx, dissimilarity)
    return d * big if in_units and dissimilarity == "euclidean" else d


def _upper(m: Array) -> Array:
    i, j = jnp.triu_indices(m.shape[0], k=1)
    return m[i, j]


def _pearson(a: Array, b: Array) -> Array:
    a, b = a - jnp.mean(a), b - jnp.mean(b)
    return bounded_ratio(inner(a, b), safe_sqrt(inner(a, a)) * safe_sqrt(inner(b, b)))


_KEY_ENTRIES = 1 << 22  # differences (or products) formed at once by _rank_keys


def _power_of_two_scaled(x: Array) -> Array:
    """x divided by the power of two at or above its largest absolute value: no square
    can overflow, and, unlike any other divisor, the division rounds nothing."""
    _, exponent = jnp.frexp(jax.lax.stop_gradient(jnp.max(jnp.abs(x))))
    return x * jnp.ldexp(jnp.ones((), x.dtype), -exponent)


def _rank_keys(x: Array, dissimilarity: str) -> Array:
    """The RDM's upper triangle up to a strictly increasing map, formed so that exactly
    tied dissimilarities stay exactly tied: rank comparisons (Spearman, Kendall) need
    nothing else, and quantized or ReLU activations tie often. Each entry is reduced from
    the two patterns alone, in an order that does not depend on the pair (no centering,
    no product expansion, a power-of-two scale): squared Euclidean distances from the
    differences, ``-sign(c) c^2 / (v_i v_j)`` for correlation (``c = d <x_i, x_j> - s_i
    s_j``, ``s`` the pattern sums, ``v = d |x|^2 - s^2``; 0 for a constant pattern, whose
    correlation is taken as 0), exact wherever these sums are, as for integer-valued
    activations."""
    n, d = x.shape
    xs = _power_of_two_scaled(x)
    sums = jnp.sum(xs, axis=1)
    spread = d * jnp.sum(xs * xs, axis=1) - sums * sums

    def keys(rows, block):
        if dissimilarity == "euclidean":
            diff = block[0][:, None, :] - xs[None, :, :]
            return jnp.sum(diff * diff, axis=2)
        c = d * jnp.sum(block[0][:, None, :] * xs[None, :, :], axis=2) - block[1][:, None] * sums
        v = block[2][:, None] * spread[None, :]
        return jnp.where(v > 0, -jnp.sign(c) * (c * c) / jnp.where(v > 0, v, 1), 0)

    full = _row_blocks.row_blocks(keys, (xs, sums, spread), n * d, _KEY_ENTRIES).reshape(-1, n)[:n]
    return _upper(full)


def _rsa_prepare(x: Array, dissimilarity: str, compare: str) -> Array:
    if compare == "pearson":
        return _upper(_rdm(x, dissimilarity))
    v = _rank_keys(x, dissimilarity)
    return rankdata(v).astype(x.dtype) if compare == "spearman" else v


def _rsa_pair(a: Array, b: Array, compare: str) -> Array:
    return _row_blocks.kendall_tau_b(a, b) if compare == "kendall" else _pearson(a, b)


class RDMSource(NamedTuple):
    """What the blocks of a layer's centered RDM are made from: O(n d), not O(n^2)."""

    terms: Array  # (n_pad, d) see _rdm_terms, zero rows past n
    sq: Array  # (n_pad,)
    mean: Array  # () mean of the RDM's off-diagonal entries
    count: Array  # type: ignore[assignment]  # a field, shadowing tuple.count; n, an integer


_MEAN_ENTRIES = 1 << 22  # RDM entries formed at once while the mean is found


def _rdm_source(x: Array, n_pad: int, *, dissimilarity: str) -> RDMSource:
    """The layer's terms and the mean of its off-diagonal RDM entries, found a few rows
    at a time (``_MEAN_ENTRIES`` entries at once): no n x n array."""
    n = x.shape[0]
    z, sq, _ = _rdm_terms(x, dissimilarity)
    cols = jnp.arange(n)

    def row_sum(rows, block):
        d = _rdm_entries(block[0], z, block[1], sq, rows, cols, dissimilarity)
        return jnp.sum(jnp.where((rows[:, None] < n) & (rows[:, None] != cols[None, :]), d, 0))

    mean = jnp.sum(_row_blocks.row_blocks(row_sum, (z, sq), n, _MEAN_ENTRIES)) / (n * (n - 1))
    return RDMSource(pad_rows(z, n_pad), pad_rows(sq, n_pad), mean, jnp.asarray(n, jnp.int32))


def _rdm_block(src: RDMSource, r0: Array, c0: Array, b: int, *, dissimilarity: str) -> Array:
    """Block (r0, c0) of the layer's RDM minus its mean, 0 on the diagonal and past n: the
    cosine of two such matrices (all blocks) is the Pearson correlation of the RDMs'
    upper triangles."""
    take = lambda v, start: jax.lax.dynamic_slice_in_dim(v, start, b)
    i, j = r0 + jnp.arange(b), c0 + jnp.arange(b)
    d = _rdm_entries(
        take(src.terms, r0),
        take(src.terms, c0),
        take(src.sq, r0),
        take(src.sq, c0),
        i,
        j,
        dissimilarity,
    )
    return masked_block(d - src.mean, r0, c0, b, src.count, off_diagonal=True)


@functools.lru_cache(maxsize=None)
def rsa_measure(*, dissimilarity: str = "correlation", compare: str = "spearman") -> Measure:
    """RSA as a Measure: the RDM's upper triangle (ranked for Spearman) once per layer. With
    ``compare="pearson"`` grids form the centered RDMs block by block from the features
    (memory O(L b^2 + n d)); Spearman and Kendall need every entry of each layer's RDM
    (its ranks), ``n (n - 1) / 2`` values per layer, which grids hold for as many layers
    as fit their summary budget (see :func:`jaxsim.grid.similarity_grid`)."""
    _v.choice(dissimilarity, "dissimilarity", _DISSIMILARITIES)
    _v.choice(compare, "compare", _COMPARISONS)
    blocks = None
    if compare == "pearson":
        blocks = GramBlocks(
            functools.partial(_rdm_source, dissimilarity=dissimilarity),
            functools.partial(_rdm_block, dissimilarity=dissimilarity),
        )
    return Measure(
        "rsa",
        functools.partial(_rsa_prepare, dissimilarity=dissimilarity, compare=compare),
        functools.partial(_rsa_pair, compare=compare),
        blocks=blocks,
    )


def rsa(
    x: Any,
    y: Any,
    *,
    dissimilarity: str = "correlation",
    compare: str = "spearman",
    check_finite: bool = True,
) -> Array:
    """Representational similarity analysis: the correlation (Spearman, Pearson or Kendall's
    tau-b) of the upper triangles of the two layers' RDMs (``m = n (n - 1) / 2`` entries).
    Kendall's tau-b compares every pair of entries: O(m^2) = O(n^4) time (memory O(m));
    keep n in the hundreds for it."""
    _v.choice(dissimilarity, "dissimilarity", _DISSIMILARITIES)
    _v.choice(compare, "compare", _COMPARISONS)
    x, y = _v.pair(
        x, y, min_n=3, why=" for an RDM with more than one pair", check_finite=check_finite
    )
    return evaluate(rsa_measure, x, y, dissimilarity=dissimilarity, compare=compare)


@functools.lru_cache(maxsize=None)
def mutual_knn_measure(*, k: int = 10) -> Measure:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    return Measure(
        "mutual_knn", functools.partial(_row_blocks.knn_indices, k=k), _row_blocks.knn_pair
    )


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k: expected an int in [1, n - 1] = [1, {n - 1}], got {k!r}")
    return k


def mutual_knn(x: Any, y: Any, *, k: int = 10, check_finite: bool = True) -> Array:
    r"""Mutual k-nearest-neighbour alignment (Huh et al. 2024):
    :math:`\frac{1}{n} \sum_i |N_k^x(i) \cap N_k^y(i)| / k`, neighbours by cosine
    similarity, in [0, 1]."""
    x, y = _v.pair(x, y, check_finite=check_finite)
    return evaluate(mutual_knn_measure, x, y, k=_check_k(k, x.shape[0]))


class RidgeSummary(NamedTuple):
    """A layer as the thin SVD of its centered activations ``X = U S V^T`` (scaled to a
    largest absolute value of 1) and the ridge fit's shrinkage ``g = S^2 / (S^2 + lambda)``
    of each direction."""

    basis: Array  # (n, k) U
    values: Array  # (k,) S
    right: Array  # (k, d) V^T
    shrink: Array  # (k,) g


def _ridge_prepare(x: Array, ridge: float) -> RidgeSummary:
    xs, _ = unit_scaled(x)
    u, s, vh, live = _la.data_svd(xs)
    lam2 = s * s
    lam = ridge * jnp.sum(lam2) / x.shape[1]
    shrink = jnp.where(live, safe_ratio(lam2, lam2 + lam), 0)
    return RidgeSummary(u, s, vh, shrink)


def _predictivity_pair(a: RidgeSummary, b: RidgeSummary) -> Array:
    # fitted = U g U^T Y, so |Y - fitted|^2 = |Y|^2 - sum_i (2 g_i - g_i^2) |U_i^T Y|^2 and
    # R^2 is the explained part itself: no cancellation when the fit is good. With
    # Y = U_b S_b V_b^T, the row norms of U^T Y are those of U^T U_b S_b.
    z = dot(a.basis.T, b.basis * b.values)
    explained = jnp.sum((2 * a.shrink - a.shrink**2) * jnp.sum(z * z, axis=1))
    return bounded_ratio(explained, jnp.sum(b.values**2), 0.0)


@functools.lru_cache(maxsize=None)
def predictivity_measure(*, ridge: float = 1e-3) -> Measure:
    ridge = _v.non_negative(ridge, "ridge")
    return Measure(
        "linear_predictivity",
        functools.partial(_ridge_prepare, ridge=ridge),
        _predictivity_pair,
        symmetric=False,
    )


def linear_predictivity(x: Any, y: Any, *, ridge: float = 1e-3, check_finite: bool = True) -> Array:
    r"""In-sample R^2 of a ridge regression of y on x (both centered):
    :math:`1 - \lVert Y - X W \rVert_F^2 / \lVert Y \rVert_F^2`,
    :math:`W = (X^\top X + \lambda I)^{-1} X^\top Y`, with :math:`\lambda` = ``ridge`` times
    the mean eigenvalue of :math:`X^\top X`. Asymmetric: x predicts y. Use held-out
    examples (fit on one split) for out-of-sample claims."""
    x, y = _v.pair(x, y, check_finite=check_finite)
    return evaluate(predictivity_measure, x, y, ridge=_v.non_negative(ridge, "ridge"))


def predict_direction(x: Any, y: Any, direction: Any, *, ridge: float = 1e-3) -> Array:
    """The direction in y's feature space whose activations best linearly predict the
    activations of ``direction`` (a ``(d_x,)`` vector) in x: ridge regression of
    ``(x - mean) @ direction`` on y's centered features. Returns a unit ``(d_y,)`` vector
    (lucid's model alignment: "what does layer B use to represent this direction of A?")."""
    x, y = _v.pair(x, y)
    direction = _v.as_float_array(direction, "direction")
    if direction.shape != (x.shape[1],):
        raise ValueError(
            f"direction: expected shape ({x.shape[1]},) for x of shape "
            f"{tuple(x.shape)}, got {tuple(direction.shape)}"
        )
    s = _ridge_prepare(y, _v.non_negative(ridge, "ridge"))
    target = dot(center_features(x), direction.astype(x.dtype))
    # w = (Y^T Y + lambda)^-1 Y^T t = V diag(g / S) U^T t (up to Y's scale, which the
    # normalization removes)
    w = dot(s.right.T, safe_ratio(s.shrink, s.values) * dot(s.basis.T, target))
    return w / jnp.where(jnp.linalg.norm(w) > 0, jnp.linalg.norm(w), 1)


def most_similar_neurons(x: Any, y: Any) -> tuple[Array, Array]:
    """For each neuron (feature) of x, the neuron of y with the largest absolute Pearson
    correlation over the examples: ``(indices (d_x,), correlations (d_x,))``, signed."""
    x, y = _v.pair(x, y)
    xc, yc = center_features(x), center_features(y)
    nx = jnp.linalg.norm(xc, axis=0)
    ny = jnp.linalg.norm(yc, axis=0)
    corr = safe_ratio(dot(xc.T, yc), nx[:, None] * ny[None, :])
    idx = jnp.argmax(jnp.abs(corr), axis=1)
    return idx, jnp.take_along_axis(corr, idx[:, None], axis=1)[:, 0]
