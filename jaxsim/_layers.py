"""Collections of layers: their names, conv reduction, validation, dtype and grouping."""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import Array

from jaxsim import _validation as _v
from jaxsim import conv
from jaxsim._measure import poison


def named(acts: Any, arg: str) -> tuple[list[str], list[Any]]:
    if isinstance(acts, Mapping):
        names, arrays = [str(k) for k in acts.keys()], list(acts.values())
    elif isinstance(acts, (list, tuple)):
        names, arrays = [str(i) for i in range(len(acts))], list(acts)
    elif hasattr(acts, "shape"):
        raise TypeError(
            f"{arg}: expected a sequence or mapping of per-layer arrays, got one "
            f"array of shape {tuple(acts.shape)}; wrap a single layer as [x]"
        )
    else:
        raise TypeError(
            f"{arg}: expected a sequence or mapping of per-layer arrays, got {type(acts).__name__}"
        )
    if not arrays:
        raise ValueError(f"{arg}: no layers given (an empty {type(acts).__name__})")
    return names, arrays


def by_model(layers: Mapping[str, Any], models: Sequence[str]) -> dict[str, Any]:
    """Layers that stack models on their first axis as one model's layers, model by model:
    ``{"m/layer": layers[layer][i]}`` for the i-th name m of ``models`` (the order of a
    sweep's grid, see :meth:`jaxsim.SweepGrid.from_grid`)."""
    return {f"{m}/{k}": a[i] for i, m in enumerate(models) for k, a in layers.items()}


def reduced_layers(
    acts_a: Any,
    acts_b: Any,
    reduce: dict[str, Any],
    check_finite: bool,
    min_n: int = 2,
    why: str = "",
) -> tuple[list[str], list[Array], list[str], list[Array]]:
    """Both sides' layers, conv-reduced together (so "resize" finds one common size), then
    validated (finite, a shared n >= min_n) and flattened to ``(n, features)``."""
    rows, raw_a = named(acts_a, "acts_a")
    cols, raw_b = ([], []) if acts_b is None else named(acts_b, "acts_b")
    keys = [f"acts_a[{k!r}]" for k in rows] + [f"acts_b[{k!r}]" for k in cols]
    raw = dict(zip(keys, raw_a + raw_b))
    union = {k: _v.as_float_array(a, k) for k, a in raw.items()}
    _v.finite(raw, check_finite)
    union = conv.reduce_layers(union, **reduce)
    flat = list(_v.layers(union, check_finite_values=False).values())
    _v.same_n(dict(zip(union, flat)), min_n=min_n, why=why)
    return rows, flat[: len(rows)], cols, flat[len(rows) :]


def common_dtype(layers: Iterable[Array]) -> Any:
    return functools.reduce(jnp.promote_types, (a.dtype for a in layers))


def stack_trees(group: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *group)


def _shape_key(summary: Any) -> tuple:
    return tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(summary))


def shape_groups(summaries: Sequence[Any]) -> list[list[int]]:
    out: dict[tuple, list[int]] = {}
    for i, s in enumerate(summaries):
        out.setdefault(_shape_key(s), []).append(i)
    return list(out.values())


@jax.jit
def layer_poison(layers: list[Array]) -> Array:
    return jnp.stack([poison(x) for x in layers])


@jax.jit
def poisoned(values: Array, layers_a: list[Array], layers_b: list[Array] | None) -> Array:
    """``values`` NaN in the rows and columns of layers that hold a NaN or inf (see
    :func:`jaxsim._measure.poison`)."""
    rows = layer_poison(layers_a).astype(values.dtype)
    cols = rows if layers_b is None else layer_poison(layers_b).astype(values.dtype)
    return values + rows[:, None] + cols[None, :]


def side_labels(labels: Any, self_grid: bool, default: tuple[str, str]) -> tuple[str, str]:
    if labels is None:
        return (default[0], default[0]) if self_grid else default
    if isinstance(labels, str) or len(labels) != 2:
        raise TypeError(f"labels: expected two names (rows, columns), got {labels!r}")
    return str(labels[0]), str(labels[1])
