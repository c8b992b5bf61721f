"""Layers of Flax models by path: the filters that select them, and their forward order."""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable

import jax
from jax import Array
from jax.extend.core import Literal

Filter = Any  # None | callable(path, module) | type | tuple of types | str glob | re.Pattern | list


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
    raise TypeError(
        "filter: expected None, a callable (path, module) -> bool, a module type "
        f"or tuple of types, a glob string, a compiled regex, or a list; "
        f"got {filter!r}"
    )


def select(found: dict[str, tuple[Array, Any, int]], filter: Filter) -> dict[str, Array]:
    """The layers ``filter`` accepts, in forward order; a value selected under two names
    (a module returning its last child's output, e.g. the model's "output" and its "head")
    is kept once, under the first (innermost) name."""
    accept = _accept(filter)
    out, seen = {}, set()
    for path, (value, module, identity) in found.items():
        if accept(path, module) and identity not in seen:
            out[path] = value
            seen.add(identity)
    if not out:
        available = ", ".join(found) or "(none: the model produced no intermediate values)"
        raise ValueError(f"filter: {filter!r} matched no layer; available paths: {available}")
    return out


def _equation_positions(
    fn: Callable[[Any], list[Array]], inputs: Any
) -> tuple[list[int], list[int]]:
    """For each output of ``fn(inputs)``, the position in the computation of the equation
    that produces it (-1 for inputs and constants), and an identity shared by outputs that
    are the very same value; read off the jaxpr."""
    jaxpr = jax.make_jaxpr(fn)(inputs).jaxpr
    made = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.outvars:
            made[v] = i
    position = [-1 if isinstance(v, Literal) else made.get(v, -1) for v in jaxpr.outvars]
    ids: dict[Any, int] = {}
    identity = [
        k if isinstance(v, Literal) else ids.setdefault(v, k) for k, v in enumerate(jaxpr.outvars)
    ]
    return position, identity


def ordered(
    fn: Callable[[Any], dict[str, tuple[Array, Any]]], inputs: Any
) -> dict[str, tuple[Array, Any, int]]:
    """``{path: (value, module, identity)}`` in forward order."""
    found = fn(inputs)
    keys = list(found)
    position, identity = _equation_positions(lambda x: [v for v, _ in fn(x).values()], inputs)
    # A module returning its last child's output ties with it: the child comes first, and
    # the model's own output last.
    depth = lambda k: 0 if keys[k] == "output" else keys[k].count("/") + 1
    order = sorted(range(len(keys)), key=lambda k: (position[k], -depth(k)))
    return {keys[i]: found[keys[i]] + (identity[i],) for i in order}


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


def collected(tree: Any, modules: dict[str, Any]) -> dict[str, tuple[Array, Any]]:
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
