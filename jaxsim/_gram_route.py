"""The Gram route: every pair of layers' centered-Gram inner products, block by block.

No n x n Gram is stored: each b x b block of every layer's centered Gram is formed from a
per-layer source and flattened into a column of a slab, and the slab's Gram is summed.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxsim import _layers
from jaxsim._kernel_blocks import LinearSource, linear_cross_block
from jaxsim._measure import (
    HIGHEST,
    TRACE_COUNT,
    GramBlocks,
    block_offsets,
    bounded_ratio,
    dot,
    inner,
    on_mesh,
    rounding_zero,
    safe_sqrt,
    unit_scaled,
)

_SPLIT_MIN = 256  # diagonal blocks of at least this many rows are formed as halves


SLAB_BUDGET = 2**32  # bytes of an accelerator's largest (b, b, L) float32 slab of blocks


def block_size(n: int, layers: int = 1, target: int | None = None) -> int:
    """Rows per block of the n x n index space: one block up to ``2 * target``; beyond,
    the fewest blocks of at most ``target`` rows, evened out (a multiple of 8), so that
    padding wastes at most a few rows per block: n = 1025 runs as 3 blocks of 344
    (1032 rows), not 3 of 512 (1536).

    ``target`` defaults to 512 rows on a CPU (larger blocks fall out of cache); on an
    accelerator, where small products leave the device idle between them, to the largest
    power of two up to 2048 whose largest slab (``layers`` blocks of ``2 * target`` rows,
    float32) fits ``SLAB_BUDGET`` (measurements: docs/performance.md)."""
    if target is None:
        target = 512
        if jax.default_backend() != "cpu":
            while target < 2048 and 4 * layers * (4 * target) ** 2 <= SLAB_BUDGET:
                target *= 2
    if n <= 2 * target:
        return n if n < _SPLIT_MIN else n + n % 2  # even: see _block_sum
    count = -(-n // target)
    rows = -(-n // count)
    return -(-rows // 8) * 8


def block_count(n: int, b: int) -> int:
    """How many block pairs (r <= c) :func:`jaxsim._measure.block_offsets` lists."""
    nb = -(-n // b)
    return nb * (nb + 1) // 2


CHUNK = 16  # block pairs per compiled call when a progress bar follows a Gram-route grid


def progress_chunks(n: int, b: int) -> list[tuple[int, int]]:
    """(first, count) of the compiled calls a followed Gram-route grid makes."""
    total = block_count(n, b)
    return [(first, min(CHUNK, total - first)) for first in range(0, total, CHUNK)]


@functools.partial(jax.jit, static_argnames=("source", "n_pad"))
def layer_source(source: Callable[[Array, int], Any], x: Array, n_pad: int) -> Any:
    """One layer's block source, compiled on its own: whatever temporaries it needs exist
    for one layer at a time, not for all at once."""
    return source(x, n_pad)


def block_pairs(
    n: int, b: int, dtype: Any, first: int = 0, count: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`jaxsim._measure.block_offsets` (row and column offsets of the block pairs,
    and their weights), pairs ``first .. first + count``."""
    end = None if count is None else first + count
    rows, cols, weights = block_offsets(n, b, dtype)
    return rows[first:end], cols[first:end], weights[first:end]


def _block_sum(
    blocks: GramBlocks,
    sources: list[Any],
    r0: Array,
    c0: Array,
    weight: Array,
    b: int,
    num_a: int | None = None,
    groups: tuple[tuple[int, ...], ...] | None = None,
) -> Array:
    """The sum over the block pairs at ``(r0[k], c0[k])`` (see :func:`block_pairs`) of
    the weighted ``slab^T slab`` terms of :func:`gram_inner_products` (not symmetrized;
    ``num_a``: see :func:`slab_products`). The offsets are arguments: chunks of equal
    length share one compiled program. ``groups``: the sources are stacks, one per group
    of layers (see :func:`source_groups`), and each block is one batched product per
    group (:func:`grouped_products`)."""
    TRACE_COUNT["blocks"] += 1

    def products(r, c, size):
        if groups is None:
            return slab_products([blocks.block(s, r, c, size) for s in sources], num_a)
        stacks = [jax.vmap(lambda s: blocks.block(s, r, c, size))(g) for g in sources]
        return grouped_products(jnp.concatenate(stacks), groups, num_a)

    def term(r, c, w):
        if b < _SPLIT_MIN or b % 2:
            return w * products(r, c, b)
        # a block on the diagonal is symmetric: its upper three halves, the off-diagonal
        # one twice, are 3/4 of its products
        h = b // 2
        halves = lambda: products(r, c, h) + 2 * products(r, c + h, h) + products(r + h, c + h, h)
        return w * jax.lax.cond(r == c, halves, lambda: products(r, c, b))

    return _scan_sum(term, r0, c0, weight)


