r"""Layer-by-layer similarity grids, and streaming minibatch CKA.

A grid prepares each layer once (its centered Gram, its whitened basis, ...) and then
evaluates every pair of layers in batched computations:

* kernel measures (linear and RBF CKA): the whole grid is one matrix product of the
  flattened centered Grams, ``(L_a, n^2) @ (n^2, L_b)``;
* linear CKA with more examples than features takes the feature-space route instead, when
  the cost model :func:`jaxsim.kernel.use_feature_space` says it is cheaper;
* everything else (the CCA family, user callables): ``vmap`` of the pair function over the
  list of pairs, layers grouped by the shape of their summaries, chunked with
  ``jax.lax.map(batch_size=...)`` so memory stays bounded.

Self-grids (``acts_b=None``) of symmetric measures compute one triangle.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import operator
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsim import _progress, canonical, conv, geometry, kernel
from jaxsim import _validation as _v
from jaxsim._measure import (
    HIGHEST,
    GramBlocks,
    Measure,
    block_offsets,
    bounded_ratio,
    center_features,
    dot,
    inner,
    poison,
    replicated,
    rounding_zero,
    safe_sqrt,
    spec_axes,
    summary_width,
    unit_scaled,
)

Array = jax.Array

# Incremented at trace time only: tests use it to prove that grids do not recompile.
TRACE_COUNT: collections.Counter = collections.Counter()


# ---------------------------------------------------------------------------- the Grid


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values"],
                   meta_fields=["rows", "cols", "metric", "row_label", "col_label", "notes",
                                "underdetermined"])
@dataclasses.dataclass(frozen=True)
class Grid:
    """Similarity of every row layer with every column layer (a pytree).

    Attributes:
      values: ``(len(rows), len(cols))`` array; ``values[i, j]`` compares row layer i (first
        argument of :func:`similarity_grid`) with column layer j.
      rows: names of the row layers.
      cols: names of the column layers.
      metric: the measure's name.
      row_label, col_label: what the row and column layers belong to (a model's name; by
        default the argument they came from), for titles and axis labels.
      notes: caveats about the values (e.g. CCA on too few examples per unit), shown by
        ``repr``.
      underdetermined: the positions of the row and of the column layers that CCA saw on
        fewer than 5 examples per unit (their cells' values are inflated); heatmaps mark
        them.
    """

    values: Array
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    metric: str = ""
    row_label: str = ""
    col_label: str = ""
    notes: tuple[str, ...] = ()
    underdetermined: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    def to_numpy(self) -> np.ndarray:
        return np.asarray(self.values)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.values, dtype=dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), len(self.cols))

    def __getitem__(self, key: tuple[str, str]) -> Array:
        """``grid["layer_a", "layer_b"]``: one value by layer names."""
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"Grid: index with two layer names, grid[row, col]; got {key!r}")
        return self.values[_position(self.rows, key[0], "row"),
                           _position(self.cols, key[1], "column")]

    def save(self, path: str) -> str:
        """Writes the grid (values, names, metric, labels) to an ``.npz`` file; returns the
        path written (numpy adds ``.npz`` when it is missing)."""
        path = str(path)
        path = path if path.endswith(".npz") else path + ".npz"
        np.savez(path, values=self.to_numpy(), rows=np.array(self.rows, dtype=str),
                 cols=np.array(self.cols, dtype=str), metric=np.array(self.metric),
                 labels=np.array([self.row_label, self.col_label], dtype=str),
                 notes=np.array(self.notes, dtype=str),
                 underdetermined_rows=np.array(self.underdetermined[0], dtype=np.int64),
                 underdetermined_cols=np.array(self.underdetermined[1], dtype=np.int64))
        return path

    @classmethod
    def load(cls, path: str) -> "Grid":
        with np.load(path) as f:
            labels = [str(v) for v in f["labels"]] if "labels" in f.files else ["", ""]
            notes = tuple(str(v) for v in f["notes"]) if "notes" in f.files else ()
            short = tuple(tuple(int(i) for i in f[k]) if k in f.files else ()
                          for k in ("underdetermined_rows", "underdetermined_cols"))
            return cls(jnp.asarray(f["values"]), tuple(str(r) for r in f["rows"]),
                       tuple(str(c) for c in f["cols"]), str(f["metric"]), labels[0],
                       labels[1], notes, (short[0], short[1]))

    def __repr__(self) -> str:
        values = self.to_numpy()
        head = f"Grid({self.metric or 'similarity'}, {values.shape[0]} x {values.shape[1]})"
        notes = "".join(f"\nnote: {n}" for n in self.notes)
        if values.size > 400:
            return head + notes
        width = max([6] + [len(c) for c in self.cols])
        label = max([0] + [len(r) for r in self.rows])
        lines = [head, " " * label + "".join(f" {c:>{width}}" for c in self.cols)]
        for name, row in zip(self.rows, values):
            lines.append(f"{name:>{label}}" + "".join(f" {v:>{width}.4f}" for v in row))
        return "\n".join(lines) + notes


def _position(names: tuple[str, ...], name: Any, side: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise KeyError(f"{name!r} is not a {side} layer of this grid; {side} layers: "
                       f"{', '.join(map(repr, names))}") from None


# ----------------------------------------------------------------------------- metrics


def _maker(factory: Callable[..., Measure], name: str, options: dict[str, Any]
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


def _measure_for(metric: Any, options: dict[str, Any], symmetric: bool | None = None
                 ) -> tuple[Callable[..., Measure], str]:
    """``(make, name)`` for a metric name or callable and its options; ``symmetric``: only
    for a callable (None: from ``options``, as the statistics functions pass it)."""
    if symmetric is None:
        symmetric = options.pop("symmetric", None) if callable(metric) else None
    if callable(metric):
        symmetric = bool(symmetric)
        _no_extra(getattr(metric, "__name__", "callable"), options)
        m = _callable_measure(metric, symmetric)
        return (lambda feature_space=False: m), getattr(metric, "__name__", "callable")
    if metric not in METRICS:
        raise ValueError(f"metric: unknown metric {metric!r}; valid names: "
                         f"{', '.join(sorted(METRICS))}, or a callable pair function")
    if symmetric:
        raise TypeError(f"symmetric: for a callable metric; {metric!r} knows whether it is "
                        "symmetric")
    return _maker(METRICS[metric], metric, options), metric


@functools.lru_cache(maxsize=64)
def _callable_measure(fn: Callable[[Array, Array], Array], symmetric: bool) -> Measure:
    return Measure(getattr(fn, "__name__", "callable"), lambda x: x, fn, symmetric=symmetric)


# ------------------------------------------------------------------------------ layers


def _named(acts: Any, arg: str) -> tuple[list[str], list[Any]]:
    if isinstance(acts, Mapping):
        names, arrays = [str(k) for k in acts.keys()], list(acts.values())
    elif isinstance(acts, (list, tuple)):
        names, arrays = [str(i) for i in range(len(acts))], list(acts)
    elif hasattr(acts, "shape"):
        raise TypeError(f"{arg}: expected a sequence or mapping of per-layer arrays, got one "
                        f"array of shape {tuple(acts.shape)}; wrap a single layer as [x]")
    else:
        raise TypeError(f"{arg}: expected a sequence or mapping of per-layer arrays, got "
                        f"{type(acts).__name__}")
    if not arrays:
        raise ValueError(f"{arg}: no layers given (an empty {type(acts).__name__})")
    return names, arrays


def _reduced_layers(acts_a: Any, acts_b: Any, reduce: dict[str, Any], check_finite: bool,
                    min_n: int = 2, why: str = ""
                    ) -> tuple[list[str], list[Array], list[str], list[Array]]:
    """Both sides' layers, conv-reduced together (so "resize" finds one common size), then
    validated (finite, a shared n >= min_n) and flattened to ``(n, features)``."""
    rows, raw_a = _named(acts_a, "acts_a")
    cols, raw_b = ([], []) if acts_b is None else _named(acts_b, "acts_b")
    keys = [f"acts_a[{k!r}]" for k in rows] + [f"acts_b[{k!r}]" for k in cols]
    raw = dict(zip(keys, raw_a + raw_b))
    union = {k: _v.as_float_array(a, k) for k, a in raw.items()}
    _v.finite(raw, check_finite)
    union = conv.reduce_layers(union, **reduce)
    flat = list(_v.layers(union, check_finite_values=False).values())
    _v.same_n(dict(zip(union, flat)), min_n=min_n, why=why)
    return rows, flat[:len(rows)], cols, flat[len(rows):]


def _common_dtype(layers: Iterable[Array]) -> Any:
    return functools.reduce(jnp.promote_types, (a.dtype for a in layers))


# --------------------------------------------------------------------------- computing


@functools.lru_cache(maxsize=256)
def _jit_prepare(prepare: Callable[[Array], Any]) -> Callable[[Array], Any]:
    def run(x):
        TRACE_COUNT["prepare"] += 1
        return prepare(x)
    return jax.jit(run)


def _prepare_all(measure: Measure, layers: Sequence[Array], tick: Callable[..., None]
                 ) -> list[Any]:
    prepare = _jit_prepare(measure.prepare)
    out = []
    for x in layers:
        out.append(prepare(x))
        tick(out[-1])
    return out


def _ticker(enabled: bool | None, total: int, desc: str, traced: bool
            ) -> tuple[Callable[..., None], Callable[[], None]]:
    """``(tick, close)`` for a progress bar over ``total`` steps of a grid:
    ``tick(value, steps=1)`` waits for ``value`` (so that the bar follows the work, not its
    dispatch) and advances.
    No bar, and no waiting, when ``enabled`` is False or the layers are traced."""
    if traced:
        enabled = False
    advance, close = _progress.steps(enabled, total, desc)
    if enabled is False:
        return (lambda value, steps=1: None), close

    def tick(value, steps=1):
        jax.block_until_ready(value)
        for _ in range(steps):
            advance()

    return tick, close


_SPLIT_MIN = 256  # diagonal blocks of at least this many rows are formed as halves

_SLAB_BUDGET = 2**32  # bytes of an accelerator's largest (b, b, L) float32 slab of blocks


def _block_size(n: int, layers: int = 1, target: int | None = None) -> int:
    """Rows per block of the n x n index space: one block up to ``2 * target``; beyond,
    the fewest blocks of at most ``target`` rows, evened out (a multiple of 8), so that
    padding wastes at most a few rows per block: n = 1025 runs as 3 blocks of 344
    (1032 rows), not 3 of 512 (1536).

    ``target`` defaults to 512 rows on a CPU (larger blocks gain nothing measurable there
    and fall out of cache); on an accelerator, where small products leave the device idle
    between them, to the largest power of two up to 2048 whose largest slab (``layers``
    blocks of ``2 * target`` rows, float32) fits ``_SLAB_BUDGET``. On an H100, 50 layers
    at n = 10000: 0.230 s with 504-row blocks, 0.158 s with 1000, 0.138 s with 2000,
    0.151 s with 3336 (``benchmarks/grids.py --block-rows``)."""
    if target is None:
        target = 512
        if jax.default_backend() != "cpu":
            while target < 2048 and 4 * layers * (4 * target) ** 2 <= _SLAB_BUDGET:
                target *= 2
    if n <= 2 * target:
        return n if n < _SPLIT_MIN else n + n % 2  # even: see _block_sum
    count = -(-n // target)
    rows = -(-n // count)
    return -(-rows // 8) * 8


def _block_count(n: int, b: int) -> int:
    """How many block pairs (r <= c) :func:`jaxsim._measure.block_offsets` lists."""
    nb = -(-n // b)
    return nb * (nb + 1) // 2


_CHUNK = 16  # block pairs per compiled call when a progress bar follows a Gram-route grid


def _chunks(n: int, b: int) -> list[tuple[int, int]]:
    """(first, count) of the compiled calls a followed Gram-route grid makes."""
    total = _block_count(n, b)
    return [(first, min(_CHUNK, total - first)) for first in range(0, total, _CHUNK)]


@functools.partial(jax.jit, static_argnames=("source", "n_pad"))
def _source(source: Callable[[Array, int], Any], x: Array, n_pad: int) -> Any:
    """One layer's block source, compiled on its own: whatever temporaries it needs exist
    for one layer at a time, not for all at once."""
    return source(x, n_pad)


def _block_offsets(n: int, b: int, dtype: Any, first: int = 0, count: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`jaxsim._measure.block_offsets` (row and column offsets of the block pairs,
    and their weights), pairs ``first .. first + count``."""
    end = None if count is None else first + count
    rows, cols, weights = block_offsets(n, b, dtype)
    return rows[first:end], cols[first:end], weights[first:end]


def _block_sum(blocks: GramBlocks, sources: list[Any], r0: Array, c0: Array,
               weight: Array, b: int, num_a: int | None = None,
               groups: tuple[tuple[int, ...], ...] | None = None) -> Array:
    """The sum over the block pairs at ``(r0[k], c0[k])`` (see :func:`_block_offsets`) of
    the weighted ``slab^T slab`` terms of :func:`_gram_inner_products` (not symmetrized;
    ``num_a``: see :func:`_slab_products`). The offsets are arguments: chunks of equal
    length share one compiled program. ``groups``: the sources are stacks, one per group
    of layers (see :func:`_source_groups`), and each block is one batched product per
    group (:func:`_grouped_products`)."""
    TRACE_COUNT["blocks"] += 1

    def products(r, c, size):
        if groups is None:
            return _slab_products([blocks.block(s, r, c, size) for s in sources], num_a)
        stacks = [jax.vmap(lambda s: blocks.block(s, r, c, size))(g) for g in sources]
        return _grouped_products(jnp.concatenate(stacks), groups, num_a)

    def term(r, c, w):
        if b < _SPLIT_MIN or b % 2:
            return w * products(r, c, b)
        # a block on the diagonal is symmetric: its upper three halves, the off-diagonal
        # one twice, are 3/4 of its products
        h = b // 2
        halves = lambda: products(r, c, h) + 2 * products(r, c + h, h) + products(r + h, c + h, h)
        return w * jax.lax.cond(r == c, halves, lambda: products(r, c, b))

    return _scan_sum(term, r0, c0, weight)


_gram_block_sum = jax.jit(_block_sum, static_argnames=("blocks", "b", "num_a", "groups"))


@functools.lru_cache(maxsize=32)
def _local_source(source: Callable[[Array, int], Any], n_pad: int, mesh: Any
                  ) -> Callable[[Array], Any]:
    """:func:`_source` of a layer on ``mesh``, gathered once and computed on every device
    without communication (``shard_map`` of replicated data). Left to XLA's partitioner, a
    sharded layer's source loops with collectives inside, which XLA's CPU runtime can
    order differently on different devices: a deadlock (an all-gather on one device, an
    all-reduce on the others)."""
    spec = jax.sharding.PartitionSpec
    return jax.jit(_on_mesh(lambda x: source(x, n_pad), mesh, (spec(),), spec()))


@functools.lru_cache(maxsize=32)
def _spread_block_sum(blocks: GramBlocks, b: int, mesh: Any, num_a: int | None = None,
                      groups: tuple[tuple[int, ...], ...] | None = None
                      ) -> Callable[..., Array]:
    """:func:`_gram_block_sum` with the block pairs divided among the devices of ``mesh``
    (all axes flattened; the offsets a multiple of ``mesh.size`` long, padded with weight
    0): ``(sources, r0, c0, weight) -> (L, L)``, the sources replicated, the partial sums
    all-reduced."""
    spec = jax.sharding.PartitionSpec
    axes = tuple(mesh.axis_names)
    local = lambda sources, r0, c0, w: jax.lax.psum(
        _block_sum(blocks, sources, r0, c0, w, b, num_a, groups), axes)
    return jax.jit(_on_mesh(local, mesh, (spec(), spec(axes), spec(axes), spec(axes)), spec()))


def _row_inner(left: Array, right: Array) -> Array:
    """``left right^T`` for (L, m) and (M, m): ``(L, M)``, one product. XLA's CPU dot
    accumulates such a product with a side of at most 3 in one long float32 sum (relative
    error 1e-5 to 1e-4 at m = 512^2, also as an einsum over the blocks' axes): a narrower
    side is padded with zero rows to 4 (error ~4e-7, as for wider sides)."""
    wide = lambda s: jnp.pad(s, [(0, max(0, 4 - s.shape[0])), (0, 0)])
    return dot(wide(left), wide(right).T)[:left.shape[0], :right.shape[0]]


def _with_cross(cross: Array, selves: Array, num_a: int) -> Array:
    """The ``(L, L)`` inner products of a cross-grid's layers from the row-column block
    ``cross`` and each layer's with itself (the rest 0)."""
    out = jnp.diag(selves)
    return out.at[:num_a, num_a:].set(cross).at[num_a:, :num_a].set(cross.T)


def _slab_products(grams: list[Array], num_a: int | None = None) -> Array:
    """``<G_l, G_m>`` for every pair of these (b, b) blocks, one per layer: ``(L, L)``, as
    the ``(b^2, L)^T (b^2, L)`` product of the blocks stacked along a last axis.

    ``num_a``: the blocks are the rows (the first ``num_a``) and columns of a cross-grid,
    and only the pairs of a row with a column and each block with itself are formed (the
    rest of the matrix is 0): for 24 x 36 layers, 24 * 36 + 60 products of the slab's
    3600, and ~10% of the time of each block pair on a CPU."""
    rows = lambda gs: jnp.stack(gs, axis=-1).reshape(-1, len(gs)).T  # (L, b^2), a view
    if num_a is None:
        return _row_inner(rows(grams), rows(grams))
    return _with_cross(_row_inner(rows(grams[:num_a]), rows(grams[num_a:])),
                       jnp.stack([inner(g, g) for g in grams]), num_a)


def _grouped_products(stack: Array, groups: tuple[tuple[int, ...], ...],
                      num_a: int | None = None) -> Array:
    """:func:`_slab_products` of the (L, b, b) blocks of the layers in the order of
    ``groups`` (a cross-grid's row groups first), as the (L, b^2) x (b^2, L) product of
    their flattened rows, put back in the layers' order."""
    rows = stack.reshape(stack.shape[0], -1)
    if num_a is None:
        out = _row_inner(rows, rows)
    else:
        out = _with_cross(_row_inner(rows[:num_a], rows[num_a:]),
                          jnp.einsum("lk,lk->l", rows, rows, precision=HIGHEST), num_a)
    back = np.argsort([i for group in groups for i in group])
    return out[back][:, back]


def _batched_blocks() -> bool:
    """Whether the Gram route forms each block of equal-shaped layers as one batched
    product (:func:`_source_groups`): on an accelerator, where one product per layer
    leaves it partly idle (on an H100, 50 layers of 3 widths, blocks of 2000 rows: 6.6 ms
    per block pair against 8.6 ms); not on a CPU, where it gains nothing measurable."""
    return jax.default_backend() != "cpu"


def _source_groups(sources: list[Any], num_a: int | None = None
                   ) -> tuple[tuple[int, ...], ...]:
    """:func:`_groups` of the layers' sources (equal shapes and dtypes), a cross-grid's rows
    (the first ``num_a``) and columns grouped apart, rows first."""
    if num_a is None:
        return tuple(map(tuple, _groups(sources)))
    return (tuple(map(tuple, _groups(sources[:num_a])))
            + tuple(tuple(num_a + i for i in g) for g in _groups(sources[num_a:])))


def _scan_sum(term: Callable[..., Array], *args: Array) -> Array:
    """``sum_k term(args[0][k], args[1][k], ...)``, as a scan. The first term starts the
    sum (not zeros), so the carry has the type of the terms, also inside shard_map where
    the terms vary across devices."""
    acc = term(*(a[0] for a in args))
    if args[0].shape[0] > 1:
        acc, _ = jax.lax.scan(lambda total, xs: (total + term(*xs), None), acc,
                              tuple(a[1:] for a in args))
    return acc


# ------------------------------------------------- linear CKA of example-sharded layers


def ring_axis(layers: Sequence[Any]) -> tuple[Any, str] | None:
    """``(mesh, axis)`` when every layer is a ``jax.Array`` sharded along its examples over
    the same single mesh axis (of size > 1, dividing n), features replicated; else None.

    Under ``jax.jit`` on auto mesh axes the layers' types name their mesh but not how
    they are sharded on it; there a mesh with a single axis of size > 1 (the layers', or
    else the one set with ``jax.set_mesh``) is taken as the data axis: the ring's
    ``shard_map`` takes each device's rows of the layers, without communication if they
    are already sharded so, by slicing if replicated."""
    if layers and all(isinstance(a, jax.core.Tracer)
                      and not spec_axes(getattr(jax.typeof(a).sharding, "spec", ()))
                      for a in layers):
        mesh = layer_mesh(layers)
        if mesh is None:
            return None
        data = [k for k, v in mesh.shape.items() if v > 1]
        if (len(data) == 1 and jax.sharding.AxisType.Explicit not in mesh.axis_types
                and layers[0].shape[0] % mesh.shape[data[0]] == 0):
            return mesh, data[0]
        return None
    found = None
    for a in layers:
        # a traced layer carries its sharding in its type only on explicit mesh axes
        sharding = jax.typeof(a).sharding if isinstance(a, jax.core.Tracer) else \
            getattr(a, "sharding", None)
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return None
        spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
        axis = spec[0][0] if isinstance(spec[0], tuple) and len(spec[0]) == 1 else spec[0]
        if not isinstance(axis, str) or any(p is not None for p in spec[1:]):
            return None
        if found is not None and found != (sharding.mesh, axis):
            return None
        found = (sharding.mesh, axis)
    size = None if found is None else found[0].shape[found[1]]
    if size is None or size < 2 or layers[0].shape[0] % size:
        return None
    return found


def _cross_products(rows: list[kernel.LinearSource], cols: list[kernel.LinearSource], b: int,
                    debiased: bool = False, same: bool = False, num_a: int | None = None
                    ) -> Array:
    """``<K_l, K_m>`` over one (m x m) block of every layer's centered Gram, rows ``rows``
    and columns ``cols`` (``same``: the very same examples, so the block holds the
    diagonal), for every pair of layers; formed b x b at a time (see
    :func:`jaxsim.kernel.linear_cross_block`; ``count`` and ``total``: over all devices;
    ``num_a``: see :func:`_slab_products`)."""
    m = rows[0].features.shape[0]
    tiles = -(-m // b)
    pad = lambda x: jnp.pad(x, [(0, tiles * b - m)] + [(0, 0)] * (x.ndim - 1))
    padded = lambda src: src._replace(features=pad(src.features), row_sq=pad(src.row_sq))
    rows, cols = [padded(r) for r in rows], [padded(c) for c in cols]
    starts = [(r * b, c * b) for r in range(tiles) for c in range(tiles)]

    def term(r0, c0):
        return _slab_products([kernel.linear_cross_block(r, c, r0, c0, b, debiased=debiased,
                                                         same=same, valid=m)
                               for r, c in zip(rows, cols)], num_a)

    return _scan_sum(term, jnp.array([r for r, _ in starts], jnp.int32),
                     jnp.array([c for _, c in starts], jnp.int32))


@functools.lru_cache(maxsize=32)
def _ring_program(mesh: Any, axis: str, debiased: bool = False, rescale: bool = True,
                  dtype: Any = None, num_a: int | None = None) -> Callable[[list[Array]], Array]:
    """The inner products of the centered (``debiased``: U-centered) linear Grams of layers
    sharded along examples over ``axis``, without gathering them: device p holds rows p
    of every layer and pairs them with rows p, p+1, ..., p + D/2 as they come round a ring
    (``ppermute``), each block pair once (the mirrored blocks by symmetry, weight 2), and
    the ``(L, L)`` sums are all-reduced. Per device ~``(D + 2) / (2 D)`` of one device's
    Gram products. ``rescale=False``: the activations' own units (minibatch CKA);
    ``dtype``: computed in it; ``num_a``: see :func:`_slab_products`."""
    size = mesh.shape[axis]
    shift = [(j, (j - 1) % size) for j in range(size)]  # device p receives from p + 1

    def local(layers):
        layers = [x if dtype is None else x.astype(dtype) for x in layers]
        feats = [unit_scaled(x, axis)[0] if rescale else center_features(x, axis)
                 for x in layers]
        m = feats[0].shape[0]
        count = jnp.asarray(m * size, feats[0].dtype)
        mine = []
        for f in feats:
            row_sq = jnp.sum(f * f, axis=1)
            mine.append(kernel.LinearSource(f, row_sq, jax.lax.psum(jnp.sum(row_sq), axis),
                                            count))
        b = _block_size(m, len(feats))
        acc, theirs = _cross_products(mine, mine, b, debiased, same=True, num_a=num_a), mine
        for step in range(1, size // 2 + 1):
            theirs = [t._replace(features=jax.lax.ppermute(t.features, axis, shift),
                                 row_sq=jax.lax.ppermute(t.row_sq, axis, shift))
                      for t in theirs]
            weight = 1.0 if 2 * step == size else 2.0
            acc = acc + weight * _cross_products(mine, theirs, b, debiased, num_a=num_a)
        return jax.lax.psum(acc, axis)

    P = jax.sharding.PartitionSpec
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(axis),), out_specs=P()))


