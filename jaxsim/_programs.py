"""A guard for long sessions on a CPU: compiled programs hold memory mappings.

Each program XLA:CPU compiles keeps about three memory mappings per kernel (code,
constants, data) for as long as JAX's caches hold it, which is the life of the process.
At the kernel's per-process limit (``/proc/sys/vm/max_map_count``, 65,530 by default)
LLVM's JIT can map nothing more and the process crashes. A session that calls measures on
hundreds of new shapes (a new number of examples each time, say) gets there; jaxsim's
eager entry points check the count after each call that compiled one of their programs.
"""

from __future__ import annotations

import warnings

import jax

from jaxsim._measure import TRACE_COUNT

SHARE = 0.75  # of the limit, past which the compiled programs are dropped


def traces() -> int:
    """How many times jaxsim's programs have been traced (each trace is a compile)."""
    return sum(TRACE_COUNT.values())


def _limit() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):  # not Linux
        return None


def _mappings() -> int:
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\n")


def relieve(traces_before: int) -> None:
    """After an eager call: if it compiled (:func:`traces` moved past ``traces_before``)
    and the process holds more than ``SHARE`` of the kernel's memory-mapping limit, drop
    JAX's compiled programs (``jax.clear_caches()``: later calls compile again) and say
    so. Reading the count costs milliseconds, so it is read only after a compile."""
    if traces() == traces_before:
        return
    limit = _limit()
    if limit is None:
        return
    held = _mappings()
    if held <= SHARE * limit:
        return
    jax.clear_caches()
    warnings.warn(
        f"this process held {held:,} memory mappings of the kernel's limit of {limit:,} "
        "(vm.max_map_count), most of them XLA's compiled programs, one per shape a "
        "function was called with; at the limit the process crashes. jaxsim dropped JAX's "
        "compiled programs (jax.clear_caches()): later calls compile again. To keep them, "
        "raise the limit (sysctl -w vm.max_map_count=262144) or call measures on fewer "
        "distinct shapes (a grid compiles per width group, not per pair).",
        RuntimeWarning,
        stacklevel=3,
    )
