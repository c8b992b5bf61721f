"""Activations from Flax models (linen and nnx), and streaming grids from models.

``capture_linen`` and ``capture_nnx`` return ``{"block1/conv2": (n, ...) array, ...}`` in
forward order (the order in which the values are computed), using Flax's own mechanisms:
linen's ``capture_intermediates`` and nnx's ``nnx.capture(method_outputs=...)``. Values the
model sows itself are included. Both work under ``jax.jit``.

``minibatch_grid`` runs one or two models over an iterable of input batches and feeds
:func:`jaxsim.minibatch_cka_update`, one jitted step per batch (forward pass, capture and
update fused), never holding more than one batch of activations.
``collect_activations`` keeps every batch, for the CCA family when the data set fits.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence, Sized

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxsim import _flax_paths, _layers
from jaxsim import _linalg as _la
from jaxsim import minibatch as _minibatch
from jaxsim._progress import bar
from jaxsim._result import Grid, SweepGrid

__all__ = [
    "stack_models",
    "as_capture",
    "capture_linen",
    "capture_nnx",
    "collect_activations",
    "minibatch_grid",
    "minibatch_state",
]


Filter = Any  # None | callable(path, module) | type | tuple of types | str glob | re.Pattern | list


def _linen_found(
    module: Any, variables: Any, inputs: Any, apply_kwargs: dict
) -> dict[str, tuple[Array, Any]]:
    modules: dict[str, Any] = {}

    def record(mdl: Any, method_name: str) -> bool:
        if method_name == "__call__":
            modules["/".join(mdl.path)] = mdl
            return True
        return False

    from flax import errors

    variables = {k: v for k, v in dict(variables).items() if k != "intermediates"}
    try:
        _, state = module.apply(
            variables,
            inputs,
            capture_intermediates=record,
            mutable=["intermediates"],
            **apply_kwargs,
        )
    except (errors.ModifyScopeVariableError, errors.InvalidRngError) as err:
        raise ValueError(
            f"model: it runs in training mode ({err.__class__.__name__}: batch norm would "
            "update its statistics or dropout needs a random key); capture inference-mode "
            "activations with the model's own switch, e.g. capture_linen(module, variables, "
            "x, train=False) or apply_kwargs={'train': False}"
        ) from None
    return _flax_paths.collected(state.get("intermediates", {}), modules)


def _linen_module(module: Any) -> None:
    from flax import linen as nn

    if not isinstance(module, nn.Module):
        hint = " (for an nnx model use capture_nnx(model, x))" if _is_nnx(module) else ""
        raise TypeError(f"module: expected a flax.linen.Module, got {type(module).__name__}{hint}")


def _merged(apply_kwargs: dict | None, more: dict) -> dict:
    """``apply_kwargs={...}`` and keyword arguments given directly are the same thing."""
    both = dict(apply_kwargs or {})
    clash = sorted(set(both) & set(more))
    if clash:
        raise TypeError(
            f"apply_kwargs: {', '.join(clash)} given twice (in apply_kwargs and as "
            "a keyword argument)"
        )
    both.update(more)
    return both


def capture_linen(
    module: Any,
    variables: Any,
    inputs: Any,
    *,
    filter: Filter = None,
    model_axis: int | None = None,
    apply_kwargs: dict | None = None,
    **more_apply_kwargs: Any,
) -> dict[str, Array]:
    """Activations of a linen model, ``{layer path: array}`` in forward order.

    Args:
      module: a ``flax.linen.Module``.
      variables: its variables (``params``, ``batch_stats``, ...).
      inputs: the input batch, passed as ``module.apply(variables, inputs, ...)``.
      filter: which layers: ``None`` (every submodule's output, the model's own output as
        ``"output"``, and values it sows), a callable ``(path, module) -> bool`` (module is
        None for sown values), a module type or tuple of types (e.g. ``nn.Conv``), a glob
        string on the path (``"block*/conv*"``), a compiled regex, or a list of these
        (any matches).
      model_axis: the axis along which every leaf of ``variables`` stacks models (an
        ensemble's seeds, a sweep, a training run's checkpoints: see
        :func:`stack_models`); each model sees the same inputs.
      apply_kwargs: passed to ``module.apply``, e.g. ``{"train": False}``.
      **more_apply_kwargs: passed to ``module.apply`` too, e.g. ``train=False``.
    Returns:
      Ordered dict of arrays of shape ``(n, ...)``, or ``(M, n, ...)`` with ``model_axis``
      (the models first, ready for ``similarity_grid(acts, model_axis=0)``). A value that
      two names select (the model's ``"output"`` when it is its last layer's output)
      appears once, under the layer's name.
    Raises:
      ValueError: if the filter matches nothing (the message lists the available paths), or
        if the model runs in training mode (batch norm updating its statistics, dropout
        without a key): pass ``train=False`` or the model's equivalent.
    """
    _linen_module(module)
    apply_kwargs = _merged(apply_kwargs, more_apply_kwargs)
    if model_axis is not None:
        one = lambda v: capture_linen(module, v, inputs, filter=filter, **apply_kwargs)
        return _over_models(one, variables, model_axis, "variables")
    fn = lambda x: _linen_found(module, variables, x, apply_kwargs)
    with _stacked_hint(dict(variables).get("params", {}), "variables"):
        found = _flax_paths.ordered(fn, inputs)
    return _flax_paths.select(found, filter)


def _over_models(
    capture: Callable[[Any], dict[str, Array]], stacked: Any, axis: int, arg: str
) -> dict[str, Array]:
    """``capture`` mapped over the models that ``stacked``'s leaves stack along ``axis``,
    the layers kept in forward order (a vmapped dict would come back sorted). On
    accelerators the models are vmapped; on a CPU they run one after the other
    (``lax.map``): vmapped convolution kernels become one grouped convolution there,
    several times slower than the models' own convolutions in turn."""
    sizes = {np.shape(leaf)[axis] for leaf in jax.tree.leaves(stacked) if np.ndim(leaf) > axis}
    if len(sizes) != 1:
        raise ValueError(
            f"{arg}: model_axis={axis} needs every array leaf to stack the same number of "
            f"models along axis {axis}; found sizes {sorted(sizes) or 'none'}"
        )
    names: list[str] = []

    def one(model_state):
        acts = capture(model_state)
        if not names:
            names.extend(acts)
        return acts

    if _SEQUENTIAL_MODELS():
        moved = jax.tree.map(lambda a: jnp.moveaxis(a, axis, 0), stacked)
        out = jax.lax.map(one, moved)
    else:
        out = jax.vmap(one, in_axes=(axis,))(stacked)
    return {k: out[k] for k in names}