gram_block_sum = jax.jit(_block_sum, static_argnames=("blocks", "b", "num_a", "groups"))


@functools.lru_cache(maxsize=32)
def local_source(
    source: Callable[[Array, int], Any], n_pad: int, mesh: Any
) -> Callable[[Array], Any]:
    """:func:`layer_source` of a layer on ``mesh``, gathered once and computed on every device
    without communication (``shard_map`` of replicated data). Left to XLA's partitioner, a
    sharded layer's source loops with collectives inside, which XLA's CPU runtime can
    order differently on different devices: a deadlock (an all-gather on one device, an
    all-reduce on the others)."""
    spec = jax.sharding.PartitionSpec
    return jax.jit(on_mesh(lambda x: source(x, n_pad), mesh, (spec(),), spec()))


@functools.lru_cache(maxsize=32)
def spread_block_sum(
    blocks: GramBlocks,
    b: int,
    mesh: Any,
    num_a: int | None = None,
    groups: tuple[tuple[int, ...], ...] | None = None,
) -> Callable[..., Array]:
    """:func:`gram_block_sum` with the block pairs divided among the devices of ``mesh``
    (all axes flattened; the offsets a multiple of ``mesh.size`` long, padded with weight
    0): ``(sources, r0, c0, weight) -> (L, L)``, the sources replicated, the partial sums
    all-reduced."""
    spec = jax.sharding.PartitionSpec
    axes = tuple(mesh.axis_names)
    local = lambda sources, r0, c0, w: jax.lax.psum(
        _block_sum(blocks, sources, r0, c0, w, b, num_a, groups), axes
    )
    return jax.jit(on_mesh(local, mesh, (spec(), spec(axes), spec(axes), spec(axes)), spec()))


def _row_inner(left: Array, right: Array) -> Array:
    """``left right^T`` for (L, m) and (M, m): ``(L, M)``, one product. XLA's CPU dot
    accumulates such a product with a side of at most 3 in one long float32 sum (relative
    error 1e-5 to 1e-4 at m = 512^2, also as an einsum over the blocks' axes): a narrower
    side is padded with zero rows to 4 (error ~4e-7, as for wider sides)."""
    wide = lambda s: jnp.pad(s, [(0, max(0, 4 - s.shape[0])), (0, 0)])
    return dot(wide(left), wide(right).T)[: left.shape[0], : right.shape[0]]


def _with_cross(cross: Array, selves: Array, num_a: int) -> Array:
    """The ``(L, L)`` inner products of a cross-grid's layers from the row-column block
    ``cross`` and each layer's with itself (the rest 0)."""
    out = jnp.diag(selves)
    return out.at[:num_a, num_a:].set(cross).at[num_a:, :num_a].set(cross.T)


def slab_products(grams: list[Array], num_a: int | None = None) -> Array:
    """``<G_l, G_m>`` for every pair of these (b, b) blocks, one per layer: ``(L, L)``, as
    the ``(b^2, L)^T (b^2, L)`` product of the blocks stacked along a last axis.

    ``num_a``: the blocks are the rows (the first ``num_a``) and columns of a cross-grid,
    and only the pairs of a row with a column and each block with itself are formed (the
    rest of the matrix is 0): for 24 x 36 layers, 24 * 36 + 60 products of the slab's
    3600."""
    rows = lambda gs: jnp.stack(gs, axis=-1).reshape(-1, len(gs)).T  # (L, b^2), a view
    if num_a is None:
        return _row_inner(rows(grams), rows(grams))
    return _with_cross(
        _row_inner(rows(grams[:num_a]), rows(grams[num_a:])),
        jnp.stack([inner(g, g) for g in grams]),
        num_a,
    )


