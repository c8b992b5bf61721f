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

import fnmatch
import re
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.extend.core import Literal

from jaxsim import grid as _grid

Array = jax.Array
Filter = Any  # None | callable(path, module) | type | tuple of types | str glob | re.Pattern | list


# ------------------------------------------------------------------------------ filters


def _accept(filter: Filter) -> Callable[[str, Any], bool]:
    """Turns a filter specification into ``(path, module_or_None) -> bool``.

    Module types match module outputs only (a sown value has no module type).
    """
    if filter is None:
        return lambda path, module: True
    if isinstance(filter, type):
        return lambda path, module: module is not None and isinstance(module, filter)
    if isinstance(filter, str):
        return lambda path, module: fnmatch.fnmatchcase(path, filter)
    if isinstance(filter, re.Pattern):
        return lambda path, module: filter.search(path) is not None
    if isinstance(filter, tuple) and filter and all(isinstance(t, type) for t in filter):
        return lambda path, module: module is not None and isinstance(module, filter)
    if isinstance(filter, (list, tuple)):
        parts = [_accept(f) for f in filter]
        return lambda path, module: any(p(path, module) for p in parts)
    if callable(filter):
        return lambda path, module: bool(filter(path, module))
    raise TypeError("filter: expected None, a callable (path, module) -> bool, a module type "
                    f"or tuple of types, a glob string, a compiled regex, or a list; got {filter!r}")


def _select(found: dict[str, tuple[Array, Any]], filter: Filter) -> dict[str, Array]:
    accept = _accept(filter)
    out = {path: value for path, (value, module) in found.items() if accept(path, module)}
    if not out:
        available = ", ".join(found) or "(none: the model produced no intermediate values)"
        raise ValueError(f"filter: {filter!r} matched no layer; available paths: {available}")
    return out


# ------------------------------------------------------------------------ forward order


def _equation_positions(fn: Callable[[Any], list[Array]], inputs: Any) -> list[int]:
    """For each output of ``fn(inputs)``, the position in the computation of the equation
    that produces it (-1 for inputs and constants), read off the jaxpr."""
    jaxpr = jax.make_jaxpr(fn)(inputs).jaxpr
    made = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.outvars:
            made[v] = i
    return [-1 if isinstance(v, Literal) else made.get(v, -1) for v in jaxpr.outvars]


def _ordered(fn: Callable[[Any], dict[str, tuple[Array, Any]]], inputs: Any
             ) -> dict[str, tuple[Array, Any]]:
    found = fn(inputs)
    keys = list(found)
    position = _equation_positions(lambda x: [v for v, _ in fn(x).values()], inputs)
    # A module returning its last child's output ties with it: the child comes first, and
    # the model's own output last.
    depth = lambda k: 0 if keys[k] == "output" else keys[k].count("/") + 1
    order = sorted(range(len(keys)), key=lambda k: (position[k], -depth(k)))
    return {keys[i]: found[keys[i]] for i in order}


