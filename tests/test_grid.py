"""Grids and minibatch CKA: equal to loops of the pair functions and to NumPy references."""

import operator
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import block_grid_memory, orthogonal, subprocess_env
from references import (
    np_cca,
    np_hsic_unbiased,
    np_linear_cka,
    np_pwcca,
    power_law,
    relu_layers,
)

import jaxsim
from jaxsim import _gram_route, _kernel_blocks, _layers, _pairwise, _registry
from jaxsim._measure import TRACE_COUNT


def model_acts(rng, n=120, widths=(6, 10, 6, 10), noise=0.3):
    """Layers of a random ReLU network with noise: related neighbours, mixed widths."""
    acts, h = {}, rng.normal(size=(n, 8))
    for i, d in enumerate(widths):
        h = np.maximum(h @ rng.normal(size=(h.shape[1], d)) / np.sqrt(h.shape[1]), 0)
        acts[f"layer{i}"] = h + noise * rng.normal(size=h.shape)
    return acts


SINGLE = {
    "linear_cka": (jaxsim.linear_cka, {}),
    "rbf_cka": (jaxsim.rbf_cka, {"threshold": 0.8}),
    "mean_cca": (jaxsim.mean_cca, {}),
    "svcca": (jaxsim.svcca, {"keep_dims": 4}),
    "pwcca": (jaxsim.pwcca, {"epsilon": 1e-6}),
}


