"""Long computations finish: the jaxlib 0.10 batched-LAPACK deadlock, under a deadline.

Every reproducer runs in a fresh subprocess (a deadlock cannot be interrupted from the
same process, and 8 host devices must be requested before jax starts), which prints one
line per finished step, so a hang names the step that hung.
"""

import subprocess
import sys
import textwrap

import pytest
from conftest import subprocess_env

PRELUDE = """
import jax, numpy as np
import jaxsim
from jaxsim import stats

def done(step, value):
    jax.block_until_ready(value)
    print("finished", step, flush=True)

"""

ONE_DEVICE = textwrap.dedent("""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(397, 32)).astype(np.float32)
    y = (x[:, :16] + rng.normal(size=(397, 16))).astype(np.float32)
    key = jax.random.key(0)
    # the issue's reproducer: lax.map over several chunks of vmapped decompositions
    done("bootstrap pwcca", stats.bootstrap("pwcca", x, y, key=key, num_samples=200))
    # a grid of the CCA family: lax.map over pairs of prepared layers
    acts = {f"l{i}": rng.normal(size=(200, w)).astype(np.float32)
            for i, w in enumerate([24, 40, 24])}
    done("pwcca cross grid", jaxsim.similarity_grid(acts, [a + 0.1 for a in acts.values()],
                                                    metric="pwcca", epsilon=1e-6))
""")

# many host devices run their shards concurrently on one thread pool
SHARDED = textwrap.dedent("""
    from jax.sharding import NamedSharding, PartitionSpec as P
    rng = np.random.default_rng(0)
    x = rng.normal(size=(392, 32)).astype(np.float32)
    y = (x[:, :16] + rng.normal(size=(392, 16))).astype(np.float32)
    key = jax.random.key(0)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))
    done("sharded permutation svcca",
         stats.permutation_test("svcca", sharded(x), sharded(y), key=key,
                                num_permutations=64, batch_size=16, keep_dims=8))
    # an RBF grid's bandwidth passes over distance blocks in loops: left to XLA's
    # partitioner, a sharded layer's loops held an all-gather and an all-reduce, which
    # the CPU runtime ordered differently on different devices (a hang, then an abort,
    # under load); each layer's source is now computed on replicated data, locally
    long = [rng.normal(size=(1104, 3)).astype(np.float32) for _ in range(2)]
    done("sharded rbf grid", jaxsim.similarity_grid([sharded(a) for a in long],
                                                    metric="rbf_cka").values)
""")


def run(script, timeout, **env):
    env = subprocess_env(**env)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", PRELUDE + script],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        finished = [line for line in out.splitlines() if line.startswith("finished")]
        raise AssertionError(f"hung after: {finished or 'nothing'}") from None
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.count("finished")


def test_decompositions_never_deadlock():
    assert run(ONE_DEVICE, 180) == 2


@pytest.mark.slow  # suite time; the one-device reproducer runs in every test command
def test_sharded_decompositions_never_deadlock():
    assert run(SHARDED, 120, xla_flags="--xla_force_host_platform_device_count=8") == 2
