r"""Streaming minibatch CKA (Nguyen, Raghu & Kornblith 2021, eq. 3), a functional
accumulator: ``init``, one ``update`` per minibatch, ``result``."""

from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxsim import _gram_route, _kernel_blocks, _layers, _sharding
from jaxsim import _validation as _v
from jaxsim._measure import TRACE_COUNT, center_features, replicated
from jaxsim._result import Grid

__all__ = [
    "MinibatchCKAState",
    "minibatch_cka_init",
    "minibatch_cka_result",
    "minibatch_cka_scan",
    "minibatch_cka_update",
]


@jax.jit
def _own_traces(layers: list[Array]) -> Array:
    """Each layer's centered linear Gram trace at the activations' own scale (minibatch
    CKA's units)."""
    return jnp.stack([jnp.sum(center_features(x) ** 2) for x in layers])


class MinibatchCKAState(NamedTuple):
    """Running sums of minibatch CKA (a pytree of arrays that add).

    ``jax.tree.map(operator.add, s1, s2)`` is the state of both streams together.
    """

    cross: Array  # (L_a, L_b) sum over batches of HSIC_1(K_i, L_i)
    self_a: Array  # (L_a,) sum of HSIC_1(K_i, K_i)
    self_b: Array  # (L_b,) sum of HSIC_1(L_i, L_i)
    count: Array  # type: ignore[assignment]  # a field, shadowing tuple.count; minibatches