@pytest.mark.parametrize("metric", sorted(SINGLE))
def test_grid_equals_loop_of_pair_function(x64, rng, metric):
    fn, opts = SINGLE[metric]
    a = model_acts(rng)
    # two widths on each side: few distinct shapes, so the loop compiles few functions
    b = [rng.normal(size=(120, 2, 3)), a["layer1"] @ rng.normal(size=(10, 10))]
    for acts_b, cols in ((None, a), (b, {"0": b[0], "1": b[1]})):
        grid = jaxsim.similarity_grid(a, acts_b, metric=metric, **opts)
        assert grid.rows == tuple(a)
        assert grid.cols == tuple(cols)
        # (the 3-D layer flattened for the loop: the same values, fewer shapes to compile)
        loop = [
            [float(fn(x, y.reshape(len(y), -1), **opts)) for y in cols.values()] for x in a.values()
        ]
        # PWCCA of a layer with itself (all coefficients 1) depends on directions within a
        # degenerate singular subspace: batched and single evaluations round differently
        rtol = 1e-6 if metric == "pwcca" else 1e-9
        np.testing.assert_allclose(grid.values, loop, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("method", ["gram", "features", "auto"])
def test_linear_grid_against_numpy(x64, rng, debiased, method):
    a = model_acts(rng, n=60)
    b = list(model_acts(rng, n=60, widths=(3, 5)).values())
    grid = jaxsim.similarity_grid(a, b, debiased=debiased, method=method)
    ref = [[np_linear_cka(x, y, debiased) for y in b] for x in a.values()]
    np.testing.assert_allclose(grid.values, ref, rtol=1e-9)


def test_self_grid_symmetric_unit_diagonal_and_rotation_invariant(x64, rng):
    acts = model_acts(rng)
    for metric in ("linear_cka", "rbf_cka", "mean_cca"):
        v = np.asarray(jaxsim.similarity_grid(acts, metric=metric).values)
        np.testing.assert_array_equal(v, v.T)
        np.testing.assert_allclose(np.diag(v), 1.0, rtol=1e-10)
    rotated = {k: x @ orthogonal(rng, x.shape[1]) for k, x in acts.items()}
    np.testing.assert_allclose(
        jaxsim.similarity_grid(rotated).values, jaxsim.similarity_grid(acts).values, rtol=1e-9
    )
    # a test that could not fail would pass this too; a shuffled layer must not
    shuffled = dict(acts, layer0=acts["layer0"][rng.permutation(120)])
    assert not np.allclose(
        jaxsim.similarity_grid(shuffled).values, jaxsim.similarity_grid(acts).values, atol=1e-3
    )


def test_pwcca_self_grid_computes_both_orders(x64, rng):
    acts = model_acts(rng, widths=(6, 6, 6))
    v = np.asarray(jaxsim.similarity_grid(acts, metric="pwcca").values)
    assert not np.allclose(v, v.T)
    np.testing.assert_allclose(v[1, 0], jaxsim.pwcca(acts["layer1"], acts["layer0"]), rtol=1e-9)


def test_callable_metric_and_symmetric_option(x64, rng):
    acts = model_acts(rng)
    calls = jaxsim.similarity_grid(acts, metric=jaxsim.linear_cka, symmetric=True)
    np.testing.assert_allclose(calls.values, jaxsim.similarity_grid(acts).values, rtol=1e-9)
    dot = lambda x, y: (x.mean() - y.mean()) ** 2
    grid = jaxsim.similarity_grid(acts, metric=dot)
    assert float(grid["layer0", "layer1"]) == pytest.approx(
        float(dot(acts["layer0"], acts["layer1"])), rel=1e-9
    )


def test_no_retracing(x64, rng):
    acts = model_acts(rng)
    for metric in ("linear_cka", "svcca"):
        jaxsim.similarity_grid(acts, metric=metric)
        before = TRACE_COUNT.copy()
        other = {k: v + 1.0 for k, v in acts.items()}
        jaxsim.similarity_grid(other, metric=metric)
        assert TRACE_COUNT == before, metric


def test_one_compile_per_pair_of_width_groups(rng):
    """A grid compiles its pair step once per pair of width groups (per unordered pair for
    a symmetric measure on a self-grid: the mirror image is scattered, not recomputed),
    then assembles the grid in one program (docs/performance.md has what it cost before)."""
    widths = (2, 3, 4, 2, 3, 4, 2)
    acts = {f"l{i}": rng.normal(size=(10, d)) for i, d in enumerate(widths)}
    cols = {"a": acts["l0"], "b": acts["l1"], "c": acts["l3"]}

    def corner():  # cheap, asymmetric, defined for any two widths; new each time (no cache)
        return lambda x, y: x[0, 0] - 2 * y[1, 1]

    expected = lambda rows, cols: np.array([[a[0, 0] - 2 * b[1, 1] for b in cols] for a in rows])
    for fn_cols, symmetric, pair_steps in [(None, True, 6), (None, False, 9), (cols, True, 6)]:
        before = TRACE_COUNT["pairs"]
        grid = jaxsim.similarity_grid(
            acts, fn_cols, metric=corner(), symmetric=symmetric, progress=False
        ).values
        assert TRACE_COUNT["pairs"] - before == pair_steps, (fn_cols, symmetric)
        want = expected(acts.values(), (acts if fn_cols is None else fn_cols).values())
        if fn_cols is None and symmetric:  # each unordered pair computed in one order
            np.testing.assert_array_equal(grid, grid.T)
            assert np.all(np.isclose(grid, want) | np.isclose(grid, want.T))
        else:
            np.testing.assert_allclose(grid, want, rtol=1e-6)


def np_svcca_variance(x, y, frac):
    """SVCCA keeping each layer's fewest directions with ``frac`` of its variance."""

    def reduce(a):
        u, s, _ = np.linalg.svd(a - a.mean(0), full_matrices=False)
        k = np.searchsorted(np.cumsum(s**2) / np.sum(s**2), frac) + 1
        return u[:, :k] * s[:k]

    return np_cca(reduce(x), reduce(y))[0].mean()


def test_close_widths_share_a_compiled_pair_step(x64, rng):
    """Mean CCA and SVCCA pad each layer's basis with zero columns to the widest width
    within 1/8 above it (zero columns add only canonical correlations past the rank):
    widths 116, 120, 128 and 80 compile 3 pair steps (one bucket of 128 and one of 80),
    not 6, and the values (padded with each other, with an unpadded layer, with
    themselves) equal the NumPy formulas. Widths up to 64 share one bucket whatever
    their spread."""
    from jaxsim._pairwise import buckets

    assert buckets([10, 40, 64, 200]) == {10: 64, 40: 64, 64: 64, 200: 200}
    assert buckets([30, 50, 70, 72]) == {72: 72, 70: 72, 50: 50, 30: 50}
    widths = (116, 120, 128, 80)
    acts = [
        rng.normal(size=(300, 8)) @ rng.normal(size=(8, d)) + rng.normal(size=(300, d))
        for d in widths
    ]
    frac = 0.9
    for metric, ref, opts in (
        ("mean_cca", lambda x, y: np_cca(x, y)[0].mean(), {}),
        ("svcca", lambda x, y: np_svcca_variance(x, y, frac), {"keep_variance": frac}),
    ):
        if metric == "svcca":
            acts = [a[:250] for a in acts]  # new shapes (svcca's pair step is mean CCA's)
        before = TRACE_COUNT["pairs"]
        grid = jaxsim.similarity_grid(acts, metric=metric, progress=False, **opts).values
        assert TRACE_COUNT["pairs"] - before == 3, metric
        for i, j in ((0, 1), (1, 3), (0, 0)):
            np.testing.assert_allclose(
                grid[i, j],
                ref(acts[i], acts[j]),
                rtol=1e-9,
                err_msg=f"{metric} {widths[i]} {widths[j]}",
            )
    # the SVCCA grid padded in float32 and under jit: as in float64 (these layers are well
    # conditioned: 1e-5)
    f32 = jax.jit(lambda a: jaxsim.similarity_grid(a, metric="svcca", **opts).values)(
        [a.astype(np.float32) for a in acts]
    )
    np.testing.assert_allclose(f32, grid, atol=1e-5)


def test_a_loop_of_single_pairs_compiles_per_rung(x64, rng):
    """A notebook loop of single-pair calls over layers of many widths: each layer is
    prepared by a program per shape and the summaries are padded to fixed rungs (eighths
    between powers of two, all widths up to 64 on one), so the loop compiles a pair step
    per pair of rungs, not per pair of widths (a 20 x 20 loop of distinct widths compiled
    400 programs, and a CPU process runs out of memory mappings after a few hundred such
    loops' worth). Values: the NumPy formulas, as unpadded (PWCCA in both orders)."""
    from jaxsim._pairwise import ladder_width

    assert [ladder_width(w) for w in (1, 64, 65, 100, 128, 129, 500, 1025)] == [
        64,
        64,
        72,
        104,
        128,
        144,
        512,
        1152,
    ]
    widths = (70, 75, 78, 81)  # rungs 72, 80, 80, 88
    acts = [
        rng.normal(size=(420, 6)) @ rng.normal(size=(6, d)) + rng.normal(size=(420, d))
        for d in widths
    ]
    before = TRACE_COUNT["single_pairs"]
    for x in acts:
        for y in acts:
            np.testing.assert_allclose(jaxsim.mean_cca(x, y), np_cca(x, y)[0].mean(), rtol=1e-9)
    assert TRACE_COUNT["single_pairs"] - before == 9  # 3 rungs, 16 pairs
    for x, y in ((acts[0], acts[2]), (acts[2], acts[0])):  # absent units padded: 72, 80
        np.testing.assert_allclose(jaxsim.pwcca(x, y), np_pwcca(x, y), rtol=1e-9)
    # padded in float32 and from bfloat16 inputs, on realistic layers (post-ReLU, power-law
    # spectrum; widths 100 and 70 on rungs 104 and 72): the formulas on the same inputs
    x, y = relu_layers(rng, 800, 100, 70)
    for dtype in (jnp.float32, jnp.bfloat16):
        a, b = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        for fn, ref in (
            (jaxsim.mean_cca, lambda p, q: np_cca(p, q)[0].mean()),
            (jaxsim.pwcca, np_pwcca),
        ):
            value = fn(a, b)
            assert value.dtype == jnp.float32
            np.testing.assert_allclose(value, ref(a64, b64), atol=1e-5, err_msg=str(dtype))


def test_grid_save_load_and_repr(x64, rng, tmp_path):
    grid = jaxsim.similarity_grid(model_acts(rng), metric="svcca", keep_dims=3)
    path = tmp_path / "g.npz"
    grid.save(path)
    back = jaxsim.Grid.load(path)
    np.testing.assert_array_equal(back.to_numpy(), grid.to_numpy())
    assert (back.rows, back.cols, back.metric) == (grid.rows, grid.cols, "svcca")
    text = repr(grid)
    assert text.startswith("Grid(svcca, 4 x 4)") and "layer3" in text
    assert np.asarray(grid).shape == (4, 4)
    doubled = jax.tree.map(lambda v: 2 * v, grid)  # a pytree: names ride along
    assert doubled.rows == grid.rows
    with pytest.raises(
        KeyError,
        match=r"'nope' is not a row layer of this grid; row layers: "
        r"'layer0', 'layer1', 'layer2', 'layer3'",
    ):
        grid["nope", "layer0"]
    with pytest.raises(KeyError, match=r"'x' is not a column layer"):
        grid["layer0", "x"]


def test_grid_errors(rng):
    acts = model_acts(rng)
    with pytest.raises(
        ValueError,
        match=(
            r"acts_b\['1'\]: has 50 examples.*acts_a\['layer0'\] "
            r"has 120"
        ),
    ):
        jaxsim.similarity_grid(acts, [acts["layer0"], acts["layer1"][:50]])
    with pytest.raises(ValueError, match=r"acts_a\['layer2'\]: has 119 examples"):
        jaxsim.similarity_grid(dict(acts, layer2=acts["layer2"][:119]))
    with pytest.raises(ValueError, match=r"acts_a: no layers given"):
        jaxsim.similarity_grid([])
    with pytest.raises(
        ValueError,
        match=r"unknown metric 'cca2'; valid names: cka, linear_cka, "
        r"linear_predictivity, mean_cca, mutual_knn, procrustes, "
        r"pwcca, rbf_cka, rsa, svcca, a jaxsim.Measure, or a callable",
    ):
        jaxsim.similarity_grid(acts, metric="cca2")
    with pytest.raises(TypeError, match=r"metric 'linear_cka': unexpected option\(s\) epsilon"):
        jaxsim.similarity_grid(acts, epsilon=0.1)
    with pytest.raises(
        TypeError,
        match=(
            r"acts_a: expected a sequence or mapping.*shape "
            r"\(120, 6\)"
        ),
    ):
        jaxsim.similarity_grid(acts["layer0"])
    with pytest.raises(
        ValueError,
        match=(
            r"keep_dims: 8 directions requested but "
            r"acts_a\['layer0'\] has shape \(120, 6\)"
        ),
    ):
        jaxsim.similarity_grid(acts, metric="svcca", keep_dims=8)
    with pytest.raises(ValueError, match=r"need at least 4 examples for the unbiased"):
        jaxsim.similarity_grid([a[:3] for a in acts.values()], debiased=True)


# ------------------------------------------------------------------ minibatch CKA


def np_minibatch_cka(batches_a, batches_b):
    """Nguyen et al. 2020, eq. 3, with unbiased HSIC (Song et al.) per batch."""
    la, lb = len(batches_a[0]), len(batches_b[0])
    out = np.zeros((la, lb))
    for i in range(la):
        for j in range(lb):
            kk = [x[i].reshape(len(x[i]), -1) for x in batches_a]
            ll = [y[j].reshape(len(y[j]), -1) for y in batches_b]
            cross = np.mean([np_hsic_unbiased(k @ k.T, l @ l.T) for k, l in zip(kk, ll)])
            sa = np.mean([np_hsic_unbiased(k @ k.T, k @ k.T) for k in kk])
            sb = np.mean([np_hsic_unbiased(l @ l.T, l @ l.T) for l in ll])
            out[i, j] = cross / np.sqrt(sa * sb)
    return out


def split(acts, k):
    return [[np.array_split(a, k)[b] for a in acts] for b in range(k)]


def test_minibatch_against_numpy_eq3(x64, rng):
    a = list(model_acts(rng, n=96).values())
    b = [rng.normal(size=(96, 2, 2, 3)), a[0] @ rng.normal(size=(6, 4))]
    ba, bb = split(a, 4), split(b, 4)
    state = jaxsim.minibatch_cka_init(len(a), len(b))
    for xa, xb in zip(ba, bb):
        state = jaxsim.minibatch_cka_update(state, xa, xb)
    grid = jaxsim.minibatch_cka_result(state)
    assert grid.values.shape == (4, 2)
    np.testing.assert_allclose(grid.values, np_minibatch_cka(ba, bb), rtol=1e-9)
    assert float(state.count) == 4


def test_minibatch_self_grid_and_state_algebra(x64, rng, tmp_path):
    a = list(model_acts(rng, n=120).values())
    batches = split(a, 6)
    full = jaxsim.minibatch_cka_init(4)
    for xa in batches:
        full = jaxsim.minibatch_cka_update(full, xa)
    np.testing.assert_allclose(
        jaxsim.minibatch_cka_result(full).values, np_minibatch_cka(batches, batches), rtol=1e-9
    )

    # two streams added leaf-wise == one stream of all batches
    s1, s2 = jaxsim.minibatch_cka_init(4), jaxsim.minibatch_cka_init(4)
    for xa in batches[:2]:
        s1 = jaxsim.minibatch_cka_update(s1, xa)
    for xa in batches[2:]:
        s2 = jaxsim.minibatch_cka_update(s2, xa)
    both = jax.tree.map(operator.add, s1, s2)
    np.testing.assert_allclose(
        jaxsim.minibatch_cka_result(both).values,
        jaxsim.minibatch_cka_result(full).values,
        rtol=1e-12,
    )

    # save with numpy mid-stream, restore, resume: identical result
    path = tmp_path / "state.npz"
    np.savez(path, **s1._asdict())
    with np.load(path) as f:
        restored = jaxsim.MinibatchCKAState(**{k: jax.numpy.asarray(f[k]) for k in f.files})
    for xa in batches[2:]:
        restored = jaxsim.minibatch_cka_update(restored, xa)
    np.testing.assert_array_equal(
        jaxsim.minibatch_cka_result(restored).values, jaxsim.minibatch_cka_result(full).values
    )


def test_minibatch_one_trace_per_shape(x64, rng):
    a = list(model_acts(rng, n=60).values())
    state = jaxsim.minibatch_cka_init(4)
    state = jaxsim.minibatch_cka_update(state, [x[:20] for x in a])
    before = TRACE_COUNT["minibatch"]
    for k in (1, 2):
        state = jaxsim.minibatch_cka_update(state, [x[20 * k : 20 * (k + 1)] for x in a])
    assert TRACE_COUNT["minibatch"] == before


def test_minibatch_scan_equals_a_loop_of_updates(x64, rng):
    """k stacked minibatches through one compiled lax.scan: the state of k updates (cross-
    and self-grids, mixed widths and a (k, m, h, w) conv layer), one trace per shape."""
    a = list(model_acts(rng, n=80).values())
    conv = rng.normal(size=(80, 2, 2, 3))
    k, m = 4, 20
    stack = lambda x: np.reshape(x, (k, m, *x.shape[1:]))
    for rows, cols in ((a, None), (a[:3], [a[3], conv])):
        state = jaxsim.minibatch_cka_init(len(rows), None if cols is None else len(cols))
        loop = state
        for i in range(k):
            loop = jaxsim.minibatch_cka_update(
                loop,
                [x[i * m : (i + 1) * m] for x in rows],
                None if cols is None else [x[i * m : (i + 1) * m] for x in cols],
            )
        scanned = jaxsim.minibatch_cka_scan(
            state, [stack(x) for x in rows], None if cols is None else [stack(x) for x in cols]
        )
        for got, want in zip(scanned, loop):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
        # and the paper's eq. 3, written in NumPy
        side = lambda layers: [[x[i * m : (i + 1) * m] for x in layers] for i in range(k)]
        np.testing.assert_allclose(
            jaxsim.minibatch_cka_result(scanned).values,
            np_minibatch_cka(side(rows), side(rows if cols is None else cols)),
            rtol=1e-9,
        )
    before = TRACE_COUNT["minibatch_scan"]
    jaxsim.minibatch_cka_scan(scanned, [stack(x) for x in a[:3]], [stack(a[3]), stack(conv)])
    assert TRACE_COUNT["minibatch_scan"] == before
    with pytest.raises(ValueError, match=r"batches_a\['1'\]: 5 minibatches of 16 .* 4 of 20"):
        jaxsim.minibatch_cka_scan(
            jaxsim.minibatch_cka_init(2), [stack(a[0]), np.reshape(a[1], (5, 16, -1))]
        )
    with pytest.raises(ValueError, match=r"batches_a\['0'\]: expected a stack .*\(k, m, ...\)"):
        jaxsim.minibatch_cka_scan(jaxsim.minibatch_cka_init(1), [a[0][:, 0]])


def test_minibatch_scan_in_float32_and_bfloat16_on_realistic_layers(rng):
    """The scan of float32 and bfloat16 stacks (computed in float32) agrees with float64
    to the precision battery's 1e-3 on power-law and post-ReLU layers with an offset."""
    x, y = power_law(rng, 1024, 64, 32, 1.5)
    r1, r2 = relu_layers(rng, 1024, 48, 24)
    layers = [x, y, r1, r2]
    stacks = lambda dtype: [jnp.asarray(a.reshape(8, 128, -1), dtype) for a in layers]
    with jax.enable_x64(True):
        ref = jaxsim.minibatch_cka_result(
            jaxsim.minibatch_cka_scan(jaxsim.minibatch_cka_init(4), stacks(jnp.float64))
        ).values
        ref = np.asarray(ref)
    for dtype in (jnp.float32, jnp.bfloat16):
        state = jaxsim.minibatch_cka_init(4, dtype=jnp.float32)
        got = jaxsim.minibatch_cka_result(jaxsim.minibatch_cka_scan(state, stacks(dtype)))
        assert got.values.dtype == jnp.float32
        # bfloat16 inputs are rounded to 8 bits first: compare with float64 of those inputs
        want = ref
        if dtype == jnp.bfloat16:
            with jax.enable_x64(True):
                rounded = [s.astype(jnp.float64) for s in stacks(dtype)]
                state64 = jaxsim.minibatch_cka_init(4, dtype=jnp.float64)
                want = np.asarray(
                    jaxsim.minibatch_cka_result(jaxsim.minibatch_cka_scan(state64, rounded)).values
                )
        np.testing.assert_allclose(got.values, want, atol=1e-3, err_msg=str(dtype))


def test_minibatch_updates_never_wait_for_the_device(rng):
    """The default update makes no device-to-host transfer (no sync per batch): a NaN
    poisons the state, and minibatch_cka_result raises, naming the layer; check_finite=True
    on the update finds the batch at once, and check_finite=False on the result gives NaN."""
    a = [jnp.asarray(x, jnp.float32) for x in model_acts(rng, n=40).values()]
    bad = [a[0], a[1].at[3, 2].set(jnp.nan), a[2], a[3]]
    state = jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(4), a)  # compiled
    with jax.transfer_guard_device_to_host("disallow"):
        for batch in (a, bad, a):
            state = jaxsim.minibatch_cka_update(state, batch)
    with pytest.raises(ValueError, match=r"row layer 1 \('fc'\) are NaN or inf"):
        jaxsim.minibatch_cka_result(state, rows=["0", "fc", "2", "3"], cols=list("abcd"))
    values = np.asarray(jaxsim.minibatch_cka_result(state, check_finite=False).values)
    assert np.isnan(values[1]).all() and np.isfinite(values[0, [0, 2, 3]]).all()
    with pytest.raises(ValueError, match=r"batch_acts_a\['1'\]: contains 1 non-finite"):
        jaxsim.minibatch_cka_update(state, bad, check_finite=True)


