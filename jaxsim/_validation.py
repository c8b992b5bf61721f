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
from jax import Array

from jaxsim._measure import poison


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def compute_dtype(dtype: Any) -> Any:
    """The dtype a measure computes in: float32 and float64 as given; bfloat16 and float16
    in float32 (their 8- and 11-bit significands cannot hold a Gram or a covariance);
    integers and bools in the default float (float64 when x64 is on)."""
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return np.dtype(np.float32) if dtype.itemsize < 4 else dtype
    return np.dtype(jnp.result_type(float))


def gathers_host_meshes() -> bool:
    """Whether arrays spread over several host (CPU) devices of this process are gathered
    into host memory on entry, outside ``jit`` and ``jax.set_mesh``: the computation then
    needs no collective. Host devices share the same cores, so dividing the work gains
    nothing, and XLA's CPU runtime can stall a collective whose devices reach it late
    (a loaded machine, host callbacks) and then abort the process. Tests of the
    multi-device programs, which host devices stand in for, turn this off."""
    return True


def _off_host_mesh(x: Any) -> Any:
    """``x`` as a NumPy array if it is a concrete jax array on several host devices of this
    process (see :func:`gathers_host_meshes`), else ``x``."""
    if not isinstance(x, jax.Array) or is_tracer(x) or not gathers_host_meshes():
        return x
    devices = x.sharding.device_set
    if len(devices) < 2 or not jax.sharding.get_abstract_mesh().empty:
        return x
    here = jax.process_index()
    if all(
        getattr(d, "platform", "") == "cpu" and getattr(d, "process_index", here) == here
        for d in devices
    ):
        return np.asarray(x)
    return x


def as_float_array(x: Any, name: str) -> Array:
    """Converts ``x`` to a jax array in its compute dtype (see :func:`compute_dtype`)."""
    x = _off_host_mesh(x)
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            x = np.asarray(x)
        except Exception as err:  # ragged lists and the like
            raise TypeError(f"{name}: expected an array, got {type(x).__name__} ({err})") from None
        dtype = x.dtype
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"{name}: complex dtype {dtype} is not supported; pass real activations")
    if not (jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_):
        raise TypeError(f"{name}: expected a numeric array, got dtype {dtype}")
    target = compute_dtype(dtype)
    return jnp.asarray(x) if dtype == target else jnp.asarray(x).astype(target)


@jax.jit
def _nonfinite(arrays: list[Array]) -> Array:
    """Whether each array holds an inf or NaN (its :func:`jaxsim._measure.poison` is NaN):
    one read of each array, which cannot overflow; the count is taken only for an array
    that failed (counting every array is several times slower)."""
    return jnp.stack([jnp.isnan(poison(a)) for a in arrays])


@jax.jit
def _nonfinite_count(a: Array) -> Array:
    return jnp.sum(~jnp.isfinite(a))


def finite(named: dict[str, Any], enabled: bool = True) -> None:
    """Raises if any array holds NaN or inf, naming the first such array.

    Host (numpy) arrays are checked on the host; device arrays of all layers in one
    fused reduction (one small device-to-host copy, however many layers); traced values
    cannot be inspected and are skipped. Safe inside a user's ``jit``/``grad``: arrays
    closed over there are concrete and are checked eagerly.
    """
    if not enabled:
        return
    named = {
        k: _off_host_mesh(a) if hasattr(a, "dtype") else np.asarray(a) for k, a in named.items()
    }
    host = {k: a for k, a in named.items() if isinstance(a, np.ndarray)}
    device = {k: a for k, a in named.items() if not isinstance(a, np.ndarray) and not is_tracer(a)}
    counts = {
        k: int(np.sum(~np.isfinite(a))) if a.dtype.kind in "fc" else 0 for k, a in host.items()
    }
    if device:
        with jax.ensure_compile_time_eval():
            flagged = np.asarray(_nonfinite(list(device.values())))
            counts.update(
                (k, int(_nonfinite_count(device[k])))
                for k, bad in zip(device, flagged.tolist())
                if bad
            )
    for name in named:
        if counts.get(name):
            raise ValueError(
                f"{name}: contains {counts[name]} non-finite value(s) (NaN or inf) in an array "
                f"of shape {tuple(named[name].shape)}; pass check_finite=False to skip this check"
            )


