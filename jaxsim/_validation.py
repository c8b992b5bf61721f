"""Input checks that run before the jitted cores.

Every public function converts and checks its arguments here, outside ``jax.jit``, so a
bad argument fails with a message that names it instead of a NaN or an XLA error. Shape
checks also work on tracers (under a user's ``jit``/``vmap``); the finiteness check needs
concrete values and is skipped for tracers or when ``check_finite=False``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def as_float_array(x: Any, name: str) -> Array:
    """Converts ``x`` to a floating jax array; integers and bools go to the default float."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            x = np.asarray(x)
        except Exception as err:  # ragged lists and the like
            raise TypeError(f"{name}: expected an array, got {type(x).__name__} ({err})") from None
        dtype = x.dtype
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{name}: complex dtype {dtype} is not supported; pass real activations")
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise TypeError(f"{name}: expected a numeric array, got dtype {dtype}")
    if not np.issubdtype(dtype, np.floating):
        return jnp.asarray(x, dtype=jnp.result_type(float))
    return jnp.asarray(x)


def check_finite(x: Any, name: str, enabled: bool = True) -> None:
    if not enabled or _is_tracer(x):
        return
    # host arrays are checked on the host: no device round trip per layer
    xp = np if isinstance(x, np.ndarray) else jnp
    bad = ~xp.isfinite(x)
    if bool(xp.any(bad)):
        count = int(xp.sum(bad))
        raise ValueError(
            f"{name}: contains {count} non-finite value(s) (NaN or inf) in an array of shape "
            f"{tuple(x.shape)}; pass check_finite=False to skip this check"
        )


def activations(x: Any, name: str, *, check_finite_values: bool = True) -> Array:
    """An ``(n, ...)`` activation array, flattened to ``(n, features)``."""
    raw = x
    x = as_float_array(x, name)
    if x.ndim < 2:
        raise ValueError(
            f"{name}: expected activations of shape (n, features...), got shape {tuple(x.shape)}; "
            "reshape a single feature to (n, 1)"
        )
    if x.shape[1:] and math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name}: has no features, shape {tuple(x.shape)}")
    check_finite(raw if isinstance(raw, np.ndarray) and raw.dtype.kind == "f" else x, name,
                 check_finite_values)
    return x.reshape(x.shape[0], -1)


def same_n(arrays: dict[str, Array], *, min_n: int = 2, why: str = "") -> int:
    """Checks that every array has the same number of examples, at least ``min_n``."""
    items = list(arrays.items())
    n = items[0][1].shape[0]
    for name, a in items[1:]:
        if a.shape[0] != n:
            raise ValueError(
                f"{name}: has {a.shape[0]} examples (shape {tuple(a.shape)}) but "
                f"{items[0][0]} has {n} (shape {tuple(items[0][1].shape)}); axis 0 must index "
                "the same examples in both"
            )
    if n < min_n:
        names = ", ".join(name for name, _ in items)
        raise ValueError(
            f"{names}: need at least {min_n} examples{why}, got n={n} "
            f"(shape {tuple(items[0][1].shape)})"
        )
    return n


def _two(a: Array, b: Array, names: tuple[str, str], min_n: int, why: str
         ) -> tuple[Array, Array]:
    same_n({names[0]: a, names[1]: b}, min_n=min_n, why=why)
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)


def pair(x: Any, y: Any, *, min_n: int = 2, why: str = "", check_finite: bool = True,
         names: tuple[str, str] = ("x", "y")) -> tuple[Array, Array]:
    """Converts and checks two activation arrays that must share n; returns a common dtype."""
    return _two(activations(x, names[0], check_finite_values=check_finite),
                activations(y, names[1], check_finite_values=check_finite), names, min_n, why)


def gram(k: Any, name: str, *, check_finite_values: bool = True) -> Array:
    k = as_float_array(k, name)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"{name}: expected a square (n, n) Gram matrix, got shape {tuple(k.shape)}")
    check_finite(k, name, check_finite_values)
    return k


def gram_pair(k: Any, l: Any, *, min_n: int = 2, why: str = "", check_finite: bool = True,
              names: tuple[str, str] = ("gram_x", "gram_y")) -> tuple[Array, Array]:
    return _two(gram(k, names[0], check_finite_values=check_finite),
                gram(l, names[1], check_finite_values=check_finite), names, min_n, why)


def positive(value: Any, name: str) -> float:
    if _is_tracer(value):
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a positive number, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name}: must be a positive finite number, got {value!r}")
    return v


def non_negative(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number >= 0, got {value!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    return v


def choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}; got {value!r}")
    return value
