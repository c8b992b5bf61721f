"""Row-by-everything computations a few rows at a time: Kendall's tau and k nearest
neighbours without an n x n (or m x m) array."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from jaxsim._distances import pad_rows
from jaxsim._measure import bounded_ratio, dot, max_scaled, safe_sqrt


def row_blocks(fn: Callable[[Array, Any], Any], values: Any, width: int, block_entries: int) -> Any:
    """``fn(rows, block)`` over consecutive blocks of the rows of ``values`` (arrays
    sharing axis 0, zero-padded past its end), each of at most ``block_entries // width``
    rows (at least one), stacked along a new first axis (``lax.map``): ``rows`` are the
    block's row indices, those past the end padding. For row-by-everything computations
    whose full ``n x width`` result must not exist at once."""
    n = jax.tree.leaves(values)[0].shape[0]
    b = max(1, min(n, block_entries // width))
    count = -(-n // b)
    blocks = jax.tree.map(lambda v: pad_rows(v, count * b).reshape(count, b, *v.shape[1:]), values)
    starts = jnp.arange(count, dtype=jnp.int32) * b
    return jax.lax.map(lambda args: fn(args[0] + jnp.arange(b), args[1]), (starts, blocks))


_KENDALL_ENTRIES = 1 << 18  # sign comparisons per step of Kendall's tau


def kendall_tau_b(a: Array, b: Array, block_entries: int = _KENDALL_ENTRIES) -> Array:
    """Kendall's tau-b of two vectors of m values: the m x m sign comparisons are made a
    few rows at a time (``block_entries`` at once), so memory is O(m), not O(m^2); the
    counts are exact integers per step."""
    m = a.shape[0]

    def step(rows, block):
        signs = lambda v, every: jnp.where(
            (rows < m)[:, None], jnp.sign(v[:, None] - every[None, :]), 0
        ).astype(jnp.int32)
        sa, sb = signs(block[0], a), signs(block[1], b)
        return jnp.stack([jnp.sum(sa * sb), jnp.sum(sa * sa), jnp.sum(sb * sb)])

    counts = jnp.sum(row_blocks(step, (a, b), m, block_entries).astype(a.dtype), axis=0)
    return bounded_ratio(counts[0], safe_sqrt(counts[1]) * safe_sqrt(counts[2]))


class Neighbours(NamedTuple):
    """A layer's k nearest neighbours of every example."""

    indices: Array  # (n, k) int32, in no particular order
    weight: Array  # () 1 / (n k), in the activations' dtype (the measure's result dtype)


def knn_indices(x: Array, k: int, block_entries: int = 2**22) -> Neighbours:
    """Each example's k nearest neighbours (cosine similarity of the feature vectors, the
    example itself excluded). Rows are done in blocks of at most ``block_entries``
    similarities, so memory is O(n k + b n), never an n x n matrix."""
    n = x.shape[0]
    x, _ = max_scaled(x)  # cosines are scale-free: no square may overflow
    norm = jnp.linalg.norm(x, axis=1, keepdims=True)
    z = x / jnp.where(norm > 0, norm, 1)

    def nearest(rows, zr):
        own = rows[:, None] == jnp.arange(n)[None, :]
        sim = dot(zr, z.T) - 3 * own.astype(z.dtype)  # cosine >= -1 > -2
        return jax.lax.top_k(sim, k)[1]

    idx = row_blocks(nearest, z, n, block_entries).reshape(-1, k)[:n]
    return Neighbours(idx, jnp.asarray(1 / (n * k), x.dtype))


def knn_pair(a: Neighbours, b: Neighbours) -> Array:
    """Shared neighbours, counted from the two index sets: O(n k^2) comparisons."""
    shared = jnp.sum(a.indices[:, :, None] == b.indices[:, None, :], dtype=jnp.int32)
    return shared.astype(a.weight.dtype) * a.weight