# Whether a stack of models is captured one model at a time (a function, so tests can
# take either path on any backend).
_SEQUENTIAL_MODELS: Callable[[], bool] = _la._on_cpu


def stack_models(models: Sequence[Any]) -> Any:
    """Models of one architecture stacked into one: checkpoints of a training run, or
    seeds trained one by one, for ``capture_*(..., model_axis=0)`` and
    ``similarity_grid(..., model_axis=0)``.

    Args:
      models: nnx modules of one structure, or linen variable pytrees (``{"params":
        ...}``) of one structure, e.g. restored checkpoints.
    Returns:
      One nnx module (or one variables pytree) whose arrays stack the models on axis 0,
      as ``nnx.vmap`` would have made them.
    """
    models = list(models)
    if not models:
        raise ValueError("models: nothing to stack (an empty sequence)")
    stack = lambda *leaves: jnp.stack(leaves)
    if _is_nnx(models[0]):
        from flax import nnx

        graphdef, _ = nnx.split(models[0])
        states = [nnx.split(m)[1] for m in models]
        return nnx.merge(graphdef, jax.tree.map(stack, *states))
    return jax.tree.map(stack, *models)


def _nnx_found(module: Any, inputs: Any) -> dict[str, tuple[Array, Any]]:
    from flax import nnx

    # A copy made here belongs to the current trace, so capturing (which writes to the
    # modules) also works under jax.jit; the caller's module is left untouched.
    graphdef, state = nnx.split(module)
    model = nnx.merge(graphdef, state)
    _, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(inputs)
    captured = nnx.to_pure_dict(captured)
    modules = {"/".join(str(p) for p in path): m for path, m in nnx.iter_modules(module)}
    return _flax_paths.collected(captured, modules)


