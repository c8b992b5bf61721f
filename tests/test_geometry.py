"""Procrustes, RSA, mutual kNN and linear predictivity against NumPy/SciPy references."""

from fractions import Fraction

import jax
import numpy as np
import pytest
from conftest import block_grid_memory, orthogonal, related
from scipy import linalg, stats
from scipy.spatial.distance import pdist

import jaxsim
from jaxsim import _pairwise, _row_blocks


def np_normalize(x):
    xc = x - x.mean(0)
    return xc / np.linalg.norm(xc)


def test_procrustes_against_scipy(x64, rng):
    x, y = related(rng, 100, 6, 6)
    a, b = np_normalize(x), np_normalize(y)
    r, scale = linalg.orthogonal_procrustes(a, b)
    np.testing.assert_allclose(jaxsim.procrustes_similarity(x, y), scale, rtol=1e-10)
    np.testing.assert_allclose(
        jaxsim.procrustes_distance(x, y, angular=False), np.linalg.norm(a @ r - b), rtol=1e-8
    )
    np.testing.assert_allclose(jaxsim.procrustes_distance(x, y), np.arccos(scale), rtol=1e-10)
    # invariances: rotation, isotropic scaling, translation; not anisotropic scaling
    q = orthogonal(rng, 6)
    np.testing.assert_allclose(jaxsim.procrustes_similarity(3 * x @ q + 1, y), scale, rtol=1e-9)
    assert abs(float(jaxsim.procrustes_similarity(x * np.arange(1, 7), y)) - scale) > 1e-3
    np.testing.assert_allclose(jaxsim.procrustes_distance(x, x @ q), 0, atol=1e-6)


def test_full_whitening_gives_mean_cca(x64, rng):
    x, y = related(rng, 300, 5, 5)
    np.testing.assert_allclose(
        jaxsim.procrustes_similarity(x, y, alpha=0.0), jaxsim.mean_cca(x, y), rtol=1e-8
    )
    mid = float(jaxsim.procrustes_similarity(x, y, alpha=0.5))
    assert np.isfinite(mid) and 0 < mid <= 1
    with pytest.raises(ValueError, match=r"alpha: must lie in \[0, 1\]"):
        jaxsim.procrustes_similarity(x, y, alpha=2)


@pytest.mark.parametrize("dissimilarity", ["correlation", "euclidean"])
@pytest.mark.parametrize("compare", ["spearman", "pearson", "kendall"])
def test_rsa_against_scipy(x64, rng, dissimilarity, compare):
    x, y = related(rng, 40, 6, 5)
    da = pdist(x, "correlation" if dissimilarity == "correlation" else "euclidean")
    db = pdist(y, "correlation" if dissimilarity == "correlation" else "euclidean")
    ref = {"spearman": stats.spearmanr, "pearson": stats.pearsonr, "kendall": stats.kendalltau}[
        compare
    ](da, db)[0]
    got = jaxsim.rsa(x, y, dissimilarity=dissimilarity, compare=compare)
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    np.testing.assert_allclose(jaxsim.rdm(x, dissimilarity=dissimilarity)[0, 1], da[0], rtol=1e-9)


def test_pearson_rsa_grid_in_blocks(x64, rng):
    """Pearson RSA grids form each layer's centered RDM block by block from its features
    (n = 1100: 3 blocks, the last padded), equal to SciPy; a constant layer scores 0."""
    n = 1100
    a = [rng.normal(size=(n, 3)) + 5, rng.normal(size=(n, 4))]
    a[1][:, :3] += a[0]
    a.append(np.tanh(a[1]) + 0.1 * rng.normal(size=(n, 4)))
    for dissimilarity in ("correlation", "euclidean"):
        grid = jaxsim.similarity_grid(
            a + [np.ones((n, 2))], metric="rsa", compare="pearson", dissimilarity=dissimilarity
        ).values
        ref = [
            [stats.pearsonr(pdist(x, dissimilarity), pdist(y, dissimilarity))[0] for y in a]
            for x in a
        ]
        np.testing.assert_allclose(np.asarray(grid)[:3, :3], ref, rtol=1e-10, err_msg=dissimilarity)
        np.testing.assert_array_equal(np.asarray(grid)[3, :3], 0)