def _gram_inner_products(blocks: GramBlocks, layers: list[Array], b: int,
                         tick: Callable[..., None] | None = None, mesh: Any = None,
                         num_a: int | None = None) -> Array:
    """``<K~_i, K~_j>`` for every pair of layers, ``(L, L)``, up to :func:`_symmetrize`
    (``num_a``: a cross-grid's first ``num_a`` layers against the rest, where only those
    pairs and each layer with itself are formed, see :func:`_slab_products`).

    The centered Grams are never stored: for each block (r, c) of the n x n index space
    with r <= c, every layer's block is produced and flattened into a column of an
    ``(b^2, L)`` slab, and ``slab^T slab`` is added with weight 1 (r == c) or 2 (r < c,
    standing for the mirrored block too, as the Grams are symmetric); a diagonal block
    (b >= 256) as its three upper halves, weights 1, 2, 1. The Gram work is thus the
    symmetric half of every Gram plus a quarter of each diagonal block (a single block:
    3/4 of the full Gram), and memory is ``L b^2``, not ``L n^2``.

    With ``tick`` (a progress bar, see :func:`_ticker`), the block pairs run as the
    calls of :func:`_chunks` (at most two compiled programs: full chunks and the last),
    so that the bar can follow them; otherwise as one call. With a ``mesh`` (layers that
    live on several devices), each device sums an equal share of the block pairs
    (:func:`_spread_block_sum`), one call. On accelerators, layers of equal shapes are
    stacked and each block formed by one batched product per group
    (:func:`_batched_blocks`).
    """
    n = layers[0].shape[0]
    n_pad = -(-n // b) * b
    spread = mesh is not None and n_pad > b  # one block: XLA partitions it
    if spread:
        sources = [_local_source(blocks.source, n_pad, mesh)(x) for x in layers]
    else:
        sources = [_source(blocks.source, x, n_pad) for x in layers]
    dtype = jax.tree.leaves(sources[0])[0].dtype
    groups = None
    if _batched_blocks():
        groups = _source_groups(sources, num_a)
        stacks = []
        for group in groups:  # each layer's source is freed once its group is stacked
            stacks.append(_stack([sources[i] for i in group]))
            for i in group:
                sources[i] = None
        sources = stacks
    chunks = _chunks(n, b)
    if spread:
        offsets = _block_offsets(n, b, dtype)
        total = -(-len(offsets[0]) // mesh.size) * mesh.size
        padded = [np.concatenate([a, np.zeros(total - len(a), a.dtype)]) for a in offsets]
        return _spread_block_sum(blocks, b, mesh, num_a, groups)(sources, *padded)
    if tick is None or len(chunks) == 1:
        acc = _gram_block_sum(blocks, sources, *_block_offsets(n, b, dtype), b, num_a, groups)
    else:
        acc = None
        for first, count in chunks:
            part = _gram_block_sum(blocks, sources, *_block_offsets(n, b, dtype, first, count),
                                   b, num_a, groups)
            tick(part)
            acc = part if acc is None else acc + part
    return acc


def _symmetrize(acc: Array) -> Array:
    """The inner products from :func:`_gram_inner_products`' weighted sums."""
    return (acc + acc.T) / 2


@functools.partial(jax.jit, static_argnames="lower")
def _normalize(cross: Array, self_a: Array, self_b: Array, lower: float = -1.0) -> Array:
    """``cross[i, j] / sqrt(self_a[i] self_b[j])`` in ``[lower, 1]`` (a cosine), 0 where a
    layer has no variance."""
    return bounded_ratio(cross, safe_sqrt(self_a)[:, None] * safe_sqrt(self_b)[None, :], lower)


@functools.partial(jax.jit, static_argnames=("num_a", "self_grid", "lower"))
def _gram_values(acc: Array, num_a: int, self_grid: bool, lower: float,
                 magnitudes: Array | None = None) -> Array:
    """The grid from :func:`_gram_inner_products`' sums, in one compiled program;
    ``magnitudes``: of unbiased HSICs, see :func:`_zero_to_rounding`."""
    return _normalize(*_split(_zero_to_rounding(_symmetrize(acc), magnitudes), num_a,
                              self_grid), lower)


def _zero_to_rounding(products: Array, magnitudes: Array | None) -> Array:
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
def _gram_traces(layers: list[Array], rbf: bool) -> Array:
    """Each layer's (uncentered) Gram trace in the units of its Gram route: the unit-scaled
    centered features' squared norm (linear), n (RBF: a unit diagonal)."""
    if rbf:
        return jnp.full(len(layers), layers[0].shape[0], layers[0].dtype)
    return jnp.stack([jnp.sum(unit_scaled(x)[0] ** 2) for x in layers])


def _split(products: Array, num_a: int, self_grid: bool) -> tuple[Array, Array, Array]:
    """Inner products of the row and column layers stacked together -> (cross block, row
    self terms, column self terms)."""
    norms = jnp.diagonal(products)
    if self_grid:
        return products, norms, norms
    return products[:num_a, num_a:], norms[:num_a], norms[num_a:]


def _stack(group: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *group)


def _pair_values(pair: Callable, group_a: tuple, group_b: tuple | None, ii: Array,
                 jj: Array, batch_size: int) -> Array:
    """``pair`` over the pairs ``(group_a[ii[k]], group_b[jj[k]])`` of two shape groups
    (``group_b`` None: the same group), stacked inside the compiled program."""
    TRACE_COUNT["pairs"] += 1
    stack_a = _stack(group_a)
    stack_b = stack_a if group_b is None else _stack(group_b)

    def one(ij):
        i, j = ij
        take = lambda t, k: jax.tree.map(lambda leaf: leaf[k], t)
        return pair(take(stack_a, i), take(stack_b, j))

    return jax.lax.map(one, (ii, jj), batch_size=batch_size)


_pairs = jax.jit(_pair_values, static_argnames=("pair", "batch_size"))


@functools.lru_cache(maxsize=64)
def _spread_pairs(pair: Callable, batch_size: int, mesh: Any, count: int | None = None
                  ) -> Callable[..., Array]:
    """:func:`_pairs` with the pairs divided among the devices of ``mesh`` (all its axes
    flattened): ``(group_a, group_b, ii, jj) -> values``, the summaries replicated and
    the pair indices (a multiple of ``mesh.size`` of them) split into equal shares; the
    first ``count`` values (default all), replicated."""
    spec = jax.sharding.PartitionSpec
    shares = spec(tuple(mesh.axis_names))
    local = lambda ga, gb, ii, jj: _pair_values(pair, ga, gb, ii, jj, batch_size)
    program = _on_mesh(local, mesh, (spec(), spec(), shares, shares), shares)
    return jax.jit(lambda *args: program(*args)[:count])


def _on_mesh(local: Callable[..., Any], mesh: Any, in_specs: tuple, out_specs: Any
             ) -> Callable[..., Any]:
    """``shard_map(local)`` over ``mesh``, to be jitted. On explicit axes, where
    shard_map takes only arguments already sharded as ``in_specs`` says, they are
    resharded first, and the result is replicated."""
    program = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    if jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return program
    put = lambda tree, s: jax.tree.map(
        lambda leaf: jax.sharding.reshard(leaf, jax.sharding.NamedSharding(mesh, s)), tree)
    return lambda *args: put(program(*(put(a, s) for a, s in zip(args, in_specs))),
                             jax.sharding.PartitionSpec())


def layer_mesh(layers: Sequence[Any]) -> Any | None:
    """The device mesh that every layer lives on, when it has more than one device: read
    from the layers' shardings (arrays placed with a ``NamedSharding``, replicated or
    sharded in any way; traced layers: the mesh in their types), or for traced layers
    whose types name none, the mesh set with ``jax.set_mesh``. None for host arrays,
    arrays on one device, and layers on different meshes."""
    found = None
    for a in layers:
        traced = isinstance(a, jax.core.Tracer)
        sharding = jax.typeof(a).sharding if traced else getattr(a, "sharding", None)
        mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
        if traced and (mesh is None or mesh.empty):
            mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty or (found is not None and mesh != found):
            return None
        found = mesh
    return found if found is not None and found.size > 1 else None


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "mirror"))
def _assemble(parts: tuple, rows: Array, cols: Array, shape: tuple[int, int], dtype: Any,
              mirror: bool) -> Array:
    """The grid from the values of its computed pairs (and their mirror images)."""
    out = jnp.concatenate([p.astype(dtype) for p in parts])
    if mirror:
        rows, cols, out = (jnp.concatenate([rows, cols]), jnp.concatenate([cols, rows]),
                           jnp.concatenate([out, out]))
    return jnp.zeros(shape, dtype).at[rows, cols].set(out)