def _flat(x: Any, name: str) -> Array:
    """An ``(n, ...)`` activation array as ``(n, features)`` in its compute dtype."""
    x = as_float_array(x, name)
    if x.ndim < 2:
        raise ValueError(
            f"{name}: expected activations of shape (n, features...), got shape {tuple(x.shape)}; "
            "reshape a single feature to (n, 1)"
        )
    if x.shape[1:] and math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name}: has no features, shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def activations(x: Any, name: str, *, check_finite_values: bool = True) -> Array:
    """An ``(n, ...)`` activation array, flattened to ``(n, features)``."""
    out = _flat(x, name)
    finite({name: x}, check_finite_values)
    return out


def layers(named: dict[str, Any], *, check_finite_values: bool = True) -> dict[str, Array]:
    """Several activation arrays, flattened, with one finiteness check for all."""
    out = {k: _flat(a, k) for k, a in named.items()}
    finite(named, check_finite_values)
    return out


_TRANSPOSE_HINT = (
    "; if the arrays are laid out (neurons, n) as in google/svcca, pass their transposes (x.T)"
)


def same_n(arrays: dict[str, Array], *, min_n: int = 2, why: str = "") -> int:
    """Checks that every array has the same number of examples, at least ``min_n``."""
    items = list(arrays.items())
    n = items[0][1].shape[0]
    for name, a in items[1:]:
        if a.shape[0] != n:
            first = items[0][1]
            # (neurons, n) arrays share their second axis, longer than either first one
            looks_transposed = a.ndim == first.ndim == 2 and a.shape[1] == first.shape[1] > max(
                a.shape[0], n
            )
            hint = _TRANSPOSE_HINT if looks_transposed else ""
            raise ValueError(
                f"{name}: has {a.shape[0]} examples (shape {tuple(a.shape)}) but "
                f"{items[0][0]} has {n} (shape {tuple(first.shape)}); axis 0 must index "
                f"the same examples in both{hint}"
            )
    if n < min_n:
        names = ", ".join(name for name, _ in items)
        raise ValueError(
            f"{names}: need at least {min_n} examples{why}, got n={n} "
            f"(shape {tuple(items[0][1].shape)})"
        )
    return n


def _two(a: Array, b: Array, names: tuple[str, str], min_n: int, why: str) -> tuple[Array, Array]:
    same_n({names[0]: a, names[1]: b}, min_n=min_n, why=why)
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)


def pair(
    x: Any,
    y: Any,
    *,
    min_n: int = 2,
    why: str = "",
    check_finite: bool = True,
    names: tuple[str, str] = ("x", "y"),
) -> tuple[Array, Array]:
    """Converts and checks two activation arrays that must share n; returns a common dtype."""
    a, b = layers(dict(zip(names, (x, y))), check_finite_values=check_finite).values()
    return _two(a, b, names, min_n, why)


def gram(k: Any, name: str) -> Array:
    k = as_float_array(k, name)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(
            f"{name}: expected a square (n, n) Gram matrix, got shape {tuple(k.shape)}"
        )
    return k


def gram_pair(
    k: Any,
    l: Any,
    *,
    min_n: int = 2,
    why: str = "",
    check_finite: bool = True,
    names: tuple[str, str] = ("gram_x", "gram_y"),
) -> tuple[Array, Array]:
    a, b = gram(k, names[0]), gram(l, names[1])
    finite(dict(zip(names, (k, l))), check_finite)
    return _two(a, b, names, min_n, why)


def positive(value: Any, name: str) -> float:
    if is_tracer(value):
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