def test_rsa_grid_memory_is_not_layers_times_n_squared():
    """Read from the compiled programs: a Pearson RSA grid's per-layer source is O(n d)
    and its block sum holds L blocks of b x b. Before, every layer's prepared RDM (n^2 / 2
    values) was held at once: 8 layers at n = 4096 in float32, 268 MB."""
    from jaxsim import geometry

    n, d = 3000, 16
    one, total, n_pad = block_grid_memory(
        geometry.rsa_measure(compare="pearson").blocks, n, d, num_layers=6
    )
    rdm_bytes = n * n * 4
    assert one.temp_size_in_bytes < rdm_bytes / 2
    assert one.output_size_in_bytes < 2 * n_pad * (d + 1) * 4
    assert total.temp_size_in_bytes < rdm_bytes / 2


def test_kendall_in_row_blocks_with_ties(x64, rng):
    """Kendall's tau-b compares the m x m pairs of entries a few rows at a time (here 7
    rows of 150, the last padded), ties included, as SciPy counts them."""

    a = np.round(rng.normal(size=150), 1)
    b = np.round(a + rng.normal(size=150), 1)
    want = stats.kendalltau(a, b)[0]
    for entries in (150 * 7, 150 * 150):
        np.testing.assert_allclose(_row_blocks.kendall_tau_b(a, b, entries), want, rtol=1e-12)
        # float32: the same order and ties, the counts exact integers
        got = _row_blocks.kendall_tau_b(a.astype(np.float32), b.astype(np.float32), entries)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # memory, from the compiled program: O(m), where before the two m x m sign matrices
    # were formed (m = 4000 values: 128 MB in float32)
    m = 4000
    v = jax.ShapeDtypeStruct((m,), np.float32)
    compiled = jax.jit(lambda p, q: _row_blocks.kendall_tau_b(p, q)).lower(v, v).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < m * m * 4 / 4


def test_mutual_knn_against_brute_force(x64, rng):
    x, y = related(rng, 50, 6, 5, noise=1.0)
    k = 5

    def neighbours(a):
        z = a / np.linalg.norm(a, axis=1, keepdims=True)
        sim = z @ z.T
        np.fill_diagonal(sim, -np.inf)
        return [set(np.argsort(-row)[:k]) for row in sim]

    nx, ny = neighbours(x), neighbours(y)
    ref = np.mean([len(a & b) / k for a, b in zip(nx, ny)])
    np.testing.assert_allclose(jaxsim.mutual_knn(x, y, k=k), ref, rtol=1e-12)
    # neighbours found in row blocks (here 3 rows, 17 blocks, the last padded): the same
    # sets, with O(b n) memory instead of an n x n matrix
    from jaxsim._row_blocks import knn_indices as _knn_indices

    blocked = np.asarray(jax.jit(lambda a: _knn_indices(a, k, block_entries=150))(x).indices)
    assert [set(row) for row in blocked] == nx
    assert float(jaxsim.mutual_knn(x, 2 * x, k=k)) == 1.0
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, n - 1\] = \[1, 49\], got 50"):
        jaxsim.mutual_knn(x, y, k=50)


def test_mutual_knn_memory_is_not_n_squared():
    """Read from the compiled program: a layer's neighbours take O(n k) to keep and
    O(b n) to find, where before each layer was a dense n x n 0/1 matrix (a grid of 8
    layers at n = 4096 held 2.1 GB more)."""

    k = 10

    def memory(n):
        x = jax.ShapeDtypeStruct((n, 8), np.float32)
        return jax.jit(lambda a: _row_blocks.knn_indices(a, k)).lower(x).compile().memory_analysis()

    small, large = memory(6000), memory(12000)
    assert large.output_size_in_bytes < 2 * 12000 * k * 4
    assert large.temp_size_in_bytes < 12000 * 12000 * 4 / 4
    # rows in blocks of a fixed number of similarities: not growing with n (n^2: 4x)
    assert large.temp_size_in_bytes < 1.5 * small.temp_size_in_bytes


