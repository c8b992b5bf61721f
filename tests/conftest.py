import os
import subprocess
import sys
import tempfile

# Tests compile about a thousand small programs and run each for milliseconds, so
# compiling is most of their time: XLA's cheapest CPU code generation (no LLVM
# optimization, the classic elemental fusion emitters, one code-generation unit) compiles
# 3x faster than the default (no fast-math; the suite passes under both, and float32
# accuracy is also checked on a GPU by benchmarks/device_check.sh), and a persistent
# cache lets the parallel workers (pytest-xdist) share what either compiled.
#
# XLA aborts the process on a flag it does not know (jaxlib 0.11 dropped the fusion
# emitters' switch), so the flags this jaxlib accepts are found once, in a child process,
# before XLA starts here; the xdist workers inherit the result.
_FAST_COMPILE = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)


def _accepted(flags):
    probe = "import jax; jax.devices('cpu')"
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    return (
        subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, timeout=120
        ).returncode
        == 0
    )


if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = " ".join(
        _FAST_COMPILE if _accepted(_FAST_COMPILE) else [f for f in _FAST_COMPILE if _accepted([f])]
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from jaxsim import _gram_route  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(tempfile.gettempdir(), "jaxsim-test-compilation-cache"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25)
settings.load_profile("ci")


def subprocess_env(xla_flags: str = "", **extra: str) -> dict[str, str]:
    """Environment of a test's child Python process: CPU only, the same cheap XLA code
    generation as here plus ``xla_flags``, and the shared persistent compilation cache."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip(),
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.1",
        **extra,
    )


@pytest.fixture
def x64():
    """float64 for one test, restored even when the test fails."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def related(rng, n=200, d1=12, d2=9, noise=0.5):
    """Two activation sets that share structure: y is a nonlinear map of x plus noise."""
    x = rng.normal(size=(n, d1))
    y = np.tanh(x @ rng.normal(size=(d1, d2))) + noise * rng.normal(size=(n, d2))
    return x, y


def orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def block_grid_memory(blocks, n, d, num_layers):
    """Memory statistics of the two compiled programs of a block-accumulated grid over
    ``num_layers`` float32 layers of shape (n, d), read without running them: one layer's
    source, and the sum over all block pairs, in blocks of at most 512 rows (a CPU's; an
    accelerator's are larger, within ``grid._SLAB_BUDGET``). Returns
    ``(source, block_sum, n_pad)``."""

    b = _gram_route.block_size(n, num_layers, target=512)
    n_pad = -(-n // b) * b
    x = jax.ShapeDtypeStruct((n, d), np.float32)
    one = _gram_route.layer_source.lower(blocks.source, x, n_pad).compile()
    sources = [jax.eval_shape(lambda v: blocks.source(v, n_pad), x)] * num_layers
    total = _gram_route.gram_block_sum.lower(
        blocks, sources, *_gram_route.block_pairs(n, b, np.float32), b
    ).compile()
    return one.memory_analysis(), total.memory_analysis(), n_pad
