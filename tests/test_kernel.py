"""Kernel alignment against NumPy float64 implementations of the published formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import orthogonal, related
from hypothesis import given
from hypothesis import strategies as st
from references import (
    np_centering,
    np_cka,
    np_gram_rbf,
    np_hsic_biased,
    np_hsic_unbiased,
    np_linear_cka,
)

import jaxsim
from jaxsim import _distances, _rbf_median

# ---------------------------------------------------------------- NumPy references
# Kornblith et al. 2019 (Gram, centering, CKA) and Song et al. 2012 (unbiased HSIC).


# ------------------------------------------------------------------------- values


def test_grams(x64, rng):
    x, _ = related(rng, n=40)
    np.testing.assert_allclose(jaxsim.gram_linear(x), x @ x.T, rtol=1e-12)
    for t in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(
            jaxsim.gram_rbf(x, threshold=t), np_gram_rbf(x, t), rtol=1e-10, atol=1e-12
        )


def test_center_gram(x64, rng):
    x, _ = related(rng, n=30)
    k = x @ x.T
    h = np_centering(30)
    np.testing.assert_allclose(jaxsim.center_gram(k), h @ k @ h, atol=1e-10)
    # U-centered inner products give the unbiased HSIC; U-centered rows sum to 0.
    ku = np.asarray(jaxsim.center_gram(k, debiased=True))
    np.testing.assert_allclose(np.diag(ku), 0, atol=1e-12)
    np.testing.assert_allclose(ku.sum(0), 0, atol=1e-9)


@pytest.mark.parametrize("debiased", [False, True])
def test_hsic(x64, rng, debiased):
    x, y = related(rng, n=50)
    k, l = x @ x.T, np_gram_rbf(y)
    ref = np_hsic_unbiased(k, l) if debiased else np_hsic_biased(k, l)
    np.testing.assert_allclose(jaxsim.hsic(k, l, debiased=debiased), ref, rtol=1e-9)


def test_debiased_is_the_one_name(rng):
    """One name per concept, no deprecated aliases in 0.1: ``unbiased=`` is gone."""
    x, y = related(rng, n=20)
    k, l = x @ x.T, y @ y.T
    with pytest.raises(TypeError, match="unbiased"):
        jaxsim.hsic(k, l, unbiased=True)
    with pytest.raises(TypeError, match="unbiased"):
        jaxsim.center_gram(k, unbiased=True)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_against_reference(x64, rng, debiased):
    x, y = related(rng, n=60)
    ref = np_linear_cka(x, y, debiased)
    np.testing.assert_allclose(jaxsim.cka(x @ x.T, y @ y.T, debiased=debiased), ref, rtol=1e-10)
    for method in ("gram", "features", "auto"):
        got = jaxsim.linear_cka(x, y, debiased=debiased, method=method)
        np.testing.assert_allclose(got, ref, rtol=1e-10)
    for t in (0.5, 1.0):
        ref_rbf = np_cka(np_gram_rbf(x, t), np_gram_rbf(y, t), debiased)
        np.testing.assert_allclose(
            jaxsim.rbf_cka(x, y, threshold=t, debiased=debiased), ref_rbf, rtol=1e-9
        )


def test_feature_space_route_is_chosen_for_tall_inputs():
    from jaxsim._feature_route import use_feature_space

    assert use_feature_space(10_000, [512], [512])
    assert not use_feature_space(256, [1024], [2048])
    # a cross-grid forms only L_a L_b + L inner products of Gram blocks, but stacks all
    # L of them for every block pair: counting that as L^2 keeps the feature route where
    # it is measured faster (docs/performance.md)
    assert use_feature_space(512, [32] * 20, [32] * 20)
    assert use_feature_space(1024, [64] * 20, [64] * 20)


def test_large_n_feature_route(x64, rng):
    # n much larger than the widths: the auto route must agree with the reference
    x, y = related(rng, n=1500, d1=5, d2=7)
    np.testing.assert_allclose(jaxsim.linear_cka(x, y), np_linear_cka(x, y), rtol=1e-10)
    np.testing.assert_allclose(
        jaxsim.linear_cka(x, y, debiased=True), np_linear_cka(x, y, True), rtol=1e-9
    )


# -------------------------------------------------------------------- invariances


@pytest.mark.parametrize("metric", ["linear", "rbf", "linear_debiased"])
def test_cka_invariances(x64, rng, metric):
    f = {
        "linear": jaxsim.linear_cka,
        "rbf": jaxsim.rbf_cka,
        "linear_debiased": lambda a, b: jaxsim.linear_cka(a, b, debiased=True),
    }[metric]
    x, y = related(rng, n=80)
    base = f(x, y)
    q = orthogonal(rng, x.shape[1])
    np.testing.assert_allclose(f(x @ q, y), base, rtol=1e-9)
    np.testing.assert_allclose(f(3.7 * x, y), base, rtol=1e-9)
    np.testing.assert_allclose(f(x[:, rng.permutation(x.shape[1])], y), base, rtol=1e-9)
    np.testing.assert_allclose(f(x + 10.0, y), base, rtol=1e-8)
    np.testing.assert_allclose(f(y, x), base, rtol=1e-9)
    np.testing.assert_allclose(f(x, x), 1.0, rtol=1e-10)


def test_linear_cka_not_invariant_to_anisotropic_scaling(x64, rng):
    # the tests above would pass for a constant function; this one would not
    x, y = related(rng, n=80)
    scale = np.ones(x.shape[1])
    scale[0] = 50.0
    assert abs(float(jaxsim.linear_cka(x * scale, y)) - float(jaxsim.linear_cka(x, y))) > 1e-3


@given(
    st.sampled_from([(8, 1, 3), (30, 10, 4)]),
    st.floats(0.01, 100),
    st.floats(-50, 50),
    st.integers(0, 2**16),
)
def test_cka_bounds(shape, scale, offset, seed):
    # two shapes (one with a single feature and few examples): every example reuses
    # the same compiled functions, the values vary
    n, d1, d2 = shape
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        x = scale * rng.normal(size=(n, d1)) + offset
        y = rng.normal(size=(n, d2)) ** 3
        for f in (jaxsim.linear_cka, jaxsim.rbf_cka):
            v = float(f(x, y))
            assert 0 <= v <= 1 + 1e-12
        np.testing.assert_allclose(
            jaxsim.linear_cka(x, y, method="features"),
            jaxsim.linear_cka(x, y, method="gram"),
            rtol=1e-8,
            atol=1e-12,
        )


# --------------------------------------------------------------------- numerics


def test_float32_unbiased_cka_with_large_mean(rng):
    n = 2048
    x = rng.normal(size=(n, 64)) + 5.0
    y = np.tanh(x @ rng.normal(size=(64, 32)) / 8) + 5.0 + 0.1 * rng.normal(size=(n, 32))
    with jax.enable_x64(True):
        ref = float(jaxsim.linear_cka(x, y, debiased=True, method="gram"))
        np.testing.assert_allclose(
            ref, np_linear_cka(x - x.mean(0), y - y.mean(0), True), rtol=1e-8
        )
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    for method in ("gram", "features"):
        got = jaxsim.linear_cka(x32, y32, debiased=True, method=method)
        assert got.dtype == jnp.float32
        assert abs(float(got) - ref) < 1e-4


def test_zero_variance_gives_zero_not_nan(x64, rng):
    x = rng.normal(size=(20, 3))
    const = np.ones((20, 4))
    for method in ("gram", "features"):
        assert float(jaxsim.linear_cka(x, const, method=method)) == 0.0
        assert float(jaxsim.linear_cka(const, const, method=method, debiased=True)) == 0.0
    assert np.isfinite(float(jaxsim.rbf_cka(x, const)))
    # a constant layer's RBF kernel is constant: its centered kernel is exactly zero, so its
    # similarity to anything, itself included, is 0 (a rounding residue of the U-centering
    # once scored 1.0 in float64, 0 in float32), on the single-pair and the grid routes
    for dtype in (np.float64, np.float32):
        zero = np.zeros((40, 4), dtype)
        for debiased in (False, True):
            assert float(jaxsim.rbf_cka(zero, zero, debiased=debiased)) == 0.0, (dtype, debiased)
            grid = jaxsim.similarity_grid(
                [zero, x.repeat(2, 0).astype(dtype)], metric="rbf_cka", debiased=debiased
            ).values
            assert float(grid[0, 0]) == float(grid[0, 1]) == 0.0, (dtype, debiased)
        ones = np.ones((30, 30), dtype)
        assert float(jaxsim.cka(ones, ones, debiased=True)) == 0.0, dtype


def test_integer_inputs_are_cast(rng):
    x = rng.integers(0, 5, size=(30, 4))
    y = rng.integers(0, 5, size=(30, 3))
    v = jaxsim.linear_cka(x, y)
    assert jnp.issubdtype(v.dtype, jnp.floating)
    np.testing.assert_allclose(v, np_linear_cka(x.astype(float), y.astype(float)), rtol=1e-5)


def test_dtype_follows_inputs(rng):
    x, y = related(rng, n=30)
    assert jaxsim.linear_cka(x.astype(np.float32), y.astype(np.float32)).dtype == jnp.float32
    with jax.enable_x64(True):
        assert jaxsim.linear_cka(x, y).dtype == jnp.float64


# ------------------------------------------------------------------ jit and vmap


@pytest.mark.parametrize("name", ["linear_cka", "rbf_cka"])
def test_jit_equals_eager_and_vmap_equals_loop(x64, rng, name):
    f = getattr(jaxsim, name)
    xs = rng.normal(size=(4, 40, 6))
    ys = xs @ rng.normal(size=(6, 5)) + rng.normal(size=(4, 40, 5))
    eager = np.array([float(f(a, b)) for a, b in zip(xs, ys)])
    np.testing.assert_allclose(jax.vmap(f)(xs, ys), eager, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(f)(xs[0], ys[0]), eager[0], rtol=1e-12)
    np.testing.assert_allclose(
        jax.jit(jaxsim.hsic)(xs[0] @ xs[0].T, ys[0] @ ys[0].T),
        jaxsim.hsic(xs[0] @ xs[0].T, ys[0] @ ys[0].T),
        rtol=1e-12,
    )


def test_higher_rank_activations_are_flattened(x64, rng):
    x = rng.normal(size=(30, 2, 3, 4))
    y = rng.normal(size=(30, 5))
    np.testing.assert_allclose(
        jaxsim.linear_cka(x, y), np_linear_cka(x.reshape(30, -1), y), rtol=1e-10
    )


# -------------------------------------------------------------------- validation


def test_errors(rng):
    x = rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match=r"y: has 9 examples \(shape \(9, 3\)\) but x has 10"):
        jaxsim.linear_cka(x, x[:9])
    with pytest.raises(ValueError, match=r"need at least 4 examples for the unbiased HSIC.*n=3"):
        jaxsim.linear_cka(x[:3], x[:3], debiased=True)
    with pytest.raises(ValueError, match=r"need at least 4 examples.*n=3"):
        jaxsim.hsic(np.eye(3), np.eye(3), debiased=True)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"x: contains 1 non-finite value.*shape \(10, 3\)"):
        jaxsim.linear_cka(bad, x)
    assert np.isnan(float(jaxsim.linear_cka(bad, x, check_finite=False)))
    with pytest.raises(ValueError, match=r"threshold: must be a positive finite number, got -1"):
        jaxsim.rbf_cka(x, x, threshold=-1)
    with pytest.raises(TypeError, match=r"x: complex dtype"):
        jaxsim.linear_cka(x.astype(complex), x)
    with pytest.raises(TypeError, match=r"y: expected a numeric array, got dtype <U1"):
        jaxsim.linear_cka(x, np.full((10, 3), "a"))
    with pytest.raises(
        ValueError,
        match=(
            r"x: expected activations of shape \(n, "
            r"features...\), got shape \(10,\)"
        ),
    ):
        jaxsim.linear_cka(x[:, 0], x)
    with pytest.raises(
        ValueError,
        match=(
            r"gram_x: expected a square \(n, n\) Gram matrix, "
            r"got shape \(10, 3\)"
        ),
    ):
        jaxsim.cka(x, x)
    with pytest.raises(ValueError, match=r"method: expected one of 'auto', 'gram', 'features'"):
        jaxsim.linear_cka(x, x, method="fast")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_blockwise_median_of_distances(rng, dtype):
    """The grid's RBF bandwidth, found block by block from the features (radix selection,
    8 bits a pass), against the sorted median of the n x n distances: n even and odd, rows
    padded to 1032 (3 blocks of 344, nearly all padding), ties at the middle (repeated
    points, two clusters whose median falls between them, more than half the pairs
    coinciding), and its derivative against that of the median of the full matrix."""

    def both(x):
        xc, sq = _distances.distance_terms(x)
        got = _rbf_median.blockwise_median(
            _distances.pad_rows(xc, 1032), _distances.pad_rows(sq, 1032), x.shape[0]
        )
        return got, jnp.median(_distances.sq_distances(x))

    check = jax.jit(both)
    with jax.enable_x64(dtype == "float64"):
        cases = [
            rng.normal(size=(12, 2)),
            rng.normal(size=(9, 2)) ** 3,
            np.repeat(rng.normal(size=(3, 2)), 4, axis=0),  # many ties
            np.repeat([[0.0, 0], [1, 1]], [6, 6], axis=0),  # two values, median between
            np.repeat([[0.0, 0], [1, 1]], [9, 3], axis=0),
        ]  # most pairs coincide
        for x in cases:
            got, want = check(jnp.asarray(x, dtype))
            assert got.dtype == dtype, got.dtype
            # (float32: the blocks' distances may round differently from the whole matrix's)
            np.testing.assert_allclose(got, want, rtol=0 if dtype == "float64" else 3e-7)
        grad, want = jax.jit(lambda a: [jax.grad(lambda v, k=k: both(v)[k])(a) for k in (0, 1)])(
            jnp.asarray(cases[0], dtype)
        )
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(grad)).max() > 0


def test_blockwise_median_derivative_when_distances_round_differently(rng, monkeypatch):
    """The derivative's passes recompute the distance blocks, in programs a GPU fuses
    differently, and can round an entry one ulp away from the order statistic the
    selection found (an H100 gave half the derivative: no entry equalled one of the two).
    Simulated here by order statistics one pattern off either way: the derivative must
    still flow to those entries, as the median of the whole matrix's does. (A tolerance
    instead would average in distinct entries near the median: at n = 1500 in float32
    the derivative was then off by 0.13 of 0.97: checked first, without the simulation.)"""

    def both(x, rows=1032):
        xc, sq = _distances.distance_terms(x)
        got = _rbf_median.blockwise_median(
            _distances.pad_rows(xc, rows), _distances.pad_rows(sq, rows), x.shape[0]
        )
        return got, jnp.median(_distances.sq_distances(x))

    x = jnp.asarray(rng.normal(size=(1100, 16)), jnp.float32)  # 3 x 3 blocks of 368
    grad, want = jax.jit(lambda v: [jax.grad(lambda a, k=k: both(a, 1104)[k])(v) for k in (0, 1)])(
        x
    )
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)

    found = _rbf_median.median_patterns
    monkeypatch.setattr(
        _rbf_median, "median_patterns", lambda *a: (lambda lo, hi: (lo + 1, hi - 1))(*found(*a))
    )
    with jax.enable_x64(True):
        for shape in ((12, 2), (700, 3)):  # (700: the entries spread over 3 x 3 blocks)
            x = jnp.asarray(rng.normal(size=shape))
            grad, want = jax.jit(
                lambda v: [jax.grad(lambda a, k=k: both(a)[k])(v) for k in (0, 1)]
            )(x)
            np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-9, err_msg=str(shape))


def test_rbf_median_when_the_sample_bracket_misses(rng, monkeypatch):
    """The sorted sample's bracket is checked by counting: when it does not hold the median
    (a bracket too narrow to hold it, or an empty one) the bisection runs over the whole
    range, with the same value."""
    x = (rng.normal(size=(200, 16)) * np.arange(1, 17) ** -1.0 + 5).astype(np.float32)
    d = _distances.sq_distances(jnp.asarray(x))
    for margin in (0.0, -50.0):
        monkeypatch.setattr(_rbf_median, "MARGIN", margin)
        assert float(jax.jit(_rbf_median.median_of_non_negative)(d)) == float(jnp.median(d))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rbf_median_by_selection_equals_the_sorted_median(rng, dtype):

    median = jax.jit(_rbf_median.median_of_non_negative)
    with jax.enable_x64(dtype == "float64"):  # the float64 route bisects int64 patterns
        for n in (6, 101):  # even and odd numbers of entries
            d = _distances.sq_distances(jnp.asarray(rng.normal(size=(n, 3)), dtype))
            assert d.dtype == dtype and float(median(d)) == float(jnp.median(d))
        # realistic activations: a power-law spectrum with an offset, n even
        x = (rng.normal(size=(300, 32)) * np.arange(1, 33) ** -1.0 + 5).astype(dtype)
        d = _distances.sq_distances(jnp.asarray(x))
        assert float(median(d)) == float(jnp.median(d))
    if dtype == "float64":
        return
    # ties at the middle, one value, extremes; one shape, one compile
    for values in (
        [0, 0, 0, 1.0, 1],
        [0, 0, 1.0, 1.0, 9],
        [3.0] * 5,
        [1.0, 2, 2, 2, 5],
        [0, 1e-30, 1e30, 7, 7],
        [1.0, np.nan, 2, 3, 4],
    ):
        v = jnp.asarray(values, jnp.float32)
        np.testing.assert_array_equal(median(v), jnp.median(v), err_msg=str(values))


def test_bandwidth_selection_refuses_more_distances_than_it_counts():
    """Both selections of the RBF bandwidth count in uint32: at n = 65536 the n^2 squared
    distances reach 2^32, so the grid's blockwise source (which, unlike the dense one,
    needs no n x n memory to get there) must refuse as the dense one does, not wrap its
    counts around (read at trace time, nothing computed)."""
    from jaxsim import kernel

    for n in (65536, 70000):
        x = jax.ShapeDtypeStruct((n, 2), np.float32)
        with pytest.raises(ValueError, match=r"exceed the 2\^32 - 1"):
            jax.eval_shape(lambda a: kernel.rbf_measure().blocks.source(a, n + (-n) % 512), x)
        with pytest.raises(ValueError, match=r"exceed the 2\^32 - 1"):
            jax.eval_shape(
                lambda a: _rbf_median.median_of_non_negative(_distances.sq_distances(a)), x
            )
    x = jax.ShapeDtypeStruct((65535, 2), np.float32)
    source = lambda a: kernel.rbf_measure().blocks.source(a, 65536)
    assert jax.eval_shape(source, x).median.shape == ()


def exact_unbiased_hsic(x, y):
    """Song et al.'s unbiased HSIC of linear kernels in exact rational arithmetic (integer
    activations), from the published three-term formula."""
    from fractions import Fraction

    n = len(x)
    gram = lambda a: [
        [
            Fraction(int(sum(u * v for u, v in zip(p, q)))) if i != j else Fraction(0)
            for j, q in enumerate(a)
        ]
        for i, p in enumerate(a)
    ]
    k, l = gram([[int(v) for v in r] for r in x]), gram([[int(v) for v in r] for r in y])
    total = lambda m: sum(sum(r) for r in m)
    trace_kl = sum(k[i][j] * l[j][i] for i in range(n) for j in range(n))
    kl_sum = sum(
        sum(k[i][j] for i in range(n)) * sum(l[j][m] for m in range(n)) for j in range(n)
    )  # 1^T K L 1
    return (trace_kl + total(k) * total(l) / ((n - 1) * (n - 2)) - Fraction(2, n - 2) * kl_sum) / (
        n * (n - 3)
    )


# float32 is the harder case; float64 with -m slow (suite time)
@pytest.mark.parametrize("dtype", [pytest.param(np.float64, marks=pytest.mark.slow), np.float32])
def test_debiased_cka_of_a_layer_whose_unbiased_hsic_is_zero(x64, rng, dtype):
    """x's unbiased HSIC with itself is exactly 0 (exact arithmetic below), so its debiased
    CKA with anything is 0/0, which jaxsim reports as 0 (as for a constant layer); float64
    gave 1.6e-16 and float32 0.170, rounding noise over rounding noise. Also a family at
    larger n (examples of orthogonal patterns: one-hot rows with an offset), on every route,
    grids and minibatch states."""
    x = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]], float)
    y = np.array([[1, 1], [0, 1], [0, 0], [1, 0]], float)
    assert exact_unbiased_hsic(x, x) == 0 and exact_unbiased_hsic(y, y) > 0
    n = 48
    onehot = np.diag(rng.uniform(0.5, 2.0, n)) + 3.0
    assert exact_unbiased_hsic(np.diag(np.arange(1, 9)), np.diag(np.arange(1, 9))) == 0
    other = rng.normal(size=(n, 5))
    for a, b in ((x, y), (onehot, other)):
        a, b = a.astype(dtype), b.astype(dtype)
        for method in ("gram", "features"):
            assert float(jaxsim.linear_cka(a, b, debiased=True, method=method)) == 0, method
            assert float(jaxsim.linear_cka(b, a, debiased=True, method=method)) == 0, method
            grid = np.asarray(
                jaxsim.similarity_grid(
                    [a, b, 2 * b], debiased=True, method=method, progress=False
                ).values
            )
            np.testing.assert_array_equal(grid[0], 0, err_msg=method)
            np.testing.assert_array_equal(grid[:, 0], 0, err_msg=method)
            np.testing.assert_allclose(grid[1, 2], 1, rtol=1e-5)
        assert float(jaxsim.cka(jaxsim.gram_linear(a), jaxsim.gram_linear(b), debiased=True)) == 0
    half = n // 2  # each batch's rows are orthogonal patterns too
    state = jaxsim.minibatch_cka_init(1, 1, dtype=dtype)
    for rows in (slice(0, half), slice(half, n)):
        state = jaxsim.minibatch_cka_update(
            state, [onehot[rows].astype(dtype)], [other[rows].astype(dtype)]
        )
    assert float(jaxsim.minibatch_cka_result(state).values[0, 0]) == 0
