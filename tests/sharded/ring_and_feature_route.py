"""8 host devices: minibatch, ring and feature route (see _mesh.py; run by test_grid.py)."""

import jax
import numpy as np
from _mesh import layers, mesh, rng, wide, widths
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsim
from jaxsim import _feature_route, _gram_route, _pairwise, _sharding, canonical

single = jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(3), layers)

# 1. one minibatch sharded over the mesh: its U-centered Gram blocks go round the ring
# (no activations gathered), same numbers; under jit XLA partitions it
sharded = [jax.device_put(x, NamedSharding(mesh, P("batch"))) for x in layers]
spmd = jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(3), sharded)
np.testing.assert_allclose(
    jaxsim.minibatch_cka_result(spmd).values, jaxsim.minibatch_cka_result(single).values, rtol=1e-12
)
np.testing.assert_allclose(spmd.cross, single.cross, rtol=1e-12)
ring = _sharding.ring_program(mesh, "batch", True, False, np.dtype("float64"))
assert "all-gather" not in ring.lower(sharded).compile().as_text()
# a cross-grid round the ring forms only its cross pairs (5 layers: the slab path)
cross = jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(3, 2), sharded, sharded[:2])
want = jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(3, 2), layers, layers[:2])
np.testing.assert_allclose(cross.cross, want.cross, rtol=1e-12)
np.testing.assert_allclose(cross.self_b, want.self_b, rtol=1e-12)
jitted = jax.jit(jaxsim.minibatch_cka_update)(jaxsim.minibatch_cka_init(3), sharded)
np.testing.assert_allclose(jitted.cross, single.cross, rtol=1e-9)

# 2. shard_map: each device's shard is a minibatch, increments summed with psum
step = jax.shard_map(
    lambda s, xs: jaxsim.minibatch_cka_update(s, xs, axis_name="batch"),
    mesh=mesh,
    in_specs=(P(), P("batch")),
    out_specs=P(),
)
dist = jax.jit(step)(jaxsim.minibatch_cka_init(3), sharded)
seq = jaxsim.minibatch_cka_init(3)
for k in range(8):
    seq = jaxsim.minibatch_cka_update(seq, [x[8 * k : 8 * (k + 1)] for x in layers])
np.testing.assert_allclose(
    jaxsim.minibatch_cka_result(dist).values, jaxsim.minibatch_cka_result(seq).values, rtol=1e-6
)
assert float(dist.count) == 8

# 3. a grid of sharded layers: the cost model counts the work per device. The Gram
# route goes round a ring (each device its rows against the others' as they pass,
# ppermute), the feature route all-reduces d x d partial products: neither gathers
# the activations, both equal one device's grid
spread = [jax.device_put(x, NamedSharding(mesh, P("batch"))) for x in wide]
assert _feature_route.example_shards(spread) == 8 and _feature_route.example_shards(wide) == 1
assert _sharding.ring_axis(spread) == (mesh, "batch") and not _sharding.ring_axis(wide)
assert not _feature_route.use_feature_space(64, widths)
assert _feature_route.use_feature_space(64, widths, shards=8)  # Gram blocks computed whole
assert not _feature_route.use_feature_space(64, widths, shards=8, ring=True)
single = jaxsim.similarity_grid(wide).values
rings = _sharding.ring_program.cache_info()
alias = jaxsim.similarity_grid(spread, metric="cka", method="gram").values  # the alias too
after = _sharding.ring_program.cache_info()
assert after.hits + after.misses > rings.hits + rings.misses, "cka alias skipped the ring"
np.testing.assert_allclose(alias, single, rtol=1e-12, atol=1e-15)
for method in ("auto", "gram", "features"):
    np.testing.assert_allclose(
        jaxsim.similarity_grid(spread, method=method).values,
        single,
        rtol=1e-12,
        atol=1e-15,
        err_msg=method,
    )
