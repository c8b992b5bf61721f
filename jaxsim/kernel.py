r"""Kernel alignment: Gram matrices, HSIC and centered kernel alignment (CKA).

Every function takes activations as ``(n, ...)`` arrays, axis 0 indexing the n examples
(google/svcca uses the transpose, ``(neurons, n)``). Trailing axes are flattened.

References:
  Kornblith, Norouzi, Lee & Hinton, Similarity of Neural Network Representations
  Revisited, ICML 2019.
  Song, Smola, Gretton, Bedo & Borgwardt, Feature Selection via Dependence Maximization,
  JMLR 2012 (the unbiased HSIC estimator).
  Nguyen, Raghu & Kornblith, Do Wide and Deep Networks Learn the Same Things?, ICLR 2021.
  Szekely & Rizzo, Partial distance correlation with methods for dissimilarities, 2014
  (U-centering).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsim import _validation as _v
from jaxsim._measure import (
    GramBlocks,
    Measure,
    block_offsets,
    bounded_ratio,
    center_features,
    dot,
    evaluate,
    inner,
    rounding_zero,
    safe_sqrt,
    unit_scaled,
)

Array = jax.Array

_UNBIASED_WHY = " for the unbiased HSIC estimator (it divides by n(n-3))"


# --------------------------------------------------------------------------- Grams


@jax.jit
def _gram_linear(x: Array) -> Array:
    return dot(x, x.T)


def _distance_terms(x: Array) -> tuple[Array, Array]:
    """Centered, unit-scaled features and their squared norms. Centering first keeps the
    |a|^2 + |b|^2 - 2<a, b> expansion from cancelling when the activations have a large
    common offset; distances do not change. The kernel divides by the median distance,
    so the scale of x does not matter either."""
    xc, _ = unit_scaled(x)
    return xc, jnp.sum(xc * xc, axis=1)


def _sq_distances(x: Array) -> Array:
    xc, sq = _distance_terms(x)
    idx = jnp.arange(x.shape[0])
    return _distance_block(xc, xc, sq, sq, idx, idx)


def _distance_block(xr: Array, xc: Array, sq_r: Array, sq_c: Array, i: Array, j: Array
                    ) -> Array:
    """Squared distances between rows ``i`` (features ``xr``, squared norms ``sq_r``) and
    rows ``j``; exactly 0 between a row and itself."""
    d = jnp.maximum(sq_r[:, None] + sq_c[None, :] - 2 * dot(xr, xc.T), 0)
    return jnp.where(i[:, None] == j[None, :], 0, d)


def _rbf_of(d: Array, median: Array, threshold: Array) -> Array:
    """The RBF kernel of squared distances ``d`` at bandwidth ``threshold^2 * median``.
    When more than half the pairs coincide the median is 0: the kernel's limit for a
    vanishing bandwidth is the indicator of identical points."""
    scale = 2 * threshold**2 * median
    return jnp.where(median > 0, jnp.exp(-d / jnp.where(median > 0, scale, 1)),
                     (d == 0).astype(d.dtype))


def _patterns(d: Array) -> Array:
    """Non-negative floats' bit patterns as integers, which order like the floats."""
    int_type = jnp.int64 if d.dtype == jnp.float64 else jnp.int32
    return jax.lax.bitcast_convert_type(jax.lax.stop_gradient(d), int_type)


def _check_countable(n: int) -> None:
    """The bandwidth selections count distances in uint32: at most 2^32 - 1 of them."""
    if n * n >= 2**32:
        raise ValueError(f"RBF bandwidth: {n * n} squared distances (n = {n}) exceed the "
                         "2^32 - 1 this selection counts; subsample the examples")


