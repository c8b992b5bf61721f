"""The split every measure follows: ``prepare`` once per layer, ``pair`` once per pair.

``similarity_grid`` and the streaming code only ever see :class:`Measure` records, so a
measure is written once and the grid is built from its pair function, never re-derived.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsim._linalg import HIGHEST, dot, inner  # noqa: F401  (re-exported for the measures)


class Measure(NamedTuple):
    """A similarity measure as two pure functions: the way to add a metric.

    ``prepare`` runs once per layer and ``pair`` once per pair of layers, so a grid of L
    layers costs L preparations and L^2 (cheap) pair steps. A ``Measure`` works wherever a
    metric name does: ``similarity_grid(acts, metric=measure)``, the statistics functions,
    under ``jax.jit``; pairs of layers with equal summary shapes are ``vmap``-ped together.

    Attributes:
      name: the measure's name (the grid's ``metric``).
      prepare: ``(n, d) array -> summary`` (a pytree), run once per layer.
      pair: ``(summary_a, summary_b) -> 0-d array``.
      symmetric: ``pair(a, b) == pair(b, a)``; self-grids then compute one triangle.
      blocks: for kernel measures (``pair(a, b) = <K~_a, K~_b> / (|K~_a| |K~_b|)`` with
        K~ a layer's centered Gram), a :class:`GramBlocks`: how to produce any square
        block of K~. Grids then accumulate all inner products block by block, one matrix
        product per block, using the Grams' symmetry, without storing n x n matrices.
      min_n: fewest examples the estimator accepts.
      widen: ``(summary, k) -> summary`` of width k, for measures whose summaries can be
        padded to a larger width without changing any pair's value (the width is a
        summary's last axis, see :func:`summary_width`): grids then pad layers of close
        widths to one shape and compile one pair step for them.

    Example: Yanai's R^2_CCA, the mean squared canonical correlation:

      >>> import jax, jax.numpy as jnp, jaxsim
      >>> def prepare(x):  # an orthonormal basis of the centered layer
      ...     return jnp.linalg.qr(x - x.mean(axis=0))[0]
      >>> def pair(qa, qb):
      ...     overlap = jnp.matmul(qa.T, qb, precision="highest")
      ...     return jnp.sum(overlap**2) / min(qa.shape[1], qb.shape[1])
      >>> r2_cca = jaxsim.Measure("r2_cca", prepare, pair)
      >>> keys = jax.random.split(jax.random.key(0), 2)
      >>> acts = [jax.random.normal(k, (100, 8)) for k in keys]
      >>> jaxsim.similarity_grid(acts, metric=r2_cca).values.shape
      (2, 2)
    """

    name: str
    prepare: Callable[[jax.Array], Any]
    pair: Callable[[Any, Any], jax.Array]
    symmetric: bool = True
    blocks: "GramBlocks | None" = None
    min_n: int = 2
    widen: "Callable[[Any, int], Any] | None" = None


def block_offsets(n: int, b: int, dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The b x b blocks ``(r, c)``, ``r <= c``, of the n x n index space (the last ones
    padded past n), row-major: their row and column offsets and weights (1 on the
    diagonal, 2 for a block standing for its mirror image too)."""
    nb = -(-n // b)
    pairs = [(r, c) for r in range(nb) for c in range(r, nb)]
    return (
        np.array([r * b for r, _ in pairs], np.int32),
        np.array([c * b for _, c in pairs], np.int32),
        np.array([1 if r == c else 2 for r, c in pairs], dtype),
    )


def summary_width(summary: Any) -> int:
    """The width that :attr:`Measure.widen` pads: the last axis of the summary's first
    leaf."""
    return jax.tree.leaves(summary)[0].shape[-1]


class GramBlocks(NamedTuple):
    """Blocks of a layer's centered Gram matrix, on demand.

    Attributes:
      source: ``(x, n_pad) -> src`` (a pytree), once per layer; rows past n are padding.
      block: ``(src, r0, c0, b) -> (b, b)`` block of the centered Gram starting at row
        ``r0``, column ``c0`` (traced offsets); zero in padded rows and columns.
    """

    source: Callable[[jax.Array, int], Any]
    block: Callable[[Any, jax.Array, jax.Array, int], jax.Array]


def poison(x: jax.Array) -> jax.Array:
    """0, or NaN when ``x`` holds a NaN or inf (``x * 0`` is 0 for every finite x), in x's
    dtype: added to a measure's value, whatever its steps did with the bad entry
    (maxima, masks and ranks can drop a NaN) the value is NaN, never a plausible number."""
    return jnp.sum(x * jnp.zeros((), x.dtype))


@functools.partial(jax.jit, static_argnames=("factory", "options"))
def _evaluate(
    factory: Callable[..., Measure], options: tuple, x: jax.Array, y: jax.Array
) -> jax.Array:
    m = factory(**dict(options))
    value = m.pair(m.prepare(x), m.prepare(y))
    return value + (poison(x) + poison(y)).astype(value.dtype)


def evaluate(
    factory: Callable[..., Measure], x: jax.Array, y: jax.Array, **options: Any
) -> jax.Array:
    """``pair(prepare(x), prepare(y))`` of the measure ``factory(**options)``: every public
    single-pair function is this. Called with arrays, each layer is prepared by a program
    compiled per its shape and the pair step by one per pair of (padded) summary shapes
    (:func:`jaxsim._pairwise.single_pair`): a loop over many layers' pairs compiles about
    as many programs as their grid does. Under a transformation (jit, vmap, grad) it is
    one traced program."""
    x, y = replicated(x), replicated(y)
    if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
        return _evaluate(factory, tuple(sorted(options.items())), x, y)
    from jaxsim._pairwise import single_pair

    return single_pair(factory(**options), x, y)


def spec_axes(spec: Any) -> list[str]:
    """The mesh axis names a ``PartitionSpec`` shards over, flattened."""
    return [n for p in spec if p is not None for n in (p if isinstance(p, tuple) else (p,))]


def replicated(x: Any) -> Any:
    """``x`` replicated over its mesh if it is sharded over an explicit mesh axis
    (``AxisType.Explicit``), else ``x`` itself. With explicit sharding JAX refuses a
    product that contracts a sharded axis without being told how to shard the result,
    and every measure contracts the examples: such layers are gathered first (the
    linear-CKA grid and minibatch CKA instead divide the work, see
    :func:`jaxsim.grid.ring_axis`)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return x
    types = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_types))
    names = spec_axes(sharding.spec)
    if not any(types.get(n) == jax.sharding.AxisType.Explicit for n in names):
        return x
    return jax.sharding.reshard(
        x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    )


# Incremented at trace time only: tests use it to prove that grids do not recompile.
TRACE_COUNT: collections.Counter = collections.Counter()


def on_mesh(
    local: Callable[..., Any], mesh: Any, in_specs: tuple, out_specs: Any
) -> Callable[..., Any]:
    """``shard_map(local)`` over ``mesh``, to be jitted. On explicit axes, where
    shard_map takes only arguments already sharded as ``in_specs`` says, they are
    resharded first, and the result is replicated."""
    program = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    if jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return program
    put = lambda tree, s: jax.tree.map(
        lambda leaf: jax.sharding.reshard(leaf, jax.sharding.NamedSharding(mesh, s)), tree
    )
    return lambda *args: put(
        program(*(put(a, s) for a, s in zip(args, in_specs))), jax.sharding.PartitionSpec()
    )


def safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 where ``den <= 0`` (a zero-variance layer); NaN stays NaN.

    The double ``where`` keeps gradients finite too (the optax ``safe_norm`` pattern).
    """
    empty = den <= 0
    return jnp.where(empty, jnp.zeros_like(num), num / jnp.where(empty, 1, den))


def bounded_ratio(
    num: jax.Array, den: jax.Array, lower: float = -1.0, upper: float = 1.0
) -> jax.Array:
    """:func:`safe_ratio` of a ratio whose exact value lies in ``[lower, upper]`` (a cosine,
    a correlation, a weighted mean of such values): rounding cannot carry it out of its
    range (identical layers would score above 1). NaN stays NaN."""
    return jnp.clip(safe_ratio(num, den), lower, upper)


ROUNDING = 64  # an unbiased HSIC within this many eps of its terms' magnitude is 0


def rounding_zero(self_term: jax.Array, magnitude: jax.Array, *, squared: bool) -> jax.Array:
    """A U-centered (unbiased) HSIC of a layer with itself, 0 where it is zero to its
    rounding error relative to the ``magnitude`` of the terms it was formed from. Such a
    layer's U-centered Gram is 0 in exact arithmetic (e.g. examples of orthogonal
    patterns), and its CKA with anything is 0/0: rounding noise over rounding noise unless
    recognized. ``squared``: the HSIC is a sum of
    squares of entries formed from terms of size ``magnitude`` (their errors are squared
    too); else a difference of terms summing to ``magnitude``."""
    eps = ROUNDING * jnp.finfo(self_term.dtype).eps
    floor = (eps * magnitude) ** 2 if squared else eps * magnitude
    return jnp.where(self_term <= floor, jnp.zeros_like(self_term), self_term)


def safe_sqrt(v: jax.Array) -> jax.Array:
    """``sqrt`` of a value that is >= 0 up to rounding: 0 at and below 0, with a finite
    derivative there (the double ``where`` again); NaN propagates."""
    live = v > 0
    return jnp.where(live, jnp.sqrt(jnp.where(live, v, 1)), jnp.where(jnp.isnan(v), v, 0))


def center_features(x: jax.Array, axis_name: Any = None) -> jax.Array:
    """Subtracts each feature's mean, in two passes: the second removes what rounding left
    of the first mean (in float32, a large common offset would otherwise leave a residual
    mean comparable to the spread). A feature whose centered values are within rounding of
    its magnitude (``max |x - mean| <= 16 eps max |x|``) is constant: exactly zero, so that a
    constant layer is recognized as one however the compiler orders the sums (a rounding
    residue would otherwise be scaled up to a spurious direction).

    ``axis_name``: inside ``shard_map``, x is this device's share of the examples, and the
    means and maxima are over all devices along that mesh axis."""
    if axis_name is None:
        mean = lambda a: jnp.mean(a, axis=0, keepdims=True)
        top = lambda a: jnp.max(a, axis=0, keepdims=True)
    else:
        n = x.shape[0] * jax.lax.psum(1, axis_name)
        mean = lambda a: jax.lax.psum(jnp.sum(a, axis=0, keepdims=True), axis_name) / n
        top = lambda a: jax.lax.pmax(jnp.max(a, axis=0, keepdims=True), axis_name)
    xc = x - mean(x)
    xc = xc - mean(xc)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return xc
    resolution = 16 * jnp.finfo(x.dtype).eps * top(jnp.abs(x))
    constant = top(jnp.abs(xc)) <= resolution
    # xc * 0, not 0: a maximum may skip a NaN, which must stay in the column
    return jnp.where(constant, xc * jnp.zeros((), xc.dtype), xc)


def max_scaled(x: jax.Array, axis_name: Any = None) -> tuple[jax.Array, jax.Array]:
    """``x`` divided by its largest absolute value, and that value (1 when x is all zero):
    for scale-free measures, so that no square of the raw values can overflow or
    underflow. ``axis_name``: the maximum over all devices along that mesh axis."""
    big = jnp.max(jnp.abs(x))
    if axis_name is not None:
        big = jax.lax.pmax(big, axis_name)
    big = jnp.where(big > 0, big, 1)
    return x / big, big


def unit_scaled(x: jax.Array, axis_name: Any = None) -> tuple[jax.Array, jax.Array]:
    """Centered features (:func:`center_features`) divided by their largest absolute value,
    and that value (see :func:`max_scaled`): Grams and covariances of the result cannot
    overflow (or underflow) whatever the input's scale, and every scale-invariant measure
    is unchanged. ``axis_name``: see :func:`center_features`."""
    return max_scaled(center_features(x, axis_name), axis_name)
