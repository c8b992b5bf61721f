r"""Layer-by-layer similarity grids: :func:`similarity_grid`.

Each layer is prepared once; then every pair of layers is evaluated in batched
computations: the kernel measures as sums of block products of all layers' centered Grams
(:mod:`jaxsim._gram_route`), linear CKA in feature space where that is cheaper, everything
else as a ``vmap`` of the measure's pair step over pairs of equal shapes
(:mod:`jaxsim._pairwise`). See ``docs/design.md``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence

import jax
from jax import Array

from jaxsim import (
    _cca_checks,
    _feature_route,
    _gram_route,
    _layers,
    _pairwise,
    _programs,
    _progress,
)
from jaxsim import _validation as _v
from jaxsim._measure import Measure, replicated
from jaxsim._registry import METRICS, measure_for
from jaxsim._result import Grid, SweepGrid
from jaxsim._sharding import layer_mesh, ring_axis, ring_program

__all__ = ["METRICS", "Grid", "SweepGrid", "similarity_grid"]


def similarity_grid(
    acts_a: Any,
    acts_b: Any = None,
    *,
    metric: Any = "linear_cka",
    method: str = "auto",
    reduce: str | None = None,
    size: Sequence[int] | None = None,
    subsample: float | None = None,
    key: Array | None = None,
    symmetric: bool = False,
    batch_size: int = 8,
    progress: bool | None = None,
    warn: bool = True,
    check_finite: bool = True,
    labels: tuple[str, str] | None = None,
    model_axis: int | None = None,
    models: Sequence[Any] | None = None,
    **metric_options: Any,
) -> Any:
    r"""Similarity of every layer of ``acts_a`` with every layer of ``acts_b``.

    Args:
      acts_a: the row layers, a sequence or mapping of arrays of shape ``(n, ...)``
        (widths and feature shapes may differ; n must be shared).
      acts_b: the column layers, likewise; ``None`` compares ``acts_a`` with itself (a
        self-grid: symmetric measures compute each pair once; pwcca computes both orders).
      metric: ``"linear_cka"`` (``"cka"`` is the same: linear CKA of the activations),
        ``"rbf_cka"``, ``"mean_cca"``, ``"svcca"``, ``"pwcca"``, ``"procrustes"``,
        ``"rsa"``, ``"mutual_knn"``, ``"linear_predictivity"`` (rows predict columns); a
        :class:`~jaxsim.Measure`; or a callable ``f(x, y) -> scalar`` on two ``(n, d)``
        arrays (vmapped over pairs of equal shapes; pass ``symmetric=True`` to compute one
        triangle of a self-grid).
      method: linear CKA's route: ``"auto"`` (the cheaper of the Gram and feature routes
        for the whole grid by a cost model of their multiply-adds, see
        ``docs/design.md``), ``"gram"`` or ``"features"``.
      reduce: for conv layers (see :func:`jaxsim.conv.reduce_layers`): ``None`` (default:
        each example's ``h*w*c`` values are its features), ``"flatten"`` (positions become
        examples; layers must share their spatial size), ``"average"`` (pool over
        positions) or ``"resize"`` (to ``size``, default the smallest, then flatten).
      size: the ``(h, w)`` of ``reduce="resize"``.
      subsample: a fraction of the positions kept by "flatten"/"resize".
      key: the ``jax.random`` key that draws them.
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
      model_axis: the axis of every layer's array that stacks models (an ensemble's, a
        sweep's or a training run's checkpoints, e.g. ``(M, n, ...)`` with
        ``model_axis=0``): every layer of every model is compared with every layer of
        every model (of ``acts_b``'s sweep, or of the same sweep), each prepared once, and
        the result is a :class:`SweepGrid` of values ``(M_a, M_b, L_a, L_b)``. Without it,
        layers whose first axis is small and shared, as a stacked model axis would be,
        draw a warning (pass ``warn=False`` once you mean examples).
      models: names of the models along ``model_axis`` (default ``"0"``, ``"1"``, ...):
        one sequence, or a pair of them for two sweeps.
      **metric_options: the metric's own keyword options (``debiased``, ``threshold``,
        ``epsilon``, ``keep_dims``, ``keep_variance``, ``cap_keep_dims``, ...); an unknown
        one is a ``TypeError`` naming it.
    Returns:
      :class:`Grid` with ``values`` of shape ``(len(acts_a), len(acts_b))``; with
      ``model_axis``, a :class:`SweepGrid`.

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
    if model_axis is not None:
        run = functools.partial(
            similarity_grid,
            metric=metric, method=method, reduce=reduce, size=size, subsample=subsample,
            key=key, symmetric=symmetric, batch_size=batch_size, progress=progress, warn=warn,
            check_finite=check_finite, labels=("", "") if labels is None else labels,
            **metric_options,
        )  # fmt: skip
        return _sweep(run, acts_a, acts_b, model_axis, models)
    if warn:
        _warn_stacked(acts_a, acts_b)
    method = _v.choice(method, "method", ("auto", "gram", "features"))
    options = {"size": size, "subsample": subsample, "key": key}
    reductions = {"reduce": reduce, **{k: v for k, v in options.items() if v is not None}}
    compiled = _programs.traces()
    make, name = measure_for(metric, dict(metric_options), bool(symmetric))
    measure = make()
    self_grid = acts_b is None
    rows, cols, layers_a, layers_b, dtype = _read_layers(
        acts_a, acts_b, reductions, check_finite, measure.min_n
    )
    named = {
        **{f"acts_a[{k!r}]": a for k, a in zip(rows, layers_a)},
        **({} if self_grid else {f"acts_b[{k!r}]": b for k, b in zip(cols, layers_b)}),
    }
    notes, short = _cca_checks.grid_caveats(name, metric_options, named, layers_a, layers_b, warn)
    traced = any(isinstance(a, jax.core.Tracer) for a in named.values())
    union = layers_a if self_grid else layers_a + layers_b
    # sharded along examples: the linear-CKA Gram route divides the work as a ring of rows
    ring = ring_axis(union) if measure.name == "linear_cka" else None
    if measure.name == "linear_cka":
        measure = make(feature_space=_feature_space(method, layers_a, layers_b, self_grid, ring))
    # layers on a mesh (not going round the ring): block pairs or pairs of layers are
    # divided among its devices, what they are made from replicated first; not linear
    # CKA's feature route, whose d x d products XLA already divides along the examples
    mesh = layer_mesh(union)
    if measure.blocks is None or ring is None:
        ring = None
        layers_a = [replicated(x) for x in layers_a]
        layers_b = layers_a if self_grid else [replicated(x) for x in layers_b]
    if measure.blocks is not None:
        debiased = bool(metric_options.get("debiased", False))
        values = _gram_grid(
            measure, layers_a, None if self_grid else layers_b, ring, mesh, debiased,
            progress, traced,
        )  # fmt: skip
    else:
        mesh = None if measure.name == "linear_cka" else mesh
        values = _pairwise_grid(
            measure, layers_a, layers_b, self_grid, dtype, batch_size, mesh, progress, traced
        )
    values = _layers.poisoned(values, layers_a, None if self_grid else layers_b)
    row_label, col_label = _layers.side_labels(labels, self_grid, ("acts_a", "acts_b"))
    if not traced:
        _programs.relieve(compiled)
    return Grid(values, tuple(rows), tuple(cols), name, row_label, col_label, notes, short)