np.testing.assert_allclose(
    jaxsim.similarity_grid(spread, method="gram", debiased=True).values,
    jaxsim.similarity_grid(wide, debiased=True).values,
    rtol=1e-12,
    atol=1e-15,
)
np.testing.assert_allclose(
    jaxsim.similarity_grid(spread[:2], spread[2:]).values, single[:2, 2:], rtol=1e-12, atol=1e-15
)
# the README's multi-host recipe (one process here holds every host's share)
sharding = NamedSharding(mesh, P("batch"))
global_arrays = [jax.make_array_from_process_local_data(sharding, x) for x in wide]
np.testing.assert_allclose(
    jaxsim.similarity_grid(global_arrays).values, single, rtol=1e-12, atol=1e-15
)
ring = _sharding.ring_program(mesh, "batch").lower(spread).compile()
assert "all-gather" not in ring.as_text() and "collective-permute" in ring.as_text()
flops = lambda compiled: (lambda c: (c[0] if isinstance(c, list) else c)["flops"])(
    compiled.cost_analysis()
)
gram_one = jax.jit(lambda l: jaxsim.similarity_grid(l, method="gram").values)
per_device = flops(ring) / flops(gram_one.lower(wide).compile())
assert per_device <= 0.25, per_device
# (under jit the layers are traced and their sharding unknown: name the route there)
route = lambda l: jaxsim.similarity_grid(l, method="features").values
hlo = jax.jit(route).lower(spread).compile().as_text()
assert "all-gather" not in hlo, "the feature route must not gather the activations"

# a layer whose unbiased HSIC is 0 (orthogonal patterns) scores 0 round the ring too
onehot = jax.device_put(np.diag(rng.uniform(0.5, 2, 64)) + 3.0, NamedSharding(mesh, P("batch")))
ring_grid = jaxsim.similarity_grid([onehot, spread[0]], method="gram", debiased=True).values
assert np.all(np.asarray(ring_grid)[0] == 0), ring_grid
st = jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(1, 1), [onehot], [spread[0]])
assert float(jaxsim.minibatch_cka_result(st).values[0, 0]) == 0
# a NaN in a sharded layer (the check skipped) gives NaN round the ring, eager and under
# jit, and in a minibatch update; the other layers' values stay finite
bad = wide[0].copy()
bad[5, 3] = np.nan
bad = jax.device_put(bad, NamedSharding(mesh, P("batch")))
nan_grid = lambda l: jaxsim.similarity_grid(l, method="gram", check_finite=False).values
for values in (nan_grid([bad] + spread[1:]), jax.jit(nan_grid)([bad] + spread[1:])):
    values = np.asarray(values)
    assert np.isnan(values[0]).all() and np.isfinite(values[1:, 1:]).all(), values
st = jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(2), [bad, spread[1]], check_finite=False)
assert np.isnan(np.asarray(jaxsim.minibatch_cka_result(st, check_finite=False).values)[0]).all()

# 4. measures evaluated pair by pair (CCA family, Procrustes, RSA, ...) on layers that
# live on a mesh, replicated or sharded along examples: the pairs are divided among
# the devices (the layer axis), the same values as one device, eager and under jit
reps = [jax.device_put(x, NamedSharding(mesh, P())) for x in layers]
grid = lambda l: jaxsim.similarity_grid(l, metric="mean_cca", warn=False).values
np.testing.assert_allclose(grid(reps), grid(layers), rtol=1e-10)
np.testing.assert_allclose(grid(sharded), grid(layers), rtol=1e-10)
# under jit on auto axes the layers' types name no mesh: the mesh set by jax.set_mesh
# serves, also for layers that were not placed at all
# (and a jitted minibatch update goes round the ring there)
with jax.set_mesh(mesh):
    np.testing.assert_allclose(jax.jit(grid)(layers), grid(layers), rtol=1e-10)
    update = (
        jax.jit(jaxsim.minibatch_cka_update).lower(jaxsim.minibatch_cka_init(3), sharded).compile()
    )
    np.testing.assert_allclose(
        update(jaxsim.minibatch_cka_init(3), sharded).cross, spmd.cross, rtol=1e-12
    )
    hlo = update.as_text()
    assert "collective-permute" in hlo and "all-gather" not in hlo