def _median_of_non_negative(d: Array) -> Array:
    """``jnp.median(d)`` of an array of non-negative floats, by exact selection instead of a
    sort: non-negative floats order like their bit patterns read as integers, so the k-th
    smallest value is found by bisection on the pattern, one counting pass per bit (31 for
    float32, 63 for float64), each a fused compare-and-sum. At n = 2048 (4e6 distances) this
    is ~11x cheaper than the sort behind ``jnp.median`` on a CPU, and bit-for-bit the same
    value. The derivative flows to the entries equal to the median (as through a sort), and
    NaN propagates. Counts are uint32: at most 2^32 - 1 entries (an n x n matrix up to
    n = 65535, 17 GB in float32)."""
    flat = d.ravel()
    m = flat.size
    _check_countable(d.shape[0])
    bits = _patterns(flat)
    int_type = bits.dtype
    count = lambda mask: jnp.sum(mask, dtype=jnp.uint32)  # exact up to n = 65535

    def kth(k):  # bit pattern of the k-th smallest value (0-based)
        def halve(_, bounds):
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            enough = count(bits <= mid) >= k + 1
            return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)
        start = (jnp.zeros((), int_type), jnp.max(bits))
        return jax.lax.fori_loop(0, jnp.iinfo(int_type).bits - 1, halve, start)[0]

    lower = kth((m - 1) // 2)
    if m % 2:
        upper = lower
    else:  # the next value up: itself if it occurs twice, else the smallest one above it
        bigger = jnp.min(jnp.where(bits > lower, bits, jnp.iinfo(int_type).max))
        upper = jnp.where(count(bits <= lower) >= m // 2 + 1, lower, bigger)

    def value(pattern):  # differentiable: the mean of the entries equal to it
        hit = bits == pattern
        return jnp.sum(jnp.where(hit, flat, 0)) / jnp.maximum(count(hit), 1).astype(flat.dtype)

    median = (value(lower) + value(upper)) / 2
    return jnp.where(jnp.any(jnp.isnan(flat)), jnp.nan, median)


@jax.jit
def _gram_rbf(x: Array, threshold: Array) -> Array:
    d = _sq_distances(x)
    return _rbf_of(d, _median_of_non_negative(d), threshold)


def gram_linear(x: Any, *, check_finite: bool = True) -> Array:
    r"""Linear kernel Gram matrix :math:`K = X X^\top`.

    Args:
      x: activations, shape ``(n, ...)``; trailing axes are flattened to features.
      check_finite: raise on NaN/inf (skipped automatically for traced values).
    Returns:
      ``(n, n)`` array in the inputs' floating dtype.
    """
    x = _v.activations(x, "x", check_finite_values=check_finite)
    return _gram_linear(x)


def gram_rbf(x: Any, *, threshold: float = 1.0, check_finite: bool = True) -> Array:
    r"""RBF kernel Gram matrix with the median-distance bandwidth of Kornblith et al.

    .. math:: K_{ij} = \exp\left(-\frac{D_{ij}}{2\,t^2\,\mathrm{median}(D)}\right)

    where :math:`D_{ij} = \lVert x_i - x_j \rVert^2` and the median runs over all
    :math:`n^2` entries, zero diagonal included, as in the paper's demo code. If that median
    is 0 (more than half the pairs coincide) the kernel is the indicator of identical rows.

    Args:
      x: activations, shape ``(n, ...)``.
      threshold: ``t``, the bandwidth as a fraction of the median distance; > 0.
      check_finite: raise on NaN/inf.
    Returns:
      ``(n, n)`` array.
    """
    x = _v.activations(x, "x", check_finite_values=check_finite)
    t = _v.positive(threshold, "threshold")
    return _gram_rbf(x, jnp.asarray(t, x.dtype))


def _centering_row(k: Array, unbiased: bool) -> Array:
    """``r`` with the centered Gram ``K_ij - r_i - r_j`` (off the diagonal when unbiased,
    the diagonal of K then counted as 0).

    Both centerings ignore a constant added to every (off-diagonal) entry, so the sums are
    taken after subtracting one off-diagonal entry ``c`` and ``c / 2`` is added back: a
    constant Gram (a constant layer's RBF kernel) then centres to exactly 0, not to a
    rounding residue that a cosine would scale up to 1, and a large common offset costs
    no precision in the sums."""
    c = k[0, 1]
    return _row_from_sums(jnp.sum(k - c, axis=0), jnp.diagonal(k) - c, c, k.shape[0], unbiased)


def _row_from_sums(sums: Array, diagonal: Array, c: Array, n: int, unbiased: bool,
                   real: Array | None = None) -> Array:
    """:func:`_centering_row` from the column sums and the diagonal of ``K - c`` (over n
    real rows; ``real`` marks them among padded ones, whose entries come out 0)."""
    keep = (lambda v: v) if real is None else (lambda v: jnp.where(real, v, 0))
    if unbiased:
        row = (sums - diagonal) / (n - 2)
        row = row - jnp.sum(keep(row)) / (2 * (n - 1))
    else:
        row = sums / n
        row = row - jnp.sum(keep(row)) / (2 * n)
    return keep(row + c / 2)


def _u_center(k: Array) -> Array:
    off = 1 - jnp.eye(k.shape[0], dtype=k.dtype)
    row = _centering_row(k, True)
    return (k - row[:, None] - row[None, :]) * off


def _double_center(k: Array) -> Array:
    row = _centering_row(k, False)
    return k - row[:, None] - row[None, :]


@functools.partial(jax.jit, static_argnames="unbiased")
def _center_gram(k: Array, unbiased: bool) -> Array:
    return _u_center(k) if unbiased else _double_center(k)


def center_gram(gram: Any, *, debiased: bool = False, check_finite: bool = True) -> Array:
    r"""Centers a Gram matrix.

    Biased: :math:`H K H` with :math:`H = I - \frac{1}{n} 1 1^\top`.
    Unbiased (U-centering, Szekely & Rizzo 2014): with the diagonal of K set to zero,

    .. math:: \tilde K_{ij} = K_{ij} - \frac{r_i + r_j}{n-2} + \frac{s}{(n-1)(n-2)},
       \quad i \ne j, \qquad \tilde K_{ii} = 0,

    :math:`r` the row sums and :math:`s` the total sum. Then
    :math:`\langle \tilde K, \tilde L \rangle / (n(n-3))` is the unbiased HSIC of Song et al.

    Args:
      gram: ``(n, n)`` symmetric matrix.
      debiased: U-center instead of double-center (needs n >= 4).
    Returns:
      ``(n, n)`` centered matrix.
    """
    unbiased = bool(debiased)
    k = _v.gram(gram, "gram")
    _v.finite({"gram": gram}, check_finite)
    _v.same_n({"gram": k}, min_n=4 if unbiased else 1, why=_UNBIASED_WHY if unbiased else "")
    return _center_gram(k, unbiased)


def _hsic_scale(n: int, unbiased: bool) -> float:
    return n * (n - 3) if unbiased else (n - 1) ** 2


@functools.partial(jax.jit, static_argnames="unbiased")
def _hsic(k: Array, l: Array, unbiased: bool) -> Array:
    kc, lc = _center_gram(k, unbiased), _center_gram(l, unbiased)
    return inner(kc, lc) / _hsic_scale(k.shape[0], unbiased)


def hsic(gram_x: Any, gram_y: Any, *, debiased: bool = False, check_finite: bool = True
         ) -> Array:
    r"""Hilbert-Schmidt independence criterion of two Gram matrices.

    Biased: :math:`\mathrm{tr}(K H L H) / (n-1)^2`. Unbiased (Song et al. 2012; Nguyen et
    al. 2020, eq. 2), computed through U-centering, which equals the three-term formula

    .. math:: \frac{1}{n(n-3)}\left[\mathrm{tr}(\bar K \bar L)
       + \frac{1^\top \bar K 1\, 1^\top \bar L 1}{(n-1)(n-2)}
       - \frac{2}{n-2} 1^\top \bar K \bar L 1\right]

    (:math:`\bar K` is K with a zero diagonal) without its cancellation in float32.

    Args:
      gram_x, gram_y: ``(n, n)`` Gram matrices of the same n examples.
      debiased: the unbiased estimator (n >= 4).
    Returns:
      Scalar array.
    """
    unbiased = bool(debiased)
    k, l = _v.gram_pair(gram_x, gram_y, min_n=4 if unbiased else 2,
                        why=_UNBIASED_WHY if unbiased else "", check_finite=check_finite)
    return _hsic(k, l, unbiased)


# --------------------------------------------------------------------------- CKA


class GramSummary(NamedTuple):
    """A layer as its centered (or U-centered) Gram matrix and its squared norm."""

    vec: Array  # (n, n)
    self: Array  # <vec, vec>


class FeatureSummary(NamedTuple):
    """A layer as its centered features, for the ``n > width`` route of linear CKA."""

    features: Array  # (n, d), centered
    row_sq: Array  # (n,) squared norms of the centered rows (the Gram's diagonal)
    total: Array  # sum of row_sq (the Gram's trace)
    self: Array  # <K~, K~> in the chosen (biased or U-centered) form


def _gram_summary(k: Array, debiased: bool) -> GramSummary:
    kc = _center_gram(k, debiased)
    self = inner(kc, kc)
    if debiased:
        self = rounding_zero(self, safe_sqrt(inner(k, k)), squared=True)
    return GramSummary(kc, self)


def _norm_product(a: Any, b: Any) -> Array:
    # U-centered self terms are sums of squares, >= 0 up to rounding
    return safe_sqrt(a.self) * safe_sqrt(b.self)


def _cosine_pair(a: Any, b: Any, lower: float = -1.0) -> Array:
    """CKA of two prepared layers, in [lower, 1] (``lower``: 0 for the biased estimator,
    whose centered Grams are positive semi-definite; -1 for the unbiased one)."""
    return bounded_ratio(inner(a.vec, b.vec), _norm_product(a, b), lower)


def _debias_inner(xty: Array, rx: Array, ry: Array, sx: Array, sy: Array, n: int) -> Array:
    # <K~, L~> from <K, L> for linearly-kernelled centered features: the U-centering terms
    # reduce to the Grams' diagonals (row norms) and traces.
    return xty - n / (n - 2) * dot(rx, ry) + sx * sy / ((n - 1) * (n - 2))


def _feature_summary(x: Array, debiased: bool) -> FeatureSummary:
    xc, _ = unit_scaled(x)
    row_sq = jnp.sum(xc * xc, axis=1)
    total = jnp.sum(row_sq)
    cov = dot(xc.T, xc)
    self = inner(cov, cov)
    if debiased:
        n = x.shape[0]
        terms = self + n / (n - 2) * dot(row_sq, row_sq) + total * total / ((n - 1) * (n - 2))
        self = rounding_zero(_debias_inner(self, row_sq, row_sq, total, total, n), terms,
                             squared=False)
    return FeatureSummary(xc, row_sq, total, self)


def _feature_pair(a: FeatureSummary, b: FeatureSummary, debiased: bool) -> Array:
    cross = dot(a.features.T, b.features)
    xty = inner(cross, cross)
    if debiased:
        xty = _debias_inner(xty, a.row_sq, b.row_sq, a.total, b.total, a.features.shape[0])
    return bounded_ratio(xty, _norm_product(a, b), -1.0 if debiased else 0.0)


def use_feature_space(n: int, widths_a: list[int], widths_b: list[int] | None = None, *,
                      shards: int = 1, ring: bool = False) -> bool:
    """Cost model of linear CKA: Gram route versus feature-space route.

    Multiply-adds, for row layers of widths ``widths_a`` and column layers ``widths_b``
    (``None``: a self-grid of ``widths_a``):

    * Gram route: each layer's centered Gram, ``n^2 d / 2`` (one triangle of blocks), and
      the inner products of all ``L`` Grams (rows and columns together), ``n^2 L^2 / 2``.
      A cross-grid forms only ``L_a L_b + L`` of them, but what they cost is mostly
      stacking all ``L`` blocks of every block pair (memory traffic): counted as ``L^2``,
      the model keeps the feature route where it is measured faster;
    * feature route: each layer's ``d x d`` covariance for its norm, ``n d^2``, and each
      pair's cross-covariance, ``n d_a d_b`` (one triangle for a self-grid).

    With the examples sharded over ``shards`` devices, the feature route's products divide
    among them (each device reduces its rows, then one all-reduce of the d x d results,
    counted as their size). The Gram blocks pair rows held by different devices: with
    ``ring`` (the layers' sharding is visible, see :func:`jaxsim.grid.ring_axis`) each
    device computes ``shards / 2 + 1`` blocks of ``(n / shards)^2`` per layer, full, and
    passes its rows on (``n sum(d) / 2`` values sent); otherwise every device computes
    every block. The cheaper route per device wins; ties go to the Gram route.
    """
    union = list(widths_a) + list(widths_b or [])
    gram = n * n / 2 * (sum(union) + len(union) ** 2)
    if ring and shards > 1:
        gram = gram * (shards + 2) / shards**2 + n * sum(union) / 2
    if widths_b is None:
        pairs = (sum(widths_a) ** 2 + sum(d * d for d in widths_a)) / 2
    else:
        pairs = sum(widths_a) * sum(widths_b)
    sizes = sum(d * d for d in union) + pairs
    feat = n * sizes / shards + (sizes if shards > 1 else 0)
    return feat < gram


def example_shards(arrays: Iterable[Any]) -> int:
    """Into how many pieces the examples (axis 0) of these arrays are split across
    devices: 1 for host arrays, single-device or replicated arrays, and traced values."""
    most = 1
    for a in arrays:
        sharding = getattr(a, "sharding", None)
        if sharding is None or isinstance(a, jax.core.Tracer) or not a.shape:
            continue
        rows = sharding.shard_shape(a.shape)[0]
        if rows:
            most = max(most, a.shape[0] // rows)
    return most


def feature_route(method: str, n: int, widths_a: list[int], widths_b: list[int] | None = None,
                  *, shards: int = 1, ring: bool = False) -> bool:
    """Whether linear CKA takes the feature-space route: ``method`` "gram", "features" or
    "auto" (the cost model :func:`use_feature_space`)."""
    method = _v.choice(method, "method", ("auto", "gram", "features"))
    if method == "auto":
        return use_feature_space(n, widths_a, widths_b, shards=shards, ring=ring)
    return method == "features"


class LinearSource(NamedTuple):
    """What the Gram blocks of a linear kernel are made from."""

    features: Array  # (n_pad, d) centered features, zero rows past n
    row_sq: Array | None  # (n_pad,) the centered Gram's diagonal (None: not needed)
    total: Array | None  # its trace
    count: Array  # type: ignore[assignment]  # a field, shadowing tuple.count; n, as a float


def _pad_rows(x: Array, n_pad: int) -> Array:
    return jnp.pad(x, [(0, n_pad - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _linear_source(x: Array, n_pad: int, rescale: bool = True, debiased: bool = True
                   ) -> LinearSource:
    """``debiased=False``: without the diagonal and trace, which only U-centering reads
    (a quarter to a half of the source's time on a CPU, where it is memory-bound)."""
    xc = unit_scaled(x)[0] if rescale else center_features(x)
    count = jnp.asarray(x.shape[0], x.dtype)
    if not debiased:
        return LinearSource(_pad_rows(xc, n_pad), None, None, count)
    row_sq = jnp.sum(xc * xc, axis=1)
    return LinearSource(_pad_rows(xc, n_pad), _pad_rows(row_sq, n_pad), jnp.sum(row_sq), count)


def _linear_block(src: LinearSource, r0: Array, c0: Array, b: int, *, debiased: bool) -> Array:
    return linear_cross_block(src, src, r0, c0, b, debiased=debiased)


def linear_cross_block(rows: LinearSource, cols: LinearSource, r0: Array, c0: Array, b: int,
                       *, debiased: bool, same: bool = True, valid: Any = None) -> Array:
    """Block (r0, c0) of size b of the centered linear Gram between the examples of ``rows``
    and those of ``cols`` (``same``: the very same examples, as in a layer's own Gram;
    otherwise two devices' shares of them). ``debiased``: U-centered, with ``count`` and
    ``total`` (the trace) of the whole Gram, and zero past ``valid`` rows and columns
    (default ``count``: padding). U-centering a centered Gram involves only its diagonal and
    trace: K~_ij = K_ij + (k_i + k_j) / (n - 2) - tr K / ((n - 1)(n - 2)) off the diagonal,
    0 on it."""
    take = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, b)
    k = dot(take(rows.features, r0), take(cols.features, c0).T)
    if not debiased:  # centered features give an exactly centered Gram (0 in padded rows)
        return k
    n = rows.count
    valid = n if valid is None else valid
    assert rows.total is not None and rows.row_sq is not None and cols.row_sq is not None
    k = (k + (take(rows.row_sq, r0)[:, None] + take(cols.row_sq, c0)[None, :]) / (n - 2)
         - rows.total / ((n - 1) * (n - 2)))
    return _masked_block(k, r0, c0, b, valid, off_diagonal=same)


def _masked_block(k: Array, r0: Array, c0: Array, b: int, valid: Any, off_diagonal: bool
                  ) -> Array:
    """Block ``k`` at (r0, c0) with the rows and columns past ``valid`` (padding) zeroed,
    and its entries on the Gram's diagonal too when ``off_diagonal``."""
    i = r0 + jnp.arange(b)
    j = c0 + jnp.arange(b)
    keep = (i[:, None] < valid) & (j[None, :] < valid)
    if off_diagonal:
        keep = keep & (i[:, None] != j[None, :])
    return jnp.where(keep, k, 0)


@functools.lru_cache(maxsize=None)
def linear_measure(*, debiased: bool = False, feature_space: bool = False) -> Measure:
    """Linear CKA as a :class:`Measure` (Gram route, or feature route when asked)."""
    min_n = 4 if debiased else 2
    if feature_space:
        return Measure("linear_cka", functools.partial(_feature_summary, debiased=debiased),
                       functools.partial(_feature_pair, debiased=debiased), min_n=min_n)
    prepare = lambda x: _gram_summary(_gram_linear(unit_scaled(x)[0]), debiased)
    blocks = GramBlocks(functools.partial(_linear_source, debiased=debiased),
                        functools.partial(_linear_block, debiased=debiased))
    return Measure("linear_cka", prepare, cka_pair(debiased), blocks=blocks, min_n=min_n)


@functools.lru_cache(maxsize=None)
def cka_pair(debiased: bool) -> Callable[[Any, Any], Array]:
    """The pair step of CKA on prepared Grams, in its estimator's range."""
    return functools.partial(_cosine_pair, lower=-1.0 if debiased else 0.0)


@functools.lru_cache(maxsize=None)
def minibatch_blocks() -> GramBlocks:
    """U-centered linear Gram blocks of one minibatch, at the activations' own scale: HSIC
    terms are summed over batches, so every batch must be in the same units."""
    return GramBlocks(functools.partial(_linear_source, rescale=False),
                      functools.partial(_linear_block, debiased=True))


class RBFSource(NamedTuple):
    """What the blocks of a layer's centered RBF Gram are made from: O(n d), not O(n^2)."""

    features: Array  # (n_pad, d) centered, unit-scaled features, zero rows past n
    sq: Array  # (n_pad,) their squared norms
    median: Array  # () median squared distance (the bandwidth's scale)
    row: Array  # (n_pad,) centering row of the Gram (see _centering_row)
    count: Array  # type: ignore[assignment]  # a field, shadowing tuple.count; n, an integer


def _source_blocks(n_pad: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(b, r0, c0, weight)``: the upper-triangle blocks (b x b, b dividing ``n_pad``: one
    block up to 1024 rows, else the largest divisor up to 512) that a layer's source
    passes over, and their integer weights (see :func:`block_offsets`)."""
    b = n_pad if n_pad <= 1024 else max(k for k in range(1, 513) if n_pad % k == 0)
    return (b, *block_offsets(n_pad, b, np.uint32))


def _source_distances(xc: Array, sq: Array, n: int, b: int, r0: Array, c0: Array
                      ) -> tuple[Array, Array]:
    """Block ``(r0, c0)`` of the squared distances of the (padded) rows ``xc``, and which
    of its entries are real (rows and columns below n)."""
    take = lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, b)
    i, j = r0 + jnp.arange(b), c0 + jnp.arange(b)
    d = _distance_block(take(xc, r0), take(xc, c0), take(sq, r0), take(sq, c0), i, j)
    return d, (i[:, None] < n) & (j[None, :] < n)




@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _blockwise_median(xc: Array, sq: Array, n: int) -> Array:
    """The median of a layer's n^2 squared distances (zero diagonal included), the value
    :func:`_median_of_non_negative` gives, found block by block without the n x n matrix:
    a radix selection on the bit pattern (non-negative floats order like their patterns),
    8 bits per pass (4 passes in float32, 8 in float64), each pass recomputing the
    distance blocks and counting the next 8 bits of the entries that share the prefix
    found so far. Memory O(b^2 + n d). The derivative is the mean of the derivatives of
    the entries equal to the median's two order statistics, as through a sort (the
    nearest entries, where a pass rounds the distances differently)."""
    lower, upper = _median_patterns(xc, sq, n)
    value = lambda p: jax.lax.bitcast_convert_type(p, xc.dtype)
    return (value(lower) + value(upper)) / 2


def _median_patterns(xc: Array, sq: Array, n: int) -> tuple[Array, Array]:
    """Bit patterns of the order statistics (n^2 - 1) // 2 and n^2 // 2 of the squared
    distances."""
    _check_countable(n)
    b, r0, c0, weight = _source_blocks(xc.shape[0])
    int_type = _patterns(xc[:0, 0]).dtype
    bits = jnp.iinfo(int_type).bits

    def level(step, state):  # one pass: the next 8 bits, below the prefix found so far
        prefix, k, _, _ = state
        shift = (bits - 8 * (step + 1)).astype(int_type)

        def count(hist, block):
            r, c, w = block
            d, real = _source_distances(xc, sq, n, b, r, c)
            pattern = _patterns(d)
            real = real & ((step == 0) | ((pattern >> (shift + 8)) == prefix))
            digit = ((pattern >> shift) & 255).astype(jnp.int32)
            return hist.at[digit.ravel()].add(jnp.where(real, w, 0).ravel()), None

        hist, _ = jax.lax.scan(count, jnp.zeros(256, jnp.uint32), (r0, c0, weight))
        below = jnp.cumsum(hist)
        digit = jnp.argmax(below > k).astype(jnp.int32)
        k = k - jnp.where(digit > 0, below[digit - 1], 0)
        return (prefix << 8) | digit.astype(int_type), k, hist, digit

    start = (jnp.zeros((), int_type), jnp.asarray((n * n - 1) // 2, jnp.uint32),
             jnp.zeros(256, jnp.uint32), jnp.zeros((), jnp.int32))
    prefix, k, hist, digit = jax.lax.fori_loop(0, bits // 8, level, start)
    lower = prefix
    if (n * n) % 2:
        return lower, lower
    # the next value up: the lower one again if it occurs once more, else the next
    # pattern counted in the last pass, else (none shares the prefix) the least above it
    later = jnp.arange(256) > digit
    following = jnp.argmax(later & (hist > 0))
    in_group = (prefix - digit.astype(int_type)) | following.astype(int_type)

    def least_above(_):
        def smallest(low, block):
            r, c, _ = block
            d, real = _source_distances(xc, sq, n, b, r, c)
            pattern = _patterns(d)
            above = real & (pattern > lower)
            return jnp.minimum(low, jnp.min(jnp.where(above, pattern, low))), None
        return jax.lax.scan(smallest, jnp.asarray(jnp.iinfo(int_type).max, int_type),
                            (r0, c0, weight))[0]

    upper = jnp.where(
        k + 1 < hist[digit], lower,
        jax.lax.cond(jnp.any(later & (hist > 0)), lambda _: in_group, least_above, None))
    return lower, upper


@_blockwise_median.defjvp
def _blockwise_median_jvp(n, primals, tangents):
    xc, sq = primals
    lower, upper = _median_patterns(xc, sq, n)
    b, r0, c0, weight = _source_blocks(xc.shape[0])

    value = lambda p: jax.lax.bitcast_convert_type(p, xc.dtype)
    far = jnp.iinfo(lower.dtype).max

    # One pass finds the entries nearest each order statistic's pattern (those equal to
    # it, unless this pass rounds a distance differently from the selection's passes: a
    # GPU fuses each program differently, and on an H100 an entry an ulp away dropped half
    # the derivative) and sums their derivatives, a running (gap, sum, count) reduction:
    # finding them in a pass of their own could round differently again.
    def nearest(carry, block):  # linear in the tangents (the selects' predicates known)
        gap, total, many = carry
        r, c, w = block
        d, d_dot, real = jax.jvp(lambda a, s: _source_distances(a, s, n, b, r, c), primals,
                                 tangents, has_aux=True)
        out = []
        for k, p in enumerate((lower, upper)):
            dist = jnp.where(real, jnp.abs(_patterns(d) - p), far)
            here = jnp.min(dist)
            hit = dist == here
            part = w.astype(d_dot.dtype) * jnp.sum(jnp.where(hit, d_dot, 0))
            count = w * jnp.sum(hit, dtype=jnp.uint32)
            closer, same = here < gap[k], here == gap[k]
            out.append((jnp.minimum(here, gap[k]),
                        jnp.where(closer, part, jnp.where(same, total[k] + part, total[k])),
                        jnp.where(closer, count, jnp.where(same, many[k] + count, many[k]))))
        return tuple(jnp.stack(v) for v in zip(*out)), None

    start = (jnp.full(2, far, lower.dtype), jnp.zeros(2, xc.dtype), jnp.zeros(2, jnp.uint32))
    _, total, many = jax.lax.scan(nearest, start, (r0, c0, weight))[0]
    mean = total / jnp.maximum(many, 1).astype(xc.dtype)
    return (value(lower) + value(upper)) / 2, (mean[0] + mean[1]) / 2


def _dense_source(xc: Array, sq: Array, threshold: Array, debiased: bool
                  ) -> tuple[Array, Array]:
    """The median distance and centering row from the layer's n x n distances formed at
    once (one block: cheaper than passes over blocks; also the baseline of
    ``benchmarks/scale.py``)."""
    idx = jnp.arange(xc.shape[0])
    d = _distance_block(xc, xc, sq, sq, idx, idx)
    median = _median_of_non_negative(d)
    return median, _centering_row(_rbf_of(d, median, threshold), debiased)


def _rbf_source(x: Array, n_pad: int, *, threshold: float, debiased: bool) -> RBFSource:
    """A layer's RBF source, in O(n d + b^2) memory: the median distance by blockwise
    selection (:func:`_blockwise_median`), then the centering row (see
    :func:`_centering_row`) from the column sums of the kernel's blocks, one more pass.
    Up to 1024 rows (one block) the distances are formed at once, without the passes."""
    n = x.shape[0]
    xc, sq = _distance_terms(x)
    if _source_blocks(n_pad)[0] == n_pad:
        median, row = _dense_source(xc, sq, jnp.asarray(threshold, x.dtype), debiased)
        return RBFSource(_pad_rows(xc, n_pad), _pad_rows(sq, n_pad), median,
                         _pad_rows(row, n_pad), jnp.asarray(n, jnp.int32))
    xc, sq = _pad_rows(xc, n_pad), _pad_rows(sq, n_pad)
    median = _blockwise_median(xc, sq, n)
    t = jnp.asarray(threshold, x.dtype)
    b, r0, c0, weight = _source_blocks(n_pad)
    # the first off-diagonal entry c is subtracted before summing (see _centering_row)
    first = _rbf_of(_distance_block(xc[:1], xc[1:2], sq[:1], sq[1:2], jnp.zeros(1),
                                    jnp.ones(1))[0, 0], median, t)

    def column_sums(acc, block):
        r, c, w = block
        d, real = _source_distances(xc, sq, n, b, r, c)
        k = jnp.where(real, _rbf_of(d, median, t) - first, 0)
        acc = jax.lax.dynamic_update_slice_in_dim(
            acc, jax.lax.dynamic_slice_in_dim(acc, c, b) + jnp.sum(k, axis=0), c, 0)
        mirrored = jax.lax.dynamic_slice_in_dim(acc, r, b) + jnp.where(w > 1, 1, 0) * jnp.sum(
            k, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(acc, mirrored, r, 0), None

    sums, _ = jax.lax.scan(column_sums, jnp.zeros(n_pad, x.dtype), (r0, c0, weight))
    # the diagonal of K is 1 (exp(0), or the indicator of d == 0)
    row = _row_from_sums(sums, 1 - first, first, n, debiased, jnp.arange(n_pad) < n)
    return RBFSource(xc, sq, median, row, jnp.asarray(n, jnp.int32))


def _rbf_block(src: RBFSource, r0: Array, c0: Array, b: int, *, threshold: float,
               debiased: bool) -> Array:
    take = lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, b)
    d = _distance_block(take(src.features, r0), take(src.features, c0), take(src.sq, r0),
                        take(src.sq, c0), r0 + jnp.arange(b), c0 + jnp.arange(b))
    k = _rbf_of(d, src.median, jnp.asarray(threshold, d.dtype))
    k = k - take(src.row, r0)[:, None] - take(src.row, c0)[None, :]
    return _masked_block(k, r0, c0, b, src.count, off_diagonal=debiased)


@functools.lru_cache(maxsize=None)
def rbf_measure(*, threshold: float = 1.0, debiased: bool = False) -> Measure:
    """RBF CKA as a :class:`Measure`; in grids, its centered Grams are formed block by block
    from the features (see :class:`RBFSource`)."""
    t = _v.positive(threshold, "threshold")
    prepare = lambda x: _gram_summary(_gram_rbf(x, jnp.asarray(t, x.dtype)), debiased)
    blocks = GramBlocks(functools.partial(_rbf_source, threshold=t, debiased=debiased),
                        functools.partial(_rbf_block, threshold=t, debiased=debiased))
    return Measure("rbf_cka", prepare, cka_pair(debiased), blocks=blocks,
                   min_n=4 if debiased else 2)


@functools.partial(jax.jit, static_argnames=("debiased",))
def _cka(k: Array, l: Array, debiased: bool) -> Array:
    return cka_pair(debiased)(_gram_summary(k, debiased), _gram_summary(l, debiased))


def cka(gram_x: Any, gram_y: Any, *, debiased: bool = False, check_finite: bool = True) -> Array:
    r"""Centered kernel alignment of two Gram matrices.

    .. math:: \mathrm{CKA}(K, L) = \frac{\mathrm{HSIC}(K, L)}{\sqrt{\mathrm{HSIC}(K, K)\,
       \mathrm{HSIC}(L, L)}}

    Args:
      gram_x, gram_y: ``(n, n)`` Gram matrices of the same n examples.
      debiased: use the unbiased HSIC estimator (n >= 4); the result can then be slightly
        negative for unrelated representations.
    Returns:
      Scalar array; in [0, 1] for the biased form. 0 when either kernel is constant after
      centering (a zero-variance layer), where CKA is undefined.

    Precision: a Gram matrix of uncentered features carries their common offset in every
    entry, and centering it afterwards cancels that offset in the dtype's precision. In
    float32 (8 significant digits) activations with an offset of 1000 times their spread
    lose everything (``cka(gram_linear(x), gram_linear(y))`` is then off by ~0.2; by
    ~1e-4 at an offset of 100). For linear CKA use :func:`linear_cka`, which centres the
    features before forming any product; for other kernels, centre (and scale) the
    features before building the Grams, or compute them in float64.
    """
    k, l = _v.gram_pair(gram_x, gram_y, min_n=4 if debiased else 2,
                        why=_UNBIASED_WHY if debiased else "", check_finite=check_finite)
    return _cka(k, l, debiased)


def linear_cka(x: Any, y: Any, *, debiased: bool = False, method: str = "auto",
               check_finite: bool = True) -> Array:
    r"""Linear centered kernel alignment of two activation arrays.

    .. math:: \mathrm{CKA} = \frac{\lVert Y_c^\top X_c \rVert_F^2}
       {\lVert X_c^\top X_c \rVert_F\,\lVert Y_c^\top Y_c \rVert_F}

    with :math:`X_c, Y_c` the feature-centered activations; equal to
    ``cka(gram_linear(x), gram_linear(y), debiased=debiased)``.

    Args:
      x: activations, shape ``(n, ...)``, one row per example.
      y: activations, shape ``(n, ...)``, the same n examples in the same order.
      debiased: unbiased HSIC estimator (n >= 4).
      method: ``"gram"`` builds the two ``(n, n)`` Grams (cost ``n^2 (d1 + d2)``),
        ``"features"`` works with ``d x d`` products (cost ``n (d1 d2 + d1^2 + d2^2)``), no
        ``n x n`` matrix; ``"auto"`` picks the cheaper (:func:`use_feature_space`).
      check_finite: raise on NaN/inf (skipped automatically for traced values).
    Returns:
      Scalar array in [0, 1] (biased) in the inputs' floating dtype; 0 for a zero-variance
      input.
    References:
      Kornblith et al., Similarity of Neural Network Representations Revisited, ICML 2019.

    Example:
      >>> import jax, jaxsim
      >>> x = jax.random.normal(jax.random.key(0), (100, 10))
      >>> float(jaxsim.linear_cka(x, 2 * x))
      1.0
    """
    _v.choice(method, "method", ("auto", "gram", "features"))
    x, y = _v.pair(x, y, min_n=4 if debiased else 2, why=_UNBIASED_WHY if debiased else "",
                   check_finite=check_finite)
    feature_space = feature_route(method, x.shape[0], [x.shape[1]], [y.shape[1]],
                                  shards=example_shards((x, y)))
    return evaluate(linear_measure, x, y, debiased=debiased, feature_space=feature_space)


def rbf_cka(x: Any, y: Any, *, threshold: float = 1.0, debiased: bool = False,
            check_finite: bool = True) -> Array:
    r"""CKA with RBF kernels: ``cka(gram_rbf(x, threshold=t), gram_rbf(y, threshold=t))``.

    Args:
      x, y: activations, shapes ``(n, ...)``.
      threshold: bandwidth as a fraction of the median squared distance (see
        :func:`gram_rbf`); > 0.
      debiased: unbiased HSIC estimator (n >= 4).
    Returns:
      Scalar array.
    """
    x, y = _v.pair(x, y, min_n=4 if debiased else 2, why=_UNBIASED_WHY if debiased else "",
                   check_finite=check_finite)
    return evaluate(rbf_measure, x, y, threshold=_v.positive(threshold, "threshold"),
                    debiased=debiased)