def grouped_products(
    stack: Array, groups: tuple[tuple[int, ...], ...], num_a: int | None = None
) -> Array:
    """:func:`slab_products` of the (L, b, b) blocks of the layers in the order of
    ``groups`` (a cross-grid's row groups first), as the (L, b^2) x (b^2, L) product of
    their flattened rows, put back in the layers' order."""
    rows = stack.reshape(stack.shape[0], -1)
    if num_a is None:
        out = _row_inner(rows, rows)
    else:
        out = _with_cross(
            _row_inner(rows[:num_a], rows[num_a:]),
            jnp.einsum("lk,lk->l", rows, rows, precision=HIGHEST),
            num_a,
        )
    back = np.argsort([i for group in groups for i in group])
    return out[back][:, back]


def batched_blocks() -> bool:
    """Whether the Gram route forms each block of equal-shaped layers as one batched
    product (:func:`source_groups`): on an accelerator, where one product per layer
    leaves it partly idle; not on a CPU, where it gains nothing (docs/performance.md)."""
    return jax.default_backend() != "cpu"


def source_groups(sources: list[Any], num_a: int | None = None) -> tuple[tuple[int, ...], ...]:
    """:func:`_layers.shape_groups` of the layers' sources (equal shapes and dtypes), a
    cross-grid's rows (the first ``num_a``) and columns grouped apart, rows first."""
    if num_a is None:
        return tuple(map(tuple, _layers.shape_groups(sources)))
    return tuple(map(tuple, _layers.shape_groups(sources[:num_a]))) + tuple(
        tuple(num_a + i for i in g) for g in _layers.shape_groups(sources[num_a:])
    )


def _scan_sum(term: Callable[..., Array], *args: Array) -> Array:
    """``sum_k term(args[0][k], args[1][k], ...)``, as a scan. The first term starts the
    sum (not zeros), so the carry has the type of the terms, also inside shard_map where
    the terms vary across devices."""
    acc = term(*(a[0] for a in args))
    if args[0].shape[0] > 1:
        acc, _ = jax.lax.scan(
            lambda total, xs: (total + term(*xs), None), acc, tuple(a[1:] for a in args)
        )
    return acc


