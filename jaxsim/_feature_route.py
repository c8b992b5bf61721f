"""Linear CKA in feature space (``d x d`` products, no ``n x n`` matrix), and the cost
model that chooses between it and the Gram route."""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxsim import _validation as _v
from jaxsim._measure import bounded_ratio, dot, inner, rounding_zero, safe_sqrt, unit_scaled


class FeatureSummary(NamedTuple):
    """A layer as its centered features, for the ``n > width`` route of linear CKA."""

    features: Array  # (n, d), centered
    row_sq: Array  # (n,) squared norms of the centered rows (the Gram's diagonal)
    total: Array  # sum of row_sq (the Gram's trace)
    self: Array  # <K~, K~> in the chosen (biased or U-centered) form


def norm_product(a: Any, b: Any) -> Array:
    # U-centered self terms are sums of squares, >= 0 up to rounding
    return safe_sqrt(a.self) * safe_sqrt(b.self)


def debias_inner(xty: Array, rx: Array, ry: Array, sx: Array, sy: Array, n: int) -> Array:
    # <K~, L~> from <K, L> for linearly-kernelled centered features: the U-centering terms
    # reduce to the Grams' diagonals (row norms) and traces.
    return xty - n / (n - 2) * dot(rx, ry) + sx * sy / ((n - 1) * (n - 2))


def feature_summary(x: Array, debiased: bool) -> FeatureSummary:
    xc, _ = unit_scaled(x)
    row_sq = jnp.sum(xc * xc, axis=1)
    total = jnp.sum(row_sq)
    cov = dot(xc.T, xc)
    self = inner(cov, cov)
    if debiased:
        n = x.shape[0]
        terms = self + n / (n - 2) * dot(row_sq, row_sq) + total * total / ((n - 1) * (n - 2))
        self = rounding_zero(
            debias_inner(self, row_sq, row_sq, total, total, n), terms, squared=False
        )
    return FeatureSummary(xc, row_sq, total, self)


def feature_pair(a: FeatureSummary, b: FeatureSummary, debiased: bool) -> Array:
    cross = dot(a.features.T, b.features)
    xty = inner(cross, cross)
    if debiased:
        xty = debias_inner(xty, a.row_sq, b.row_sq, a.total, b.total, a.features.shape[0])
    return bounded_ratio(xty, norm_product(a, b), -1.0 if debiased else 0.0)


def use_feature_space(
    n: int,
    widths_a: list[int],
    widths_b: list[int] | None = None,
    *,
    shards: int = 1,
    ring: bool = False,
) -> bool:
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


def feature_route(
    method: str,
    n: int,
    widths_a: list[int],
    widths_b: list[int] | None = None,
    *,
    shards: int = 1,
    ring: bool = False,
) -> bool:
    """Whether linear CKA takes the feature-space route: ``method`` "gram", "features" or
    "auto" (the cost model :func:`use_feature_space`)."""
    method = _v.choice(method, "method", ("auto", "gram", "features"))
    if method == "auto":
        return use_feature_space(n, widths_a, widths_b, shards=shards, ring=ring)
    return method == "features"
