"""Centered kernel matrices, and the per-layer sources the Gram route forms their blocks
from (linear and RBF kernels, biased and U-centered)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxsim import _distances, _rbf_median
from jaxsim._measure import GramBlocks, center_features, dot, poison, unit_scaled


def rbf_of(d: Array, median: Array, threshold: Array) -> Array:
    """The RBF kernel of squared distances ``d`` at bandwidth ``threshold^2 * median``.
    When more than half the pairs coincide the median is 0: the kernel's limit for a
    vanishing bandwidth is the indicator of identical points."""
    scale = 2 * threshold**2 * median
    return jnp.where(
        median > 0, jnp.exp(-d / jnp.where(median > 0, scale, 1)), (d == 0).astype(d.dtype)
    )


def centering_row(k: Array, unbiased: bool) -> Array:
    """``r`` with the centered Gram ``K_ij - r_i - r_j`` (off the diagonal when unbiased,
    the diagonal of K then counted as 0).

    Both centerings ignore a constant added to every (off-diagonal) entry, so the sums are
    taken after subtracting one off-diagonal entry ``c`` and ``c / 2`` is added back: a
    constant Gram (a constant layer's RBF kernel) then centers to exactly 0, not to a
    rounding residue that a cosine would scale up to 1, and a large common offset costs
    no precision in the sums."""
    c = k[0, 1]
    return row_from_sums(jnp.sum(k - c, axis=0), jnp.diagonal(k) - c, c, k.shape[0], unbiased)


def row_from_sums(
    sums: Array, diagonal: Array, c: Array, n: int, unbiased: bool, real: Array | None = None
) -> Array:
    """:func:`centering_row` from the column sums and the diagonal of ``K - c`` (over n
    real rows; ``real`` marks them among padded ones, whose entries come out 0)."""
    keep = (lambda v: v) if real is None else (lambda v: jnp.where(real, v, 0))
    if unbiased:
        row = (sums - diagonal) / (n - 2)
        row = row - jnp.sum(keep(row)) / (2 * (n - 1))
    else:
        row = sums / n
        row = row - jnp.sum(keep(row)) / (2 * n)
    return keep(row + c / 2)


def u_center(k: Array) -> Array:
    off = 1 - jnp.eye(k.shape[0], dtype=k.dtype)
    row = centering_row(k, True)
    return (k - row[:, None] - row[None, :]) * off


def double_center(k: Array) -> Array:
    row = centering_row(k, False)
    return k - row[:, None] - row[None, :]


class LinearSource(NamedTuple):
    """What the Gram blocks of a linear kernel are made from."""

    features: Array  # (n_pad, d) centered features, zero rows past n
    row_sq: Array | None  # (n_pad,) the centered Gram's diagonal (None: not needed)
    total: Array | None  # its trace
    count: Array  # type: ignore[assignment]  # a field, shadowing tuple.count; n, as a float


def linear_source(
    x: Array, n_pad: int, rescale: bool = True, debiased: bool = True
) -> LinearSource:
    """``debiased=False``: without the diagonal and trace, which only U-centering reads
    (memory-bound work the biased estimator does without)."""
    xc = unit_scaled(x)[0] if rescale else center_features(x)
    count = jnp.asarray(x.shape[0], x.dtype)
    if not debiased:
        return LinearSource(_distances.pad_rows(xc, n_pad), None, None, count)
    row_sq = jnp.sum(xc * xc, axis=1)
    return LinearSource(
        _distances.pad_rows(xc, n_pad), _distances.pad_rows(row_sq, n_pad), jnp.sum(row_sq), count
    )


def linear_block(src: LinearSource, r0: Array, c0: Array, b: int, *, debiased: bool) -> Array:
    return linear_cross_block(src, src, r0, c0, b, debiased=debiased)


def linear_cross_block(
    rows: LinearSource,
    cols: LinearSource,
    r0: Array,
    c0: Array,
    b: int,
    *,
    debiased: bool,
    same: bool = True,
    valid: Any = None,
) -> Array:
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
    k = (
        k
        + (take(rows.row_sq, r0)[:, None] + take(cols.row_sq, c0)[None, :]) / (n - 2)
        - rows.total / ((n - 1) * (n - 2))
    )
    return _distances.masked_block(k, r0, c0, b, valid, off_diagonal=same)


@functools.lru_cache(maxsize=None)
def minibatch_blocks() -> GramBlocks:
    """U-centered linear Gram blocks of one minibatch, at the activations' own scale: HSIC
    terms are summed over batches, so every batch must be in the same units."""
    return GramBlocks(
        functools.partial(linear_source, rescale=False),
        functools.partial(linear_block, debiased=True),
    )


class RBFSource(NamedTuple):
    """What the blocks of a layer's centered RBF Gram are made from: O(n d), not O(n^2)."""

    features: Array  # (n_pad, d) centered, unit-scaled features, zero rows past n
    sq: Array  # (n_pad,) their squared norms
    median: Array  # () median squared distance (the bandwidth's scale)
    row: Array  # (n_pad,) centering row of the Gram (see centering_row)
    count: Array  # type: ignore[assignment]  # a field, shadowing tuple.count; n, an integer


def dense_source(xc: Array, sq: Array, threshold: Array, debiased: bool) -> tuple[Array, Array]:
    """The median distance and centering row from the layer's n x n distances formed at
    once (one block: cheaper than passes over blocks; also the baseline of
    ``benchmarks/scale.py``)."""
    idx = jnp.arange(xc.shape[0])
    d = _distances.distance_block(xc, xc, sq, sq, idx, idx)
    median = _rbf_median.median_of_non_negative(d, jnp.isnan(poison(xc)))
    return median, centering_row(rbf_of(d, median, threshold), debiased)


def rbf_source(x: Array, n_pad: int, *, threshold: float, debiased: bool) -> RBFSource:
    """A layer's RBF source, in O(n d + b^2) memory: the median distance by blockwise
    selection (:func:`_rbf_median.blockwise_median`), then the centering row (see
    :func:`centering_row`) from the column sums of the kernel's blocks, one more pass.
    Up to 1024 rows (one block) the distances are formed at once, without the passes."""
    n = x.shape[0]
    xc, sq = _distances.distance_terms(x)
    if _distances.source_blocks(n_pad)[0] == n_pad:
        median, row = dense_source(xc, sq, jnp.asarray(threshold, x.dtype), debiased)
        return RBFSource(
            _distances.pad_rows(xc, n_pad),
            _distances.pad_rows(sq, n_pad),
            median,
            _distances.pad_rows(row, n_pad),
            jnp.asarray(n, jnp.int32),
        )
    xc, sq = _distances.pad_rows(xc, n_pad), _distances.pad_rows(sq, n_pad)
    median = _rbf_median.blockwise_median(xc, sq, n)
    t = jnp.asarray(threshold, x.dtype)
    b, r0, c0, weight = _distances.source_blocks(n_pad)
    # the first off-diagonal entry c is subtracted before summing (see centering_row)
    first = rbf_of(
        _distances.distance_block(xc[:1], xc[1:2], sq[:1], sq[1:2], jnp.zeros(1), jnp.ones(1))[
            0, 0
        ],
        median,
        t,
    )

    def column_sums(acc, block):
        r, c, w = block
        d, real = _distances.source_distances(xc, sq, n, b, r, c)
        k = jnp.where(real, rbf_of(d, median, t) - first, 0)
        acc = jax.lax.dynamic_update_slice_in_dim(
            acc, jax.lax.dynamic_slice_in_dim(acc, c, b) + jnp.sum(k, axis=0), c, 0
        )
        mirrored = jax.lax.dynamic_slice_in_dim(acc, r, b) + jnp.where(w > 1, 1, 0) * jnp.sum(
            k, axis=1
        )
        return jax.lax.dynamic_update_slice_in_dim(acc, mirrored, r, 0), None

    sums, _ = jax.lax.scan(column_sums, jnp.zeros(n_pad, x.dtype), (r0, c0, weight))
    # the diagonal of K is 1 (exp(0), or the indicator of d == 0)
    row = row_from_sums(sums, 1 - first, first, n, debiased, jnp.arange(n_pad) < n)
    return RBFSource(xc, sq, median, row, jnp.asarray(n, jnp.int32))


def rbf_block(
    src: RBFSource, r0: Array, c0: Array, b: int, *, threshold: float, debiased: bool
) -> Array:
    take = lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, b)
    d = _distances.distance_block(
        take(src.features, r0),
        take(src.features, c0),
        take(src.sq, r0),
        take(src.sq, c0),
        r0 + jnp.arange(b),
        c0 + jnp.arange(b),
    )
    k = rbf_of(d, src.median, jnp.asarray(threshold, d.dtype))
    k = k - take(src.row, r0)[:, None] - take(src.row, c0)[None, :]
    return _distances.masked_block(k, r0, c0, b, src.count, off_diagonal=debiased)
