"""Grids of measures evaluated pair by pair: summaries grouped by shape, pairs batched."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxsim import _layers, _programs
from jaxsim._measure import TRACE_COUNT, Measure, on_mesh, poison, summary_width


@functools.lru_cache(maxsize=256)
def jit_prepare(prepare: Callable[[Array], Any]) -> Callable[[Array], Any]:
    def run(x):
        TRACE_COUNT["prepare"] += 1
        return prepare(x)

    return jax.jit(run)


def prepare_all(measure: Measure, layers: Sequence[Array], tick: Callable[..., None]) -> list[Any]:
    prepare = jit_prepare(measure.prepare)
    out = []
    for x in layers:
        out.append(prepare(x))
        tick(out[-1])
    return out


def _pair_values(
    pair: Callable, group_a: tuple, group_b: tuple | None, ii: Array, jj: Array, batch_size: int
) -> Array:
    """``pair`` over the pairs ``(group_a[ii[k]], group_b[jj[k]])`` of two shape groups
    (``group_b`` None: the same group), stacked inside the compiled program."""
    TRACE_COUNT["pairs"] += 1
    stack_a = _layers.stack_trees(group_a)
    stack_b = stack_a if group_b is None else _layers.stack_trees(group_b)

    def one(ij):
        i, j = ij
        take = lambda t, k: jax.tree.map(lambda leaf: leaf[k], t)
        return pair(take(stack_a, i), take(stack_b, j))

    return jax.lax.map(one, (ii, jj), batch_size=batch_size)


pair_batches = jax.jit(_pair_values, static_argnames=("pair", "batch_size"))


@functools.lru_cache(maxsize=64)
def spread_pairs(
    pair: Callable, batch_size: int, mesh: Any, count: int | None = None
) -> Callable[..., Array]:
    """:func:`pair_batches` with the pairs divided among the devices of ``mesh`` (all its axes
    flattened): ``(group_a, group_b, ii, jj) -> values``, the summaries replicated and
    the pair indices (a multiple of ``mesh.size`` of them) split into equal shares; the
    first ``count`` values (default all), replicated."""
    spec = jax.sharding.PartitionSpec
    shares = spec(tuple(mesh.axis_names))
    local = lambda ga, gb, ii, jj: _pair_values(pair, ga, gb, ii, jj, batch_size)
    program = on_mesh(local, mesh, (spec(), spec(), shares, shares), shares)
    return jax.jit(lambda *args: program(*args)[:count])


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "mirror"))
def _assemble(
    parts: tuple, rows: Array, cols: Array, shape: tuple[int, int], dtype: Any, mirror: bool
) -> Array:
    """The grid from the values of its computed pairs (and their mirror images)."""
    out = jnp.concatenate([p.astype(dtype) for p in parts])
    if mirror:
        rows, cols, out = (
            jnp.concatenate([rows, cols]),
            jnp.concatenate([cols, rows]),
            jnp.concatenate([out, out]),
        )
    return jnp.zeros(shape, dtype).at[rows, cols].set(out)


WIDEN_SLACK = 1 / 8  # a widened summary costs at most this much more per dimension
NARROW = 64  # widths up to this share one bucket (docs/performance.md: first calls)


def buckets(widths: Iterable[int], slack: float | None = None) -> dict[int, int]:
    """Each width's bucket: going down from the widest, a width joins the current bucket
    when that is at most ``slack`` (default ``WIDEN_SLACK``) above it (58, 60, 64 -> 64;
    40 -> 40 when wider layers are there); widths up to ``NARROW`` all join the bucket of
    the widest of them (10, 40, 64 -> 64): so narrow a pair step costs far less than
    compiling another."""
    slack = WIDEN_SLACK if slack is None else slack
    out: dict[int, int] = {}
    top = None
    for w in sorted(set(widths), reverse=True):
        if top is None or top > w * (1 + slack):
            top = w
        out[w] = top
    narrow = [w for w in out if w <= NARROW]
    for w in narrow:
        out[w] = out[max(narrow)]
    return out


def ladder_width(width: int) -> int:
    """The width a single pair's summary is padded to, the same for every call: up to
    ``NARROW`` all widths share ``NARROW``; above, the next of the eighths between powers
    of two (``NARROW``, 72, 80, ..., 128, 144, ..., 512, 576, ...), at most ``WIDEN_SLACK``
    above the width. A loop of single-pair calls over layers of many widths then compiles
    a pair step per pair of rungs, not per pair of widths."""
    if width <= NARROW:
        return NARROW
    step = 2 ** ((width - 1).bit_length() - 1) // 8  # an eighth of the power of two below
    return -(-width // step) * step


@functools.lru_cache(maxsize=64)
def _jit_pair(pair: Callable[[Any, Any], Array]) -> Callable[..., Array]:
    def run(a, b, bad):
        TRACE_COUNT["single_pairs"] += 1
        value = pair(a, b)
        return value + bad.astype(value.dtype)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def _jit_prepare_checked(prepare: Callable[[Array], Any]) -> Callable[[Array], Any]:
    def run(x):
        TRACE_COUNT["prepare"] += 1
        return prepare(x), poison(x)

    return jax.jit(run)


def widen_to(measure: Measure, summary: Any, width: int) -> Any:
    """``summary`` padded to ``width`` by :attr:`Measure.widen` (itself if it has it)."""
    if summary_width(summary) == width:
        return summary
    return _jit_widen(measure.widen)(summary, width)


def single_pair(measure: Measure, x: Array, y: Array) -> Array:
    """``pair(prepare(x), prepare(y))`` as the grids compute it, for concrete arrays: each
    layer prepared by one program per shape, the summaries padded to :func:`ladder_width`
    where the measure can pad (:attr:`Measure.widen`), then one pair step per pair of
    summary shapes; a NaN or inf in either layer makes the value NaN (:func:`poison`)."""
    traced = _programs.traces()
    prepare = _jit_prepare_checked(measure.prepare)
    (sa, bad_a), (sb, bad_b) = prepare(x), prepare(y)
    if measure.widen is not None:
        sa, sb = (widen_to(measure, s, ladder_width(summary_width(s))) for s in (sa, sb))
    value = _jit_pair(measure.pair)(sa, sb, bad_a + bad_b)
    _programs.relieve(traced)
    return value


@functools.lru_cache(maxsize=64)
def _jit_widen(widen: Callable[[Any, int], Any]) -> Callable[[Any, int], Any]:
    """``widen`` as one compiled program per summary shape and width (eagerly, each of its
    pads would be a program of its own)."""
    return jax.jit(widen, static_argnums=1)


def _widened(
    measure: Measure, sa: Sequence[Any], sb: Sequence[Any], self_grid: bool
) -> tuple[list[Any], list[Any]]:
    """Summaries padded to their width's bucket (both sides together), for measures that
    allow it: fewer shape groups, hence fewer compiled pair steps, the same values."""
    bucket = buckets(summary_width(s) for s in [*sa, *([] if self_grid else sb)])

    def widen(ss):
        return [widen_to(measure, s, bucket[summary_width(s)]) for s in ss]

    wa = widen(sa)
    return wa, (wa if self_grid else widen(sb))


def generic_grid(
    measure: Measure,
    sa: Sequence[Any],
    sb: Sequence[Any],
    self_grid: bool,
    batch_size: int,
    dtype: Any,
    tick: Callable[..., None],
    mesh: Any = None,
) -> Array:
    """Every pair, one compiled ``lax.map`` per pair of shape groups (for a symmetric
    measure on a self-grid, per unordered pair of groups, mirrored), scattered into the
    grid on the device (jittable: no host round trip). With a ``mesh``, each device
    evaluates an equal share of the pairs (:func:`spread_pairs`)."""
    mirror = self_grid and measure.symmetric
    if measure.widen is not None:
        sa, sb = _widened(measure, sa, sb, self_grid)
    groups_a = _layers.shape_groups(sa)
    groups_b = groups_a if self_grid else _layers.shape_groups(sb)
    rows, cols, parts = [], [], []
    for ga, idx_a in enumerate(groups_a):
        for gb, idx_b in enumerate(groups_b):
            if mirror and gb < ga:
                continue  # the mirror image of (gb, ga)
            same = self_grid and ga == gb
            pairs = [
                (p, q)
                for p in range(len(idx_a))
                for q in range(len(idx_b))
                if not (mirror and same and q < p)
            ]
            group_a = tuple(sa[i] for i in idx_a)
            group_b = None if same else tuple(sb[j] for j in idx_b)
            ii = np.array([p for p, _ in pairs], np.int32)
            jj = np.array([q for _, q in pairs], np.int32)
            if mesh is None:
                out = pair_batches(
                    measure.pair, group_a, group_b, ii, jj, min(batch_size, len(pairs))
                )
            else:  # padded with repeats of the first pairs to equal shares
                share = -(-len(pairs) // mesh.size)
                spread = spread_pairs(measure.pair, min(batch_size, share), mesh, len(pairs))
                out = spread(
                    group_a,
                    group_b,
                    np.resize(ii, share * mesh.size),
                    np.resize(jj, share * mesh.size),
                )
            tick(out, len(pairs))
            rows += [idx_a[p] for p, _ in pairs]
            cols += [idx_b[q] for _, q in pairs]
            parts.append(out)
    return _assemble(
        tuple(parts),
        np.array(rows, np.int32),
        np.array(cols, np.int32),
        (len(sa), len(sb)),
        np.dtype(dtype),
        mirror,
    )


SUMMARY_BUDGET = 2**31  # bytes of prepared summaries a pairwise grid holds at once


def summary_groups(
    measure: Measure, layers_a: list[Any], layers_b: list[Any], self_grid: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """Consecutive layers grouped so that two groups' prepared summaries fit in
    ``SUMMARY_BUDGET`` bytes (one group per side when all of them fit): Spearman and
    Kendall RSA keep n (n - 1) / 2 entries per layer."""

    def size(x):
        shapes = jax.eval_shape(jit_prepare(measure.prepare), x)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))

    def grouped(layers):
        sizes = [size(x) for x in layers]
        out: list[list[int]] = []
        held = 0
        for i, s in enumerate(sizes):
            if not out or held + s > SUMMARY_BUDGET // 2:
                out.append([])
                held = 0
            out[-1].append(i)
            held += s
        return out, sum(sizes)

    ga, total_a = grouped(layers_a)
    gb, total_b = (ga, 0) if self_grid else grouped(layers_b)
    if total_a + total_b <= SUMMARY_BUDGET:
        return [list(range(len(layers_a)))], [list(range(len(layers_b)))]
    return ga, gb


def _group_blocks(
    groups_a: list[list[int]], groups_b: list[list[int]], self_grid: bool, symmetric: bool
) -> list[tuple[int, int]]:
    """The (row group, column group) blocks a grouped grid evaluates (a symmetric
    self-grid: the upper triangle)."""
    return [
        (ga, gb)
        for ga in range(len(groups_a))
        for gb in range(len(groups_b))
        if not (self_grid and symmetric and gb < ga)
    ]


def preparations(
    groups_a: list[list[int]], groups_b: list[list[int]], self_grid: bool, symmetric: bool
) -> int:
    """How many layers :func:`grouped_grid` prepares: every row once, and each column
    group once per block it is not the row group of."""
    return sum(map(len, groups_a)) + sum(
        len(groups_b[gb])
        for ga, gb in _group_blocks(groups_a, groups_b, self_grid, symmetric)
        if not (self_grid and ga == gb)
    )


def grouped_grid(
    measure: Measure,
    run: Callable[..., Array],
    layers_a: list[Any],
    layers_b: list[Any],
    groups_a: list[list[int]],
    groups_b: list[list[int]],
    self_grid: bool,
    dtype: Any,
    tick: Callable[..., None],
) -> Array:
    """A pairwise grid, its layers prepared group by group (one group per side when all
    summaries fit, see :func:`summary_groups`): each row group is prepared once, and
    each column group again for every row group (a self-grid of a symmetric measure: for
    the row group and those after it, mirrored), so that at most two groups' summaries
    exist at a time; ``run(sa, sb, self_grid)`` evaluates one block."""
    if len(groups_a) == len(groups_b) == 1:
        sa = prepare_all(measure, layers_a, tick)
        return run(sa, sa if self_grid else prepare_all(measure, layers_b, tick), self_grid)
    values = jnp.zeros((len(layers_a), len(layers_b)), dtype)
    mirror = self_grid and measure.symmetric
    blocks = _group_blocks(groups_a, groups_b, self_grid, measure.symmetric)
    for ga, rows in enumerate(groups_a):
        sa = prepare_all(measure, [layers_a[i] for i in rows], tick)
        for gb in [gb for g, gb in blocks if g == ga]:
            cols = groups_b[gb]
            same = self_grid and ga == gb
            sb = sa if same else prepare_all(measure, [layers_b[j] for j in cols], tick)
            block = run(sa, sb, same)
            r, c = np.array(rows), np.array(cols)
            values = values.at[r[:, None], c[None, :]].set(block)
            if mirror and not same:
                values = values.at[c[:, None], r[None, :]].set(block.T)
            del sb  # freed before the next column group is prepared
    return values