def _split_models(acts: Any, axis: Any, arg: str) -> tuple[int, dict[str, Array]]:
    """``(M, {layer: array with the model axis first})`` of one sweep, validated."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"model_axis: expected an int, got {axis!r}")
    names, arrays = _layers.named(acts, arg)
    arrays = [_v.as_float_array(a, f"{arg}[{k!r}]") for k, a in zip(names, arrays)]
    counts = {}
    for k, a in zip(names, arrays):
        if a.ndim < 3 or not -a.ndim <= axis < a.ndim:
            raise ValueError(
                f"{arg}[{k!r}]: model_axis={axis} needs a layer of shape (models, n, "
                f"features...) (model axis first) or with the model axis at {axis}; got "
                f"shape {tuple(a.shape)}"
            )
        counts[k] = a.shape[axis]
    if len(set(counts.values())) > 1:
        seen = ", ".join(f"{k!r}: {m}" for k, m in counts.items())
        raise ValueError(
            f"{arg}: every layer needs the same number of models along model_axis={axis}; "
            f"got {seen}"
        )
    moved = {k: jax.numpy.moveaxis(a, axis, 0) for k, a in zip(names, arrays)}
    return next(iter(counts.values())), moved


def _model_names(models: Any, counts: tuple[int, int], self_grid: bool) -> tuple[tuple, tuple]:
    if models is None:
        return tuple(str(i) for i in range(counts[0])), tuple(str(i) for i in range(counts[1]))
    two = not self_grid and len(models) == 2 and all(isinstance(m, (list, tuple)) for m in models)
    pairs = [tuple(str(v) for v in m) for m in models] if two else [tuple(map(str, models))] * 2
    for side, names, m in zip(("acts_a", "acts_b"), pairs, counts):
        if len(names) != m or len(set(names)) != m:
            raise ValueError(
                f"models: {m} distinct names needed for {side}'s {m} models, got {list(names)}"
            )
    return pairs[0], pairs[1]


def _sweep(run: Any, acts_a: Any, acts_b: Any, axis: Any, models: Any) -> SweepGrid:
    """Every model's layers of one sweep against every model's of the other: one grid of
    all ``M L`` layers (each prepared once; on the Gram route, one block loop), its
    values regrouped model by model."""
    m_a, stack_a = _split_models(acts_a, axis, "acts_a")
    self_grid = acts_b is None
    m_b, stack_b = (m_a, stack_a) if self_grid else _split_models(acts_b, axis, "acts_b")
    names_a, names_b = _model_names(models, (m_a, m_b), self_grid)
    grid = run(
        _layers.by_model(stack_a, names_a),
        None if self_grid else _layers.by_model(stack_b, names_b),
    )
    return SweepGrid.from_grid(grid, names_a, None if self_grid else names_b)


STACKED_MODELS = 16  # a shared first axis this small reads as stacked models, not examples


def _warn_stacked(acts_a: Any, acts_b: Any) -> None:
    """The pitfall of stacked ``(M, n, d)`` activations passed without ``model_axis``: M
    read as the number of examples (values near 1 that mean nothing)."""
    try:
        arrays = _layers.named(acts_a, "acts_a")[1]
        arrays += [] if acts_b is None else _layers.named(acts_b, "acts_b")[1]
    except (TypeError, ValueError):
        return  # reported by the validation that follows
    shapes = [tuple(getattr(a, "shape", ())) for a in arrays]
    if not all(len(s) >= 3 for s in shapes):
        return
    first = {s[0] for s in shapes}
    m = first.pop() if len(first) == 1 else None
    if m is not None and m <= STACKED_MODELS and all(m < s[1] for s in shapes):
        warnings.warn(
            f"acts_a: every layer's first axis has {m} entries (shapes like "
            f"{shapes[0]}), read as {m} examples. If that axis stacks models (an "
            "ensemble's or a sweep's activations, (models, n, ...)), pass model_axis=0 "
            "for a SweepGrid of every model pair; pass warn=False if these are examples.",
            UserWarning,
            stacklevel=3,
        )


def _read_layers(
    acts_a: Any, acts_b: Any, reductions: dict[str, Any], check_finite: bool, min_n: int
) -> tuple[list[str], list[str], list[Array], list[Array], Any]:
    """``(rows, cols, layers_a, layers_b, dtype)``: both sides' names and ``(n, features)``
    layers, validated and cast to their common dtype (a self-grid's columns are its
    rows)."""
    why = " for the unbiased HSIC estimator" if min_n >= 4 else ""
    rows, layers_a, cols, layers_b = _layers.reduced_layers(
        acts_a, acts_b, reductions, check_finite, min_n, why
    )
    self_grid = acts_b is None
    if self_grid:
        cols, layers_b = rows, layers_a
    dtype = _layers.common_dtype(layers_a + ([] if self_grid else layers_b))
    layers_a = [a.astype(dtype) for a in layers_a]
    layers_b = layers_a if self_grid else [b.astype(dtype) for b in layers_b]
    return rows, cols, layers_a, layers_b, dtype


def _feature_space(
    method: str,
    layers_a: list[Array],
    layers_b: list[Array],
    self_grid: bool,
    ring: tuple[Any, str] | None,
) -> bool:
    """Whether a linear-CKA grid takes the feature route (see :mod:`jaxsim._feature_route`),
    its cost divided among the devices the examples are spread over."""
    union = layers_a if self_grid else layers_a + layers_b
    return _feature_route.feature_route(
        method,
        layers_a[0].shape[0],
        [a.shape[1] for a in layers_a],
        None if self_grid else [b.shape[1] for b in layers_b],
        shards=ring[0].shape[ring[1]] if ring else _feature_route.example_shards(union),
        ring=ring is not None,
    )


def _gram_grid(
    measure: Measure,
    layers_a: list[Array],
    layers_b: list[Array] | None,
    ring: tuple[Any, str] | None,
    mesh: Any,
    debiased: bool,
    progress: bool | None,
    traced: bool,
) -> Array:
    """A kernel measure's grid from the inner products of all layers' centered Grams
    (``layers_b`` None: a self-grid), formed round a ``ring`` of devices, divided among
    the devices of ``mesh``, or here, block by block."""
    assert measure.blocks is not None
    union = layers_a + (layers_b or [])
    num_a = None if layers_b is None else len(layers_a)  # a cross-grid forms only its pairs
    if ring is not None:
        sums = ring_program(*ring, debiased, num_a=num_a)(union)
    else:
        n = union[0].shape[0]
        b = _gram_route.block_size(n, len(union))
        calls = len(_gram_route.progress_chunks(n, b))
        follow = calls > 1 and progress is not False and not traced and mesh is None
        tick, close = _progress.ticker(
            progress if follow else False, calls, f"{measure.name} grid", traced
        )
        try:
            sums = _gram_route.gram_inner_products(
                measure.blocks, union, b, tick if follow else None, mesh, num_a
            )
        finally:
            close()
    cka = measure.name in ("linear_cka", "rbf_cka")
    # biased CKA's centered Grams are positive semi-definite: their cosines are >= 0
    lower = 0.0 if cka and not debiased else -1.0
    magnitudes = None
    if debiased and cka:
        magnitudes = _gram_route.gram_traces(union, measure.name == "rbf_cka")
    return _gram_route.gram_values(sums, len(layers_a), layers_b is None, lower, magnitudes)


def _pairwise_grid(
    measure: Measure,
    layers_a: list[Array],
    layers_b: list[Array],
    self_grid: bool,
    dtype: Any,
    batch_size: int,
    mesh: Any,
    progress: bool | None,
    traced: bool,
) -> Array:
    """A grid of a measure evaluated pair by pair (see :mod:`jaxsim._pairwise`), its
    pairs divided among the devices of ``mesh`` if given."""
    num_a, num_b = len(layers_a), len(layers_b)
    pairs = num_a * (num_a + 1) // 2 if self_grid and measure.symmetric else num_a * num_b
    groups_a, groups_b = _pairwise.summary_groups(measure, layers_a, layers_b, self_grid)
    total = _pairwise.preparations(groups_a, groups_b, self_grid, measure.symmetric) + pairs
    tick, close = _progress.ticker(progress, total, f"{measure.name} grid", traced)
    run = functools.partial(
        _pairwise.generic_grid, measure, batch_size=batch_size, dtype=dtype, tick=tick, mesh=mesh
    )
    try:
        return _pairwise.grouped_grid(
            measure, run, layers_a, layers_b, groups_a, groups_b, self_grid, dtype, tick
        )
    finally:
        close()