def cross_products(
    rows: list[LinearSource],
    cols: list[LinearSource],
    b: int,
    debiased: bool = False,
    same: bool = False,
    num_a: int | None = None,
) -> Array:
    """``<K_l, K_m>`` over one (m x m) block of every layer's centered Gram, rows ``rows``
    and columns ``cols`` (``same``: the very same examples, so the block holds the
    diagonal), for every pair of layers; formed b x b at a time (see
    :func:`jaxsim.linear_cross_block`; ``count`` and ``total``: over all devices;
    ``num_a``: see :func:`slab_products`)."""
    m = rows[0].features.shape[0]
    tiles = -(-m // b)
    pad = lambda x: jnp.pad(x, [(0, tiles * b - m)] + [(0, 0)] * (x.ndim - 1))
    padded = lambda src: src._replace(features=pad(src.features), row_sq=pad(src.row_sq))
    rows, cols = [padded(r) for r in rows], [padded(c) for c in cols]
    starts = [(r * b, c * b) for r in range(tiles) for c in range(tiles)]

    def term(r0, c0):
        return slab_products(
            [
                linear_cross_block(r, c, r0, c0, b, debiased=debiased, same=same, valid=m)
                for r, c in zip(rows, cols)
            ],
            num_a,
        )

    return _scan_sum(
        term,
        jnp.array([r for r, _ in starts], jnp.int32),
        jnp.array([c for _, c in starts], jnp.int32),
    )


def gram_inner_products(
    blocks: GramBlocks,
    layers: list[Array],
    b: int,
    tick: Callable[..., None] | None = None,
    mesh: Any = None,
    num_a: int | None = None,
) -> Array:
    """``<K~_i, K~_j>`` for every pair of layers, ``(L, L)``, up to :func:`symmetrize`
    (``num_a``: a cross-grid's first ``num_a`` layers against the rest, where only those
    pairs and each layer with itself are formed, see :func:`slab_products`).

    The centered Grams are never stored: for each block (r, c) of the n x n index space
    with r <= c, every layer's block is produced and flattened into a column of an
    ``(b^2, L)`` slab, and ``slab^T slab`` is added with weight 1 (r == c) or 2 (r < c,
    standing for the mirrored block too, as the Grams are symmetric); a diagonal block
    (b >= 256) as its three upper halves, weights 1, 2, 1. The Gram work is thus the
    symmetric half of every Gram plus a quarter of each diagonal block (a single block:
    3/4 of the full Gram), and memory is ``L b^2``, not ``L n^2``.

    With ``tick`` (a progress bar, see :func:`_progress.ticker`), the block pairs run as the
    calls of :func:`progress_chunks` (at most two compiled programs: full chunks and the last),
    so that the bar can follow them; otherwise as one call. With a ``mesh`` (layers that
    live on several devices), each device sums an equal share of the block pairs
    (:func:`spread_block_sum`), one call. On accelerators, layers of equal shapes are
    stacked and each block formed by one batched product per group
    (:func:`batched_blocks`).
    """
    n = layers[0].shape[0]
    n_pad = -(-n // b) * b
    spread = mesh is not None and n_pad > b  # one block: XLA partitions it
    if spread:
        sources = [local_source(blocks.source, n_pad, mesh)(x) for x in layers]
    else:
        sources = [layer_source(blocks.source, x, n_pad) for x in layers]
    dtype = jax.tree.leaves(sources[0])[0].dtype
    groups = None
    if batched_blocks():
        groups = source_groups(sources, num_a)
        stacks = []
        for group in groups:  # each layer's source is freed once its group is stacked
            stacks.append(_layers.stack_trees([sources[i] for i in group]))
            for i in group:
                sources[i] = None
        sources = stacks
    chunks = progress_chunks(n, b)
    if spread:
        offsets = block_pairs(n, b, dtype)
        total = -(-len(offsets[0]) // mesh.size) * mesh.size
        padded = [np.concatenate([a, np.zeros(total - len(a), a.dtype)]) for a in offsets]
        return spread_block_sum(blocks, b, mesh, num_a, groups)(sources, *padded)
    if tick is None or len(chunks) == 1:
        acc = gram_block_sum(blocks, sources, *block_pairs(n, b, dtype), b, num_a, groups)
    else:
        acc = None
        for first, count in chunks:
            part = gram_block_sum(
                blocks, sources, *block_pairs(n, b, dtype, first, count), b, num_a, groups
            )
            tick(part)
            acc = part if acc is None else acc + part
    return acc


def symmetrize(acc: Array) -> Array:
    """The inner products from :func:`gram_inner_products`' weighted sums."""
    return (acc + acc.T) / 2


@functools.partial(jax.jit, static_argnames="lower")
def normalize(cross: Array, self_a: Array, self_b: Array, lower: float = -1.0) -> Array:
    """``cross[i, j] / sqrt(self_a[i] self_b[j])`` in ``[lower, 1]`` (a cosine), 0 where a
    layer has no variance."""
    return bounded_ratio(cross, safe_sqrt(self_a)[:, None] * safe_sqrt(self_b)[None, :], lower)


@functools.partial(jax.jit, static_argnames=("num_a", "self_grid", "lower"))
def gram_values(
    acc: Array, num_a: int, self_grid: bool, lower: float, magnitudes: Array | None = None
) -> Array:
    """The grid from :func:`gram_inner_products`' sums, in one compiled program;
    ``magnitudes``: of unbiased HSICs, see :func:`zero_to_rounding`."""
    return normalize(
        *split_products(zero_to_rounding(symmetrize(acc), magnitudes), num_a, self_grid), lower
    )


def zero_to_rounding(products: Array, magnitudes: Array | None) -> Array:
    """Inner products of U-centered Grams with the self terms that are zero to rounding
    (see :func:`jaxsim._measure.rounding_zero`; ``magnitudes``: each layer's Gram trace,
    None: no such terms) set to 0, with their layers' cross terms (no larger, by
    Cauchy-Schwarz)."""
    if magnitudes is None:
        return products
    diag = jnp.diagonal(products)
    live = rounding_zero(diag, magnitudes, squared=True) > 0
    return jnp.where(live[:, None] & live[None, :], products, 0)


@functools.partial(jax.jit, static_argnames="rbf")
def gram_traces(layers: list[Array], rbf: bool) -> Array:
    """Each layer's (uncentered) Gram trace in the units of its Gram route: the unit-scaled
    centered features' squared norm (linear), n (RBF: a unit diagonal)."""
    if rbf:
        return jnp.full(len(layers), layers[0].shape[0], layers[0].dtype)
    return jnp.stack([jnp.sum(unit_scaled(x)[0] ** 2) for x in layers])


def split_products(products: Array, num_a: int, self_grid: bool) -> tuple[Array, Array, Array]:
    """Inner products of the row and column layers stacked together -> (cross block, row
    self terms, column self terms)."""
    norms = jnp.diagonal(products)
    if self_grid:
        return products, norms, norms
    return products[:num_a, num_a:], norms[:num_a], norms[num_a:]
