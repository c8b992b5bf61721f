"""The CCA family against NumPy float64 implementations of the classic algorithms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import orthogonal, related
from references import np_cca, np_inv_sqrt, np_pwcca, np_svcca

import jaxsim

# ---------------------------------------------------------------- NumPy references
# Classic CCA (Hotelling) through covariance whitening, with google/svcca's epsilon
# convention; SVCCA (Raghu et al. 2017); PWCCA (Morcos et al. 2018) as computed by the
# code behind the published numbers. Written in the (n, features) convention.


# ------------------------------------------------------------------------- values


@pytest.mark.parametrize("shape", [(300, 10, 14), (300, 14, 10), (250, 8, 8)])
@pytest.mark.parametrize("epsilon", [0.0, 1e-3])
def test_cca_against_reference(x64, rng, shape, epsilon):
    x, y = related(rng, *shape)
    s = np_cca(x, y, epsilon)[0]
    res = jaxsim.cca(x, y, epsilon=epsilon)
    assert res.coefficients.shape == (min(shape[1:]),)
    np.testing.assert_allclose(res.coefficients, s, rtol=1e-9)
    np.testing.assert_allclose(jaxsim.mean_cca(x, y, epsilon=epsilon), s.mean(), rtol=1e-9)
    np.testing.assert_allclose(
        jaxsim.pwcca(x, y, epsilon=epsilon), np_pwcca(x, y, epsilon), rtol=1e-9
    )


def test_epsilon_drops_low_variance_units(x64, rng):
    x, y = related(rng, 300, 10, 14)
    x[:, 3] *= 1e-3  # scaled variance 1e-6 of the largest: dropped at epsilon=1e-4
    s, _, _, kx, _ = np_cca(x, y, 1e-4)
    assert kx.sum() == 9
    res = jaxsim.cca(x, y, epsilon=1e-4)
    assert int(res.rank) == 9
    np.testing.assert_allclose(res.coefficients[:9], s, rtol=1e-9)
    assert float(res.coefficients[9]) == 0.0
    np.testing.assert_allclose(jaxsim.mean_cca(x, y, epsilon=1e-4), s.mean(), rtol=1e-9)
    np.testing.assert_allclose(jaxsim.pwcca(x, y, epsilon=1e-4), np_pwcca(x, y, 1e-4), rtol=1e-9)


def test_canonical_variates(x64, rng):
    x, y = related(rng, 300, 6, 9)
    res = jaxsim.cca(x, y)
    xv, yv = np.asarray(res.x_variates), np.asarray(res.y_variates)
    np.testing.assert_allclose(np.cov(xv.T), np.eye(6), atol=1e-9)
    np.testing.assert_allclose(np.cov(yv.T), np.eye(6), atol=1e-9)
    corr = np.diag(np.corrcoef(xv.T, yv.T)[:6, 6:])
    np.testing.assert_allclose(corr, res.coefficients, rtol=1e-9)
    np.testing.assert_allclose((x - x.mean(0)) @ np.asarray(res.x_weights), xv, atol=1e-9)


@pytest.mark.parametrize("k", [1, 5, 8])
def test_svcca_keep_dims_against_reference(x64, rng, k):
    x, y = related(rng, 400, 12, 9)
    np.testing.assert_allclose(jaxsim.svcca(x, y, keep_dims=k), np_svcca(x, y, k), rtol=1e-9)


def test_svcca_wide_layers_use_gram_route(x64, rng):
    # fewer examples than features: the reduction goes through the n x n Gram
    x, y = related(rng, 40, 60, 50)
    np.testing.assert_allclose(jaxsim.svcca(x, y, keep_dims=10), np_svcca(x, y, 10), rtol=1e-8)


def test_svcca_keep_variance(x64, rng):
    x, y = related(rng, 400, 12, 9)
    x = x * np.linspace(3, 0.1, 12)  # spread the variances so the threshold matters

    def count(a, frac):
        s = np.linalg.svd(a - a.mean(0), compute_uv=False) ** 2
        # the slack keeps frac = 1 reachable: cumsum / sum can round below 1 (it did with
        # NumPy 2.5's BLAS, where argmax of all-False then counted 1 direction)
        return int(np.argmax(np.cumsum(s) / s.sum() >= frac - 1e-12)) + 1

    for frac in (0.5, 0.9, 0.99, 1.0):
        kx, ky = count(x, frac), count(y, frac)

        def reduce(a, k):
            ac = a - a.mean(0)
            u, s, _ = np.linalg.svd(ac, full_matrices=False)
            return u[:, :k] * s[:k]

        ref = np_cca(reduce(x, kx), reduce(y, ky))[0].mean()
        np.testing.assert_allclose(jaxsim.svcca(x, y, keep_variance=frac), ref, rtol=1e-8)


def test_rank_deficient_layer_is_finite(x64, rng):
    x, y = related(rng, 300, 6, 9)
    dup = np.concatenate([x, x[:, :2] + x[:, 2:4], np.zeros((300, 1))], axis=1)
    res = jaxsim.cca(dup, y)
    assert np.all(np.isfinite(res.coefficients))
    np.testing.assert_allclose(res.coefficients[:6], np_cca(x, y)[0], rtol=1e-7)
    np.testing.assert_allclose(res.coefficients[6:], 0, atol=1e-7)
    assert np.isfinite(float(jaxsim.pwcca(dup, y)))
    assert np.isfinite(float(jaxsim.svcca(dup, y)))


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_zero_variance_gives_zero(rng, dtype):
    # n > 1024: on CUDA such layers once took the polar SVD (gesvdp), where a constant unit
    # changed mean CCA by 3.6% on an H100; a side over 1024 is where CUDA's default SVD
    # changes solver too (Jacobi below, gesvd above)
    n = 1100
    x = rng.normal(size=(n, 4))
    # constants whose mean is inexact in binary: the rounding residue of centering must not
    # be scaled up into a direction, whatever order the compiler sums in
    with jax.enable_x64(dtype == "float64"):
        for value in (2.0, 0.1, 1 / 3, -1234.567):
            const = jnp.asarray(np.full((n, 3), value), dtype)
            for f in (jaxsim.mean_cca, jaxsim.pwcca, jaxsim.svcca, jaxsim.linear_cka):
                assert float(f(jnp.asarray(x, dtype), const)) == 0.0, (f.__name__, value)
            # a constant unit inside a realistic layer changes nothing
            layer = np.concatenate([x, np.full((n, 1), value)], axis=1)
            np.testing.assert_allclose(
                jaxsim.mean_cca(jnp.asarray(layer, dtype), x[:, :3] ** 2),
                jaxsim.mean_cca(jnp.asarray(x, dtype), x[:, :3] ** 2),
                rtol=1e-5,
            )
        np.testing.assert_array_equal(jaxsim.cca(const, x).coefficients, 0)


# -------------------------------------------------------------------- invariances


def test_cca_invariant_to_invertible_maps(x64, rng):
    x, y = related(rng, 300, 8, 6)
    base = jaxsim.cca(x, y).coefficients
    a = rng.normal(size=(8, 8)) + 3 * np.eye(8)
    b = rng.normal(size=(6, 6)) + 3 * np.eye(6)
    np.testing.assert_allclose(jaxsim.cca(x @ a + 4.0, y @ b).coefficients, base, rtol=1e-8)
    np.testing.assert_allclose(jaxsim.cca(y, x).coefficients, base, rtol=1e-9)
    np.testing.assert_allclose(jaxsim.cca(x, x @ a).coefficients, 1.0, rtol=1e-9)
    assert np.all((base >= 0) & (base <= 1))
    assert np.all(np.diff(np.asarray(base)) <= 1e-12)
    # full-rank SVCCA inherits CCA's invariance; truncated SVCCA keeps the orthogonal one
    np.testing.assert_allclose(
        jaxsim.svcca(x @ a, y @ b, keep_variance=1.0), jaxsim.mean_cca(x, y), rtol=1e-8
    )
    q = orthogonal(rng, 8)
    np.testing.assert_allclose(
        jaxsim.svcca(2.5 * x @ q, y, keep_dims=4), jaxsim.svcca(x, y, keep_dims=4), rtol=1e-8
    )


def test_truncated_svcca_is_not_mean_cca(x64, rng):
    x, y = related(rng, 300, 8, 6)
    assert abs(float(jaxsim.svcca(x, y, keep_dims=2)) - float(jaxsim.mean_cca(x, y))) > 1e-3


def test_pwcca_sides(x64, rng):
    x, y = related(rng, 300, 8, 8)
    # equal widths: weights come from the first argument, so the order matters
    assert abs(float(jaxsim.pwcca(x, y)) - float(jaxsim.pwcca(y, x))) > 1e-6
    np.testing.assert_allclose(jaxsim.pwcca(y, x), np_pwcca(y, x), rtol=1e-9)
    # different widths: both orders weight the narrower side; they agree up to the
    # reference's dependence on the SVD's signs (it adds the means after the rotation)
    x, y = related(rng, 300, 5, 9)
    np.testing.assert_allclose(jaxsim.pwcca(y, x), np_pwcca(y, x), rtol=1e-9)
    np.testing.assert_allclose(jaxsim.pwcca(x, y), jaxsim.pwcca(y, x), atol=1e-3)
    np.testing.assert_allclose(jaxsim.pwcca(x, x @ rng.normal(size=(5, 5))), 1.0, rtol=1e-9)


def test_dead_units_and_pwcca_side(x64, rng):
    """The README's caveat: at epsilon = 0 dead (zero) units count as kept, so padding a
    layer with them can switch the side whose directions PWCCA weighs (google/svcca's
    rule); epsilon = 1e-6 drops them. Mean CCA and SVCCA ignore them either way."""
    x, y = related(rng, 300, 20, 12)
    dead = lambda a, width: np.pad(a, ((0, 0), (0, width - a.shape[1])))
    xd, yd = dead(x, 32), dead(y, 32)
    assert abs(float(jaxsim.pwcca(xd, yd)) - float(jaxsim.pwcca(x, y))) > 0.1
    np.testing.assert_allclose(
        jaxsim.pwcca(xd, yd, epsilon=1e-6), jaxsim.pwcca(x, y, epsilon=1e-6), rtol=1e-10
    )
    np.testing.assert_allclose(
        jaxsim.pwcca(xd, yd, epsilon=1e-6), np_pwcca(x, y, epsilon=1e-6), rtol=1e-9
    )
    for fn in (jaxsim.mean_cca, lambda a, b: jaxsim.svcca(a, b, keep_dims=8)):
        np.testing.assert_allclose(fn(xd, yd), fn(x, y), rtol=1e-10)


# --------------------------------------------------------------- float32, jit, vmap


def test_float32_close_to_float64(rng):
    x, y = related(rng, 2000, 20, 15)
    with jax.enable_x64(True):
        ref = [float(f(x, y)) for f in (jaxsim.mean_cca, jaxsim.pwcca, jaxsim.svcca)]
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    got = [f(x32, y32) for f in (jaxsim.mean_cca, jaxsim.pwcca, jaxsim.svcca)]
    assert all(g.dtype == np.float32 for g in got)
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("name", ["mean_cca", "svcca", "pwcca"])
def test_jit_and_vmap(x64, rng, name):
    f = getattr(jaxsim, name)
    xs = rng.normal(size=(3, 120, 6))
    ys = np.tanh(xs @ rng.normal(size=(6, 7))) + rng.normal(size=(3, 120, 7))
    loop = np.array([float(f(a, b)) for a, b in zip(xs, ys)])
    np.testing.assert_allclose(jax.vmap(f)(xs, ys), loop, rtol=1e-10)
    np.testing.assert_allclose(jax.jit(f)(xs[1], ys[1]), loop[1], rtol=1e-10)
    out = jax.jit(jaxsim.cca)(xs[0], ys[0])
    np.testing.assert_allclose(out.coefficients, jaxsim.cca(xs[0], ys[0]).coefficients, rtol=1e-10)


# -------------------------------------------------------------------- validation


def test_errors(rng):
    x = rng.normal(size=(30, 5))
    y = rng.normal(size=(30, 7))
    with pytest.raises(
        ValueError,
        match=(
            r"keep_dims: 6 directions requested but x has shape "
            r"\(30, 5\)"
        ),
    ):
        jaxsim.svcca(x, y, keep_dims=6)
    with pytest.raises(
        ValueError,
        match=(
            r"keep_dims: 3 directions requested but x has shape "
            r"\(2, 5\)"
        ),
    ):
        jaxsim.svcca(x[:2], y[:2], keep_dims=3)
    with pytest.raises(TypeError, match=r"keep_dims: expected an int or None, got 2.5"):
        jaxsim.svcca(x, y, keep_dims=2.5)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"keep_variance: must lie in \(0, 1\]"):
            jaxsim.svcca(x, y, keep_variance=bad)
    with pytest.raises(ValueError, match=r"epsilon: must be a finite number >= 0, got -1"):
        jaxsim.cca(x, y, epsilon=-1)
    with pytest.raises(ValueError, match=r"y: has 29 examples"):
        jaxsim.pwcca(x, y[:29])
    with pytest.raises(ValueError, match=r"need at least 2 examples"):
        jaxsim.mean_cca(x[:1], y[:1])
    y_bad = y.copy()
    y_bad[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"y: contains 1 non-finite"):
        jaxsim.svcca(x, y_bad)


def np_pwcca_variates(x, y):
    """Morcos et al.'s formula read literally: weights from the normalized canonical
    variates of the narrower side and its units' activations."""
    s, u, vh, _, _ = np_cca(x, y)
    acts, vecs = (x, u) if x.shape[1] <= y.shape[1] else (y, vh.T)
    ac = acts - acts.mean(0)
    cov = ac.T @ ac / (len(ac) - 1)
    h = ac @ np_inv_sqrt(cov / np.abs(cov).max()) @ vecs
    h = h / np.linalg.norm(h, axis=0)
    weights = np.abs(h.T @ acts).sum(axis=1)
    return np.sum(weights / weights.sum() * s)


