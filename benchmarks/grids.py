"""Layer grids and streaming minibatch CKA against pairwise NumPy loops, in one run.

    python benchmarks/grids.py [--quick] [--skip-notebook]

W1  linear-CKA self-grid, 24 layers (8 each of widths 256/512/1024), n=2048, float32
W2  linear-CKA cross-grid, 24 x 36 layers, n=4096, float32
W4  minibatch CKA, 24 x 24 layers, batches of 256: time per batch, and peak memory for
    20 versus 200 batches (each in a fresh process)
--large N L: a self-grid of L layers at N examples, both routes, first call and steady state

Baselines, timed in the same run: the notebook loop (each pair recomputes both Grams and
the unbiased HSIC with traces of n x n matrix products; timed on a few pairs and
extrapolated to the grid's pair count) and a careful loop (each Gram centered once,
then one elementwise inner product per pair, all in NumPy).

A fraction of the matmul rate counts the FLOPs a route performs (for the Gram route one
triangle of blocks of each Gram and of each inner product), not a careful loop's (whole
Grams, about twice as many, printed beside W1 and W2): the median over 3 runs, each
against the float32 matmul rate measured just before it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import matmul_rate, paired_fraction, timeit  # noqa: E402


def layers(rng, n, widths):
    return [rng.normal(size=(n, d)).astype(np.float32) for d in widths]


def notebook_cka(x, y):
    """What a typical notebook does for every pair."""
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)

    def hsic(a, b):
        one = np.ones(n, a.dtype)
        return (
            np.trace(a @ b)
            + one @ a @ one * (one @ b @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ a @ b @ one
        ) / (n * (n - 3))

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def careful_grid(acts_a, acts_b=None):
    """Each centered Gram once, then <K, L> per pair, in NumPy."""

    def centered(x):
        xc = x - x.mean(0)
        return xc @ xc.T

    ka = [centered(x) for x in acts_a]
    kb = ka if acts_b is None else [centered(y) for y in acts_b]
    na = [np.sqrt(np.vdot(k, k)) for k in ka]
    nb = na if acts_b is None else [np.sqrt(np.vdot(k, k)) for k in kb]
    out = np.zeros((len(ka), len(kb)))
    for i, k in enumerate(ka):
        for j, l in enumerate(kb):
            if acts_b is None and j < i:
                out[i, j] = out[j, i]
                continue
            out[i, j] = np.vdot(k, l) / (na[i] * nb[j])
    return out


def notebook_time(acts_a, acts_b, pairs: int, sample: int = 2) -> float:
    """Seconds for the notebook loop over ``pairs`` pairs, from ``sample`` timed pairs."""
    acts_b = acts_a if acts_b is None else acts_b
    idx = [(i % len(acts_a), (3 * i + 1) % len(acts_b)) for i in range(sample)]
    t0 = time.perf_counter()
    for i, j in idx:
        notebook_cka(acts_a[i], acts_b[j])
    return (time.perf_counter() - t0) / sample * pairs


def gram_flops(n, widths_a, widths_b, self_grid):
    """(a careful loop's FLOPs: every Gram whole and one n^2 inner product per ordered
    pair; the FLOPs the Gram route performs: one triangle of blocks of each Gram and of
    each inner product, the cost model's multiply-adds x 2)."""
    union = list(widths_a) + ([] if self_grid else list(widths_b))
    whole = 2 * n * n * sum(union) + 2 * len(widths_a) * len(widths_b) * n * n
    products = len(union) ** 2 if self_grid else len(widths_a) * len(widths_b) + len(union)
    return whole, n * n * (sum(union) + products)


def grid_workload(name, rng, n, widths_a, widths_b, skip_notebook):
    import jaxsim

    a = layers(rng, n, widths_a)
    b = None if widths_b is None else layers(rng, n, widths_b)
    self_grid = b is None
    pairs = len(a) * (len(a) + 1) // 2 if self_grid else len(a) * len(b)
    whole, flops = gram_flops(n, widths_a, widths_a if self_grid else widths_b, self_grid)
    t, fraction = paired_fraction(
        lambda: jaxsim.similarity_grid(a, b, progress=False).values, flops
    )
    tc = timeit(lambda: careful_grid(a, b), repeat=1, warmup=0)
    check = np.abs(
        np.asarray(jaxsim.similarity_grid(a, b, progress=False).values) - careful_grid(a, b)
    ).max()
    print(f"{name}: jaxsim {t:.2f} s, careful loop {tc:.2f} s ({tc / t:.1f}x)", end="")
    if not skip_notebook:
        tn = notebook_time(a, b, pairs)
        print(f", notebook loop ~{tn:.0f} s ({tn / t:.0f}x, from 2 timed pairs of {pairs})", end="")
    print(
        f"\n    performs {flops / 1e9:.0f} GFLOP (a careful loop {whole / 1e9:.0f}) -> "
        f"{flops / t / 1e9:.0f} GFLOP/s at best; {fraction:.0%} of the float32 matmul "
        f"rate; max |jaxsim - careful| = {check:.1e}"
    )


W4_CHILD = """
import sys, numpy as np, jax, jaxsim
from jaxsim import _gram_route, _layers
batches, n, widths = int(sys.argv[1]), int(sys.argv[2]), [int(w) for w in sys.argv[3].split(",")]
rng = np.random.default_rng(0)
proj = [rng.normal(size=(32, d)).astype(np.float32) for d in widths]
state = jaxsim.minibatch_cka_init(len(widths))
for b in range(batches):
    z = rng.normal(size=(n, 32)).astype(np.float32)
    previous = state
    state = jaxsim.minibatch_cka_update(state, [np.tanh(z @ p) for p in proj])
    jax.block_until_ready(previous)  # at most two steps in flight, as minibatch_grid runs
jax.block_until_ready(state)
# VmHWM, not ru_maxrss: the latter keeps the parent's high-water mark across fork + exec
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def minibatch_workload(rng, n, widths, quick):
    import jaxsim

    batch = [rng.normal(size=(n, d)).astype(np.float32) for d in widths]
    state = jaxsim.minibatch_cka_init(len(widths))
    t = timeit(lambda: jaxsim.minibatch_cka_update(state, batch), repeat=3)
    # the FLOP limit of one batch: every layer's full Gram and the grid as one product
    limit = 2 * n * n * (sum(widths) + len(widths) ** 2)
    k = 4 if quick else 20
    stacks = [jax.device_put(rng.normal(size=(k, n, d)).astype(np.float32)) for d in widths]
    device = [s[0] for s in stacks]

    def loop(check_finite=False):
        s = state
        for i in range(k):
            s = jaxsim.minibatch_cka_update(s, [x[i] for x in stacks], check_finite=check_finite)
        return s

    t_loop, f_loop = paired_fraction(loop, k * limit)
    t_sync, f_sync = paired_fraction(lambda: loop(True), k * limit)
    t_scan, f_scan = paired_fraction(lambda: jaxsim.minibatch_cka_scan(state, stacks), k * limit)
    t_dev = timeit(lambda: jaxsim.minibatch_cka_update(state, device), repeat=3)

    def numpy_update():
        grams = []
        for x in batch:
            xc = x - x.mean(0)
            k = xc @ xc.T
            np.fill_diagonal(k, 0)
            r = k.sum(0) / (n - 2)
            r -= r.sum() / (2 * (n - 1))
            k = k - r[:, None] - r[None, :]
            np.fill_diagonal(k, 0)
            grams.append(k)
        return [[np.vdot(k, l) for l in grams] for k in grams]

    tn = timeit(numpy_update, repeat=1, warmup=0)
    print(
        f"W4: minibatch update ({len(widths)} x {len(widths)} layers, batch {n}): jaxsim "
        f"{t * 1e3:.0f} ms/batch from NumPy, {t_dev * 1e3:.0f} ms from the device; NumPy loop "
        f"{tn * 1e3:.0f} ms/batch ({tn / t:.1f}x)\n"
        f"    {k} batches: a loop of updates {t_loop * 1e3:.0f} ms ({f_loop:.0%} of the FLOP "
        f"limit; checking each batch, a sync per batch: {t_sync * 1e3:.0f} ms, {f_sync:.0%}), "
        f"minibatch_cka_scan {t_scan * 1e3:.0f} ms ({f_scan:.0%}); NumPy loop "
        f"{k * tn:.1f} s ({k * tn / t_scan:.1f}x the scan)"
    )
    counts = (4, 40) if quick else (20, 200)
    peaks = []
    for c in counts:
        out = subprocess.run(
            [sys.executable, "-c", W4_CHILD, str(c), str(n), ",".join(map(str, widths))],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks.append(int(out.stdout.strip().splitlines()[-1]) / 1024)
    print(
        f"    peak memory (VmHWM): {counts[0]} batches {peaks[0]:.0f} MiB, {counts[1]} "
        f"batches {peaks[1]:.0f} MiB (ratio {peaks[1] / peaks[0]:.3f})"
    )


def large_workload(rng, n, num_layers, block_rows=()):
    """A self-grid of ``num_layers`` layers (widths 256/512/1024 in turn) at ``n`` examples,
    both linear-CKA routes: first call (compiles included) and steady state, and the
    FLOPs performed (the cost model's multiply-adds x 2) as a fraction of the matmul rate.
    ``block_rows``: the Gram route again with blocks of about these many rows in place of
    the size the grid picks (``_gram_route.block_size``'s target)."""
    import jaxsim
    from jaxsim import _gram_route, _layers
    from jaxsim._feature_route import use_feature_space
    from jaxsim._linalg import dot

    widths = [(256, 512, 1024)[i % 3] for i in range(num_layers)]
    acts = [jax.device_put(x) for x in layers(rng, n, widths)]
    picked = "features" if use_feature_space(n, widths) else "gram"
    flops = {
        "gram": n * n * (sum(widths) + num_layers**2),
        "features": n * (sum(d * d for d in widths) * 3 + sum(widths) ** 2),
    }
    print(f"{num_layers} layers, n={n} (self-grid; the cost model picks the {picked} route)")
    values = {}
    for method in ("gram", "features"):
        grid = lambda: jaxsim.similarity_grid(acts, method=method, progress=False).values
        t0 = time.perf_counter()
        values[method] = np.asarray(jax.block_until_ready(grid()))
        first = time.perf_counter() - t0
        t, fraction = paired_fraction(grid, flops[method], warmup=False)
        print(
            f"    {method:8s} route: first call {first:.2f} s, then {t:.3f} s; "
            f"performs {flops[method] / 1e9:.0f} GFLOP -> {flops[method] / t / 1e9:.0f} "
            f"GFLOP/s at best; {fraction:.0%} of the float32 matmul rate"
        )
    b = _gram_route.block_size(n, num_layers)
    print(
        f"    max |gram - features| = {np.abs(values['gram'] - values['features']).max():.1e}"
        f"; blocks of {b} rows"
    )
    # the ceiling of the Gram route at these shapes: its (b, d) x (d, b) products alone, on
    # blocks already in place (one block pair's, then scaled to the grid's block pairs);
    # the rest of the route's time is slicing the blocks out and forming the slab
    pairs = _gram_route.block_count(n, b)
    rows = [jax.device_put(np.asarray(x)[:b]) for x in acts]
    cols = [jax.device_put(np.asarray(x)[-b:]) for x in acts]
    batched = _gram_route.batched_blocks()
    if batched:  # one batched product per width, as the route forms them on accelerators
        groups = _gram_route.source_groups(rows)
        rows, cols = (
            [_layers.stack_trees([side[i] for i in g]) for g in groups] for side in (rows, cols)
        )
        products = jax.jit(
            lambda rs, cs: [
                jnp.einsum("kbd,kcd->kbc", r, c, precision="highest") for r, c in zip(rs, cs)
            ]
        )
    else:
        products = jax.jit(lambda rs, cs: [dot(r, c.T) for r, c in zip(rs, cs)])
    t, fraction = paired_fraction(lambda: products(rows, cols), flops["gram"] / pairs)
    print(
        f"    the Gram route's block products alone ({pairs} block pairs of (b, d) x (d, b),"
        f"{' batched by width,' if batched else ''} blocks in place): {t * pairs:.3f} s; "
        f"{fraction:.0%} of the float32 matmul rate"
    )

    def variant(label, name, value):  # the Gram route with _gram_route.<name> = value
        with mock.patch.object(_gram_route, name, value):
            grid = lambda: jaxsim.similarity_grid(acts, method="gram", progress=False).values
            t0 = time.perf_counter()
            jax.block_until_ready(grid())
            first = time.perf_counter() - t0
            t, fraction = paired_fraction(grid, flops["gram"], warmup=False)
        print(
            f"    gram route, {label}: first call {first:.2f} s, then {t:.3f} s; "
            f"{fraction:.0%} of the float32 matmul rate"
        )

    if batched:
        variant("one product per layer and block (the CPU's form)", "batched_blocks", lambda: False)
    picked = _gram_route.block_size
    for target in block_rows:
        variant(
            f"blocks of {picked(n, 1, target=target)} rows (target {target})",
            "block_size",
            lambda m, layers=1, t=target: picked(m, layers, target=t),
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("--skip-notebook", action="store_true", help="skip the slow baseline")
    parser.add_argument(
        "--large",
        nargs=2,
        type=int,
        metavar=("N", "LAYERS"),
        help="also a self-grid of LAYERS layers at N examples, both routes "
        "(on a GPU: --large 10000 50)",
    )
    parser.add_argument(
        "--large-only", action="store_true", help="with --large: only that workload"
    )
    parser.add_argument("--minibatch-only", action="store_true", help="only W4")
    parser.add_argument(
        "--block-rows",
        default="",
        metavar="B,B,...",
        help="with --large: the Gram route again with blocks of about these many rows",
    )
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    first = matmul_rate(np.float32)
    if jax.default_backend() == "cpu":
        where = f"{os.cpu_count()} cores"
    else:
        tf32 = matmul_rate(np.float32, precision="default") / 1e12
        where = f"{jax.devices()[0].device_kind}, TF32 {tf32:.0f} TFLOP/s"
    print(
        f"machine: float32 matmul {first / 1e9:.0f} GFLOP/s (jax, full precision), "
        f"{where}, jax {jax.__version__} on {jax.default_backend()}"
    )
    if args.large:
        large_workload(rng, *args.large, [int(b) for b in args.block_rows.split(",") if b])
        if args.large_only:
            return
    base = [256] * 8 + [512] * 8 + [1024] * 8
    if args.minibatch_only:
        minibatch_workload(rng, 256, base, quick=args.quick)
        return
    if args.quick:
        grid_workload("W1 (quick)", rng, 512, base[::4], None, args.skip_notebook)
        grid_workload("W2 (quick)", rng, 512, base[::4], base[::3], args.skip_notebook)
        minibatch_workload(rng, 64, [64] * 6, quick=True)
    else:
        grid_workload("W1", rng, 2048, base, None, args.skip_notebook)
        grid_workload(
            "W2", rng, 4096, base, [256] * 12 + [512] * 12 + [1024] * 12, args.skip_notebook
        )
        minibatch_workload(rng, 256, [256] * 8 + [512] * 8 + [1024] * 8, quick=False)
    print(
        "each fraction of the matmul rate: the median over 3 runs of the workload's FLOP/s "
        "over the float32 matmul rate measured just before that run"
    )


if __name__ == "__main__":
    main()