def minibatch_cka_init(
    num_a: int, num_b: int | None = None, *, dtype: Any = None
) -> MinibatchCKAState:
    """An empty minibatch CKA state for ``num_a`` row layers and ``num_b`` column layers
    (``num_b=None``: a self-grid of ``num_a`` layers)."""
    num_b = num_a if num_b is None else num_b
    for name, v in (("num_a", num_a), ("num_b", num_b)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected a positive number of layers, got {v!r}")
    dtype = dtype or jnp.result_type(float)
    return MinibatchCKAState(
        jnp.zeros((num_a, num_b), dtype),
        jnp.zeros(num_a, dtype),
        jnp.zeros(num_b, dtype),
        jnp.zeros((), dtype),
    )


def _side(batch: Any, arg: str, expected: int) -> dict[str, Any]:
    """One side's layers by their argument names (``arg['name']``), as many as the state
    has on that side."""
    names, arrays = _layers.named(batch, arg)
    if len(arrays) != expected:
        raise ValueError(
            f"{arg}: the state has {expected} layer(s) on this side but the batch has {len(arrays)}"
        )
    return {f"{arg}[{k!r}]": a for k, a in zip(names, arrays)}


def _batch_layers(batch: Any, arg: str, expected: int) -> tuple[dict[str, Any], dict[str, Array]]:
    """A batch's layers as given and flattened (finiteness is checked by the caller, for
    both sides in one fused reduction)."""
    raw = _side(batch, arg, expected)
    return raw, _v.layers(raw, check_finite_values=False)


@functools.partial(jax.jit, static_argnames=("axis_name",))
def _minibatch_update(
    state: MinibatchCKAState, layers_a: list[Array], layers_b: list[Array] | None, axis_name: Any
) -> MinibatchCKAState:
    TRACE_COUNT["minibatch"] += 1
    dtype = state.cross.dtype
    union = [x.astype(dtype) for x in layers_a + (layers_b or [])]
    m = union[0].shape[0]
    sums = _gram_route.gram_inner_products(
        _kernel_blocks.minibatch_blocks(),
        union,
        _gram_route.block_size(m, len(union)),
        num_a=None if layers_b is None else len(layers_a),
    )
    return _minibatch_add(
        state,
        sums,
        len(layers_a),
        layers_b is None,
        m,
        axis_name,
        _layers.layer_poison(union).astype(dtype),
        _own_traces(union),
    )


def _minibatch_add(
    state: MinibatchCKAState,
    sums: Array,
    num_a: int,
    self_grid: bool,
    m: int,
    axis_name: Any = None,
    bad: Array | None = None,
    traces: Array | None = None,
) -> MinibatchCKAState:
    """The state plus one batch of m examples, from its U-centered Grams' inner products
    (``sums``, up to :func:`_gram_route.symmetrize`); ``bad``: the union's layers' poison;
    ``traces``: their Grams' traces (see :func:`_gram_route.zero_to_rounding`)."""
    products = _gram_route.zero_to_rounding(_gram_route.symmetrize(sums), traces) / (m * (m - 3))
    cross, self_a, self_b = _gram_route.split_products(products, num_a, self_grid)
    if bad is not None:  # a layer with a NaN or inf makes its sums NaN (see poison)
        bad_a, bad_b = bad[:num_a], (bad[:num_a] if self_grid else bad[num_a:])
        cross = cross + bad_a[:, None] + bad_b[None, :]
        self_a, self_b = self_a + bad_a, self_b + bad_b
    step = MinibatchCKAState(cross, self_a, self_b, jnp.ones((), state.cross.dtype))
    if axis_name is not None:
        step = jax.lax.psum(step, axis_name)
    return jax.tree.map(operator.add, state, step)


_minibatch_add_jit = jax.jit(_minibatch_add, static_argnames=("num_a", "self_grid", "m"))


def minibatch_cka_update(
    state: MinibatchCKAState,
    batch_acts_a: Any,
    batch_acts_b: Any = None,
    *,
    axis_name: Any = None,
    check_finite: bool = False,
) -> MinibatchCKAState:
    r"""Adds one minibatch to a minibatch CKA state (Nguyen et al. 2020, eq. 3).

    For each layer the batch's linear Gram is U-centered once; the unbiased
    :math:`\mathrm{HSIC}_1` of every pair of layers is then one matrix product. One jitted
    call per batch; memory does not depend on the number of batches seen.

    Args:
      state: from :func:`minibatch_cka_init` or a previous update.
      batch_acts_a: the row layers on this batch, a sequence or mapping of ``(m, ...)``
        arrays (m >= 4, shared); trailing axes are flattened per example.
      batch_acts_b: the column layers on the same examples; ``None`` for a self-grid.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis: each device's shard counts
        as one minibatch and the increments are summed with ``psum``. Outside, a batch
        sharded along its examples over one mesh axis is one minibatch, its Gram blocks
        divided among the devices (see :func:`similarity_grid`); under ``jit`` XLA
        partitions it itself.
      check_finite: raise on NaN/inf in this batch now (one device-to-host sync per
        batch; skipped when traced). By default nothing waits for the device: a layer
        with NaN or inf makes its sums NaN, and :func:`minibatch_cka_result` raises,
        naming the layer.
    Returns:
      The new state.

    HSIC terms are summed over batches at the activations' own scale (a per-batch
    rescaling would change their units): in float32, activations beyond ~1e5 in
    magnitude can overflow a batch's HSIC; divide such a layer by one constant first.
    """
    num_a, num_b = state.cross.shape
    raw, named = _batch_layers(batch_acts_a, "batch_acts_a", num_a)
    if batch_acts_b is not None:
        raw_b, named_b = _batch_layers(batch_acts_b, "batch_acts_b", num_b)
        raw = {**raw, **raw_b}
    elif num_a != num_b:
        raise ValueError(
            f"batch_acts_b: missing, but the state compares {num_a} row layers "
            f"with {num_b} column layers"
        )
    _v.finite(raw, check_finite)  # every layer of both sides: one sync, when asked
    _v.same_n(
        {**named, **(named_b if batch_acts_b is not None else {})},
        min_n=4,
        why=" per minibatch for the unbiased HSIC estimator",
    )
    layers_a = list(named.values())
    layers_b = None if batch_acts_b is None else list(named_b.values())
    union = layers_a + (layers_b or [])
    ring = _sharding.ring_axis(union) if axis_name is None else None
    if ring is not None:  # sharded along examples: each device its share of the blocks
        sums = _sharding.ring_program(
            *ring,
            debiased=True,
            rescale=False,
            dtype=np.dtype(state.cross.dtype),
            num_a=None if layers_b is None else len(layers_a),
        )(union)
        dtype = state.cross.dtype
        return _minibatch_add_jit(
            state,
            sums,
            len(layers_a),
            layers_b is None,
            union[0].shape[0],
            bad=_layers.layer_poison(union).astype(dtype),
            traces=_own_traces([x.astype(dtype) for x in union]),
        )
    return _minibatch_update(
        state,
        [replicated(x) for x in layers_a],
        None if layers_b is None else [replicated(x) for x in layers_b],
        axis_name,
    )


def _stacks(batches: Any, arg: str, expected: int) -> tuple[list[str], list[Array]]:
    """The layers' stacks of minibatches, each ``(k, m, features)``, validated: the same k
    and m (at least 4) across the layers."""
    raw = _side(batches, arg, expected)
    stacks = []
    for name, a in raw.items():
        a = _v.as_float_array(a, name)
        if a.ndim < 3:
            raise ValueError(
                f"{name}: expected a stack of minibatches of shape (k, m, ...), "
                f"got shape {tuple(a.shape)}"
            )
        stacks.append(a.reshape(a.shape[0], a.shape[1], -1))
    return list(raw), stacks


def minibatch_cka_scan(
    state: MinibatchCKAState, batches_a: Any, batches_b: Any = None
) -> MinibatchCKAState:
    """Adds k minibatches at once, in one compiled ``lax.scan``: no Python dispatch and no
    host round trip between batches.

    Equal to k calls of :func:`minibatch_cka_update`, one per minibatch, for batches that
    fit in memory together (a data set split into equal batches, or the stack a
    training loop collects).

    Args:
      state: from :func:`minibatch_cka_init` or a previous update.
      batches_a: the row layers, a sequence or mapping of ``(k, m, ...)`` arrays: k
        minibatches of m >= 4 examples, the same k and m for every layer.
      batches_b: the column layers' stacks on the same examples; ``None`` for a self-grid.
    Returns:
      The new state. NaN or inf in a batch poison its layers' sums, as in
      :func:`minibatch_cka_update`; :func:`minibatch_cka_result` reports them.
    """
    num_a, num_b = state.cross.shape
    if batches_b is None and num_a != num_b:
        raise ValueError(
            f"batches_b: missing, but the state compares {num_a} row layers with {num_b} "
            "column layers"
        )
    names, stacks_a = _stacks(batches_a, "batches_a", num_a)
    names_b, stacks_b = ([], None) if batches_b is None else _stacks(batches_b, "batches_b", num_b)
    k, m = stacks_a[0].shape[:2]
    for name, s in zip(names + names_b, stacks_a + (stacks_b or [])):
        if s.shape[:2] != (k, m):
            raise ValueError(
                f"{name}: {s.shape[0]} minibatches of {s.shape[1]} examples, but "
                f"{names[0]} has {k} of {m}"
            )
    if m < 4:
        raise ValueError(
            f"{names[0]}: minibatches of m={m} examples; need at least 4 examples per "
            "minibatch for the unbiased HSIC estimator"
        )
    return _minibatch_scan(state, stacks_a, stacks_b)


@jax.jit
def _minibatch_scan(
    state: MinibatchCKAState, stacks_a: list[Array], stacks_b: list[Array] | None
) -> MinibatchCKAState:
    TRACE_COUNT["minibatch_scan"] += 1

    def step(s, batch):
        a, b = batch
        return _minibatch_update(s, list(a), None if b is None else list(b), None), None

    xs = (tuple(stacks_a), None if stacks_b is None else tuple(stacks_b))
    return jax.lax.scan(step, state, xs)[0]


def minibatch_cka_result(
    state: MinibatchCKAState,
    *,
    rows: Sequence[str] | None = None,
    cols: Sequence[str] | None = None,
    labels: tuple[str, str] | None = None,
    check_finite: bool = True,
) -> Grid:
    r"""Minibatch CKA from a state:

    .. math:: \mathrm{CKA}_{mb}(a, b) = \frac{\frac1k \sum_i \mathrm{HSIC}_1(K_i, L_i)}
       {\sqrt{\frac1k \sum_i \mathrm{HSIC}_1(K_i, K_i)\,\frac1k \sum_i \mathrm{HSIC}_1(L_i, L_i)}}

    Args:
      state: the sums of the minibatches seen.
      rows: names of the row layers (default "0", "1", ...).
      cols: names of the column layers.
      labels: names of the two sides, for figures.
      check_finite: raise when a layer's sums are NaN or inf (a minibatch held NaN or
        inf, or, in float32, its HSIC overflowed), naming the layer; ``False`` gives NaN
        in its row or column instead.
    Returns:
      :class:`Grid` of shape ``(num_a, num_b)``.
    """
    num_a, num_b = state.cross.shape
    rows = tuple(rows) if rows is not None else tuple(str(i) for i in range(num_a))
    cols = tuple(cols) if cols is not None else tuple(str(i) for i in range(num_b))
    if not _v.is_tracer(state.count):
        _check_state(state, rows, cols, check_finite)
    values = _gram_route.normalize(state.cross, state.self_a, state.self_b)
    return Grid(
        values,
        rows,
        cols,
        "minibatch_cka",
        *_layers.side_labels(labels, False, ("batch_acts_a", "batch_acts_b")),
    )


def _check_state(
    state: MinibatchCKAState, rows: tuple[str, ...], cols: tuple[str, ...], check_finite: bool
) -> None:
    """Raises on a state with no minibatch, or (``check_finite``) with non-finite sums,
    naming the first such layer: one device-to-host copy for the whole stream."""
    count, self_a, self_b = jax.device_get((state.count, state.self_a, state.self_b))
    if float(count) == 0:
        raise ValueError(
            "state: no minibatch has been added yet (count is 0); call "
            "minibatch_cka_update(state, batch_acts_a, batch_acts_b) first"
        )
    if not check_finite:
        return
    for side, names, sums in (("row", rows, self_a), ("column", cols, self_b)):
        bad = np.flatnonzero(~np.isfinite(sums))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"state: the sums of {side} layer {i} ({names[i]!r}) are NaN or inf: a "
                "minibatch held NaN or inf in that layer (minibatch_cka_update(..., "
                "check_finite=True) finds which), or in float32 its HSIC overflowed "
                "(divide the layer by a constant); pass check_finite=False for NaN values"
            )