def test_pwcca_variates_reading(x64, rng):
    for shape in [(300, 6, 9), (300, 9, 6), (300, 7, 7)]:
        x, y = related(rng, *shape)
        got = jaxsim.pwcca(x, y, directions="variates")
        np.testing.assert_allclose(got, np_pwcca_variates(x, y), rtol=1e-9)
        assert abs(float(got) - float(jaxsim.pwcca(x, y))) < 0.1
    with pytest.raises(ValueError, match=r"directions: expected one of 'reference', 'variates'"):
        jaxsim.pwcca(x, y, directions="paper")


def relu_layers(rng, n=400, widths=(8, 10), latent=6):
    """Post-ReLU layers with offsets (unit means far from 0, as in trained networks)."""
    z = rng.normal(size=(n, latent))
    return [
        np.maximum(z @ rng.normal(size=(latent, w)) + rng.normal(size=(n, w)) + 0.5, 0)
        for w in widths
    ]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pwcca_with_units_dropped_by_epsilon(x64, rng, dtype):
    """Units that epsilon drops are gone, as google/svcca crops them: PWCCA of a layer with
    dead units added (at the end or between live ones) equals PWCCA without them, the
    reference on the cropped layers, in both orders and in grids. The reference's
    directions depend on the signs of the SVD of the cropped matrix, and jaxsim took them
    from the SVD of the padded one (0.598 for 0.670 here)."""
    x, y = relu_layers(rng)
    zeros = np.zeros((len(x), 2))
    padded = [
        np.concatenate([x, zeros, zeros], 1),
        np.concatenate([x[:, :3], zeros, x[:, 3:], zeros], 1),
    ]
    tol = dict(rtol=1e-9) if dtype == np.float64 else dict(atol=2e-5)
    cast = lambda a: a.astype(dtype)
    for xd in padded:
        np.testing.assert_allclose(
            jaxsim.pwcca(cast(xd), cast(y), epsilon=1e-6), np_pwcca(x, y, 1e-6), **tol
        )
        np.testing.assert_allclose(
            jaxsim.pwcca(cast(y), cast(xd), epsilon=1e-6), np_pwcca(y, x, 1e-6), **tol
        )
    grid = jaxsim.similarity_grid(
        [cast(padded[1]), cast(y)], metric="pwcca", epsilon=1e-6, progress=False, warn=False
    ).values
    np.testing.assert_allclose(grid[0, 1], np_pwcca(x, y, 1e-6), **tol)
    np.testing.assert_allclose(grid[1, 0], np_pwcca(y, x, 1e-6), **tol)