def _shape_key(summary: Any) -> tuple:
    return tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(summary))


def _groups(summaries: Sequence[Any]) -> list[list[int]]:
    out: dict[tuple, list[int]] = {}
    for i, s in enumerate(summaries):
        out.setdefault(_shape_key(s), []).append(i)
    return list(out.values())


_WIDEN_SLACK = 1 / 8  # a widened summary costs at most this much more per dimension


def _buckets(widths: Iterable[int], slack: float | None = None) -> dict[int, int]:
    """Each width's bucket: going down from the widest, a width joins the current bucket
    when that is at most ``slack`` (default ``_WIDEN_SLACK``) above it (58, 60, 64 -> 64;
    40 -> 40)."""
    slack = _WIDEN_SLACK if slack is None else slack
    out: dict[int, int] = {}
    top = None
    for w in sorted(set(widths), reverse=True):
        if top is None or top > w * (1 + slack):
            top = w
        out[w] = top
    return out


def _widened(measure: Measure, sa: Sequence[Any], sb: Sequence[Any], self_grid: bool
             ) -> tuple[list[Any], list[Any]]:
    """Summaries padded to their width's bucket (both sides together), for measures that
    allow it: fewer shape groups, hence fewer compiled pair steps, the same values."""
    bucket = _buckets(summary_width(s) for s in [*sa, *([] if self_grid else sb)])

    def widen(ss):
        return [s if bucket[summary_width(s)] == summary_width(s)
                else measure.widen(s, bucket[summary_width(s)]) for s in ss]

    wa = widen(sa)
    return wa, (wa if self_grid else widen(sb))


