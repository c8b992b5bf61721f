"""Baselines and error bars for similarity measures: permutation tests, bootstrap
intervals and random-Gaussian baselines, for one pair of layers or a whole grid.

Each resamples in one jitted, batched computation (``jax.lax.map`` over chunks of vmapped
draws). The permutation test never re-prepares a layer: permuting the examples of y
permutes the rows of its prepared summary (its centered Gram ``P K P^T``, its centered
features, its CCA basis), while covariances, norms and whitening stay as they are.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsim import _validation as _v
from jaxsim import canonical, geometry, grid, kernel
from jaxsim._measure import Measure, safe_ratio

Array = jax.Array


class PermutationResult(NamedTuple):
    """``statistic``: the measure on the data; ``p_value``: (1 + #{null >= statistic}) /
    (1 + num_permutations); ``null``: the measure with y's examples permuted. For grids,
    the first two are :class:`jaxsim.Grid` and ``null`` is ``(L_a, L_b, num_permutations)``."""

    statistic: Any
    p_value: Any
    null: Array


class BootstrapResult(NamedTuple):
    """``statistic`` on the data, the percentile interval ``[low, high]`` and the
    ``samples`` on resampled examples."""

    statistic: Any
    low: Any
    high: Any
    samples: Array


class BaselineResult(NamedTuple):
    """The measure on i.i.d. Gaussian activations of the data's shapes: ``mean``, ``std``
    and the ``samples``."""

    mean: Any
    std: Any
    samples: Array


# -------------------------------------------------------------------------- resolution


def _resolve(metric: Any, options: dict, x: Array, y: Array) -> Measure:
    options = dict(options)
    method = options.pop("method", "auto")
    make, _ = grid._measure_for(metric, options)
    measure = make()
    if measure.name == "linear_cka":
        if method == "auto":
            # permutations gather the n x n Gram (n^2 per draw) or multiply the features
            # (n d1 d2 per draw); the Gram route wins unless the layers are narrow
            feature_space = x.shape[1] * y.shape[1] < 8 * x.shape[0]
        else:
            feature_space = _v.choice(method, "method", ("gram", "features")) == "features"
        measure = make(feature_space=feature_space)
    return measure


def _permuted(measure: Measure, summary: Any, y: Array, perm: Array) -> Any:
    """y's summary for the examples reordered by ``perm``, without re-preparing when the
    summary's structure allows it."""
    if isinstance(summary, kernel.GramSummary):
        return summary._replace(vec=summary.vec[perm][:, perm])
    if isinstance(summary, kernel.FeatureSummary):
        return summary._replace(features=summary.features[perm], row_sq=summary.row_sq[perm])
    if isinstance(summary, (canonical.CCASummary, geometry.RidgeSummary)):
        return summary._replace(basis=summary.basis[perm])
    return measure.prepare(y[perm])


def _feature_null(sx: kernel.FeatureSummary, sy: kernel.FeatureSummary, perms: Array,
                  debiased: bool) -> Array:
    """Linear CKA of x with a batch of permutations of y, feature route, as ONE matrix
    product ``X^T [P_1 Y, ..., P_B Y]`` (a batched matmul is much slower on CPU)."""
    b, n = perms.shape
    d2 = sy.features.shape[1]
    stacked = sy.features[perms.T].reshape(n, b * d2)  # gathered straight into (n, b, d2)
    cross = jnp.matmul(sx.features.T, stacked, precision=jax.lax.Precision.HIGHEST)
    xty = jnp.sum(cross.reshape(-1, b, d2) ** 2, axis=(0, 2))
    if debiased:
        xty = kernel._debias_inner(xty, sx.row_sq, sy.row_sq[perms].T, sx.total, sy.total, n)
    return safe_ratio(xty, kernel._norm_product(sx, sy))


@functools.partial(jax.jit, static_argnames=("measure", "num", "batch_size"))
def _permutation(measure: Measure, x: Array, y: Array, key: Array, num: int, batch_size: int):
    sx, sy = measure.prepare(x), measure.prepare(y)
    stat = measure.pair(sx, sy)
    perms = jax.vmap(lambda k: jax.random.permutation(k, x.shape[0]))(jax.random.split(key, num))
    if isinstance(sx, kernel.FeatureSummary):
        debiased = measure.min_n == 4
        chunks = perms[: num - num % batch_size].reshape(-1, batch_size, x.shape[0])
        null = jax.lax.map(lambda c: _feature_null(sx, sy, c, debiased), chunks).reshape(-1)
        if num % batch_size:
            null = jnp.concatenate([null, _feature_null(sx, sy, perms[num - num % batch_size:],
                                                        debiased)])
    else:
        null = jax.lax.map(lambda p: measure.pair(sx, _permuted(measure, sy, y, p)), perms,
                           batch_size=batch_size)
    p = (1 + jnp.sum(null >= stat)) / (num + 1)
    return stat, p, null


@functools.partial(jax.jit, static_argnames=("measure", "num", "batch_size"))
def _bootstrap(measure: Measure, x: Array, y: Array, key: Array, num: int, batch_size: int):
    n = x.shape[0]
    idx = jax.random.randint(key, (num, n), 0, n)
    one = lambda i: measure.pair(measure.prepare(x[i]), measure.prepare(y[i]))
    return one(jnp.arange(n)), jax.lax.map(one, idx, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("measure", "shapes", "dtype", "num", "batch_size"))
def _baseline(measure: Measure, key: Array, shapes: tuple, dtype: Any, num: int,
              batch_size: int):
    def one(k):
        kx, ky = jax.random.split(k)
        gx = jax.random.normal(kx, shapes[0], dtype)
        gy = jax.random.normal(ky, shapes[1], dtype)
        return measure.pair(measure.prepare(gx), measure.prepare(gy))
    return jax.lax.map(one, jax.random.split(key, num), batch_size=batch_size)


# ------------------------------------------------------------------- pairs and grids


def _is_layers(acts: Any) -> bool:
    return isinstance(acts, Mapping) or (isinstance(acts, (list, tuple)) and not hasattr(acts, "shape"))


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _on_pairs(single, x: Any, y: Any, check_finite: bool):
    """Runs ``single(x_layer, y_layer)`` on one pair, or on every pair of two layer
    collections (``y=None``: x against itself); stacks grid results."""
    if not _is_layers(x):
        x, y = _v.pair(x, y, check_finite=check_finite)
        return single(x, y), None
    rows, layers_a, cols, layers_b = grid._reduced_layers(x, y, {"reduce": None}, check_finite)
    if y is None:
        cols, layers_b = rows, layers_a
    out = [[single(a, b) for b in layers_b] for a in layers_a]
    return out, (tuple(rows), tuple(cols))


def _as_grid(values: Any, names: tuple, label: str) -> grid.Grid:
    return grid.Grid(jnp.asarray(values), names[0], names[1], label)


def permutation_test(metric: Any, x: Any, y: Any, *, key: Array, num_permutations: int = 1000,
                     batch_size: int = 100, check_finite: bool = True, **options: Any
                     ) -> PermutationResult:
    """Permutation test of "no relation between x and y": the measure recomputed with y's
    examples shuffled.

    Args:
      metric: a name known to :func:`jaxsim.similarity_grid` or a callable ``f(x, y)``.
      x, y: activations ``(n, ...)``; or two sequences/mappings of layers (``y=None`` for a
        self-grid) for a p-value per pair of layers.
      key: a ``jax.random`` key.
      num_permutations: number of shuffles.
      batch_size: permutations evaluated together (memory: ``batch_size`` x one summary).
      **options: the metric's options.
    Returns:
      :class:`PermutationResult`. The smallest possible p-value is ``1 / (num + 1)``.
      Draw i permutes y by ``jax.random.permutation(jax.random.split(key, num)[i], n)``.
    """
    num = _count(num_permutations, "num_permutations")
    bs = min(_count(batch_size, "batch_size"), num)

    def single(a, b):
        return _permutation(_resolve(metric, options, a, b), a, b, key, num, bs)

    out, names = _on_pairs(single, x, y, check_finite)
    if names is None:
        return PermutationResult(*out)
    stat = [[o[0] for o in row] for row in out]
    p = [[o[1] for o in row] for row in out]
    null = jnp.stack([jnp.stack([o[2] for o in row]) for row in out])
    return PermutationResult(_as_grid(stat, names, str(metric)), _as_grid(p, names, "p-value"), null)


def bootstrap(metric: Any, x: Any, y: Any, *, key: Array, num_samples: int = 1000,
              confidence: float = 0.95, batch_size: int = 50, check_finite: bool = True,
              **options: Any) -> BootstrapResult:
    """Bootstrap percentile interval: the measure on examples resampled with replacement
    (the same resample for x and y; sample i takes the rows
    ``jax.random.randint(key, (num, n), 0, n)[i]``). Arguments as in
    :func:`permutation_test`. Resampling repeats examples, which the unbiased estimators
    (``debiased=True``) treat as distinct."""
    num = _count(num_samples, "num_samples")
    bs = min(_count(batch_size, "batch_size"), num)
    c = float(confidence)
    if not 0 < c < 1:
        raise ValueError(f"confidence: must lie in (0, 1), got {confidence!r}")

    def single(a, b):
        stat, samples = _bootstrap(_resolve(metric, options, a, b), a, b, key, num, bs)
        low, high = jnp.quantile(samples, jnp.array([(1 - c) / 2, (1 + c) / 2]))
        return stat, low, high, samples

    out, names = _on_pairs(single, x, y, check_finite)
    if names is None:
        return BootstrapResult(*out)
    field = lambda i: [[o[i] for o in row] for row in out]
    samples = jnp.stack([jnp.stack(r) for r in field(3)])
    return BootstrapResult(_as_grid(field(0), names, str(metric)), _as_grid(field(1), names, "low"),
                           _as_grid(field(2), names, "high"), samples)


def random_baseline(metric: Any, x: Any, y: Any, *, key: Array, num_samples: int = 100,
                    batch_size: int = 20, check_finite: bool = True, **options: Any
                    ) -> BaselineResult:
    """The measure on pairs of i.i.d. standard Gaussian activations with the shapes of x
    and y (the SVCCA tutorial's baseline): what "unrelated" looks like at this n and these
    widths. Arguments as in :func:`permutation_test`."""
    num = _count(num_samples, "num_samples")
    bs = min(_count(batch_size, "batch_size"), num)

    def single(a, b):
        samples = _baseline(_resolve(metric, options, a, b), key, (a.shape, b.shape),
                            np.dtype(a.dtype), num, bs)
        return jnp.mean(samples), jnp.std(samples), samples

    out, names = _on_pairs(single, x, y, check_finite)
    if names is None:
        return BaselineResult(*out)
    field = lambda i: [[o[i] for o in row] for row in out]
    samples = jnp.stack([jnp.stack(r) for r in field(2)])
    return BaselineResult(_as_grid(field(0), names, "baseline mean"),
                          _as_grid(field(1), names, "baseline std"), samples)