def _is_nnx(model: Any) -> bool:
    from flax import nnx

    return isinstance(model, nnx.Module)


def _training_layers(module: Any) -> list[str]:
    """Paths of the nnx submodules that would behave as in training: batch norm using and
    updating batch statistics, dropout with a nonzero rate."""
    from flax import nnx

    found = []
    for path, m in nnx.iter_modules(module):
        name = "/".join(str(p) for p in path) or "(the model)"
        if getattr(m, "use_running_average", None) is False:
            found.append(name)
        elif getattr(m, "deterministic", None) is False and getattr(m, "rate", 0) > 0:
            found.append(name)
    return found


def _nnx_module(module: Any) -> None:
    if not _is_nnx(module):
        hint = ""
        if isinstance(module, tuple) and len(module) == 2:
            hint = " (a linen (module, variables) pair: use capture_linen(module, variables, x))"
        raise TypeError(f"module: expected a flax.nnx.Module, got {type(module).__name__}{hint}")
    training = _training_layers(module)
    if training:
        raise ValueError(
            f"model: in training mode ({', '.join(training)} would use batch statistics or "
            "drop units, and update the model); call model.eval() before capturing "
            "activations (model.train() switches back)"
        )


def capture_nnx(
    module: Any, inputs: Any, *, filter: Filter = None, model_axis: int | None = None
) -> dict[str, Array]:
    """Activations of an nnx model, ``{layer path: array}`` in forward order.

    Activations are those of inference mode: the model must be in it (``model.eval()``),
    otherwise a ValueError names the batch-norm and dropout layers in training mode. The
    model's state is not modified.

    Args:
      module: a ``flax.nnx.Module``.
      inputs: the input batch, passed as ``module(inputs)``.
      filter: as in :func:`capture_linen` (e.g. ``nnx.Conv``, ``"block*"``).
      model_axis: the axis along which the module's arrays stack models: an ensemble made
        with ``nnx.vmap`` (``model_axis=0``, its ``in_axes``), or :func:`stack_models`'s
        result; each model sees the same inputs.
    Returns:
      Ordered dict of arrays of shape ``(n, ...)``, or ``(M, n, ...)`` with ``model_axis``
      (models first). A value two names select appears once, as in
      :func:`capture_linen`.

    Example (an ensemble of 4 seeds):
      >>> @nnx.split_rngs(splits=4)  # doctest: +SKIP
      ... @nnx.vmap(in_axes=(0,), out_axes=0)
      ... def ensemble(rngs):
      ...     return MLP(rngs)
      >>> acts = capture_nnx(ensemble(nnx.Rngs(0)), x, model_axis=0)  # doctest: +SKIP
      >>> sweep = jaxsim.similarity_grid(acts, model_axis=0)  # (4, 4, L, L)  # doctest: +SKIP
    """
    _nnx_module(module)
    from flax import nnx

    if model_axis is not None:
        graphdef, state = nnx.split(module)
        one = lambda st: capture_nnx(nnx.merge(graphdef, st), inputs, filter=filter)
        return _over_models(one, state, model_axis, "module")
    with _stacked_hint(nnx.state(module, nnx.Param), "module"):
        found = _flax_paths.ordered(lambda x: _nnx_found(module, x), inputs)
    return _flax_paths.select(found, filter)


@contextlib.contextmanager
def _stacked_hint(params: Any, arg: str) -> Iterator[None]:
    """A model that fails on its inputs while every parameter array shares a leading axis
    is most likely an ensemble (``nnx.vmap``, stacked variables): say so."""
    try:
        yield
    except Exception as err:  # a shape error from jax or flax, re-raised unless stacked
        leaves = [np.shape(leaf) for leaf in jax.tree.leaves(params)]
        first = {shape[0] for shape in leaves if len(shape) >= 2}
        if len(leaves) >= 2 and len(first) == 1 and all(len(shape) >= 2 for shape in leaves):
            raise ValueError(
                f"{arg}: the model failed on the inputs ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}), and every parameter array has a leading "
                f"axis of {first.pop()}: if it stacks models (an ensemble made with nnx.vmap, "
                "stacked checkpoints), pass model_axis=0"
            ) from err
        raise


