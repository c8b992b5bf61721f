"""8 host devices: float32 and under jit (see _mesh.py; run by test_grid.py)."""

import jax
import numpy as np
from _mesh import mesh, rng
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsim
from jaxsim import _gram_route

# 4. float32 layers sharded over the mesh, eager and under jit, against one device:
# the Gram ring and, under jit, the blocked Gram route (n = 1600: 4 block pairs);
# the RBF median by selection, pairwise grids scattered on the device
put = lambda layers: [jax.device_put(x, NamedSharding(mesh, P("batch"))) for x in layers]
long = [rng.normal(size=(1600, d)).astype(np.float32) for d in (2, 3)]
long[1][:, :2] += long[0]
ref = jaxsim.similarity_grid(long, method="gram", progress=False).values
gram = lambda l: jaxsim.similarity_grid(l, method="gram", progress=True).values
np.testing.assert_allclose(gram(put(long)), ref, rtol=2e-5)
# under jit on auto axes the layers' types name their mesh, not their sharding: its
# one axis is the data axis, and the ring runs there too (no gather); for layers not
# placed at all, the mesh set with jax.set_mesh (each program compiled once: run as
# compiled, its text read)
compiled = jax.jit(gram).lower(put(long)).compile()
np.testing.assert_allclose(compiled(put(long)), ref, rtol=2e-5)
hlo = compiled.as_text()
assert "collective-permute" in hlo and "all-gather" not in hlo
with jax.set_mesh(mesh):
    compiled = jax.jit(gram).lower(long).compile()
    np.testing.assert_allclose(compiled(long), ref, rtol=2e-5)
    assert "collective-permute" in compiled.as_text()
# the ring in float32 for the debiased estimator and a minibatch, and on bfloat16
# activations (computed in float32), against one device
debiased = lambda l: jaxsim.similarity_grid(l, method="gram", debiased=True).values
np.testing.assert_allclose(debiased(put(long)), debiased(long), rtol=2e-5)
init = jaxsim.minibatch_cka_init(1, 1, dtype=np.float32)
np.testing.assert_allclose(
    jaxsim.minibatch_cka_update(init, put(long[:1]), put(long[1:])).cross,
    jaxsim.minibatch_cka_update(init, long[:1], long[1:]).cross,
    rtol=2e-5,
)
half = [x.astype(jax.numpy.bfloat16) for x in long]
np.testing.assert_allclose(gram(put(half)), gram(half), rtol=2e-5)
assert gram(put(half)).dtype == np.float32
# a cross-grid round the ring forms only its cross products (1 x 3 layers: a narrow
# side), eager and under jit, against one device
cols = [long[1], long[0] ** 2, np.sin(long[1])]
cross = lambda a, b: jaxsim.similarity_grid(a, b, method="gram").values
want = cross(long[:1], cols)
np.testing.assert_allclose(cross(put(long[:1]), put(cols)), want, rtol=2e-5)
np.testing.assert_allclose(jax.jit(cross)(put(long[:1]), put(cols)), want, rtol=2e-5)
# the RBF grid at n = 1104 (3 blocks): each layer's bandwidth and centering row found
# over distance blocks on every device from replicated data, the block pairs divided
rbf = lambda l: jaxsim.similarity_grid(l, metric="rbf_cka").values
mid = [x[:1104] for x in long]
np.testing.assert_allclose(rbf(put(mid)), rbf(mid), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(jax.jit(rbf)(put(mid)), rbf(mid), rtol=1e-5, atol=1e-6)
# one block (n = 600) of sharded layers, left to XLA's partitioner: its diagonal
# block formed as halves (a cond in the block loop), debiased, eager and under jit
six = [x[:600] for x in long]
rbf_u = lambda l: jaxsim.similarity_grid(l, metric="rbf_cka", debiased=True).values
np.testing.assert_allclose(rbf_u(put(six)), rbf_u(six), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(jax.jit(rbf_u)(put(six)), rbf_u(six), rtol=1e-5, atol=1e-6)
# the same in an accelerator's form (equal-width layers batched; forced here): one
# block under jit, left to XLA's partitioner; 3 blocks divided among the devices
six.append(six[0] ** 2)
want, batched, grouped = rbf_u(six), _gram_route.batched_blocks, _gram_route.grouped_products
traced = []
_gram_route.batched_blocks = lambda: True
_gram_route.grouped_products = lambda *a: traced.append(a[1]) or grouped(*a)
np.testing.assert_allclose(jax.jit(rbf_u)(put(six)), want, rtol=1e-5, atol=1e-6)
assert traced and traced[0] == ((0, 2), (1,)), traced
mid.append(mid[0] ** 2)  # 3 blocks: the block pairs divided among the devices
_gram_route.batched_blocks = batched
want = rbf(mid)
_gram_route.batched_blocks = lambda: True
traced.clear()
np.testing.assert_allclose(rbf(put(mid)), want, rtol=1e-5, atol=1e-6)
assert traced and traced[0] == ((0, 2), (1,)), traced
_gram_route.batched_blocks, _gram_route.grouped_products = batched, grouped
# (widths 8 and 9: mean CCA pads the 8s to 9; Pearson RSA accumulates RDM blocks)
small = [rng.normal(size=(64, d)).astype(np.float32) for d in (8, 9, 8)]
small[1][:, :8] += small[0]
for metric, opts in (
    ("rbf_cka", {}),
    ("pwcca", {}),
    ("mean_cca", {"warn": False}),
    ("rsa", {"compare": "pearson"}),
):
    grid = lambda l: jaxsim.similarity_grid(l, metric=metric, **opts).values
    ref = grid(small)
    np.testing.assert_allclose(grid(put(small)), ref, rtol=1e-5, atol=1e-6, err_msg=metric)
    np.testing.assert_allclose(jax.jit(grid)(put(small)), ref, rtol=1e-5, atol=1e-6, err_msg=metric)
print("sharded ok")