def _generic_grid(measure: Measure, sa: Sequence[Any], sb: Sequence[Any], self_grid: bool,
                  batch_size: int, dtype: Any, tick: Callable[..., None],
                  mesh: Any = None) -> Array:
    """Every pair, one compiled ``lax.map`` per pair of shape groups (for a symmetric
    measure on a self-grid, per unordered pair of groups, mirrored), scattered into the
    grid on the device (jittable: no host round trip). With a ``mesh``, each device
    evaluates an equal share of the pairs (:func:`_spread_pairs`)."""
    mirror = self_grid and measure.symmetric
    if measure.widen is not None:
        sa, sb = _widened(measure, sa, sb, self_grid)
    groups_a = _groups(sa)
    groups_b = groups_a if self_grid else _groups(sb)
    rows, cols, parts = [], [], []
    for ga, idx_a in enumerate(groups_a):
        for gb, idx_b in enumerate(groups_b):
            if mirror and gb < ga:
                continue  # the mirror image of (gb, ga)
            same = self_grid and ga == gb
            pairs = [(p, q) for p in range(len(idx_a)) for q in range(len(idx_b))
                     if not (mirror and same and q < p)]
            group_a = tuple(sa[i] for i in idx_a)
            group_b = None if same else tuple(sb[j] for j in idx_b)
            ii = np.array([p for p, _ in pairs], np.int32)
            jj = np.array([q for _, q in pairs], np.int32)
            if mesh is None:
                out = _pairs(measure.pair, group_a, group_b, ii, jj, min(batch_size, len(pairs)))
            else:  # padded with repeats of the first pairs to equal shares
                share = -(-len(pairs) // mesh.size)
                spread = _spread_pairs(measure.pair, min(batch_size, share), mesh, len(pairs))
                out = spread(group_a, group_b, np.resize(ii, share * mesh.size),
                             np.resize(jj, share * mesh.size))
            tick(out, len(pairs))
            rows += [idx_a[p] for p, _ in pairs]
            cols += [idx_b[q] for _, q in pairs]
            parts.append(out)
    return _assemble(tuple(parts), np.array(rows, np.int32), np.array(cols, np.int32),
                     (len(sa), len(sb)), np.dtype(dtype), mirror)


_SUMMARY_BUDGET = 2**31  # bytes of prepared summaries a pairwise grid holds at once


def _summary_groups(measure: Measure, layers_a: list[Any], layers_b: list[Any],
                    self_grid: bool) -> tuple[list[list[int]], list[list[int]]]:
    """Consecutive layers grouped so that two groups' prepared summaries fit in
    ``_SUMMARY_BUDGET`` bytes (one group per side when all of them fit): Spearman and
    Kendall RSA keep n (n - 1) / 2 entries per layer."""
    def size(x):
        shapes = jax.eval_shape(_jit_prepare(measure.prepare), x)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))

    def grouped(layers):
        sizes = [size(x) for x in layers]
        out: list[list[int]] = []
        held = 0
        for i, s in enumerate(sizes):
            if not out or held + s > _SUMMARY_BUDGET // 2:
                out.append([])
                held = 0
            out[-1].append(i)
            held += s
        return out, sum(sizes)

    ga, total_a = grouped(layers_a)
    gb, total_b = (ga, 0) if self_grid else grouped(layers_b)
    if total_a + total_b <= _SUMMARY_BUDGET:
        return [list(range(len(layers_a)))], [list(range(len(layers_b)))]
    return ga, gb


