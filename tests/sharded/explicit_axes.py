"""8 host devices: explicit mesh axes (see _mesh.py; run by test_grid.py)."""

import jax
import numpy as np
from _mesh import layers, wide

# 5. explicit sharding (AxisType.Explicit), where JAX refuses products that contract a
# sharded axis unasked: the ring divides linear CKA (eager, and under jit, where the
# sharding is in the layers' types); every other measure and route gathers first
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsim
from jaxsim import _sharding

explicit = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Explicit,))
with jax.set_mesh(explicit):
    spread = [jax.device_put(x, NamedSharding(explicit, P("batch"))) for x in wide]
    assert _sharding.ring_axis(spread)[1] == "batch"
    for opts in (
        {"method": "gram"},
        {"method": "features"},
        {"debiased": True},
        {"metric": "mean_cca", "warn": False},
    ):
        want = jaxsim.similarity_grid(wide, **opts).values
        fn = lambda l: jaxsim.similarity_grid(l, **opts).values
        np.testing.assert_allclose(fn(spread), want, rtol=1e-12, atol=1e-15, err_msg=str(opts))
        np.testing.assert_allclose(
            jax.jit(fn)(spread), want, rtol=1e-12, atol=1e-15, err_msg=str(opts)
        )
    # float32 under jit: the ring from the layers' types
    spread32 = [
        jax.device_put(x.astype(np.float32), NamedSharding(explicit, P("batch"))) for x in wide
    ]
    ring32 = jax.jit(lambda l: jaxsim.similarity_grid(l, method="gram").values)(spread32)
    np.testing.assert_allclose(
        ring32,
        jaxsim.similarity_grid([x.astype(np.float32) for x in wide], method="gram").values,
        rtol=2e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        jaxsim.linear_cka(spread[0], spread[1]), jaxsim.linear_cka(wide[0], wide[1]), rtol=1e-12
    )
    from jaxsim import stats

    key = jax.random.key(0)
    for metric in ("linear_cka", "mean_cca"):
        test = stats.permutation_test(metric, spread[0], spread[1], key=key, num_permutations=8)
        plain = stats.permutation_test(metric, wide[0], wide[1], key=key, num_permutations=8)
        np.testing.assert_allclose(test.null, plain.null, rtol=1e-12, err_msg=metric)
    batch = [jax.device_put(x, NamedSharding(explicit, P("batch"))) for x in layers]
    np.testing.assert_allclose(
        jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(3), batch).cross,
        jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(3), layers).cross,
        rtol=1e-12,
    )
print("sharded ok")
