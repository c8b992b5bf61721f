"""8 host devices (run by test_grid.py in a child process; unlike _mesh.py's scripts, with
jaxsim's host-device gather on, as a user runs it).

A PWCCA grid of layers sharded along their examples, after linear-CKA grids of the same
layers (eager, and under jit when ``jit`` is passed), must complete and equal one
device's grid: XLA's CPU
collectives abort the process when devices reach them 40 s apart, and pairs that call
into host LAPACK (PWCCA's signs) did so (``Termination timeout for all gather``)."""

import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsim

assert jax.device_count() == 8, jax.devices()
n, widths = int(sys.argv[1]), [int(w) for w in sys.argv[2].split(",")]
mesh = jax.make_mesh((8,), ("batch",))
rng = np.random.default_rng(0)
raw = [np.maximum(rng.normal(size=(n, d)) + 0.3, 0).astype(np.float32) for d in widths]
acts = [jax.device_put(v, NamedSharding(mesh, P("batch"))) for v in raw]
cka = jaxsim.similarity_grid(raw, progress=False).values
print("eager cka", flush=True)
np.testing.assert_allclose(jaxsim.similarity_grid(acts, progress=False).values, cka, rtol=2e-5)
if "jit" in sys.argv[3:]:  # the ring's collectives: only eager calls avoid them
    print("jit cka", flush=True)
    np.testing.assert_allclose(
        jax.jit(lambda a: jaxsim.similarity_grid(a).values)(acts), cka, rtol=2e-5
    )
want = jaxsim.similarity_grid(raw, metric="pwcca", epsilon=1e-6, progress=False).values
got = jaxsim.similarity_grid(acts, metric="pwcca", epsilon=1e-6, progress=False).values
np.testing.assert_array_equal(got, want)
print("sharded pwcca ok")