def _group_blocks(groups_a: list[list[int]], groups_b: list[list[int]], self_grid: bool,
                  symmetric: bool) -> list[tuple[int, int]]:
    """The (row group, column group) blocks a grouped grid evaluates (a symmetric
    self-grid: the upper triangle)."""
    return [(ga, gb) for ga in range(len(groups_a)) for gb in range(len(groups_b))
            if not (self_grid and symmetric and gb < ga)]


def _preparations(groups_a: list[list[int]], groups_b: list[list[int]], self_grid: bool,
                  symmetric: bool) -> int:
    """How many layers :func:`_grouped_grid` prepares: every row once, and each column
    group once per block it is not the row group of."""
    return sum(map(len, groups_a)) + sum(
        len(groups_b[gb]) for ga, gb in _group_blocks(groups_a, groups_b, self_grid, symmetric)
        if not (self_grid and ga == gb))


def _grouped_grid(measure: Measure, run: Callable[..., Array], layers_a: list[Any],
                  layers_b: list[Any], groups_a: list[list[int]], groups_b: list[list[int]],
                  self_grid: bool, dtype: Any, tick: Callable[..., None]) -> Array:
    """A pairwise grid, its layers prepared group by group (one group per side when all
    summaries fit, see :func:`_summary_groups`): each row group is prepared once, and
    each column group again for every row group (a self-grid of a symmetric measure: for
    the row group and those after it, mirrored), so that at most two groups' summaries
    exist at a time; ``run(sa, sb, self_grid)`` evaluates one block."""
    if len(groups_a) == len(groups_b) == 1:
        sa = _prepare_all(measure, layers_a, tick)
        return run(sa, sa if self_grid else _prepare_all(measure, layers_b, tick), self_grid)
    values = jnp.zeros((len(layers_a), len(layers_b)), dtype)
    mirror = self_grid and measure.symmetric
    blocks = _group_blocks(groups_a, groups_b, self_grid, measure.symmetric)
    for ga, rows in enumerate(groups_a):
        sa = _prepare_all(measure, [layers_a[i] for i in rows], tick)
        for gb in [gb for g, gb in blocks if g == ga]:
            cols = groups_b[gb]
            same = self_grid and ga == gb
            sb = sa if same else _prepare_all(measure, [layers_b[j] for j in cols], tick)
            block = run(sa, sb, same)
            r, c = np.array(rows), np.array(cols)
            values = values.at[r[:, None], c[None, :]].set(block)
            if mirror and not same:
                values = values.at[c[:, None], r[None, :]].set(block.T)
            del sb  # freed before the next column group is prepared
    return values


