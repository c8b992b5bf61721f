"""The statistics' draws: the measure resolved for a pair of layers, and batches of
permuted, resampled or Gaussian draws, each batch one jitted, vmapped call."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import Array

from jaxsim import _row_blocks, canonical, geometry, kernel
from jaxsim import _validation as _v
from jaxsim._cca_checks import check_keep_dims
from jaxsim._feature_route import FeatureSummary, debias_inner, norm_product, use_feature_space
from jaxsim._measure import Measure, bounded_ratio, dot
from jaxsim._progress import bar
from jaxsim._registry import measure_for

# Memory allowed for one batch of draws: the permuted n x n Grams (Gram route) or the
# gathered (n, d) features (feature route) of all draws in a batch.
_BATCH_BYTES = 512 * 2**20


# Cost of one gathered entry of a permuted n x n Gram, in multiply-adds of a matrix
# product (how it was measured: docs/performance.md).
_GATHER_COST = 160


def resolve(
    metric: Any,
    method: str,
    symmetric: bool,
    options: dict,
    x: Array,
    y: Array,
    permuted: bool = False,
) -> Measure:
    options = dict(options)
    method = _v.choice(method, "method", ("auto", "gram", "features"))
    make, _ = measure_for(metric, options, bool(symmetric))
    measure = make()
    if measure.name == "svcca":
        check_keep_dims(options.get("keep_dims"), {"x": x, "y": y})
    if measure.name == "linear_cka":
        n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
        if method != "auto":
            feature_space = method == "features"
        elif permuted:
            # per permutation: gather the n x n Gram, or one n x d1 x d2 product
            feature_space = d1 * d2 < _GATHER_COST * n
        else:
            feature_space = use_feature_space(n, [d1], [d2])
        measure = make(feature_space=feature_space)
    return measure


def _permuted(measure: Measure, summary: Any, y: Array, perm: Array) -> Any:
    """y's summary for the examples reordered by ``perm``, without re-preparing when the
    summary's structure allows it."""
    if isinstance(summary, kernel.GramSummary):
        return summary._replace(vec=summary.vec[perm][:, perm])
    if isinstance(summary, FeatureSummary):
        return summary._replace(features=summary.features[perm], row_sq=summary.row_sq[perm])
    if isinstance(summary, (canonical.CCASummary, canonical.Subspace, geometry.RidgeSummary)):
        return summary._replace(basis=summary.basis[perm])
    if isinstance(summary, canonical.Units):
        return summary._replace(layer=summary.layer._replace(basis=summary.layer.basis[perm]))
    if isinstance(summary, _row_blocks.Neighbours):  # example perm[i] is now example i
        return summary._replace(indices=jnp.argsort(perm)[summary.indices[perm]])
    return measure.prepare(y[perm])


def _feature_null(sx: FeatureSummary, sy: FeatureSummary, perms: Array, debiased: bool) -> Array:
    """Linear CKA of x with a batch of permutations of y, feature route, as ONE matrix
    product ``X^T [P_1 Y, ..., P_B Y]`` (a batched matmul is much slower on CPU)."""
    b, n = perms.shape
    d2 = sy.features.shape[1]
    stacked = sy.features[perms.T].reshape(n, b * d2)  # gathered straight into (n, b, d2)
    cross = dot(sx.features.T, stacked)
    xty = jnp.sum(cross.reshape(-1, b, d2) ** 2, axis=(0, 2))
    if debiased:
        xty = debias_inner(xty, sx.row_sq, sy.row_sq[perms].T, sx.total, sy.total, n)
    return bounded_ratio(xty, norm_product(sx, sy), -1.0 if debiased else 0.0)


@functools.partial(jax.jit, static_argnames=("measure",))
def prepared(measure: Measure, x: Array, y: Array) -> tuple[Any, Any, Array]:
    sx, sy = measure.prepare(x), measure.prepare(y)
    return sx, sy, measure.pair(sx, sy)


@functools.partial(jax.jit, static_argnames=("measure",))
def null_batch(measure: Measure, sx: Any, sy: Any, y: Array, perms: Array) -> Array:
    if isinstance(sx, FeatureSummary):
        return _feature_null(sx, sy, perms, measure.min_n == 4)
    return jax.vmap(lambda p: measure.pair(sx, _permuted(measure, sy, y, p)))(perms)


@functools.partial(jax.jit, static_argnames=("measure",))
def resample_batch(measure: Measure, x: Array, y: Array, rows: Array) -> Array:
    return jax.vmap(lambda i: measure.pair(measure.prepare(x[i]), measure.prepare(y[i])))(rows)


@functools.partial(jax.jit, static_argnames=("measure", "shapes", "dtype"))
def gaussian_batch(measure: Measure, keys: Array, shapes: tuple, dtype: Any) -> Array:
    def one(k):
        kx, ky = jax.random.split(k)
        gx = jax.random.normal(kx, shapes[0], dtype)
        gy = jax.random.normal(ky, shapes[1], dtype)
        return measure.pair(measure.prepare(gx), measure.prepare(gy))

    return jax.vmap(one)(keys)


def in_batches(
    fn: Callable[[Array], Array], draws: Array, size: int, progress: Any, desc: str
) -> Array:
    """``fn`` over the leading axis of ``draws`` in batches of ``size`` (the last padded,
    so one compile serves all), one batch in flight at a time."""
    num = draws.shape[0]
    size = max(1, min(size, num))
    pad = (-num) % size
    if pad:
        draws = jnp.concatenate([draws, draws[:pad]])
    out, previous = [], None
    starts = range(0, num + pad, size)
    for start in bar(starts, progress, len(starts), desc):
        out.append(fn(draws[start : start + size]))
        if previous is not None:  # keep memory to two batches however fast we dispatch
            jax.block_until_ready(previous)
        previous = out[-1]
    return jnp.concatenate(out)[:num]


def batch_size(requested: int, bytes_per_draw: int) -> int:
    return max(1, min(requested, _BATCH_BYTES // max(1, bytes_per_draw)))