def test_linear_predictivity_and_helpers(x64, rng):
    x, y = related(rng, 200, 6, 4)
    xc, yc = x - x.mean(0), y - y.mean(0)
    lam = 1e-2 * np.trace(xc.T @ xc) / 6
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(6), xc.T @ yc)
    ref = 1 - np.sum((yc - xc @ w) ** 2) / np.sum(yc**2)
    np.testing.assert_allclose(jaxsim.linear_predictivity(x, y, ridge=1e-2), ref, rtol=1e-10)
    a = rng.normal(size=(6, 6)) + 2 * np.eye(6)
    np.testing.assert_allclose(jaxsim.linear_predictivity(x, x @ a, ridge=0.0), 1.0, rtol=1e-10)
    v = rng.normal(size=6)
    got = jaxsim.predict_direction(x, x @ a, v, ridge=0.0)
    want = np.linalg.solve(a, v)
    np.testing.assert_allclose(got, want / np.linalg.norm(want), rtol=1e-8)
    perm = rng.permutation(6)
    idx, corr = jaxsim.most_similar_neurons(x, -2 * x[:, perm] + 1e-3 * rng.normal(size=(200, 6)))
    np.testing.assert_array_equal(idx, np.argsort(perm))
    np.testing.assert_allclose(corr, -1, atol=1e-5)
    with pytest.raises(ValueError, match=r"direction: expected shape \(6,\)"):
        jaxsim.predict_direction(x, y, np.ones(5))


@pytest.mark.parametrize(
    "metric,fn,opts",
    [
        ("procrustes", jaxsim.procrustes_similarity, {"alpha": 0.5}),
        ("rsa", jaxsim.rsa, {"compare": "pearson"}),
        ("mutual_knn", jaxsim.mutual_knn, {"k": 4}),
        ("linear_predictivity", jaxsim.linear_predictivity, {"ridge": 1e-2}),
    ],
)
def test_in_grids(x64, rng, metric, fn, opts):
    x, y = related(rng, 60, 6, 5)
    layers = [x, y, np.tanh(y)]
    grid = jaxsim.similarity_grid(layers, metric=metric, **opts)
    loop = [[float(fn(a, b, **opts)) for b in layers] for a in layers]
    np.testing.assert_allclose(grid.values, loop, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda a, b: fn(a, b, **opts))(x, y), loop[0][1], rtol=1e-8)


def quantised_layers(rng, n=40):
    """Integer-valued activations: rounded Gaussians (widths 3 and 2) and a ReLU layer with
    dead examples. Many of their RDM entries are exactly tied."""
    x, y = np.round(rng.normal(size=(n, 3))), np.round(rng.normal(size=(n, 2)))
    relu = np.maximum(np.round(2 * rng.normal(size=(n, 4))) - 1, 0)
    return x, y, relu


def exact_rdm_order(a, dissimilarity):
    """The upper triangle of an integer layer's RDM up to a strictly increasing map, in
    exact arithmetic: squared Euclidean distances, or for correlation distance
    ``1 - r`` with ``r = (d <a_i, a_j> - s_i s_j) / sqrt(v_i v_j)`` (``s`` the pattern sums,
    ``v = d |a|^2 - s^2``; r = 0 for a constant pattern) the value ``-sign(r) r^2`` as a
    fraction. SciPy's ``pdist(a, "correlation")`` rounds exactly tied entries apart (37
    distinct values for 21 here)."""
    if dissimilarity == "euclidean":
        return pdist(a, "sqeuclidean")
    rows = [[int(v) for v in row] for row in a]
    d = len(rows[0])
    dot = lambda p, q: sum(u * v for u, v in zip(p, q))
    out = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            si, sj = sum(rows[i]), sum(rows[j])
            c = d * dot(rows[i], rows[j]) - si * sj
            v = (d * dot(rows[i], rows[i]) - si * si) * (d * dot(rows[j], rows[j]) - sj * sj)
            out.append(0.0 if v == 0 else float(-np.sign(c) * Fraction(c * c, v)))
    return np.array(out)