def similarity_grid(acts_a: Any, acts_b: Any = None, *, metric: Any = "linear_cka",
                    method: str = "auto", reduce: str | None = None,
                    size: Sequence[int] | None = None, subsample: float | None = None,
                    key: Array | None = None, symmetric: bool = False, batch_size: int = 8,
                    progress: bool | None = None, warn: bool = True, check_finite: bool = True,
                    labels: tuple[str, str] | None = None, **metric_options: Any) -> Grid:
    r"""Similarity of every layer of ``acts_a`` with every layer of ``acts_b``.

    Args:
      acts_a: the row layers, a sequence or mapping of arrays of shape ``(n, ...)``
        (widths and feature shapes may differ; n must be shared).
      acts_b: the column layers, likewise; ``None`` compares ``acts_a`` with itself (a
        self-grid: symmetric measures compute each pair once; pwcca computes both orders).
      metric: ``"linear_cka"`` (alias ``"cka"``), ``"rbf_cka"``, ``"mean_cca"``,
        ``"svcca"``, ``"pwcca"``, ``"procrustes"``, ``"rsa"``, ``"mutual_knn"``,
        ``"linear_predictivity"`` (rows predict columns), or a callable
        ``f(x, y) -> scalar`` on two ``(n, d)``
        arrays (vmapped over pairs of equal shapes; pass ``symmetric=True`` to compute one
        triangle of a self-grid).
      method: linear CKA's route: ``"auto"`` (the cheaper of the Gram and feature routes
        for the whole grid, see :func:`jaxsim.kernel.use_feature_space`), ``"gram"`` or
        ``"features"``.
      reduce: for conv layers (see :func:`jaxsim.conv.reduce_layers`): ``None`` (default:
        each example's ``h*w*c`` values are its features), ``"flatten"`` (positions become
        examples; layers must share their spatial size), ``"average"`` (pool over
        positions) or ``"resize"`` (to ``size``, default the smallest, then flatten).
      size, subsample, key: for ``reduce``: the ``(h, w)`` of "resize"; a fraction of the
        positions kept by "flatten"/"resize", drawn with ``key``.
      symmetric: a callable ``metric`` is symmetric: compute one triangle of a self-grid.
      batch_size: pairs evaluated together by measures without a single-product grid
        (``jax.lax.map`` chunking); lower it if memory is short.
      progress: a progress bar for measures computed pair by pair (the CCA family,
        Procrustes, RSA, ...): ``True``, ``False``, or ``None`` (default: tqdm, shown only
        once the grid has run for a few seconds).
      warn: for the CCA family, warn when n is below 5 examples per unit (see
        :mod:`jaxsim.canonical`); the grid's ``notes`` say so either way.
      check_finite: raise on NaN/inf in any layer.
      labels: names of the two sides (e.g. ``("seed 0", "seed 1")``) for figures; default
        ``("acts_a", "acts_b")``.
      **metric_options: the metric's own keyword options (``debiased``, ``threshold``,
        ``epsilon``, ``keep_dims``, ``keep_variance``, ``cap_keep_dims``, ...); an unknown
        one is a ``TypeError`` naming it.
    Returns:
      :class:`Grid` with ``values`` of shape ``(len(acts_a), len(acts_b))``.

    Layers sharded along their examples over one axis of a device mesh: linear CKA divides
    the work among the devices without gathering the activations (the Gram route as a ring
    of ``ppermute``-ed rows, see :func:`ring_axis`, also under jit on explicit axes or on
    a one-axis auto mesh; the feature route as all-reduced
    ``d x d`` products); layers on explicit mesh axes are gathered first for the other
    measures. Measures evaluated pair by pair (CCA family, Procrustes, RSA, ...) on layers
    that live on a mesh (any ``NamedSharding``; under jit, the mesh in the layers' types
    or set by ``jax.set_mesh``) divide the pairs among its devices, each summary
    replicated once.
    Memory: linear and RBF CKA accumulate ``b x b`` blocks (RBF finds each layer's
    bandwidth block by block too); mutual kNN keeps ``n x k``
    neighbour indices per layer; Pearson RSA accumulates blocks of centered RDMs; Spearman
    and Kendall RSA prepare each layer's ``n (n - 1) / 2`` RDM entries (they rank them
    all). Pairwise grids whose summaries exceed 2 GiB prepare layers in groups, two at a
    time (each column group again for every row group).
    Compiles: one pair step per pair of layer shapes; mean CCA and SVCCA pad layers whose
    widths lie within 1/8 of each other to the widest (same values), so that close widths
    share one.

    Example:
      >>> import jax, jaxsim
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> acts = {f"layer{i}": jax.random.normal(k, (64, 8 * (i + 1))) for i, k in enumerate(keys)}
      >>> jaxsim.similarity_grid(acts).values.shape
      (3, 3)
    """
    method = _v.choice(method, "method", ("auto", "gram", "features"))
    options = metric_options
    reductions = {"reduce": reduce, **{k: v for k, v in (("size", size), (
        "subsample", subsample), ("key", key)) if v is not None}}
    make, name = _measure_for(metric, dict(options), bool(symmetric))
    measure = make()
    self_grid = acts_b is None
    rows, layers_a, cols, layers_b = _reduced_layers(
        acts_a, acts_b, reductions, check_finite, measure.min_n,
        " for the unbiased HSIC estimator" if measure.min_n >= 4 else "")
    if self_grid:
        cols, layers_b = rows, layers_a
    dtype = _common_dtype(layers_a + ([] if self_grid else layers_b))
    layers_a = [a.astype(dtype) for a in layers_a]
    layers_b = layers_a if self_grid else [b.astype(dtype) for b in layers_b]
    named = {**{f"acts_a[{k!r}]": a for k, a in zip(rows, layers_a)},
             **({} if self_grid else {f"acts_b[{k!r}]": b for k, b in zip(cols, layers_b)})}
    if name == "svcca":
        canonical.check_keep_dims(options.get("keep_dims"), named,
                                  bool(options.get("cap_keep_dims", False)))
    notes: tuple[str, ...] = ()
    short: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    if name in ("mean_cca", "svcca", "pwcca"):
        keep = options.get("keep_dims") if name == "svcca" else None
        units = lambda a: a.shape[1] if keep is None else min(keep, a.shape[1])
        n = layers_a[0].shape[0]
        note = canonical.warn_examples(n, {k: units(a) for k, a in named.items()}, warn)
        notes = (note,) if note else ()
        few = lambda layers: tuple(i for i, a in enumerate(layers)
                                   if n < canonical.EXAMPLES_PER_UNIT * units(a))
        short = (few(layers_a), few(layers_b))
    traced = any(isinstance(a, jax.core.Tracer) for a in named.values())
    debiased = bool(options.get("debiased", False))
    union = layers_a if self_grid else layers_a + layers_b
    # sharded along examples: the linear-CKA Gram route divides the work as a ring of
    # rows (the feature route's d x d products are all-reduced by XLA); everything else
    # gathers layers on explicit mesh axes first
    ring = ring_axis(union) if measure.name == "linear_cka" else None
    if measure.name == "linear_cka":
        measure = make(feature_space=kernel.feature_route(
            method, layers_a[0].shape[0], [a.shape[1] for a in layers_a],
            None if self_grid else [b.shape[1] for b in layers_b],
            shards=ring[0].shape[ring[1]] if ring else kernel.example_shards(union),
            ring=ring is not None))
    # layers on a mesh (not going round the ring): block pairs or pairs of layers are
    # divided among its devices, what they are made from replicated first; not linear
    # CKA's feature route, whose d x d products XLA already divides along the examples
    mesh = layer_mesh(union)
    if measure.blocks is None or ring is None:
        ring = None
        layers_a = [replicated(x) for x in layers_a]
        layers_b = layers_a if self_grid else [replicated(x) for x in layers_b]
        union = layers_a if self_grid else layers_a + layers_b

    if measure.blocks is not None:
        num_a = None if self_grid else len(layers_a)  # a cross-grid forms only its pairs
        if ring is not None:
            sums = _ring_program(*ring, debiased, num_a=num_a)(union)
        else:
            b = _block_size(union[0].shape[0], len(union))
            calls = len(_chunks(union[0].shape[0], b))
            follow = calls > 1 and progress is not False and not traced and mesh is None
            tick, close = _ticker(progress if follow else False, calls, f"{name} grid",
                                  traced)
            try:
                sums = _gram_inner_products(measure.blocks, union, b,
                                            tick if follow else None, mesh, num_a)
            finally:
                close()
        # biased CKA's centered Grams are positive semi-definite: their cosines are >= 0
        biased_cka = measure.name in ("linear_cka", "rbf_cka") and not debiased
        magnitudes = None
        if debiased and measure.name in ("linear_cka", "rbf_cka"):
            magnitudes = _gram_traces(union, measure.name == "rbf_cka")
        values = _gram_values(sums, len(layers_a), self_grid, 0.0 if biased_cka else -1.0,
                              magnitudes)
    else:
        num_a, num_b = len(layers_a), len(layers_b)
        pairs = (num_a * (num_a + 1) // 2 if self_grid and measure.symmetric
                 else num_a * num_b)
        groups_a, groups_b = _summary_groups(measure, layers_a, layers_b, self_grid)
        total = _preparations(groups_a, groups_b, self_grid, measure.symmetric) + pairs
        tick, close = _ticker(progress, total, f"{name} grid", traced)
        run = functools.partial(_generic_grid, measure, batch_size=batch_size, dtype=dtype,
                                tick=tick, mesh=None if measure.name == "linear_cka" else mesh)
        try:
            values = _grouped_grid(measure, run, layers_a, layers_b, groups_a, groups_b,
                                   self_grid, dtype, tick)
        finally:
            close()
    values = _poisoned(values, layers_a, None if self_grid else layers_b)
    row_label, col_label = _labels(labels, self_grid, ("acts_a", "acts_b"))
    return Grid(values, tuple(rows), tuple(cols), name, row_label, col_label, notes, short)