def test_pwcca_where_the_reference_itself_is_unstable(x64):
    """On some pairs google/svcca's PWCCA is not a function of the data at the 1e-3 level:
    LAPACK (gesdd and gesvd alike) orients several singular vectors of its cropped
    60 x 11 matrix differently after a 1e-14 relative change of the inputs, and the
    reference adds the means after rotating by them. Seen first as jaxsim "off" by
    2.4e-3 here (its matrix, formed from the factors, differs from an eager call's by
    1e-15). jaxsim's value, float64 and float32, lies in the reference's own spread; on
    the reversed order, whose side is stable, it is the reference's to 1e-9."""
    from references import power_law
    from references import relu_layers as relu

    rng = np.random.default_rng(0)
    x, _ = power_law(rng, 600, 60, 40, 1.5)
    _, narrow = relu(rng, 600, 112, 12)
    narrow[:, 3] = 0  # a dead unit, dropped by epsilon
    x, narrow = (a.astype(np.float32).astype(np.float64) for a in (x, narrow))
    noise = np.random.default_rng(1)
    spread = [np_pwcca(x, narrow, 1e-6)] + [
        np_pwcca(x * (1 + 1e-14 * noise.normal(size=x.shape)), narrow, 1e-6) for _ in range(12)
    ]
    assert max(spread) - min(spread) > 1e-3  # the reference's own instability
    for a, b in ((x, narrow), (x.astype(np.float32), narrow.astype(np.float32))):
        got = float(jaxsim.pwcca(a, b, epsilon=1e-6))
        assert min(spread) - 2e-5 <= got <= max(spread) + 2e-5, (got, min(spread), max(spread))
    stable = [
        np_pwcca(narrow, x * (1 + 1e-14 * noise.normal(size=x.shape)), 1e-6) for _ in range(4)
    ]
    assert max(stable) - min(stable) < 1e-12
    np.testing.assert_allclose(jaxsim.pwcca(narrow, x, epsilon=1e-6), stable[0], rtol=1e-9)


