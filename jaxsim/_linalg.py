"""Matrix decompositions that never deadlock XLA's CPU thread pool.

jaxlib 0.10 runs a *batched* LAPACK decomposition (``syevd``, ``gesdd``, ``geqrf``, ...)
by splitting the batch over XLA's intra-op thread pool and blocking a pool thread until
the pieces finish (``ParallelBatchMap`` -> ``BlockingCounter::Wait``). When as many such
calls run at once as the pool has threads (two on a 2-core machine; a ``vmap``-ed
decomposition inside ``lax.map`` or a while loop is enough), every pool thread waits on
work queued behind it: the process hangs forever at 0% CPU.

On the CPU backend every decomposition here is therefore applied one matrix at a time
under ``vmap`` (``jax.custom_batching.sequential_vmap``: a loop of unbatched LAPACK
calls, which run inline). Unbatched calls still run concurrently with other work, and
newer jaxlibs loop over a batch sequentially anyway, so little speed is lost. Reverse-mode
differentiation, which ``sequential_vmap`` lacks, comes back through a ``custom_vjp``
whose backward pass is the decomposition's own VJP, recomputed one matrix at a time. On
GPU and TPU the decompositions are left batched (the vendors' batched solvers are fast
and do not share a blocking pool).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


@functools.lru_cache(maxsize=None)
def _one_at_a_time(fn: Callable[[jax.Array], Any]) -> Callable[[jax.Array], Any]:
    """``fn`` applied matrix by matrix under ``vmap``, differentiable in reverse mode."""
    seq = jax.custom_batching.sequential_vmap(fn)
    seq_vjp = jax.custom_batching.sequential_vmap(lambda x, ct: jax.vjp(fn, x)[1](ct)[0])

    @jax.custom_vjp
    def run(x):
        return seq(x)

    run.defvjp(lambda x: (seq(x), x), lambda x, ct: (seq_vjp(x, ct),))
    return run


def _guarded(fn: Callable[[jax.Array], Any], x: jax.Array) -> Any:
    return _one_at_a_time(fn)(x) if _on_cpu() else fn(x)


def _svd_values(x: jax.Array) -> jax.Array:
    return jnp.linalg.svd(x, compute_uv=False)


def _svd_thin(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(jnp.linalg.svd(x, full_matrices=False))


def _svd_full(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(jnp.linalg.svd(x, full_matrices=True))


def _eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return tuple(jnp.linalg.eigh(x))


def _qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return tuple(jnp.linalg.qr(x))


def singular_values(x: jax.Array) -> jax.Array:
    """``jnp.linalg.svd(x, compute_uv=False)``, safe under ``vmap`` on CPU."""
    return _guarded(_svd_values, x)


def svd(x: jax.Array, *, full_matrices: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SVD ``(u, s, vh)`` (thin by default), safe under ``vmap`` on CPU."""
    return _guarded(_svd_full if full_matrices else _svd_thin, x)


def eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh``, safe under ``vmap`` on CPU."""
    return _guarded(_eigh, x)


def qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reduced QR, safe under ``vmap`` on CPU."""
    return _guarded(_qr, x)