@pytest.mark.parametrize(
    # ties are exact in both dtypes by the same code; float32 with -m slow (suite time)
    "dtype",
    [np.float64, pytest.param(np.float32, marks=pytest.mark.slow)],
)
def test_rsa_with_tied_dissimilarities(x64, rng, dtype):
    """Tied RDM entries take average ranks (Spearman) and count as ties (Kendall's tau-b),
    as scipy.stats does, on RDMs whose ties are exact: single pairs, grids (grouped and
    not) and the permutation test's statistic. jaxsim's RDMs were formed by a rounding
    expansion that broke exact ties (Spearman 0.1076 for 0.1030 on the first pair here)."""

    x, y, relu = quantised_layers(rng)
    layers = [x, y, relu, 3 * y + 2]
    tol = dict(rtol=1e-9 if dtype == np.float64 else 2e-6, atol=1e-12)
    cast = [a.astype(dtype) for a in layers]
    for dissimilarity in ("euclidean", "correlation"):
        rdms = [exact_rdm_order(a, dissimilarity) for a in layers]
        assert len(np.unique(rdms[0])) < len(rdms[0]) / 4  # ties are the rule here
        for compare, ref in (
            ("spearman", stats.spearmanr),
            ("kendall", lambda a, b: stats.kendalltau(a, b, variant="b")),
        ):
            want = np.array([[ref(a, b)[0] for b in rdms] for a in rdms])
            got = jaxsim.rsa(cast[0], cast[1], dissimilarity=dissimilarity, compare=compare)
            np.testing.assert_allclose(got, want[0, 1], **tol, err_msg=compare)
            grid = jaxsim.similarity_grid(
                cast, metric="rsa", dissimilarity=dissimilarity, compare=compare, progress=False
            ).values
            np.testing.assert_allclose(grid, want, **tol, err_msg=compare)
            if (dissimilarity, compare) != ("correlation", "kendall"):
                continue  # the permutation test once: it prepares layers as grids do
            stat = jaxsim.stats.permutation_test(
                "rsa",
                cast[0],
                cast[2],
                num_permutations=4,
                key=jax.random.key(0),
                dissimilarity=dissimilarity,
                compare=compare,
            )
            np.testing.assert_allclose(stat.statistic, want[0, 2], **tol, err_msg=compare)
    # grouped: a summary budget of one layer's ranks, so each is prepared in its own group
    budget = _pairwise.SUMMARY_BUDGET
    _pairwise.SUMMARY_BUDGET = 2 * np.dtype(dtype).itemsize * len(rdms[0])
    try:
        grouped = jaxsim.similarity_grid(
            cast, metric="rsa", dissimilarity="euclidean", progress=False
        ).values
    finally:
        _pairwise.SUMMARY_BUDGET = budget
    rdms = [pdist(a) for a in layers]
    np.testing.assert_allclose(
        grouped, [[stats.spearmanr(a, b)[0] for b in rdms] for a in rdms], **tol
    )


def test_procrustes_grid_pads_close_widths(x64, rng):
    """Zero columns leave a nuclear norm as it is: Procrustes grids pad layers to their
    width bucket (widths up to 64 together, 120 with 128), 3 compiled pair steps for 5
    widths, values equal to per-pair calls."""
    from jaxsim._measure import TRACE_COUNT

    acts = [rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) for d in (10, 40, 64, 128, 120)]
    for alpha in (1.0, 0.0):
        before = TRACE_COUNT["pairs"]
        grid = jaxsim.similarity_grid(acts, metric="procrustes", alpha=alpha, progress=False)
        # (the same pair step serves both alphas: compiled for the first only)
        assert TRACE_COUNT["pairs"] - before == (3 if alpha == 1 else 0)
        for i, j in [(0, 1), (0, 3), (3, 4)] if alpha == 1 else [(1, 4)]:  # padded pairs
            ref = jaxsim.procrustes_similarity(acts[i], acts[j], alpha=alpha)
            np.testing.assert_allclose(grid.values[i, j], ref, rtol=1e-10)