def as_capture(
    model: Any, *, filter: Filter = None, model_axis: int | None = None, **apply_kwargs: Any
) -> Callable[[Any], dict[str, Array]]:
    """``inputs -> {path: activation}`` for an nnx module, a linen ``(module, variables)``
    pair, or a callable that already returns activations (a dict or a sequence). With
    ``model_axis`` (nnx and linen models), the models' layers one after another,
    ``{"0/path": ..., "1/path": ...}``."""
    from flax import linen as nn

    flat = (lambda c: c) if model_axis is None else _models_flat
    if _is_nnx(model):
        _nnx_module(model)
        return flat(lambda x: capture_nnx(model, x, filter=filter, model_axis=model_axis))
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nn.Module):
        module, variables = model
        return flat(
            lambda x: capture_linen(
                module, variables, x, filter=filter, model_axis=model_axis, **apply_kwargs
            )
        )
    if model_axis is not None:
        raise TypeError(
            f"model_axis: needs an nnx module or a linen (module, variables) pair whose "
            f"arrays stack models; got {type(model).__name__}"
        )
    if callable(model) and not isinstance(model, nn.Module):

        def run(x):
            acts = model(x)
            return dict(acts) if isinstance(acts, dict) else {str(i): a for i, a in enumerate(acts)}

        return run
    hint = (
        " (a linen module needs its variables: pass (module, variables))"
        if isinstance(model, nn.Module)
        else ""
    )
    raise TypeError(
        "model: expected an nnx.Module, a (linen module, variables) pair, or a "
        f"callable returning activations; got {type(model).__name__}{hint}"
    )


def _inputs(batch: Any) -> Any:
    """A batch may be the inputs, or a tuple/list whose first item is (inputs, labels, ...)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _examples(x: Any) -> int:
    leaves = jax.tree.leaves(x)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else 0


def _names(capture: Callable[[Any], dict[str, Array]], x: Any) -> list[str]:
    """Layer names in forward order, from an abstract evaluation (jax would sort dict keys
    of a returned dict, so the names are recorded while tracing)."""
    names: list[str] = []
    jax.eval_shape(lambda v: list(_record(capture(v), names).values()), x)
    return names


def _record(acts: dict[str, Array], names: list[str]) -> dict[str, Array]:
    if not names:
        names.extend(acts)
    return acts


def _models_flat(capture: Callable[[Any], dict[str, Array]]) -> Callable[[Any], dict[str, Array]]:
    """A capture of stacked models as one model's layers: model 0's, then model 1's, ..."""

    def run(x):
        acts = capture(x)
        count = next(iter(acts.values())).shape[0]
        return _layers.by_model(acts, [str(m) for m in range(count)])

    return run


