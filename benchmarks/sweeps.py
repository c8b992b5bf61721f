"""Sweep grids: every layer of every seed against every layer of every seed, in one run.

    python benchmarks/sweeps.py [--quick] [--devices 8]

8 seeds x 20 layers (widths 256/512/768/1024), n=2048, float32, linear CKA:
- ``similarity_grid(acts, model_axis=0)``: all 160 layers in one Gram-route grid;
- a nested ``jax.vmap`` of ``similarity_grid`` over the two model axes (what a user
  writes without model_axis: each model pair's 40 layers, every Gram formed 2M times);
- a loop of per-pair ``linear_cka`` calls (jitted; timed on a sample of pairs and
  extrapolated to all M^2 L^2 of them).
The FLOP limit counts every layer's full Gram once and the grid as one product,
``2 n^2 (sum of widths + (M L)^2)``; the fraction is the median of three runs, each read
against the float32 matmul rate measured just before it. ``--devices 8`` runs the sweep
again with the examples divided among 8 host devices (in a fresh process).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import matmul_rate, paired_fraction, timeit  # noqa: E402


def sweep_layers(rng, models, n, widths):
    """{layer: (M, n, width)} float32, each model its own random features of a shared
    signal."""
    z = rng.normal(size=(n, 32)).astype(np.float32)
    return {
        f"layer{k:02d}": np.stack(
            [
                np.maximum(z @ rng.normal(size=(32, w)).astype(np.float32), 0)
                + rng.normal(size=(n, w)).astype(np.float32)
                for _ in range(models)
            ]
        )
        for k, w in enumerate(widths)
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 seeds x 6 layers, n=512")
    parser.add_argument("--devices", type=int, default=0, help="also on this many host devices")
    parser.add_argument("--sharded-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import jaxsim

    models, n, layers = (4, 512, 6) if args.quick else (8, 2048, 20)
    widths = [(256, 512, 768, 1024)[k % 4] for k in range(layers)]
    rng = np.random.default_rng(0)
    acts = sweep_layers(rng, models, n, widths)
    limit = 2 * n * n * (models * sum(widths) + (models * layers) ** 2)
    if args.sharded_child:
        return sharded(acts, limit)
    print(
        f"machine: float32 matmul {matmul_rate(np.float32) / 1e9:.0f} GFLOP/s (jax, full "
        f"precision) on {jax.devices()[0].device_kind}"
    )
    print(
        f"{models} seeds x {layers} layers (widths {min(widths)}-{max(widths)}), n={n}, "
        f"float32, linear CKA; FLOP limit {limit / 1e9:.0f} GFLOP"
    )
    sweep = lambda: jaxsim.similarity_grid(acts, model_axis=0, progress=False).values
    t, fraction = paired_fraction(sweep, limit)
    print(f"  sweep grid (model_axis=0)   {t:8.2f} s   {fraction:.0%} of the FLOP limit")

    stacked = [jax.device_put(v) for v in acts.values()]
    grid = lambda a, b: jaxsim.similarity_grid(a, b, progress=False).values
    nested = jax.jit(jax.vmap(jax.vmap(grid, in_axes=(None, 0)), in_axes=(0, None)))
    t_nested = timeit(nested, stacked, stacked, repeat=1)
    diff = np.abs(np.asarray(nested(stacked, stacked)) - np.asarray(sweep())).max()
    print(
        f"  nested vmap of grids        {t_nested:8.2f} s   sweep {t_nested / t:.1f}x faster; "
        f"max |difference| {diff:.1e}"
    )

    pair = jax.jit(lambda x, y: jaxsim.linear_cka(x, y, check_finite=False))
    flat = [v[m] for m in range(models) for v in stacked]
    count = len(flat) ** 2
    sample = [(i % len(flat), (7 * i + 3) % len(flat)) for i in range(40)]
    for i, j in sample[:3]:  # compile every shape pair first
        jax.block_until_ready(pair(flat[i], flat[j]))
    for i, j in sample:
        jax.block_until_ready(pair(flat[i], flat[j]))
    t0 = time.perf_counter()
    for i, j in sample:
        jax.block_until_ready(pair(flat[i], flat[j]))
    t_loop = (time.perf_counter() - t0) / len(sample) * count
    print(
        f"  loop of per-pair calls     ~{t_loop:8.1f} s   sweep {t_loop / t:.0f}x faster "
        f"(from {len(sample)} timed pairs of {count})"
    )
    if args.devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
        cmd = [sys.executable, __file__, "--sharded-child"] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        print(out.stdout.rstrip())
    return {"sweep_s": t, "fraction": fraction, "nested_s": t_nested, "loop_s": t_loop}


def sharded(acts, limit):
    """The sweep with each layer's examples divided among the host devices."""
    import jaxsim

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    on_mesh = {k: jax.device_put(v, spec) for k, v in acts.items()}
    sweep = lambda: jaxsim.similarity_grid(on_mesh, model_axis=0, progress=False).values
    t, fraction = paired_fraction(sweep, limit)
    local = jaxsim.similarity_grid(acts, model_axis=0, progress=False).values
    diff = np.abs(np.asarray(sweep()) - np.asarray(local)).max()
    print(
        f"  sweep on {jax.device_count()} host devices (examples divided) {t:8.2f} s   "
        f"{fraction:.0%} of the FLOP limit; max |difference| from one device {diff:.1e}"
    )


if __name__ == "__main__":
    main()