def test_pwcca_variates_on_a_rank_deficient_side(x64, rng):
    """directions="variates" on a side of rank r below its width (here 8 units of rank 5,
    nothing dropped): the canonical variates beyond rank r are null directions, which
    carry no weight; the r directions within it carry their weight whatever their
    correlation. Reference: the paper's formula on an orthonormal basis of the side's
    centered span."""
    x5, y = relu_layers(rng, widths=(5, 10))
    x = np.concatenate([x5, x5 @ rng.normal(size=(5, 3))], 1)
    basis = lambda a: np.linalg.svd(a - a.mean(0), full_matrices=False)[0][
        :, : np.linalg.matrix_rank(a - a.mean(0))
    ]
    ux, uy = basis(x), basis(y)
    p, rho, _ = np.linalg.svd(ux.T @ uy)
    h = ux @ p  # unit-norm canonical variates of x, rank 5 of them
    weights = np.abs(h.T @ x).sum(axis=1)
    want = np.sum(weights * rho) / weights.sum()
    np.testing.assert_allclose(jaxsim.pwcca(x, y, directions="variates"), want, rtol=1e-9)


def test_cca_survives_an_svd_that_does_not_converge(rng, monkeypatch):
    """LAPACK's divide-and-conquer SVD (gesdd) can fail to converge on a finite matrix, and
    JAX then returns NaN factors: mean CCA was NaN in float32 on a small CNN's conv2
    (397 x 1024, rank 396, epsilon=1e-6) while its grid, compiled apart, gave 0.988. Here
    every default SVD fails (simulated); the CCA family must fall back to another
    algorithm and give the same values, single pairs and grids alike."""
    from jaxsim import _linalg

    z = rng.normal(size=(120, 30))
    x = np.maximum(z @ rng.normal(size=(30, 200)) + 0.2, 0).astype(np.float32)  # n < width
    y = np.maximum(z[:, :10] @ rng.normal(size=(10, 12)), 0).astype(np.float32)
    funcs = {
        "mean_cca": lambda a, b: jaxsim.mean_cca(a, b, epsilon=1e-6, warn=False),
        "svcca": lambda a, b: jaxsim.svcca(a, b, keep_dims=5, warn=False),
        "pwcca": lambda a, b: jaxsim.pwcca(a, b, epsilon=1e-6, warn=False),
        "coefficients": lambda a, b: jaxsim.cca(a, b, epsilon=1e-6, warn=False).coefficients,
        "grid": lambda a, b: (
            jaxsim.similarity_grid(
                [a, b], metric="mean_cca", epsilon=1e-6, warn=False, progress=False
            ).values
        ),
    }
    want = {k: np.asarray(f(x, y)) for k, f in funcs.items()}
    real = _linalg._lapack_svd

    def failing(m, algorithm=None):
        u, s, vh = real(m, algorithm)
        if algorithm is None:  # LAPACK's failure, as JAX reports it
            return jnp.full_like(u, jnp.nan), jnp.full_like(s, jnp.nan), jnp.full_like(vh, jnp.nan)
        return u, s, vh

    jax.clear_caches()
    monkeypatch.setattr(_linalg, "_lapack_svd", failing)
    try:
        for name, f in funcs.items():
            got = np.asarray(f(x, y))
            assert np.isfinite(got).all(), name
            np.testing.assert_allclose(got, want[name], atol=2e-5, err_msg=name)
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_svcca_keep_dims_capped_to_narrow_layers(x64, rng):
    """keep_dims=20 (the tutorial's recipe) on a grid with a 10-unit logits layer raised;
    cap_keep_dims=True keeps min(20, width) directions there (the reference's slicing)."""
    x, y = related(rng, 300, 30, 10)
    with pytest.raises(ValueError, match=r"pass cap_keep_dims=True"):
        jaxsim.svcca(x, y, keep_dims=20)
    with pytest.raises(ValueError, match=r"pass cap_keep_dims=True"):
        jaxsim.similarity_grid([x, y], metric="svcca", keep_dims=20)
    want = np_svcca(x, y, 20)
    np.testing.assert_allclose(
        jaxsim.svcca(x, y, keep_dims=20, cap_keep_dims=True), want, rtol=1e-9
    )
    grid = jaxsim.similarity_grid(
        [x, y], metric="svcca", keep_dims=20, cap_keep_dims=True, progress=False
    ).values
    np.testing.assert_allclose(grid[0, 1], want, rtol=1e-9)
    np.testing.assert_allclose(grid[1, 1], 1.0, rtol=1e-9)