def minibatch_grid(
    model_a: Any,
    batches: Iterable[Any],
    model_b: Any = None,
    *,
    filter: Filter = None,
    filter_b: Filter = None,
    model_axis: int | None = None,
    progress: bool = True,
    total: int | None = None,
    state: _minibatch.MinibatchCKAState | None = None,
    labels: tuple[str, str] | None = None,
    check_finite: bool = True,
    apply_kwargs: dict | None = None,
    **more_apply_kwargs: Any,
) -> Grid | SweepGrid:
    """Minibatch CKA grid of one model's layers (or two models') over a stream of batches.

    Each batch is one jitted step: forward pass(es), capture and
    :func:`jaxsim.minibatch_cka_update` fused; activations never outlive their batch.

    Args:
      model_a: an nnx module (in eval mode), a linen ``(module, variables)`` pair, or a
        callable ``inputs -> activations``.
      batches: iterable of input batches (or tuples whose first item is the inputs).
        Equal sizes give the paper's estimator exactly; a batch of another size is used
        with a warning, and one with fewer than 4 examples (the unbiased HSIC's minimum,
        typically a loader's short last batch) is skipped with a warning: pass
        ``drop_last=True`` to your loader to avoid both.
      model_b: the column model; ``None`` for a self-grid of ``model_a``.
      filter: which layers of the first model (see :func:`capture_linen`).
      filter_b: which layers of the second; defaults to ``filter``.
      model_axis: the models are ensembles (or :func:`stack_models` of checkpoints)
        stacked along this axis of their arrays: the result is a
        :class:`jaxsim.SweepGrid` of every model pair, from one stream whose state sums
        ``(M L)^2`` HSIC terms.
      progress: show a progress bar (tqdm if installed).
      total: number of batches, for the progress bar (default ``len(batches)`` if it has one).
      state: a state from :func:`minibatch_state` (possibly saved and restored with
        numpy): the stream resumes where it stopped.
      labels: names of the two models for figures; default ``("model_a", "model_b")``.
      check_finite: raise when a layer's activations held NaN or inf in some batch (see
        :func:`jaxsim.minibatch_cka_result`); ``False`` gives NaN values instead.
      apply_kwargs: keyword arguments for linen's ``apply``, as a dict.
      **more_apply_kwargs: keyword arguments for linen's ``apply`` (``train=False``).
    Returns:
      :class:`jaxsim.Grid` named by layer paths (a :class:`jaxsim.SweepGrid` with
      ``model_axis``).

    Example:
      >>> state = minibatch_state(model, first_half)  # doctest: +SKIP
      >>> grid = minibatch_grid(model, second_half, state=state)  # doctest: +SKIP
    """
    state, rows, cols = _stream(
        model_a,
        batches,
        model_b,
        filter,
        filter_b,
        progress,
        total,
        state,
        _merged(apply_kwargs, more_apply_kwargs),
        model_axis,
    )
    default = ("model_a", "model_a" if model_b is None else "model_b")
    grid = _minibatch.minibatch_cka_result(
        state,
        rows=rows,
        cols=cols,
        labels=default if labels is None else labels,
        check_finite=check_finite,
    )
    if model_axis is None:
        return grid
    count = lambda names: len({n.split("/", 1)[0] for n in names})
    return SweepGrid.from_grid(
        grid, count(rows), None if model_b is None else count(cols), self_sweep=model_b is None
    )


def minibatch_state(
    model_a: Any,
    batches: Iterable[Any],
    model_b: Any = None,
    *,
    filter: Filter = None,
    filter_b: Filter = None,
    model_axis: int | None = None,
    progress: bool = True,
    total: int | None = None,
    state: _minibatch.MinibatchCKAState | None = None,
    apply_kwargs: dict | None = None,
    **more_apply_kwargs: Any,
) -> _minibatch.MinibatchCKAState:
    """The minibatch CKA state of :func:`minibatch_grid`'s stream (same arguments), to
    resume later (``minibatch_grid(..., state=state)``), save with numpy, or add to other
    streams' states (``jax.tree.map(operator.add, s1, s2)``)."""
    return _stream(
        model_a,
        batches,
        model_b,
        filter,
        filter_b,
        progress,
        total,
        state,
        _merged(apply_kwargs, more_apply_kwargs),
        model_axis,
    )[0]


