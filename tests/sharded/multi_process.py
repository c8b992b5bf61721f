"""One of several local processes that jax.distributed joins into one program over the
CPU (gloo collectives): each holds its share of the examples as a global array, and the
sharded linear-CKA grid, a sharded minibatch CKA stream and a PWCCA grid must equal the
single-process values. Run by tests/test_grid.py as
``python multi_process.py PROCESS_ID NUM_PROCESSES PORT``."""

import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import jaxsim  # noqa: E402

assert jax.process_count() == num_processes and jax.device_count() == num_processes
rng = np.random.default_rng(0)  # every process draws the same data
n = 64 * num_processes
base = rng.normal(size=(n, 8))
full = [np.tanh(base @ rng.normal(size=(8, d))) + 0.1 * rng.normal(size=(n, d)) for d in (6, 6, 12)]
mesh = jax.make_mesh((num_processes,), ("batch",))
rows = NamedSharding(mesh, PartitionSpec("batch"))
mine = slice(64 * process_id, 64 * (process_id + 1))
spread = [jax.make_array_from_process_local_data(rows, x[mine]) for x in full]
assert not spread[0].is_fully_addressable


def local(values):
    """The grid's values as this process holds them (replicated across processes)."""
    return np.asarray(values.addressable_data(0))


cases = (("linear_cka", {"method": "gram"}), ("pwcca", {}))  # the ring; pairs spread
for metric, options in cases:
    count = 2 if metric == "pwcca" else 3  # two layers of one width: one pair step
    grid = lambda layers: jaxsim.similarity_grid(layers[:count], metric=metric, **options)
    got, want = local(grid(spread).values), np.asarray(grid(full).values)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14, err_msg=f"{metric} {options}")

state = jaxsim.minibatch_cka_init(3)
single = jaxsim.minibatch_cka_init(3)
for half in (slice(0, 32), slice(32, 64)):  # two minibatches, each spread over the processes
    batch = [jax.make_array_from_process_local_data(rows, x[mine][half]) for x in full]
    state = jaxsim.minibatch_cka_update(state, batch)
    whole = [np.concatenate([x[64 * p : 64 * (p + 1)][half] for p in range(num_processes)])
             for x in full]  # fmt: skip
    single = jaxsim.minibatch_cka_update(single, whole)
got = local(jaxsim.minibatch_cka_result(state).values)
np.testing.assert_allclose(
    got, np.asarray(jaxsim.minibatch_cka_result(single).values), rtol=1e-12, atol=1e-14
)
print(f"process {process_id}: ok")
