"""Reductions of convolutional activations ``(n, h, w, c)`` before comparing layers.

* :func:`flatten_spatial`: every spatial position becomes an example, ``(n*h*w, c)``; the
  usual choice for CCA on conv layers (google/svcca's tutorial), layers must then share
  their spatial size;
* :func:`average_pool`: the mean over positions, ``(n, c)``;
* :func:`resize_spatial`: interpolate to another spatial size (``jax.image.resize``), to
  bring layers of different resolutions to one before flattening.

Without a reduction, jaxsim flattens each example's ``h*w*c`` values into features.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import Array

from jaxsim import _validation as _v

__all__ = ["average_pool", "flatten_spatial", "reduce_layers", "resize_spatial"]


REDUCTIONS = ("flatten", "average", "resize")


def _conv(a: Any, name: str) -> Array:
    a = _v.as_float_array(a, name)
    if a.ndim != 4:
        raise ValueError(
            f"{name}: expected a conv activation of shape (n, h, w, c), got shape "
            f"{tuple(a.shape)} (rank {a.ndim})"
        )
    return a


def flatten_spatial(a: Any) -> Array:
    """``(n, h, w, c) -> (n*h*w, c)``: spatial positions as extra examples (rows ordered by
    example, then position)."""
    a = _conv(a, "a")
    return a.reshape(-1, a.shape[-1])


def average_pool(a: Any) -> Array:
    """``(n, h, w, c) -> (n, c)``: the mean over spatial positions."""
    return jnp.mean(_conv(a, "a"), axis=(1, 2))


def resize_spatial(a: Any, size: Sequence[int], method: str = "linear") -> Array:
    """``(n, h, w, c) -> (n, size[0], size[1], c)`` by interpolation (``jax.image.resize``;
    ``method`` is one of its methods: "nearest", "linear", "cubic", "lanczos3", ...)."""
    a = _conv(a, "a")
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size: expected two positive ints (h, w), got {size!r}")
    return jax.image.resize(a, (a.shape[0], int(size[0]), int(size[1]), a.shape[3]), method=method)


def reduce_layers(
    named: dict[str, Array],
    reduce: str | None,
    *,
    size: Sequence[int] | None = None,
    subsample: float | None = None,
    key: Array | None = None,
    method: str = "linear",
) -> dict[str, Array]:
    """Applies one reduction to every 4-D layer of ``{name: activation}``.

    Args:
      named: layers; 4-D ones are ``(n, h, w, c)``, others pass through unchanged.
      reduce: None (flatten per example), "flatten", "average" or "resize" (to ``size``,
        default the smallest spatial size among the layers, then flatten positions).
      subsample: with "flatten"/"resize", keep this fraction of the ``n*h*w`` rows (the
        same rows in every layer), drawn with ``key``; results are stable from about half
        the positions on.
    """
    if reduce is None:
        return named
    _v.choice(reduce, "reduce", REDUCTIONS)
    conv = {k: a for k, a in named.items() if a.ndim == 4}
    if reduce == "average":
        return {k: (average_pool(a) if a.ndim == 4 else a) for k, a in named.items()}
    if not conv:
        return named
    dense = [k for k, a in named.items() if a.ndim != 4]
    if dense:
        listing = ", ".join(f"{k} {tuple(named[k].shape)}" for k in dense)
        raise ValueError(
            f"reduce={reduce!r}: makes every spatial position of a conv layer an example, so "
            f"conv layers get n*h*w rows, but these layers are not (n, h, w, c): {listing}; "
            "use reduce='average' (one row per example for every layer) or compare the conv "
            "layers on their own"
        )
    if reduce == "resize":
        if size is None:
            size = min((a.shape[1:3] for a in conv.values()), key=lambda s: s[0] * s[1])
        conv = {k: resize_spatial(a, size, method) for k, a in conv.items()}
    spatial = {k: a.shape[1:3] for k, a in conv.items()}
    if len(set(spatial.values())) > 1:
        listing = ", ".join(f"{k}: {h}x{w}" for k, (h, w) in spatial.items())
        raise ValueError(
            f"reduce='flatten': layers have different spatial sizes ({listing}); "
            "use reduce='average' or reduce='resize'"
        )
    out = {k: (flatten_spatial(conv[k]) if k in conv else a) for k, a in named.items()}
    if subsample is not None:
        rows = next(iter(out[k] for k in conv)).shape[0]
        if not 0 < subsample <= 1:
            raise ValueError(f"subsample: expected a fraction in (0, 1], got {subsample!r}")
        if key is None:
            raise ValueError("key: subsample needs a jax.random key")
        keep = jax.random.choice(key, rows, (max(1, int(round(subsample * rows))),), replace=False)
        keep = jnp.sort(keep)
        out = {k: (a[keep] if k in conv else a) for k, a in out.items()}
    return out
