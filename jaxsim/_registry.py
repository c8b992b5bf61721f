"""Metric names and callables, resolved to :class:`~jaxsim.Measure` records."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

from jax import Array

from jaxsim import canonical, geometry, kernel
from jaxsim._measure import Measure


def _maker(
    factory: Callable[..., Measure], name: str, options: dict[str, Any]
) -> Callable[..., Measure]:
    """``make(feature_space=False) -> Measure`` for a registered measure factory with the
    user's options (checked against the factory's keywords; the factory checks values)."""
    params = inspect.signature(factory).parameters
    unknown = sorted(k for k in options if k not in params or k == "feature_space")
    if unknown:
        raise TypeError(f"metric {name!r}: unexpected option(s) {', '.join(unknown)}")
    if "feature_space" in params:  # linear CKA: the grid picks the route
        return lambda feature_space=False: factory(**options, feature_space=feature_space)
    measure = factory(**options)
    return lambda feature_space=False: measure


def _no_extra(name: str, kw: Mapping[str, Any]) -> None:
    if kw:
        raise TypeError(f"metric {name!r}: unexpected option(s) {', '.join(sorted(kw))}")


METRICS: dict[str, Callable[..., Measure]] = {
    "linear_cka": kernel.linear_measure,
    "cka": kernel.linear_measure,
    "rbf_cka": kernel.rbf_measure,
    "mean_cca": canonical.cca_measure,
    "svcca": canonical.svcca_measure,
    "pwcca": canonical.pwcca_measure,
    "procrustes": geometry.procrustes_measure,
    "rsa": geometry.rsa_measure,
    "mutual_knn": geometry.mutual_knn_measure,
    "linear_predictivity": geometry.predictivity_measure,
}


def measure_for(
    metric: Any, options: dict[str, Any], symmetric: bool = False
) -> tuple[Callable[..., Measure], str]:
    """``(make, name)`` for a metric: a registered name with its options, a
    :class:`~jaxsim.Measure`, or a callable pair function (``symmetric``: only for a
    callable)."""
    if isinstance(metric, Measure):
        _no_extra(metric.name, options)
        if symmetric:
            raise TypeError(
                f"symmetric: for a callable metric; the Measure {metric.name!r} says "
                "whether it is symmetric (Measure.symmetric)"
            )
        return (lambda feature_space=False: metric), metric.name
    if callable(metric):
        _no_extra(getattr(metric, "__name__", "callable"), options)
        m = _callable_measure(metric, symmetric)
        return (lambda feature_space=False: m), getattr(metric, "__name__", "callable")
    if metric not in METRICS:
        raise ValueError(
            f"metric: unknown metric {metric!r}; valid names: "
            f"{', '.join(sorted(METRICS))}, a jaxsim.Measure, or a callable pair function"
        )
    if symmetric:
        raise TypeError(
            f"symmetric: for a callable metric; {metric!r} knows whether it is symmetric"
        )
    return _maker(METRICS[metric], metric, options), metric


@functools.lru_cache(maxsize=64)
def _callable_measure(fn: Callable[[Array, Array], Array], symmetric: bool) -> Measure:
    return Measure(getattr(fn, "__name__", "callable"), lambda x: x, fn, symmetric=symmetric)