@jax.jit
def _own_traces(layers: list[Array]) -> Array:
    """Each layer's centered linear Gram trace at the activations' own scale (minibatch
    CKA's units)."""
    return jnp.stack([jnp.sum(center_features(x) ** 2) for x in layers])


@jax.jit
def _layer_poison(layers: list[Array]) -> Array:
    return jnp.stack([poison(x) for x in layers])


@jax.jit
def _poisoned(values: Array, layers_a: list[Array], layers_b: list[Array] | None) -> Array:
    """``values`` NaN in the rows and columns of layers that hold a NaN or inf (see
    :func:`jaxsim._measure.poison`)."""
    rows = _layer_poison(layers_a).astype(values.dtype)
    cols = rows if layers_b is None else _layer_poison(layers_b).astype(values.dtype)
    return values + rows[:, None] + cols[None, :]


def _labels(labels: Any, self_grid: bool, default: tuple[str, str]) -> tuple[str, str]:
    if labels is None:
        return (default[0], default[0]) if self_grid else default
    if isinstance(labels, str) or len(labels) != 2:
        raise TypeError(f"labels: expected two names (rows, columns), got {labels!r}")
    return str(labels[0]), str(labels[1])


# ------------------------------------------------------------------ minibatch CKA


class MinibatchCKAState(NamedTuple):
    """Running sums of minibatch CKA (a pytree of arrays that add).

    ``jax.tree.map(operator.add, s1, s2)`` is the state of both streams together.
    """

    cross: Array  # (L_a, L_b) sum over batches of HSIC_1(K_i, L_i)
    self_a: Array  # (L_a,) sum of HSIC_1(K_i, K_i)
    self_b: Array  # (L_b,) sum of HSIC_1(L_i, L_i)
    count: Array  # type: ignore[assignment]  # a field, shadowing tuple.count; minibatches