# kernel grids (linear, RBF, Pearson RSA) of layers replicated on the mesh: each
# device sums its share of the block pairs (n = 1100: 6), the partial sums all-reduced
long = [rng.normal(size=(1100, d)) for d in (3, 4)]
long[1][:, :3] += long[0]
on_mesh = [jax.device_put(x, NamedSharding(mesh, P())) for x in long]
before = _gram_route.spread_block_sum.cache_info()
np.testing.assert_allclose(
    jaxsim.similarity_grid(on_mesh, method="gram").values,
    jaxsim.similarity_grid(long, method="gram").values,
    rtol=1e-12,
)
after = _gram_route.spread_block_sum.cache_info()
assert after.hits + after.misses > before.hits + before.misses
# per device 1/8 of the pairs: 36 pairs of 8 layers, 5 per device (the last padded),
# FLOPs of the compiled programs evaluating all pairs in one batch
m = canonical.cca_measure()
eight = tuple(m.prepare(rng.normal(size=(64, 6))) for _ in range(8))
ii, jj = (np.asarray(v, np.int32) for v in np.triu_indices(8))
one = _pairwise.pair_batches.lower(m.pair, eight, None, ii, jj, 36).compile()
assert _sharding.layer_mesh(reps) == mesh and _sharding.layer_mesh(layers) is None
spread_pairs = _pairwise.spread_pairs(m.pair, 5, mesh)
ii, jj = np.resize(ii, 40), np.resize(jj, 40)
per_device = flops(spread_pairs.lower(eight, None, ii, jj).compile()) / flops(one)
assert per_device <= 0.25, per_device
# a sweep of 3 models whose examples are divided among the devices: the same values as on
# one device (one grid of the models' layers, round the ring for linear CKA)
stack = {f"l{k}": np.stack([x + 0.1 * m for m in range(3)]) for k, x in enumerate(layers)}
spread = {k: jax.device_put(v, NamedSharding(mesh, P(None, "batch"))) for k, v in stack.items()}
np.testing.assert_allclose(
    jaxsim.similarity_grid(spread, model_axis=0).values,
    jaxsim.similarity_grid(stack, model_axis=0).values,
    rtol=1e-12,
)
# a stacked ensemble captured with its inputs divided among the devices, under jit, the
# models in turn (a CPU's path) and vmapped (an accelerator's): the single-device arrays,
# and its minibatch sweep the same
from flax import nnx  # noqa: E402

from jaxsim import flax as jflax  # noqa: E402


class Conv(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.head = nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv(x)).mean(axis=(1, 2)))


ensemble = nnx.split_rngs(splits=3)(nnx.vmap(Conv, in_axes=0, out_axes=0))(nnx.Rngs(0))
images = rng.normal(size=(64, 6, 6, 3))
spread_images = jax.device_put(images, NamedSharding(mesh, P("batch")))
want = jflax.capture_nnx(ensemble, images, model_axis=0)
original = jflax._SEQUENTIAL_MODELS
for sequential in (True, False):
    jflax._SEQUENTIAL_MODELS = lambda s=sequential: s
    got = jax.jit(lambda m, x: jflax.capture_nnx(m, x, model_axis=0))(ensemble, spread_images)
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14, err_msg=k)
    batches = [spread_images[i : i + 16] for i in range(0, 64, 16)]
    np.testing.assert_allclose(
        jflax.minibatch_grid(ensemble, batches, model_axis=0, progress=False).values,
        jflax.minibatch_grid(ensemble, [images[i : i + 16] for i in range(0, 64, 16)],
                             model_axis=0, progress=False).values,
        rtol=1e-10,
    )  # fmt: skip
jflax._SEQUENTIAL_MODELS = original
# padded pair grids (PWCCA, Procrustes: widths 10, 40 and 64 share one bucket) with
# their pairs divided among the devices, under jit: the single-device values
narrow = [rng.normal(size=(256, 8)) @ rng.normal(size=(8, d)) + rng.normal(size=(256, d))
          for d in (10, 40, 64)]  # fmt: skip
replicated = [jax.device_put(x, NamedSharding(mesh, P())) for x in narrow]
for metric in ("pwcca", "procrustes"):
    grid = jax.jit(lambda a, metric=metric: jaxsim.similarity_grid(a, metric=metric).values)
    np.testing.assert_allclose(
        grid(replicated), jaxsim.similarity_grid(narrow, metric=metric).values, rtol=1e-10
    )
print("sharded ok")