def test_minibatch_errors(rng):
    a = list(model_acts(rng, n=40).values())
    state = jaxsim.minibatch_cka_init(4, 2)
    with pytest.raises(
        ValueError,
        match=(
            r"batch_acts_a: the state has 4 layer\(s\) on this "
            r"side but the batch has 3"
        ),
    ):
        jaxsim.minibatch_cka_update(state, a[:3], a[:2])
    with pytest.raises(
        ValueError,
        match=(
            r"batch_acts_b: missing, but the state compares 4 "
            r"row layers with 2"
        ),
    ):
        jaxsim.minibatch_cka_update(state, a)
    with pytest.raises(ValueError, match=r"need at least 4 examples per minibatch.*n=3"):
        jaxsim.minibatch_cka_update(state, [x[:3] for x in a], [x[:3] for x in a[:2]])
    with pytest.raises(ValueError, match=r"num_a: expected a positive number of layers, got 0"):
        jaxsim.minibatch_cka_init(0)
    with pytest.raises(ValueError, match=r"state: no minibatch has been added yet"):
        jaxsim.minibatch_cka_result(state)


def test_cross_grids_form_only_the_cross_pairs(x64, rng):
    """A cross-grid's slab product forms only row-column pairs and each layer with itself
    (the compiled block sum has a (3, 4) product and no (7, 7) one), with the same values
    (n = 1100: 3 blocks, diagonal ones as halves): linear CKA and minibatch CKA (U-centered;
    the slab does not depend on the kernel), against the union's self-grid and NumPy:
    CKA from the centered features' products (Kornblith et al. 2019, eq. 5) and the
    unbiased HSIC of U-centered Grams (Szekely & Rizzo 2014), both O(n^2)."""
    from jaxsim import kernel

    n = 1100
    a = [rng.normal(size=(n, w)) for w in (4, 6, 3)]
    b = [
        np.tanh(a[0] @ rng.normal(size=(4, 5))),
        rng.normal(size=(n, 2)),
        a[2] ** 2,
        rng.normal(size=(n, 7)),
    ]
    full = jaxsim.similarity_grid(a + b, method="gram").values
    got = jaxsim.similarity_grid(a, b, method="gram").values
    np.testing.assert_allclose(got, np.asarray(full)[:3, 3:], rtol=1e-10)
    centered = [x - x.mean(0) for x in a + b]
    hsic = np.array([[np.linalg.norm(x.T @ y) ** 2 for y in centered] for x in centered])
    norms = np.sqrt(np.diag(hsic))
    np.testing.assert_allclose(got, (hsic / np.outer(norms, norms))[:3, 3:], rtol=1e-10)
    blocks = kernel.linear_measure().blocks
    size = _gram_route.block_size(n, 7)
    sources = [
        _gram_route.layer_source(blocks.source, jnp.asarray(x), -(-n // size) * size) for x in a + b
    ]
    offsets = _gram_route.block_pairs(n, size, np.float64)
    text = _gram_route.gram_block_sum.lower(blocks, sources, *offsets, size, 3).as_text()
    assert "tensor<3x4xf64>" in text and "7x7xf64> = stablehlo.dot" not in text
    state, joint = jaxsim.minibatch_cka_init(3, 4), jaxsim.minibatch_cka_init(7)
    for xa, xb in zip(split(a, 2), split(b, 2)):
        state = jaxsim.minibatch_cka_update(state, xa, xb)
        joint = jaxsim.minibatch_cka_update(joint, xa + xb)
    np.testing.assert_allclose(
        jaxsim.minibatch_cka_result(state).values,
        np.asarray(jaxsim.minibatch_cka_result(joint).values)[:3, 3:],
        rtol=1e-10,
    )

    def u_centered(x):
        k = x @ x.T
        m = len(k)
        np.fill_diagonal(k, 0)
        rows = k.sum(0) / (m - 2)
        k = k - rows[:, None] - rows[None, :] + k.sum() / ((m - 1) * (m - 2))
        np.fill_diagonal(k, 0)
        return k

    sums = 0
    for batch in split(a + b, 2):
        grams = [u_centered(x) for x in batch]
        sums = sums + np.array([[np.vdot(k, g) for g in grams] for k in grams])
    norms = np.sqrt(np.diag(sums))
    np.testing.assert_allclose(
        jaxsim.minibatch_cka_result(state).values,
        (sums / np.outer(norms, norms))[:3, 3:],
        rtol=1e-10,
    )


@pytest.mark.slow  # suite time; the accelerator form: test_float32_cross_grids_*
def test_accelerator_form_batches_equal_shaped_layers(x64, rng, monkeypatch):
    """On an accelerator the Gram route forms each block of equal-width layers as one
    batched product (the compiled block sum has a dot_general with a batch dimension),
    with the same values as one product per layer: linear CKA biased and U-centered, RBF
    CKA, a cross-grid with a one-layer side, and a minibatch CKA cross-grid; linear CKA
    also against NumPy's, from the centered features' products."""
    from jaxsim import kernel

    n = 600  # one block, formed as halves
    layers = [rng.normal(size=(n, w)) for w in (5, 3, 5, 7, 3, 5)]
    layers[2] = np.tanh(layers[0] @ rng.normal(size=(5, 5)))
    runs = [
        lambda: jaxsim.similarity_grid(layers, method="gram").values,
        lambda: jaxsim.similarity_grid(layers, method="gram", debiased=True).values,
        lambda: jaxsim.similarity_grid(layers[:4], metric="rbf_cka").values,
        lambda: jaxsim.similarity_grid(layers[3:4], layers[:3], method="gram").values,
    ]
    batches = split(layers, 2)

    def minibatch():  # a cross-grid
        state = jaxsim.minibatch_cka_init(4, 2)
        for batch in batches:
            state = jaxsim.minibatch_cka_update(state, batch[:4], batch[4:])
        return jaxsim.minibatch_cka_result(state).values

    runs.append(minibatch)
    want = [np.asarray(run()) for run in runs]
    monkeypatch.setattr(_gram_route, "batched_blocks", lambda: True)
    for run, expected in zip(runs, want):
        np.testing.assert_allclose(run(), expected, rtol=1e-12, atol=1e-15)
    centered = [x - x.mean(0) for x in layers]  # and NumPy's CKA (Kornblith et al. eq. 5)
    hsic = np.array([[np.linalg.norm(x.T @ y) ** 2 for y in centered] for x in centered])
    norms = np.sqrt(np.diag(hsic))
    np.testing.assert_allclose(runs[0](), hsic / np.outer(norms, norms), rtol=1e-10)
    np.testing.assert_allclose(runs[3](), (hsic / np.outer(norms, norms))[3:4, :3], rtol=1e-10)
    blocks = kernel.linear_measure().blocks
    sources = [_gram_route.layer_source(blocks.source, jnp.asarray(x), n) for x in layers]
    groups = _gram_route.source_groups(sources)
    assert groups == ((0, 2, 5), (1, 4), (3,))
    assert _gram_route.source_groups(sources, 4) == ((0, 2), (1,), (3,), (4,), (5,))
    stacks = [_layers.stack_trees([sources[i] for i in g]) for g in groups]
    text = _gram_route.gram_block_sum.lower(
        blocks, stacks, *_gram_route.block_pairs(n, n, np.float64), n, groups=groups
    ).as_text()
    assert "batching_dims = [0] x [0]" in text


def test_ring_blocks_tile_the_cross_grams(x64, rng):
    """The ring's per-step products, tiled b x b (the last tile padded): <R_l C_l^T,
    R_m C_m^T> for every pair of layers, as in NumPy."""

    rows = [rng.normal(size=(7, d)) for d in (2, 3, 5, 4)]
    cols = [rng.normal(size=(7, d)) for d in (2, 3, 5, 4)]
    n = 7
    wrap = lambda xs: [
        _kernel_blocks.LinearSource(x, np.sum(x * x, axis=1), np.sum(x * x), n) for x in xs
    ]
    grams = [r @ c.T for r, c in zip(rows, cols)]
    want = [[np.vdot(g, h) for h in grams] for g in grams]
    for b in (3, 7):
        np.testing.assert_allclose(
            _gram_route.cross_products(wrap(rows), wrap(cols), b), want, rtol=1e-12
        )
    np.testing.assert_allclose(
        _gram_route.cross_products(wrap(rows[:2]), wrap(cols[:2]), 3),
        np.asarray(want)[:2, :2],
        rtol=1e-12,
    )
    # debiased, the diagonal block (rows == cols): the U-centered Gram's terms, n = 7 here
    u_grams = []
    for x in rows:
        k = x @ x.T
        u = (
            k
            + (np.diag(k)[:, None] + np.diag(k)[None, :]) / (n - 2)
            - np.trace(k) / ((n - 1) * (n - 2))
        )
        np.fill_diagonal(u, 0)
        u_grams.append(u)
    want = [[np.vdot(g, h) for h in u_grams] for g in u_grams]
    got = _gram_route.cross_products(wrap(rows), wrap(rows), 3, debiased=True, same=True)
    np.testing.assert_allclose(got, want, rtol=1e-12)


SHARDED = os.path.join(os.path.dirname(__file__), "sharded")


@pytest.mark.parametrize(
    "script",
    # every script is compile-bound (the ring and feature routes: 26 s of the test
    # command's 5 minutes): -m slow. The test command keeps the sharded paths through
    # the two-process test (ring grid, stream, PWCCA), pwcca_after_cka.py and the
    # README's sharding example
    [
        pytest.param("ring_and_feature_route.py", marks=pytest.mark.slow),
        pytest.param("float32_and_jit.py", marks=pytest.mark.slow),
        pytest.param("explicit_axes.py", marks=pytest.mark.slow),
    ],
)
def test_sharded_equals_single_device(script):
    """The multi-device programs on 8 host devices (tests/sharded/, one child process each:
    the device count is fixed when JAX starts)."""
    env = subprocess_env("--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, os.path.join(SHARDED, script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded ok" in out.stdout


def test_diagonal_blocks_formed_as_halves(x64, rng):
    """A centered Gram's diagonal block is symmetric: it is formed as its three upper
    halves (3/4 of its products; a single-block grid at n = 1024 on a CPU 1.27x faster),
    the inner products equal to NumPy's over the whole centered Grams. n = 601 is one block
    of 602 rows (even, one row of padding) formed as 301-row halves."""
    from jaxsim import kernel
    from jaxsim._measure import GramBlocks

    sizes = []
    linear = kernel.linear_measure().blocks

    def block(src, r0, c0, b):
        sizes.append(b)
        return linear.block(src, r0, c0, b)

    n = 601
    layers = [rng.normal(size=(n, 5)), rng.normal(size=(n, 3)) ** 2]
    b = _gram_route.block_size(n, 2)
    sums = _gram_route.gram_inner_products(GramBlocks(linear.source, block), layers, b)
    assert (b, sorted(set(sizes))) == (602, [301, 602])
    grams = []
    for x in layers:
        xc = x - x.mean(0)
        xc /= np.abs(xc).max()  # the source's unit scaling
        grams.append(xc @ xc.T)
    ref = [[np.vdot(k, g) for g in grams] for k in grams]
    np.testing.assert_allclose(_gram_route.symmetrize(sums), ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_diagonal_halves_in_low_precision(rng, dtype):
    """The halves and the padding row of an odd n (601: one block of 602) in float32 and
    on bfloat16 activations, on power-law and post-ReLU layers with an offset: linear CKA
    (biased and debiased) and RBF CKA (debiased: the padded row masked) against NumPy's
    formulas in float64 on the same (rounded) activations."""
    from references import np_cka, np_gram_rbf, power_law, relu_layers

    x, _ = power_law(rng, 601, 24, 16, 1.5)
    _, y = relu_layers(rng, 601, 24, 16)
    layers = [jnp.asarray(a, dtype) for a in (x, y)]
    exact = [np.asarray(a.astype(jnp.float32), np.float64) for a in layers]
    for debiased in (False, True):
        got = jaxsim.similarity_grid(layers, method="gram", debiased=debiased).values
        assert got.dtype == np.float32
        np.testing.assert_allclose(
            got[0, 1], np_linear_cka(*exact, debiased), atol=1e-4, err_msg=str(debiased)
        )
    got = jaxsim.similarity_grid(layers, metric="rbf_cka", debiased=True).values
    np.testing.assert_allclose(got[0, 1], np_cka(*map(np_gram_rbf, exact), True), atol=1e-4)


@pytest.mark.parametrize(
    "metric,debiased",
    # RBF takes the same blocks as linear CKA (-m slow: suite time)
    [
        ("linear_cka", False),
        ("linear_cka", True),
        pytest.param("rbf_cka", False, marks=pytest.mark.slow),
        pytest.param("rbf_cka", True, marks=pytest.mark.slow),
    ],
)
def test_blocked_grams_with_padding(x64, rng, metric, debiased):
    # n > 1024: Grams are accumulated in blocks (here 3 of 368 rows), the last one padded
    n = 1100
    a = [rng.normal(size=(n, 3)), rng.normal(size=(n, 4))]
    a[1][:, :3] += a[0]
    b = [np.tanh(a[1]) + 0.1 * rng.normal(size=(n, 4))]
    opts = {"method": "gram"} if metric == "linear_cka" else {}
    grid = jaxsim.similarity_grid(a, b, metric=metric, debiased=debiased, **opts)
    if metric == "linear_cka":
        ref = [[np_linear_cka(x, y, debiased) for y in b] for x in a]
    else:
        from test_kernel import np_cka, np_gram_rbf

        ref = [[np_cka(np_gram_rbf(x), np_gram_rbf(y), debiased) for y in b] for x in a]
    np.testing.assert_allclose(grid.values, ref, rtol=1e-9)
    selfgrid = jaxsim.similarity_grid(a, metric=metric, debiased=debiased, **opts)
    single = jaxsim.linear_cka if metric == "linear_cka" else jaxsim.rbf_cka
    np.testing.assert_allclose(
        selfgrid.values[0, 1], single(a[0], a[1], debiased=debiased), rtol=1e-9
    )
    np.testing.assert_allclose(np.diag(selfgrid.values), 1.0, rtol=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_rbf_grid_memory_does_not_grow_with_layers_times_n_squared(debiased):
    """Read from the compiled programs (no run needed): each layer's RBF source (median
    bandwidth and centering row) passes over b x b blocks of its distances, never holding
    its n x n matrix, and the grid's block sum holds L blocks of b x b, never L n x n
    kernels. Before, one program formed every layer's kernel: 640 MB of temporaries for
    8 layers at n = 2048 in float32; then one layer's n x n distances (80 MB) at a time;
    now a few b x b blocks."""
    from jaxsim import kernel

    n = 2000
    blocks = kernel.rbf_measure(debiased=debiased).blocks
    one, total, _ = block_grid_memory(blocks, n, 16, num_layers=6)
    kernel_bytes = n * n * 4
    assert one.temp_size_in_bytes < kernel_bytes / 2, one.temp_size_in_bytes
    assert total.temp_size_in_bytes < kernel_bytes  # not num_layers x


@pytest.mark.slow  # suite time; grids under jit: the sweep, padded and sharded tests
def test_grids_under_jit(rng):
    # every route, the layers (two widths) the traced argument, names and options
    # static: no host round trip may happen inside
    acts = {k: v.astype(np.float32) for k, v in model_acts(rng, n=40, widths=(6, 4, 6)).items()}
    # every metric (pwcca below), and the distinct paths: feature route, Gram blocks
    # (linear, RBF, Pearson RSA), pairwise symmetric (one triangle) and asymmetric
    from jaxsim.grid import METRICS

    metrics = {
        "linear_cka": {"method": "features"},
        "cka": {"method": "gram"},
        "rbf_cka": {},
        "mean_cca": {},
        "svcca": {"keep_dims": 3},
        "procrustes": {},
        "rsa": {},
        "rsa pearson": {"compare": "pearson"},
        "mutual_knn": {"k": 5},
        "linear_predictivity": {},
    }
    assert set(METRICS) - {"pwcca"} <= {m.split()[0] for m in metrics}
    for name, opts in metrics.items():
        metric = name.split()[0]
        grid = lambda a: jaxsim.similarity_grid(a, metric=metric, warn=False, **opts).values
        np.testing.assert_allclose(
            jax.jit(grid)(acts), grid(acts), rtol=1e-5, atol=1e-6, err_msg=name
        )
    # a cross-grid too (the scatter of both orders, no triangle)
    cross = jax.jit(lambda a, b: jaxsim.similarity_grid(a, b, metric="pwcca").values)
    np.testing.assert_allclose(
        cross(acts, [acts["layer1"]]),
        jaxsim.similarity_grid(acts, [acts["layer1"]], metric="pwcca").values,
        rtol=1e-5,
        atol=1e-6,
    )


def test_progress_bar_on_pairwise_grids(rng, capsys, monkeypatch):

    acts = model_acts(rng, n=40, widths=(6, 4))
    jaxsim.similarity_grid(acts, metric="mean_cca", progress=True, warn=False)
    assert "mean_cca grid" in capsys.readouterr().err
    jaxsim.similarity_grid(acts, metric="mean_cca", progress=False, warn=False)
    assert capsys.readouterr().err == ""
    # a Gram-route grid of many blocks runs in chunks that the bar follows, same values:
    # n = 1600 is 4 blocks, 10 block pairs, here 3 chunks (4, 4, 2) of at most two
    # compiled programs (the chunks' offsets are arguments; they were constants, one
    # program per chunk: 5 at n = 6000)
    monkeypatch.setattr(_gram_route, "CHUNK", 4)
    monkeypatch.setattr(_gram_route, "SLAB_BUDGET", 0)  # 512-row blocks on a GPU too
    layers = [rng.normal(size=(1600, 2)).astype(np.float32) for _ in range(2)]
    before = TRACE_COUNT["blocks"]
    followed = jaxsim.similarity_grid(layers, method="gram", progress=True).values
    assert TRACE_COUNT["blocks"] - before == 2
    assert "linear_cka grid" in capsys.readouterr().err
    np.testing.assert_allclose(
        followed, jaxsim.similarity_grid(layers, method="gram", progress=False).values, rtol=1e-6
    )
    # and equal to the published formula, computed independently in NumPy
    np.testing.assert_allclose(
        followed[0, 1], np_linear_cka(*[a.astype(np.float64) for a in layers]), rtol=1e-5
    )


def test_block_size_has_no_padding_cliff():

    for target in (512, 2048):
        for n in list(range(2, 1025, 97)) + [1024, 1025, 1100, 1536, 1537, 2048, 2049, 4097, 10000]:
            b = _gram_route.block_size(n, target=target)
            blocks = -(-n // b)
            assert b <= max(n, target) and b % 8 == 0 or b in (n, n + 1), n
            assert blocks * b - n < 8 * blocks, (n, b)  # a few rows of padding per block


def test_block_size_by_backend(monkeypatch):
    """512-row blocks on a CPU; on an accelerator up to 2048 rows, as long as the largest
    slab of L blocks fits grid._SLAB_BUDGET (timings in _block_size's docstring)."""

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert _gram_route.block_size(10000, 50) == 504
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _gram_route.block_size(10000, 50) == 2000
    assert _gram_route.block_size(3000, 50) == 3000  # one block up to twice the target
    assert _gram_route.block_size(10000, 200) == 1000  # 4 * 200 * 4096^2 bytes > 4 GiB
    assert _gram_route.block_size(10000, 2000) == 504
    assert 4 * 200 * 2048**2 <= _gram_route.SLAB_BUDGET < 4 * 200 * 4096**2


def test_one_finiteness_sync_per_call(rng, monkeypatch):
    from jaxsim import _validation

    calls = []
    flags = _validation._nonfinite
    monkeypatch.setattr(
        _validation, "_nonfinite", lambda arrays: calls.append(len(arrays)) or flags(arrays)
    )
    a = [jax.numpy.asarray(rng.normal(size=(8, w)), jax.numpy.float32) for w in (3, 4, 5)]
    jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(3, 2), a, a[:2], check_finite=True)
    jaxsim.similarity_grid(a, a[:2])
    assert calls == [5, 5]  # every layer of both sides in one fused reduction, per call


def test_pairwise_grids_hold_a_bounded_set_of_summaries(rng, monkeypatch):
    """Spearman RSA keeps each layer's n (n - 1) / 2 ranks: past the budget of prepared
    summaries a grid prepares its layers in groups (two groups' summaries at a time, a
    column group again for each row group), with the same values; an asymmetric measure
    (PWCCA) and a cross-grid too."""
    from jaxsim import geometry

    layers = [rng.normal(size=(20, 4)) for _ in range(5)]
    others = [rng.normal(size=(20, 4)) for _ in range(2)]
    cases = [("rsa", layers, None), ("rsa", layers, others), ("pwcca", layers, None)]
    want = [jaxsim.similarity_grid(a, b, metric=m, warn=False).values for m, a, b in cases]
    prepared = []
    real = _pairwise.prepare_all
    monkeypatch.setattr(
        _pairwise,
        "prepare_all",
        lambda measure, xs, tick: prepared.append(len(xs)) or real(measure, xs, tick),
    )
    one = jax.eval_shape(geometry.rsa_measure().prepare, layers[0])
    size = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(one))
    monkeypatch.setattr(_pairwise, "SUMMARY_BUDGET", 4 * size)  # 2 layers a group
    got = jaxsim.similarity_grid(layers, metric="rsa").values
    # groups {0, 1}, {2, 3}, {4}: 5 rows, then columns {2, 3}, {4} after the first, {4}
    assert sum(prepared) == 9 and max(prepared) == 2, prepared
    np.testing.assert_allclose(got, want[0], rtol=1e-12)
    for (m, a, b), ref in zip(cases[1:], want[1:]):
        one = jax.eval_shape(_registry.measure_for(m, {})[0]().prepare, a[0])
        monkeypatch.setattr(
            _pairwise,
            "SUMMARY_BUDGET",
            4 * sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(one)),
        )
        prepared.clear()
        np.testing.assert_allclose(
            jaxsim.similarity_grid(a, b, metric=m, warn=False).values, ref, rtol=1e-12, err_msg=m
        )
        assert max(prepared) == 2 and len(prepared) > 3, (m, prepared)


@pytest.mark.parametrize(
    "load",
    # slow, run with -m slow (suite time; the CPU hog also takes a core from the other
    # worker): docs/sharding.md's example runs the same host-device gather by default
    [
        pytest.param("quiet", marks=pytest.mark.slow),
        pytest.param("a CPU hog beside it", marks=pytest.mark.slow),
    ],
)
def test_sharded_pwcca_grid_completes(load):
    """Issue 23's crash: a PWCCA grid of layers sharded over 8 host devices, after linear-CKA
    grids of them, aborted the process (``Termination timeout for all gather``, exit 134)
    within a minute on a quiet machine. Outside jit, layers spread over host devices are
    gathered into host memory on entry, so no collective runs (the jitted linear-CKA grid
    still divides its work); the values equal one device's exactly."""
    script = os.path.join(SHARDED, "pwcca_after_cka.py")
    env = subprocess_env("--xla_force_host_platform_device_count=8")
    hog = None
    if load != "quiet":
        hog = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time\nend = time.time() + 120\nwhile time.time() < end: pass",
            ]
        )
    try:
        # under load only eager calls, which run no collective; a jitted grid's collectives
        # are XLA's CPU runtime's to schedule
        mode = "jit" if load == "quiet" else "eager"
        out = subprocess.run(
            [sys.executable, script, "1024", "128,256,128,256", mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        if hog is not None:
            hog.kill()
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "sharded pwcca ok" in out.stdout


def test_two_processes_with_jax_distributed_equal_one():
    """The multi-host recipe of docs/sharding.md, on this machine: two processes joined by
    jax.distributed over gloo, each holding half of the examples as a global array. The
    linear-CKA grid (the ring), a minibatch CKA stream and a PWCCA grid (pairs divided
    among the processes) equal the single-process values to 1e-12 in float64."""
    import socket

    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = os.path.join(SHARDED, "multi_process.py")
    env = subprocess_env()
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(i), "2", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"process {i}: ok" in out, err[-3000:]
