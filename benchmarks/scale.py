"""Scale: RBF bandwidth by selection, Gram block sizes, compile counts, sharded grids.

    python benchmarks/scale.py            # ~3 minutes on 2 CPU cores

Every ratio compares two ways of computing the same thing in this run:
1. the RBF median bandwidth by exact selection on the float bit pattern vs the sort behind
   ``jnp.median`` (same value), and ``gram_rbf`` against a linear Gram plus its exp;
2. the Gram-route grid at n just above a block boundary, with blocks sized from n vs the
   former fixed 512-row blocks (padding cliff);
3. first call (compiles) vs steady state of a 24-layer mean-CCA grid over 1 and 4 widths,
   and over 4 close widths with and without width buckets;
4. (8 host devices, a subprocess) linear-CKA grids of example-sharded layers: per-device
   FLOPs from the compiled programs and wall time against one device, for the feature
   route, the Gram route and a minibatch CKA update; and a 48-layer PWCCA grid whose
   pairs are divided among the devices (the layer axis);
5. the memory an RBF-CKA grid's and a mutual-kNN layer's compiled programs need at
   n = 4096 and 8192, against the n x n matrices they held before, and the time of an
   RBF layer's source (bandwidth and centering row) block by block vs from its n x n
   distances.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import timeit  # noqa: E402

import jaxsim  # noqa: E402
from jaxsim import (  # noqa: E402
    _distances,
    _gram_route,
    _kernel_blocks,
    _measure,
    _pairwise,
    _rbf_median,
    kernel,  # noqa: E402
)


def rbf_median(rng):
    print("1. RBF bandwidth: median of the n^2 squared distances (float32)")
    print(
        f"{'n':>6} {'selection s':>12} {'sort s':>8} {'ratio':>6} {'same':>5}  "
        f"{'gram_rbf / (linear Gram + exp)':>31}"
    )
    select = jax.jit(_rbf_median.median_of_non_negative)
    sort = jax.jit(jnp.median)
    rbf = jax.jit(lambda x: kernel._gram_rbf(x, jnp.float32(1)))
    linear_exp = jax.jit(lambda x: jnp.exp(-_distances.sq_distances(x)))
    for n in (2048, 4096):
        x = jnp.asarray(rng.normal(size=(n, 64)), jnp.float32)
        d = jax.jit(_distances.sq_distances)(x)
        t_sel, t_sort = timeit(select, d), timeit(sort, d)
        same = float(select(d)) == float(sort(d))
        ratio = timeit(rbf, x) / timeit(linear_exp, x)
        print(
            f"{n:6d} {t_sel:12.3f} {t_sort:8.3f} {t_sort / t_sel:5.1f}x {str(same):>5}  "
            f"{ratio:30.1f}x"
        )


def padding(rng):
    print("\n2. Gram-route grid, 8 layers of width 64: blocks sized from n vs fixed 512 rows")
    print(
        f"{'n':>6} {'rows now':>9} {'s now':>7} {'rows before':>12} {'s before':>9} "
        f"{'before/now':>10}"
    )
    sized = _gram_route.block_size
    fixed = lambda n, layers=1: n if n <= 1024 else 512
    for n in (1025, 1537, 2049):
        layers = [rng.normal(size=(n, 64)).astype(np.float32) for _ in range(8)]
        run = lambda: jaxsim.similarity_grid(layers, method="gram").values
        times = {}
        for label, rule in (("now", sized), ("before", fixed)):
            _gram_route.block_size = rule
            try:
                times[label] = timeit(run)
            finally:
                _gram_route.block_size = sized
        rows = lambda rule: -(-n // rule(n)) * rule(n)
        print(
            f"{n:6d} {rows(sized):9d} {times['now']:7.3f} {rows(fixed):12d} "
            f"{times['before']:9.3f} {times['before'] / times['now']:9.2f}x"
        )


def compiles(rng):
    print("\n3. 24-layer mean-CCA self-grid, n=1024: first call (compiles) vs steady state")
    print(
        f"{'widths':>14} {'first s':>8} {'steady s':>9} {'prepare traces':>15} {'pair traces':>12}"
    )
    default = _pairwise.WIDEN_SLACK
    # close widths, first without width buckets (every width its own shape group), then
    # padded to one bucket (jaxsim's default); the widths of each row are new shapes
    for widths, slack in (
        ((91, 93, 95, 97), 0.0),
        ((91, 93, 95, 97), None),
        ((64,), None),
        ((32, 48, 64, 96), None),
    ):
        layers = [
            rng.normal(size=(1024, widths[i % len(widths)])).astype(np.float32) for i in range(24)
        ]
        _pairwise.WIDEN_SLACK = default if slack is None else slack
        before = dict(_measure.TRACE_COUNT)
        t0 = time.perf_counter()
        jax.block_until_ready(
            jaxsim.similarity_grid(layers, metric="mean_cca", progress=False).values
        )
        first = time.perf_counter() - t0
        traced = {k: _measure.TRACE_COUNT[k] - before.get(k, 0) for k in ("prepare", "pairs")}
        steady = timeit(
            lambda: jaxsim.similarity_grid(layers, metric="mean_cca", progress=False).values
        )
        print(
            f"{str(widths):>14} {first:8.2f} {steady:9.3f} {traced['prepare']:15d} "
            f"{traced['pairs']:12d}{'   (no width buckets)' if slack == 0 else ''}"
        )
    _pairwise.WIDEN_SLACK = default


SHARDED = textwrap.dedent("""
    import time, jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxsim
    from jaxsim import _validation, kernel
    # host devices stand in for accelerators: time the multi-device programs themselves
    # (outside jit jaxsim would gather host-device arrays first, see gathers_host_meshes)
    _validation.gathers_host_meshes = lambda: False

    def best(fn, *args, repeat=3):
        jax.block_until_ready(fn(*args))
        out = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - t0)
        return min(out)

    def flops_of(compiled):
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost.get("flops", float("nan"))

    def flops(fn, *args):
        return flops_of(jax.jit(fn).lower(*args).compile())

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rng = np.random.default_rng(0)
    print(f"{'route':>9} {'n':>5} {'widths':>10} {'FLOPs/device 8 vs 1':>20} "
          f"{'s 1 device':>11} {'s 8 devices':>12}")
    from jaxsim import _pairwise, _sharding
    # (n = 512: one Gram block on one device, so that XLA, which counts a loop body once,
    # counts every product)
    for method, n, d in (("features", 4096, 64), ("gram", 512, 512)):
        layers = [rng.normal(size=(n, d)).astype(np.float32) for _ in range(6)]
        spread = [jax.device_put(x, NamedSharding(mesh, P("batch"))) for x in layers]
        one = [jax.device_put(x, jax.devices()[0]) for x in layers]
        fn = lambda l: jaxsim.similarity_grid(l, method=method, progress=False).values
        if method == "gram":  # the ring over the mesh (eager: the sharding is visible)
            ring = _sharding.ring_program(mesh, "batch")
            ratio = flops(ring, spread) / flops(fn, one)
            print(f"{'gram ring':>9} {n:5d} {str((d,) * 6)[:10]:>10} {ratio:19.3f}x "
                  f"{best(fn, one):11.3f} {best(fn, spread):12.3f}")
        ratio = flops(fn, spread) / flops(fn, one)
        print(f"{method:>9} {n:5d} {str((d,) * 6)[:10]:>10} {ratio:19.3f}x "
              f"{best(jax.jit(fn), one):11.3f} {best(jax.jit(fn), spread):12.3f}"
              + ("   (under jit: the ring, on the mesh in the layers types)"
                 if method == "gram" else ""))

    # minibatch CKA: one minibatch sharded along examples, its U-centered Grams round the
    # ring (n = 512: one block per device pair, so XLA's count holds every product)
    batch = [rng.normal(size=(512, 512)).astype(np.float32) for _ in range(6)]
    spread = [jax.device_put(x, NamedSharding(mesh, P("batch"))) for x in batch]
    one = [jax.device_put(x, jax.devices()[0]) for x in batch]
    init = jaxsim.minibatch_cka_init(6, dtype=np.float32)
    update = lambda l: jaxsim.minibatch_cka_update(init, l).cross
    ring = _sharding.ring_program(mesh, "batch", True, False, np.dtype("float32"))
    ratio = flops(ring, spread) / flops(update, one)
    print(f"{'minibatch':>9} {512:5d} {str((512,) * 6)[:10]:>10} {ratio:19.3f}x "
          f"{best(update, one):11.3f} {best(update, spread):12.3f}")

    # pair-by-pair measures: the layer axis. 48 layers give 1176 pairs; on the mesh each
    # device evaluates 147 of them (FLOPs of the pair programs evaluating all their pairs in
    # one batch, so that XLA's count, one loop body, is all of them)
    from jaxsim import canonical
    print(f"{'pairs':>9} {'layers':>6} {'metric':>7} {'FLOPs/device 8 vs 1':>20} "
          f"{'s 1 device':>11} {'s 8 devices':>12}")
    layers = [rng.normal(size=(256, 24)).astype(np.float32) for _ in range(48)]
    m = canonical.pwcca_measure()
    summaries = tuple(m.prepare(x) for x in layers)
    ii, jj = (np.asarray(v, np.int32) for v in np.triu_indices(48))
    one = _pairwise.pair_batches.lower(m.pair, summaries, None, ii, jj, len(ii)).compile()
    k = -(-len(ii) // 8) * 8
    spread = _pairwise.spread_pairs(m.pair, k // 8, mesh).lower(
        summaries, None, np.resize(ii, k), np.resize(jj, k)).compile()
    ratio = flops_of(spread) / flops_of(one)
    fn = lambda l: jaxsim.similarity_grid(l, metric="pwcca", progress=False, warn=False).values
    on_mesh = [jax.device_put(x, NamedSharding(mesh, P())) for x in layers]
    print(f"{'spread':>9} {48:6d} {'pwcca':>7} {ratio:19.3f}x {best(fn, layers):11.3f} "
          f"{best(fn, on_mesh):12.3f}")
""")


@jax.jit
def _materialized_source(x):
    """The former RBF source: the layer's n x n distances at once, for the median
    (selection) and the centering row (what a single block still does)."""
    return _kernel_blocks.dense_source(*_distances.distance_terms(x), jnp.float32(1), False)


def rbf_memory(rng):
    print(
        "\n5. RBF-CKA self-grid of 8 layers (width 256, float32): temporaries of the compiled "
        "programs; a layer's source (median bandwidth, centering row) block by block vs "
        "from its n x n distances"
    )
    print(
        f"{'n':>6} {'source MB':>10} {'n x n source MB':>16} {'block sum MB':>13} "
        f"{'8 n x n kernels MB':>19} {'source s':>9} {'n x n source s':>15}"
    )
    blocks = kernel.rbf_measure().blocks
    for n in (4096, 8192):
        b = _gram_route.block_size(n, 8)
        n_pad = -(-n // b) * b
        x = jax.ShapeDtypeStruct((n, 256), np.float32)
        one = _gram_route.layer_source.lower(blocks.source, x, n_pad).compile()
        before = _materialized_source.lower(x).compile()
        sources = [jax.eval_shape(lambda a: blocks.source(a, n_pad), x)] * 8
        total = _gram_route.gram_block_sum.lower(
            blocks, sources, *_gram_route.block_pairs(n, b, np.float32), b
        ).compile()
        mb = lambda v: v / 2**20
        data = jnp.asarray(rng.normal(size=(n, 256)).astype(np.float32))
        new = _gram_route.layer_source(blocks.source, data, n_pad)
        same = float(new.median) == float(before(data)[0])
        print(
            f"{n:6d} {mb(one.memory_analysis().temp_size_in_bytes):10.0f} "
            f"{mb(before.memory_analysis().temp_size_in_bytes):16.0f} "
            f"{mb(total.memory_analysis().temp_size_in_bytes):13.0f} {mb(8 * n * n * 4):19.0f} "
            f"{timeit(lambda: one(data)):9.3f} {timeit(lambda: before(data)):15.3f}"
            f"{'' if same else '  (medians differ in the last bit: block-wise rounding)'}"
        )
    print(
        "   mutual kNN (k=10): a layer's neighbours, kept and temporary, vs its former "
        "n x n 0/1 matrix"
    )
    from jaxsim import geometry

    for n in (4096, 8192):
        x = jax.ShapeDtypeStruct((n, 256), np.float32)
        memory = (
            jax.jit(lambda a: geometry._knn_indices(a, 10)).lower(x).compile().memory_analysis()
        )
        print(
            f"{n:6d} kept {memory.output_size_in_bytes / 2**20:.2f} MB, temporary "
            f"{memory.temp_size_in_bytes / 2**20:.0f} MB, n x n {n * n * 4 / 2**20:.0f} MB"
        )


def sharded():
    print(
        "\n4. linear-CKA grids and minibatch CKA of 6 layers sharded along examples over 8 "
        "host devices (ideal FLOPs/device 0.125x)"
    )
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=900
    )
    print(out.stdout.rstrip() or out.stderr[-2000:])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default="1,2,3,4,5", metavar="K,K,...", help="the sections to run (default: all)"
    )
    only = {int(k) for k in parser.parse_args().only.split(",")}
    rng = np.random.default_rng(0)
    for k, section in ((1, rbf_median), (2, padding), (3, compiles), (4, sharded), (5, rbf_memory)):
        if k in only:
            section() if section is sharded else section(rng)