def minibatch_cka_init(num_a: int, num_b: int | None = None, *, dtype: Any = None
                       ) -> MinibatchCKAState:
    """An empty minibatch CKA state for ``num_a`` row layers and ``num_b`` column layers
    (``num_b=None``: a self-grid of ``num_a`` layers)."""
    num_b = num_a if num_b is None else num_b
    for name, v in (("num_a", num_a), ("num_b", num_b)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected a positive number of layers, got {v!r}")
    dtype = dtype or jnp.result_type(float)
    return MinibatchCKAState(jnp.zeros((num_a, num_b), dtype), jnp.zeros(num_a, dtype),
                             jnp.zeros(num_b, dtype), jnp.zeros((), dtype))


def _batch_layers(batch: Any, arg: str, expected: int) -> tuple[dict[str, Any],
                                                                 dict[str, Array]]:
    """A batch's layers as given and flattened (finiteness is checked by the caller, for
    both sides in one fused reduction)."""
    names, arrays = _named(batch, arg)
    if len(arrays) != expected:
        raise ValueError(f"{arg}: the state has {expected} layer(s) on this side but the batch "
                         f"has {len(arrays)}")
    raw = {f"{arg}[{k!r}]": a for k, a in zip(names, arrays)}
    return raw, _v.layers(raw, check_finite_values=False)


@functools.partial(jax.jit, static_argnames=("axis_name",))
def _minibatch_update(state: MinibatchCKAState, layers_a: list[Array],
                      layers_b: list[Array] | None, axis_name: Any) -> MinibatchCKAState:
    TRACE_COUNT["minibatch"] += 1
    dtype = state.cross.dtype
    union = [x.astype(dtype) for x in layers_a + (layers_b or [])]
    m = union[0].shape[0]
    sums = _gram_inner_products(kernel.minibatch_blocks(), union, _block_size(m, len(union)),
                                num_a=None if layers_b is None else len(layers_a))
    return _minibatch_add(state, sums, len(layers_a), layers_b is None, m, axis_name,
                          _layer_poison(union).astype(dtype), _own_traces(union))


def _minibatch_add(state: MinibatchCKAState, sums: Array, num_a: int, self_grid: bool,
                   m: int, axis_name: Any = None, bad: Array | None = None,
                   traces: Array | None = None) -> MinibatchCKAState:
    """The state plus one batch of m examples, from its U-centered Grams' inner products
    (``sums``, up to :func:`_symmetrize`); ``bad``: the union's layers' poison;
    ``traces``: their Grams' traces (see :func:`_zero_to_rounding`)."""
    products = _zero_to_rounding(_symmetrize(sums), traces) / (m * (m - 3))
    cross, self_a, self_b = _split(products, num_a, self_grid)
    if bad is not None:  # a layer with a NaN or inf makes its sums NaN (see poison)
        bad_a, bad_b = bad[:num_a], (bad[:num_a] if self_grid else bad[num_a:])
        cross = cross + bad_a[:, None] + bad_b[None, :]
        self_a, self_b = self_a + bad_a, self_b + bad_b
    step = MinibatchCKAState(cross, self_a, self_b, jnp.ones((), state.cross.dtype))
    if axis_name is not None:
        step = jax.lax.psum(step, axis_name)
    return jax.tree.map(operator.add, state, step)


_minibatch_add_jit = jax.jit(_minibatch_add, static_argnames=("num_a", "self_grid", "m"))


def minibatch_cka_update(state: MinibatchCKAState, batch_acts_a: Any, batch_acts_b: Any = None,
                         *, axis_name: Any = None, check_finite: bool = True
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
      check_finite: raise on NaN/inf (skipped automatically when traced).
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
        raise ValueError(f"batch_acts_b: missing, but the state compares {num_a} row layers "
                         f"with {num_b} column layers")
    _v.finite(raw, check_finite)  # every layer of both sides: one sync
    _v.same_n({**named, **(named_b if batch_acts_b is not None else {})}, min_n=4,
              why=" per minibatch for the unbiased HSIC estimator")
    layers_a = list(named.values())
    layers_b = None if batch_acts_b is None else list(named_b.values())
    union = layers_a + (layers_b or [])
    ring = ring_axis(union) if axis_name is None else None
    if ring is not None:  # sharded along examples: each device its share of the blocks
        sums = _ring_program(*ring, debiased=True, rescale=False,
                             dtype=np.dtype(state.cross.dtype),
                             num_a=None if layers_b is None else len(layers_a))(union)
        dtype = state.cross.dtype
        return _minibatch_add_jit(state, sums, len(layers_a), layers_b is None,
                                  union[0].shape[0], bad=_layer_poison(union).astype(dtype),
                                  traces=_own_traces([x.astype(dtype) for x in union]))
    return _minibatch_update(state, [replicated(x) for x in layers_a],
                             None if layers_b is None else [replicated(x) for x in layers_b],
                             axis_name)


def minibatch_cka_result(state: MinibatchCKAState, *, rows: Sequence[str] | None = None,
                         cols: Sequence[str] | None = None,
                         labels: tuple[str, str] | None = None) -> Grid:
    r"""Minibatch CKA from a state:

    .. math:: \mathrm{CKA}_{mb}(a, b) = \frac{\frac1k \sum_i \mathrm{HSIC}_1(K_i, L_i)}
       {\sqrt{\frac1k \sum_i \mathrm{HSIC}_1(K_i, K_i)\,\frac1k \sum_i \mathrm{HSIC}_1(L_i, L_i)}}

    Returns:
      :class:`Grid` of shape ``(num_a, num_b)`` (names default to "0", "1", ...).
    """
    num_a, num_b = state.cross.shape
    if not _v._is_tracer(state.count) and float(state.count) == 0:
        raise ValueError("state: no minibatch has been added yet (count is 0); call "
                         "minibatch_cka_update(state, batch_acts_a, batch_acts_b) first")
    values = _normalize(state.cross, state.self_a, state.self_b)
    rows = tuple(rows) if rows is not None else tuple(str(i) for i in range(num_a))
    cols = tuple(cols) if cols is not None else tuple(str(i) for i in range(num_b))
    return Grid(values, rows, cols, "minibatch_cka",
                *_labels(labels, False, ("batch_acts_a", "batch_acts_b")))
