r"""Baselines and error bars for similarity measures: permutation tests, confidence
intervals and random-Gaussian baselines, for one pair of layers or a whole grid.

Intervals come from half-samples without replacement with a bias correction, not the
classic bootstrap, whose duplicated examples inflate every similarity; see
docs/statistics.md.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from jax import Array

from jaxsim import _draws
from jaxsim import _validation as _v
from jaxsim._feature_route import FeatureSummary
from jaxsim._layers import reduced_layers
from jaxsim._measure import Measure, replicated, safe_sqrt
from jaxsim._progress import bar
from jaxsim._result import Grid

__all__ = [
    "BaselineResult",
    "BootstrapResult",
    "PermutationResult",
    "bootstrap",
    "permutation_test",
    "random_baseline",
]


class PermutationResult(NamedTuple):
    """``statistic``: the measure on the data; ``p_value``: (1 + #{null >= statistic}) /
    (1 + num_permutations); ``null``: the measure with y's examples permuted. For grids,
    the first two are :class:`jaxsim.Grid` and ``null`` is ``(L_a, L_b, num_permutations)``."""

    statistic: Any
    p_value: Any
    null: Array


class BootstrapResult(NamedTuple):
    """``statistic``: the measure on the data; ``low``, ``high``: the interval; ``samples``:
    the measure on the resamples; ``estimate``: the point estimate the interval is built
    around (the statistic corrected for its finite-sample bias; equal to the statistic
    with ``resample="replacement"``). For grids, all but ``samples`` are
    :class:`jaxsim.Grid` and ``samples`` is ``(L_a, L_b, num_samples)``."""

    statistic: Any
    low: Any
    high: Any
    samples: Array
    estimate: Any = None

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._asdict().items() if k != "samples")
        return f"BootstrapResult({shown}, samples=<{_shape_text(self.samples)}>)"


def _shape_text(a: Any) -> str:
    shape = getattr(a, "shape", ())
    return f"array of shape {tuple(shape)}" if shape else repr(a)


class BaselineResult(NamedTuple):
    """The measure on i.i.d. Gaussian activations of the data's shapes: ``mean``, ``std``
    and the ``samples``."""

    mean: Any
    std: Any
    samples: Array


def _permutation_pair(
    measure: Measure, x: Array, y: Array, key: Array, num: int, batch_size: int, progress: Any
):
    n = x.shape[0]
    sx, sy, stat = _draws.prepared(measure, x, y)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, num))
    item = y.dtype.itemsize
    per_draw = (n * y.shape[1] if isinstance(sy, FeatureSummary) else n * n) * item
    null = _draws.in_batches(
        lambda p: _draws.null_batch(measure, sx, sy, y, p),
        perms,
        _draws.batch_size(batch_size, per_draw),
        progress,
        "permutations",
    )
    p_value = (1 + jnp.sum(null >= stat)) / (num + 1)
    return stat, p_value, null


def _subsamples(key: Array, n: int, m: int, num: int) -> Array:
    """``num`` sets of ``m`` distinct example indices (draw i: the first m of
    ``jax.random.permutation(jax.random.split(key, num)[i], n)``)."""
    return jax.vmap(lambda k: jax.random.permutation(k, n)[:m])(jax.random.split(key, num))


def _bias(
    stat: Array,
    half: Array,
    quarter: Array | None,
    half_var: Array,
    quarter_var: Array | None,
    num: int,
) -> tuple[Array, Array]:
    """Finite-sample bias of the full-sample value from the mean values on ``num`` half-
    and quarter-samples, with the bias expanded as ``b/n + c/n^2``: to second order when
    the quarter-samples are there and the expansion's second term is the smaller, else to
    first order (``half - stat``); and the Monte Carlo variance of that estimate (the
    sample means' own variance, ``var / num``, through the extrapolation's weights)."""
    first = half - stat
    first_var = half_var / num
    if quarter is None or quarter_var is None:
        return first, first_var
    # stat = T + u + v, half = T + 2u + 4v, quarter = T + 4u + 16v: T = (8 stat - 6 half
    # + quarter) / 3, a bias of 2 half - quarter / 3 - 5 stat / 3
    v = ((quarter - half) - 2 * (half - stat)) / 6
    u = first - 3 * v
    second = jnp.abs(v) <= jnp.abs(u) / 2
    second_var = (4 * half_var + quarter_var / 9) / num
    return jnp.where(second, u + v, first), jnp.where(second, second_var, first_var)


def _bootstrap_pair(
    measure: Measure,
    x: Array,
    y: Array,
    key: Array,
    num: int,
    batch_size: int,
    confidence: float,
    resample: str,
    progress: Any,
):
    n = x.shape[0]
    stat = _draws.prepared(measure, x, y)[2]

    def evaluate(rows, desc):
        m = rows.shape[1]
        per_draw = m * (x.shape[1] + y.shape[1] + (m if measure.blocks is not None else 0))
        return _draws.in_batches(
            lambda r: _draws.resample_batch(measure, x, y, r),
            rows,
            _draws.batch_size(batch_size, per_draw * x.dtype.itemsize),
            progress,
            desc,
        )

    tails = np.array([(1 - confidence) / 2, (1 + confidence) / 2])
    if resample == "replacement":
        samples = evaluate(jax.random.randint(key, (num, n), 0, n), "resamples")
        low, high = jnp.quantile(samples, jnp.asarray(tails, samples.dtype))
        return stat, low, high, samples, stat
    samples = evaluate(_subsamples(key, n, n // 2, num), "half-samples")
    quarter = quarter_var = None
    if n // 4 >= measure.min_n:
        quarters = evaluate(
            _subsamples(jax.random.fold_in(key, 1), n, n // 4, num), "quarter-samples"
        )
        quarter, quarter_var = jnp.mean(quarters), jnp.var(quarters)
    mean = jnp.mean(samples)
    bias, bias_var = _bias(stat, mean, quarter, jnp.var(samples), quarter_var, num)
    estimate = stat - bias
    # the variance of half-samples (m = n/2 of n, without replacement) estimates the full
    # sample's (the delete-d jackknife's factor m / (n - m) is 1), plus the Monte Carlo
    # variance of the bias estimate, which shrinks as num_samples grows
    m = n // 2
    sd = safe_sqrt(m / (n - m) * jnp.var(samples) + bias_var)
    z = float(scipy.stats.norm.ppf(tails[1]))
    return stat, estimate - z * sd, estimate + z * sd, samples, estimate


def _baseline_pair(
    measure: Measure, x: Array, y: Array, key: Array, num: int, batch_size: int, progress: Any
):
    per_draw = x.shape[0] * (x.shape[1] + y.shape[1]) * x.dtype.itemsize
    samples = _draws.in_batches(
        lambda k: _draws.gaussian_batch(measure, k, (x.shape, y.shape), np.dtype(x.dtype)),
        jax.random.split(key, num),
        _draws.batch_size(batch_size, per_draw),
        progress,
        "Gaussian baselines",
    )
    return jnp.mean(samples), jnp.std(samples), samples


def _is_layers(acts: Any) -> bool:
    return isinstance(acts, Mapping) or (
        isinstance(acts, (list, tuple)) and not hasattr(acts, "shape")
    )


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _on_pairs(single, x: Any, y: Any, check_finite: bool, progress: Any, desc: str):
    """Runs ``single(x_layer, y_layer, progress)`` on one pair, or on every pair of two
    layer collections (``y=None``: x against itself), with one progress bar over the
    pairs; returns the results and the grid's names (None for one pair)."""
    if not _is_layers(x):
        x, y = _v.pair(x, y, check_finite=check_finite)
        return single(replicated(x), replicated(y), progress), None
    rows, layers_a, cols, layers_b = reduced_layers(x, y, {"reduce": None}, check_finite)
    if y is None:
        cols, layers_b = rows, layers_a
    layers_a = [replicated(a) for a in layers_a]
    layers_b = [replicated(b) for b in layers_b]
    pairs = [(a, b) for a in layers_a for b in layers_b]
    flat = [single(a, b, False) for a, b in bar(pairs, progress, len(pairs), desc)]
    out = [flat[i * len(layers_b) : (i + 1) * len(layers_b)] for i in range(len(layers_a))]
    return out, (tuple(rows), tuple(cols))


def _fields(out: list, names: tuple, labels: tuple[str, ...], stacked: tuple[int, ...]) -> list:
    """Grid results -> one Grid per scalar field (``labels``), stacked arrays for the
    fields in ``stacked``."""
    result: list[Any] = []
    for i, label in enumerate(labels):
        values = [[o[i] for o in row] for row in out]
        if i in stacked:
            result.append(jnp.stack([jnp.stack(r) for r in values]))
        else:
            result.append(Grid(jnp.asarray(values), names[0], names[1], label))
    return result


def permutation_test(
    metric: Any,
    x: Any,
    y: Any,
    *,
    key: Array,
    num_permutations: int = 1000,
    batch_size: int = 100,
    method: str = "auto",
    symmetric: bool = False,
    check_finite: bool = True,
    progress: bool | None = None,
    **metric_options: Any,
) -> PermutationResult:
    """Permutation test of "no relation between x and y": the measure recomputed with y's
    examples shuffled.

    Args:
      metric: a name known to :func:`jaxsim.similarity_grid` or a callable ``f(x, y)``.
      x: activations ``(n, ...)``; or a sequence/mapping of layers for a p-value per pair
        of layers.
      y: activations of the same n examples; or a sequence/mapping of layers (``None``
        for a self-grid of ``x``).
      key: a ``jax.random`` key.
      num_permutations: number of shuffles.
      batch_size: permutations evaluated together, capped so that a batch's permuted
        Grams (or gathered features) stay under 512 MB.
      progress: a progress bar over the batches (over the layer pairs for grids); None
        shows one only when the work takes more than a few seconds (tqdm installed).
      method: linear CKA's route, ``"auto"``, ``"gram"`` or ``"features"``; ``"auto"``
        picks it by a cost model measured on this workload: a permutation costs n^2
        gathered Gram entries or one n x d1 x d2 product (the feature route wins unless
        ``d1 d2 > 160 n``).
      symmetric: a callable ``metric`` is symmetric (as in :func:`jaxsim.similarity_grid`).
      check_finite: raise on NaN/inf in the activations.
      **metric_options: the metric's own options (``debiased``, ``epsilon``, ...); an
        unknown one is a ``TypeError`` naming it.
    Returns:
      :class:`PermutationResult`. The smallest possible p-value is ``1 / (num + 1)``.
      Draw i permutes y by ``jax.random.permutation(jax.random.split(key, num)[i], n)``.
    """
    num = _count(num_permutations, "num_permutations")
    bs = _count(batch_size, "batch_size")

    def single(a, b, show):
        return _permutation_pair(
            _draws.resolve(metric, method, symmetric, metric_options, a, b, permuted=True),
            a,
            b,
            key,
            num,
            bs,
            show,
        )

    out, names = _on_pairs(single, x, y, check_finite, progress, "permutation test")
    if names is None:
        return PermutationResult(*out)
    return PermutationResult(*_fields(out, names, (str(metric), "p-value", "null"), (2,)))


def bootstrap(
    metric: Any,
    x: Any,
    y: Any,
    *,
    key: Array,
    num_samples: int = 1000,
    confidence: float = 0.95,
    resample: str = "half",
    batch_size: int = 50,
    method: str = "auto",
    symmetric: bool = False,
    check_finite: bool = True,
    progress: bool | None = None,
    **metric_options: Any,
) -> BootstrapResult:
    r"""Confidence interval for a similarity measure by resampling examples.

    ``resample="half"`` (default): each resample is ``m = n // 2`` distinct examples drawn
    without replacement (the same rows of x and y), so no example is duplicated and
    compared with itself, which inflates every Gram- and covariance-based measure under
    the classic bootstrap. With :math:`\hat\theta` the measure on all n examples and
    :math:`\theta^*_b` on the half-samples:

    .. math:: \tilde\theta = \hat\theta - \hat b, \qquad
       \tilde\theta \pm z_{1-\alpha/2}\,\sqrt{\tfrac{m}{n-m}\,\mathrm{var}(\theta^*)
       + \mathrm{var}_{MC}(\hat b)}

    with :math:`\mathrm{var}(\theta^*)` the half-samples' variance (scaled as the
    delete-d jackknife scales it; the factor is 1 for m = n/2), the Monte Carlo variance
    of the bias estimate (which vanishes as ``num_samples`` grows) and :math:`\hat b` the
    finite-sample bias of :math:`\hat\theta`, extrapolated from the mean values on the
    half-samples and on as many quarter-samples: with the bias expanded as
    :math:`b/n + c/n^2`, :math:`\hat b = \bar\theta^*_{n/2} - \hat\theta` to first
    order, and the second-order term is added when it is the smaller of the two. The
    interval, centered on the corrected estimate, targets the population value. Biased
    estimators (linear and RBF CKA, the CCA family when n is not large against the
    widths) can then exclude the raw ``statistic``: their bias is larger than their
    sampling error; the interval always contains ``estimate``.

    ``resample="replacement"``: the classic percentile bootstrap (rows
    ``jax.random.randint(key, (num, n), 0, n)[i]``), kept for comparison; its intervals
    are shifted by the duplicates.

    Args:
      metric: as in :func:`permutation_test`, as are ``x``, ``y``, ``key``, ``method``,
        ``symmetric``, ``check_finite``, ``progress`` and ``**metric_options``.
      num_samples: number of resamples.
      confidence: the interval's nominal coverage, in (0, 1).
      resample: "half" or "replacement".
      batch_size: resamples evaluated together.
    Returns:
      :class:`BootstrapResult`.
    References:
      Efron, The Jackknife, the Bootstrap and Other Resampling Plans, 1982 (half-sampling);
      Shao & Wu, A general theory for jackknife variance estimation, Ann. Statist. 1989;
      Politis, Romano & Wolf, Subsampling, Springer 1999 (resampling without
      replacement).
    """
    num = _count(num_samples, "num_samples")
    bs = _count(batch_size, "batch_size")
    _v.choice(resample, "resample", ("half", "replacement"))
    c = float(confidence)
    if not 0 < c < 1:
        raise ValueError(f"confidence: must lie in (0, 1), got {confidence!r}")

    def single(a, b, show):
        measure = _draws.resolve(metric, method, symmetric, metric_options, a, b)
        if resample == "half" and a.shape[0] // 2 < measure.min_n:
            raise ValueError(
                f"x: half-samples of n={a.shape[0]} examples have fewer than the "
                f"{measure.min_n} this estimator needs"
            )
        return _bootstrap_pair(measure, a, b, key, num, bs, c, resample, show)

    out, names = _on_pairs(single, x, y, check_finite, progress, "bootstrap")
    if names is None:
        return BootstrapResult(*out)
    stat, low, high, samples, estimate = _fields(
        out, names, (str(metric), "low", "high", "samples", "estimate"), (3,)
    )
    return BootstrapResult(stat, low, high, samples, estimate)


def random_baseline(
    metric: Any,
    x: Any,
    y: Any,
    *,
    key: Array,
    num_samples: int = 100,
    batch_size: int = 20,
    method: str = "auto",
    symmetric: bool = False,
    check_finite: bool = True,
    progress: bool | None = None,
    **metric_options: Any,
) -> BaselineResult:
    """The measure on pairs of i.i.d. standard Gaussian activations with the shapes of x
    and y (the SVCCA tutorial's baseline): what "unrelated" looks like at this n and these
    widths. Arguments as in :func:`permutation_test`."""
    num = _count(num_samples, "num_samples")
    bs = _count(batch_size, "batch_size")

    def single(a, b, show):
        return _baseline_pair(
            _draws.resolve(metric, method, symmetric, metric_options, a, b),
            a,
            b,
            key,
            num,
            bs,
            show,
        )

    out, names = _on_pairs(single, x, y, check_finite, progress, "Gaussian baseline")
    if names is None:
        return BaselineResult(*out)
    return BaselineResult(*_fields(out, names, ("baseline mean", "baseline std", "samples"), (2,)))