def _stream(
    model_a: Any,
    batches: Iterable[Any],
    model_b: Any,
    filter: Filter,
    filter_b: Filter,
    progress: bool,
    total: int | None,
    state: _minibatch.MinibatchCKAState | None,
    apply_kwargs: dict,
    model_axis: int | None = None,
) -> tuple[_minibatch.MinibatchCKAState, list[str], list[str]]:
    """The stream's state and its row and column layer names."""
    cap_a = as_capture(model_a, filter=filter, model_axis=model_axis, **apply_kwargs)
    cap_b = (
        None
        if model_b is None
        else as_capture(
            model_b,
            filter=filter if filter_b is None else filter_b,
            model_axis=model_axis,
            **apply_kwargs,
        )
    )

    def update(state, x):
        acts_b = None if cap_b is None else cap_b(x)
        return _minibatch.minibatch_cka_update(state, cap_a(x), acts_b, check_finite=False)

    step = jax.jit(update)
    scan = jax.jit(lambda state, xs: jax.lax.scan(lambda s, x: (update(s, x), None), state, xs)[0])
    if total is None and isinstance(batches, Sized):
        total = len(batches)
    rows = cols = size = None
    pending: list[Any] = []  # equal-size batches not yet run, at most SCAN_CHUNK
    first = 0  # index of pending[0]

    def run(state, previous):
        """The pending batches, as one scan when there are SCAN_CHUNK of them."""
        try:
            if len(pending) == SCAN_CHUNK:
                new = scan(state, jax.tree.map(lambda *leaves: jnp.stack(leaves), *pending))
            else:
                for x in pending:
                    state = step(state, x)
                new = state
        except ValueError as err:
            where = (
                f"batches[{first}:{first + len(pending)}]"
                if len(pending) > 1
                else (f"batches[{first}]")
            )
            raise ValueError(f"{where}: {err}") from None
        pending.clear()
        # the next chunk is gathered while this one runs, but no more than that is queued:
        # memory stays bounded however fast the iterator yields
        jax.block_until_ready(previous)
        return new

    for index, batch in enumerate(bar(batches, progress, total, "minibatch CKA")):
        x = _inputs(batch)
        m = _examples(x)
        if m < 4:
            warnings.warn(
                f"batches[{index}]: {m} example(s), fewer than the 4 the unbiased HSIC "
                "needs: skipped (pass drop_last=True to your data loader)",
                stacklevel=3,
            )
            continue
        if rows is None:  # layer names and counts from the first batch's shapes
            rows = _names(cap_a, x)
            cols = rows if cap_b is None else _names(cap_b, x)
            state = _resumed(state, rows, cols)
            size = m
        elif m != size and size is not None:
            warnings.warn(
                f"batches[{index}]: {m} examples where the first batch had {size}: "
                "minibatch CKA then averages HSIC over unequal batches, not exactly "
                "the paper's estimator (pass drop_last=True to your data loader)",
                stacklevel=3,
            )
            size = None  # warn once
        if pending and _examples(pending[0]) != m:  # a scan stacks batches of one size
            state = run(state, state)
        if not pending:
            first = index
        pending.append(x)
        if len(pending) == SCAN_CHUNK:
            state = run(state, state)
    if rows is None or cols is None or state is None:
        raise ValueError("batches: the iterable yielded no batch with at least 4 examples")
    return run(state, state), rows, cols


SCAN_CHUNK = 8  # batches per compiled scan in a model's stream


def _resumed(state: Any, rows: list[str], cols: list[str]) -> _minibatch.MinibatchCKAState:
    if state is None:
        return _minibatch.minibatch_cka_init(len(rows), len(cols))
    if tuple(state.cross.shape) != (len(rows), len(cols)):
        raise ValueError(
            f"state: compares {state.cross.shape[0]} x {state.cross.shape[1]} layers "
            f"but the model(s) give {len(rows)} x {len(cols)} with these filters"
        )
    return state


def collect_activations(
    model: Any,
    batches: Iterable[Any],
    *,
    filter: Filter = None,
    progress: bool = True,
    total: int | None = None,
    apply_kwargs: dict | None = None,
    **more_apply_kwargs: Any,
) -> dict[str, np.ndarray]:
    """All activations of a model over a data set, ``{path: (N, ...) numpy array}``.

    For measures that need every example at once (the CCA family); each batch's forward
    pass and capture is one jitted call, results are moved to host memory as they come.
    Arguments as in :func:`minibatch_grid`.
    """
    cap = as_capture(model, filter=filter, **_merged(apply_kwargs, more_apply_kwargs))
    names: list[str] = []
    capture = jax.jit(lambda x: list(_record(cap(x), names).values()))
    if total is None and isinstance(batches, Sized):
        total = len(batches)
    parts: list[list[np.ndarray]] = []
    for batch in bar(batches, progress, total, "activations"):
        values = capture(_inputs(batch))
        parts = parts or [[] for _ in values]
        for part, v in zip(parts, values):
            part.append(np.asarray(v))
    if not parts:
        raise ValueError("batches: the iterable yielded no batch")
    return {k: np.concatenate(v) for k, v in zip(names, parts)}
