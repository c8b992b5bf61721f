"""Squared distances between examples, and the padding and masking of their blocks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxsim._measure import block_offsets, dot, unit_scaled


def distance_terms(x: Array) -> tuple[Array, Array]:
    """Centered, unit-scaled features and their squared norms. Centering first keeps the
    |a|^2 + |b|^2 - 2<a, b> expansion from cancelling when the activations have a large
    common offset; distances do not change. The kernel divides by the median distance,
    so the scale of x does not matter either."""
    xc, _ = unit_scaled(x)
    return xc, jnp.sum(xc * xc, axis=1)


def sq_distances(x: Array) -> Array:
    xc, sq = distance_terms(x)
    idx = jnp.arange(x.shape[0])
    return distance_block(xc, xc, sq, sq, idx, idx)


def distance_block(xr: Array, xc: Array, sq_r: Array, sq_c: Array, i: Array, j: Array) -> Array:
    """Squared distances between rows ``i`` (features ``xr``, squared norms ``sq_r``) and
    rows ``j``; exactly 0 between a row and itself."""
    d = jnp.maximum(sq_r[:, None] + sq_c[None, :] - 2 * dot(xr, xc.T), 0)
    return jnp.where(i[:, None] == j[None, :], 0, d)


def pad_rows(x: Array, n_pad: int) -> Array:
    return jnp.pad(x, [(0, n_pad - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def masked_block(k: Array, r0: Array, c0: Array, b: int, valid: Any, off_diagonal: bool) -> Array:
    """Block ``k`` at (r0, c0) with the rows and columns past ``valid`` (padding) zeroed,
    and its entries on the Gram's diagonal too when ``off_diagonal``."""
    i = r0 + jnp.arange(b)
    j = c0 + jnp.arange(b)
    keep = (i[:, None] < valid) & (j[None, :] < valid)
    if off_diagonal:
        keep = keep & (i[:, None] != j[None, :])
    return jnp.where(keep, k, 0)


def source_blocks(n_pad: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(b, r0, c0, weight)``: the upper-triangle blocks (b x b, b dividing ``n_pad``: one
    block up to 1024 rows, else the largest divisor up to 512) that a layer's source
    passes over, and their integer weights (see :func:`block_offsets`)."""
    b = n_pad if n_pad <= 1024 else max(k for k in range(1, 513) if n_pad % k == 0)
    return (b, *block_offsets(n_pad, b, np.uint32))


def source_distances(
    xc: Array, sq: Array, n: int, b: int, r0: Array, c0: Array
) -> tuple[Array, Array]:
    """Block ``(r0, c0)`` of the squared distances of the (padded) rows ``xc``, and which
    of its entries are real (rows and columns below n)."""
    take = lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, b)
    i, j = r0 + jnp.arange(b), c0 + jnp.arange(b)
    d = distance_block(take(xc, r0), take(xc, c0), take(sq, r0), take(sq, c0), i, j)
    return d, (i[:, None] < n) & (j[None, :] < n)