def _leaves(prefix: str, value: Any) -> list[tuple[str, Array]]:
    """Array leaves of a captured value, named ``prefix`` or ``prefix/0``, ``prefix/1``..."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    leaves = jax.tree_util.tree_flatten_with_path(value)[0]
    leaves = [(p, v) for p, v in leaves if hasattr(v, "shape") and getattr(v, "ndim", 0) >= 1]
    if len(leaves) == 1 and not leaves[0][0]:
        return [(prefix, leaves[0][1])]
    out = []
    for path, v in leaves:
        suffix = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out.append((f"{prefix}/{suffix}" if prefix else suffix, v))
    return out


def _collected(tree: Any, modules: dict[str, Any]) -> dict[str, tuple[Array, Any]]:
    """Flattens a nested dict of captured values into ``{path: (array, module or None)}``:
    a ``__call__`` entry is the output of the module owning it (the root's is "output");
    any other leaf is a value the model sowed (or another method's output)."""
    found: dict[str, tuple[Array, Any]] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if key == "__call__":
                owner = "/".join(path)
                for name, leaf in _leaves(owner or "output", value):
                    found[name] = (leaf, modules.get(owner))
            elif hasattr(value, "items"):
                walk(value, path + (str(key),))
            else:
                for name, leaf in _leaves("/".join(path + (str(key),)), value):
                    found[name] = (leaf, None)

    walk(tree, ())
    return found


# ------------------------------------------------------------------------------- linen


def _linen_found(module: Any, variables: Any, inputs: Any, apply_kwargs: dict
                 ) -> dict[str, tuple[Array, Any]]:
    modules: dict[str, Any] = {}

    def record(mdl: Any, method_name: str) -> bool:
        if method_name == "__call__":
            modules["/".join(mdl.path)] = mdl
            return True
        return False

    variables = {k: v for k, v in dict(variables).items() if k != "intermediates"}
    _, state = module.apply(variables, inputs, capture_intermediates=record,
                            mutable=["intermediates"], **apply_kwargs)
    return _collected(state.get("intermediates", {}), modules)


def capture_linen(module: Any, variables: Any, inputs: Any, *, filter: Filter = None,
                  **apply_kwargs: Any) -> dict[str, Array]:
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
      **apply_kwargs: passed to ``module.apply``, e.g. ``train=False``.
    Returns:
      Ordered dict of arrays of shape ``(n, ...)``.
    Raises:
      ValueError: if the filter matches nothing (the message lists the available paths).
    """
    fn = lambda x: _linen_found(module, variables, x, apply_kwargs)
    return _select(_ordered(fn, inputs), filter)


# --------------------------------------------------------------------------------- nnx


def _nnx_found(module: Any, inputs: Any) -> dict[str, tuple[Array, Any]]:
    from flax import nnx

    # A copy made here belongs to the current trace, so capturing (which writes to the
    # modules) also works under jax.jit; the caller's module is left untouched.
    graphdef, state = nnx.split(module)
    model = nnx.merge(graphdef, state)
    _, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(inputs)
    captured = nnx.to_pure_dict(captured)
    modules = {"/".join(str(p) for p in path): m for path, m in nnx.iter_modules(module)}
    return _collected(captured, modules)


def capture_nnx(module: Any, inputs: Any, *, filter: Filter = None) -> dict[str, Array]:
    """Activations of an nnx model, ``{layer path: array}`` in forward order.

    The model runs as it is configured (call ``model.eval()`` first for batch norm and
    dropout in inference mode); its state is not modified.

    Args:
      module: a ``flax.nnx.Module``.
      inputs: the input batch, passed as ``module(inputs)``.
      filter: as in :func:`capture_linen` (e.g. ``nnx.Conv``, ``"block*"``).
    Returns:
      Ordered dict of arrays of shape ``(n, ...)``.
    """
    return _select(_ordered(lambda x: _nnx_found(module, x), inputs), filter)


# ---------------------------------------------------------------------------- streaming


def as_capture(model: Any, *, filter: Filter = None, **apply_kwargs: Any
               ) -> Callable[[Any], dict[str, Array]]:
    """``inputs -> {path: activation}`` for an nnx module, a linen ``(module, variables)``
    pair, or a callable that already returns activations (a dict or a sequence)."""
    try:
        from flax import linen as nn
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        nn = nnx = None
    if nnx is not None and isinstance(model, nnx.Module):
        return lambda x: capture_nnx(model, x, filter=filter)
    if (nn is not None and isinstance(model, tuple) and len(model) == 2
            and isinstance(model[0], nn.Module)):
        module, variables = model
        return lambda x: capture_linen(module, variables, x, filter=filter, **apply_kwargs)
    if callable(model):
        def run(x):
            acts = model(x)
            return dict(acts) if isinstance(acts, dict) else {str(i): a for i, a in enumerate(acts)}
        return run
    raise TypeError("model: expected an nnx.Module, a (linen module, variables) pair, or a "
                    f"callable returning activations; got {type(model).__name__}")


def _inputs(batch: Any) -> Any:
    """A batch may be the inputs, or a tuple/list whose first item is (inputs, labels, ...)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _progress(iterable: Iterable, progress: bool, total: int | None, desc: str) -> Iterable:
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain_progress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _plain_progress(iterable: Iterable, total: int | None, desc: str) -> Iterable:
    import sys

    for i, item in enumerate(iterable, 1):
        yield item
        print(f"\r{desc}: {i}" + (f"/{total}" if total else ""), end="", file=sys.stderr,
              flush=True)
    print(file=sys.stderr)


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


def minibatch_grid(model_a: Any, batches: Iterable[Any], model_b: Any = None, *,
                   filter: Filter = None, filter_b: Filter = None, progress: bool = True,
                   total: int | None = None, apply_kwargs: dict | None = None) -> _grid.Grid:
    """Minibatch CKA grid of one model's layers (or two models') over a stream of batches.

    Each batch is one jitted step: forward pass(es), capture and
    :func:`jaxsim.minibatch_cka_update` fused; activations never outlive their batch.

    Args:
      model_a: an nnx module, a linen ``(module, variables)`` pair, or a callable
        ``inputs -> activations``.
      batches: iterable of input batches (or tuples whose first item is the inputs); each
        batch needs at least 4 examples; equal sizes give the paper's estimator exactly.
      model_b: the column model; ``None`` for a self-grid of ``model_a``.
      filter, filter_b: layer filters (see :func:`capture_linen`); ``filter_b`` defaults to
        ``filter``.
      progress: show a progress bar (tqdm if installed).
      total: number of batches, for the progress bar.
      apply_kwargs: keyword arguments for linen's ``apply`` (e.g. ``{"train": False}``).
    Returns:
      :class:`jaxsim.Grid` named by layer paths.
    """
    apply_kwargs = apply_kwargs or {}
    cap_a = as_capture(model_a, filter=filter, **apply_kwargs)
    cap_b = None if model_b is None else as_capture(
        model_b, filter=filter if filter_b is None else filter_b, **apply_kwargs)

    @jax.jit
    def step(state, x):
        acts_a = cap_a(x)
        acts_b = None if cap_b is None else cap_b(x)
        return _grid.minibatch_cka_update(state, list(acts_a.values()),
                                          None if acts_b is None else list(acts_b.values()),
                                          check_finite=False)

    state = rows = cols = None
    for batch in _progress(batches, progress, total, "minibatch CKA"):
        x = _inputs(batch)
        if state is None:  # layer names and counts from the first batch's shapes
            rows = _names(cap_a, x)
            cols = rows if cap_b is None else _names(cap_b, x)
            state = _grid.minibatch_cka_init(len(rows), len(cols))
        previous, state = state, step(state, x)
        # the next batch is prepared while this one runs, but no more than that is queued:
        # memory stays bounded however fast the iterator yields
        jax.block_until_ready(previous)
    if state is None:
        raise ValueError("batches: the iterable yielded no batch")
    return _grid.minibatch_cka_result(state, rows=rows, cols=cols)


def collect_activations(model: Any, batches: Iterable[Any], *, filter: Filter = None,
                        progress: bool = True, total: int | None = None,
                        apply_kwargs: dict | None = None) -> dict[str, np.ndarray]:
    """All activations of a model over a data set, ``{path: (N, ...) numpy array}``.

    For measures that need every example at once (the CCA family); each batch's forward
    pass and capture is one jitted call, results are moved to host memory as they come.
    """
    cap = as_capture(model, filter=filter, **(apply_kwargs or {}))
    names: list[str] = []
    capture = jax.jit(lambda x: list(_record(cap(x), names).values()))
    parts: list[list[np.ndarray]] = []
    for batch in _progress(batches, progress, total, "activations"):
        values = capture(_inputs(batch))
        parts = parts or [[] for _ in values]
        for part, v in zip(parts, values):
            part.append(np.asarray(v))
    if not parts:
        raise ValueError("batches: the iterable yielded no batch")
    return {k: np.concatenate(v) for k, v in zip(names, parts)}
