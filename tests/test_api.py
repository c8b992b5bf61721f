"""Contract of the public surface as a whole: every measure under jit (arrays passed in or
closed over), as a training loss, and the package's namespace."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import orthogonal, related

import jaxsim

MEASURES = {
    "linear_cka": (jaxsim.linear_cka, {}),
    "linear_cka_debiased": (jaxsim.linear_cka, {"debiased": True}),
    "rbf_cka": (jaxsim.rbf_cka, {}),
    "mean_cca": (jaxsim.mean_cca, {}),
    "svcca": (jaxsim.svcca, {"keep_dims": 3}),
    "pwcca": (jaxsim.pwcca, {}),
    "procrustes": (jaxsim.procrustes_similarity, {"alpha": 0.5}),
    "rsa": (jaxsim.rsa, {}),
    "mutual_knn": (jaxsim.mutual_knn, {"k": 3}),
    "linear_predictivity": (jaxsim.linear_predictivity, {}),
}


@pytest.mark.parametrize("name", sorted(MEASURES))
def test_every_measure_under_jit_passed_in_or_closed_over(rng, name):
    fn, opts = MEASURES[name]
    x, y = (jnp.asarray(a, jnp.float32) for a in related(rng, 48, 6, 5))
    eager = float(fn(x, y, **opts))
    np.testing.assert_allclose(jax.jit(lambda a, b: fn(a, b, **opts))(x, y), eager, rtol=1e-5)
    # a device array closed over is concrete inside the trace: validation must not turn
    # jnp results on it into Python bools
    np.testing.assert_allclose(jax.jit(lambda a: fn(a, y, **opts))(x), eager, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda b: fn(x, b, **opts))(y), eager, rtol=1e-5)


def test_cka_as_a_jitted_training_loss(rng):
    x, y = (jnp.asarray(a, jnp.float32) for a in related(rng, 64, 6, 5))
    target = jnp.asarray(y)
    loss = jax.jit(lambda a: 1 - jaxsim.linear_cka(a, target))
    value, grad = jax.value_and_grad(loss)(x)
    np.testing.assert_allclose(value, 1 - jaxsim.linear_cka(x, y), rtol=1e-5)
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
    # one gradient step lowers the loss
    assert float(loss(x - 0.5 * grad / jnp.linalg.norm(grad))) < float(value)


def test_closed_over_nan_is_still_reported(rng):
    x, y = related(rng, 30, 4, 3)
    bad = jnp.asarray(y).at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"y: contains 1 non-finite"):
        jax.jit(lambda a: jaxsim.linear_cka(a, bad))(x)


def test_finiteness_check_is_exact_at_the_edges_of_each_dtype(rng):
    """The device check flags an array by one sum of ``x * 0`` (NaN iff some entry is inf
    or NaN): values at the largest finite float, whose plain sum overflows, pass; one
    +inf, -inf or NaN anywhere fails, with its exact count, in every floating dtype."""
    from jaxsim import _validation

    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        big = jnp.full((300, 7), jnp.finfo(dtype).max, dtype)
        assert not bool(jnp.isfinite(jnp.sum(big)))  # a plain sum would flag it
        _validation.finite({"big": big, "neg": -big, "ints": jnp.arange(6).reshape(3, 2)})
        for bad, count in ((jnp.inf, 1), (-jnp.inf, 2), (jnp.nan, 3)):
            x = big.at[rng.choice(300, count, replace=False), 3].set(bad)
            with pytest.raises(ValueError, match=rf"x: contains {count} non-finite"):
                _validation.finite({"big": big, "x": x})


def test_namespace():
    # a fresh interpreter: other tests' imports must not make the submodules appear
    code = (
        "import jaxsim; jaxsim.stats.permutation_test; jaxsim.conv.average_pool; "
        "jaxsim.flax.capture_nnx; jaxsim.plot.heatmap; print(jaxsim.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == jaxsim.__version__
    assert set(jaxsim.__all__) <= set(dir(jaxsim))
    assert "importlib" not in dir(jaxsim)  # no helper module in the public namespace
    from jaxsim import flax as jflax

    assert sorted(jflax.__all__) == sorted(
        n
        for n in dir(jflax)
        if not n.startswith("_")
        and callable(getattr(jflax, n))
        and getattr(getattr(jflax, n), "__module__", "") == "jaxsim.flax"
    )


# ------------------------------------------------------------------ identity


SIMILARITIES = {
    # name: (function, invariant to any invertible linear map, or only to rotations)
    "linear_cka": (jaxsim.linear_cka, "rotation"),
    "linear_cka debiased": (lambda x, y: jaxsim.linear_cka(x, y, debiased=True), "rotation"),
    "rbf_cka": (jaxsim.rbf_cka, "rotation"),
    "mean_cca": (jaxsim.mean_cca, "invertible"),
    "svcca": (jaxsim.svcca, "rotation"),
    "svcca keep_variance=1": (lambda x, y: jaxsim.svcca(x, y, keep_variance=1.0), "invertible"),
    "pwcca": (jaxsim.pwcca, "invertible"),
    "pwcca variates": (lambda x, y: jaxsim.pwcca(x, y, directions="variates"), "invertible"),
    "cca": (
        lambda x, y: jnp.mean(jaxsim.cca(x, y).coefficients[: int(jaxsim.cca(x, y).rank)]),
        "invertible",
    ),
    "procrustes": (jaxsim.procrustes_similarity, "rotation"),
    "procrustes alpha=0": (
        lambda x, y: jaxsim.procrustes_similarity(x, y, alpha=0.0),
        "invertible",
    ),
    # correlation RDMs and cosine neighbours are not invariant to rotations with offsets
    "rsa": (jaxsim.rsa, "none"),
    "mutual_knn": (jaxsim.mutual_knn, "none"),
    "linear_predictivity ridge=0": (
        lambda x, y: jaxsim.linear_predictivity(x, y, ridge=0.0),
        "invertible",
    ),
}


def rank_deficient_layer(rng, n=500, width=100, rank=20):
    """A layer of 100 units spanning 20 directions (a first conv layer of 64-pixel inputs
    is such a layer), in float32."""
    return (rng.normal(size=(n, rank)) @ rng.normal(size=(rank, width))).astype(np.float32)


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_a_layer_against_itself_scores_one(rng, name):
    fn, invariance = SIMILARITIES[name]
    x = (rng.normal(size=(500, 12)) @ np.diag(np.linspace(3, 0.3, 12))).astype(np.float32)
    np.testing.assert_allclose(fn(x, x), 1.0, atol=1e-5, err_msg="full rank")
    q = np.linalg.qr(rng.normal(size=(12, 12)))[0].astype(np.float32)
    if invariance != "none":
        np.testing.assert_allclose(fn(x, 2.5 * x @ q + 1.0), 1.0, atol=1e-4, err_msg="rotated")
    if invariance == "invertible":
        a = (rng.normal(size=(12, 12)) + 3 * np.eye(12)).astype(np.float32)
        np.testing.assert_allclose(fn(x, x @ a), 1.0, atol=1e-4, err_msg="linear map")
    low = rank_deficient_layer(rng)
    np.testing.assert_allclose(fn(low, low), 1.0, atol=1e-4, err_msg="rank 20 of width 100")


def test_distances_vanish_on_identical_layers(rng):
    x = rank_deficient_layer(rng)
    assert float(jaxsim.procrustes_distance(x, x)) < 1e-3
    assert float(jaxsim.procrustes_distance(x, x, angular=False)) < 1e-3


def test_rank_deficient_cca_counts_its_effective_rank(rng):
    x = rank_deficient_layer(rng)
    res = jaxsim.cca(x, x)
    assert int(res.rank) == 20
    np.testing.assert_allclose(res.coefficients[:20], 1.0, atol=1e-4)
    np.testing.assert_allclose(res.coefficients[20:], 0.0)


# ------------------------------------------------------------------ too few examples


def test_underdetermined_cca_warns_once_with_remedies(rng):
    x, y = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))
    for fn in (
        jaxsim.mean_cca,
        jaxsim.pwcca,
        jaxsim.svcca,
        lambda a, b, **kw: jaxsim.cca(a, b, **kw).coefficients,
    ):
        with pytest.warns(jaxsim.UnderdeterminedWarning) as caught:
            fn(x, y)
        assert len(caught) == 1
        assert caught[0].filename == __file__  # points at the caller's line
        text = str(caught[0].message)
        for part in (
            "n=20 examples for 64 units",
            "keep_dims <= 4",
            "linear_cka",
            "transposes (x.T)",
            "warn=False",
        ):
            assert part in text, part
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxsim.mean_cca(x, y, warn=False)
        jaxsim.svcca(rng.normal(size=(200, 64)), rng.normal(size=(200, 64)), keep_dims=10)
        jaxsim.mean_cca(rng.normal(size=(400, 64)), rng.normal(size=(400, 32)))
    with pytest.warns(jaxsim.UnderdeterminedWarning) as caught:
        grid = jaxsim.similarity_grid([x, y], metric="mean_cca")
    assert caught[0].filename == __file__
    assert grid.notes and "n=20 examples" in repr(grid)
    # every layer below 5 examples per unit is named, with the remedies for grids
    with pytest.warns(jaxsim.UnderdeterminedWarning) as caught:
        jaxsim.similarity_grid({"a": x, "b": y[:, :10], "c": y[:, :3]}, metric="mean_cca")
    text = str(caught[0].message)
    assert "2 layer(s) so: acts_a['a'] (64), acts_a['b'] (10)" in text, text
    assert "reduce='average'" in text and "'c'" not in text
    quiet = jaxsim.similarity_grid([x, y], metric="svcca", keep_dims=3, warn=False)
    assert not quiet.notes


GRID_ROUTES = {
    "linear_cka gram": ("linear_cka", {"method": "gram"}),
    "linear_cka features": ("linear_cka", {"method": "features"}),
    "linear_cka debiased": ("linear_cka", {"debiased": True}),
    "rbf_cka": ("rbf_cka", {}),
    "mean_cca": ("mean_cca", {"warn": False}),
    "svcca": ("svcca", {"keep_dims": 3, "warn": False}),
    "pwcca": ("pwcca", {"warn": False}),
    "procrustes": ("procrustes", {}),
    "rsa": ("rsa", {}),
    "rsa pearson": ("rsa", {"compare": "pearson"}),
    "mutual_knn": ("mutual_knn", {"k": 3}),
    "linear_predictivity": ("linear_predictivity", {}),
}


# inf takes the same path as NaN (x * 0 is NaN for both): with -m slow (suite time)
@pytest.mark.parametrize("bad", [np.nan, pytest.param(np.inf, marks=pytest.mark.slow)])
def test_non_finite_in_gives_nan_out(rng, bad):
    """check_finite=False skips the check; it must never turn a NaN or inf into a plausible
    number: every measure, grid route (the blocked Gram routes at n = 1100: -m slow),
    minibatch state and CCA result gives NaN where a layer holds one, eagerly and under jit
    (one measure of each family there: under a transformation every measure is one traced
    program with the same NaN term). The
    per-layer rescaling hid it (linear CKA of a layer with one NaN: 0.976)."""
    x, y = (a.astype(np.float32) for a in related(rng, 48, 6, 5))
    x[3, 2] = bad
    for name, (fn, opts) in MEASURES.items():
        assert np.isnan(float(fn(x, y, check_finite=False, **opts))), name
        assert np.isnan(float(fn(y, x, check_finite=False, **opts))), name
    # under jit (no check is possible there): one measure of each family
    for name in ("linear_cka", "pwcca", "procrustes", "rsa"):
        fn, opts = MEASURES[name]
        assert np.isnan(float(jax.jit(lambda a, b: fn(a, b, **opts))(x, y))), name
    res = jaxsim.cca(x, y, check_finite=False)
    assert all(np.isnan(np.asarray(v)).all() for k, v in res._asdict().items() if k != "rank")
    layers = _nan_in_grids(rng, bad, 48)
    state = jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(3), layers, check_finite=False)
    values = np.asarray(jaxsim.minibatch_cka_result(state, check_finite=False).values)
    assert np.isnan(values[0]).all() and np.isfinite(values[1:, 1:]).all(), "minibatch"


@pytest.mark.slow  # suite time; the blocked Gram routes (n = 1100) of the kernel grids
def test_non_finite_in_blocked_grids_gives_nan_out(rng):
    _nan_in_grids(rng, np.nan, 1100)


def _nan_in_grids(rng, bad, n):
    """Every grid route (n = 1100: only the kernel grids, in blocks) gives NaN in the row
    and column of the layer holding ``bad``, finite values elsewhere; returns the layers."""
    layers = [a.astype(np.float32) for a in related(rng, n, 6, 5)] + [
        rng.normal(size=(n, 4)).astype(np.float32)
    ]
    layers[0][min(n - 1, 700), 1] = bad
    for route, (metric, opts) in GRID_ROUTES.items():
        if n > 48 and metric not in ("linear_cka", "rbf_cka"):
            continue
        values = np.asarray(
            jaxsim.similarity_grid(
                layers, metric=metric, check_finite=False, progress=False, **opts
            ).values
        )
        assert np.isnan(values[0]).all() and np.isnan(values[:, 0]).all(), route
        assert np.isfinite(values[1:, 1:]).all(), route
    return layers


BOUNDS = {  # (metric, options) -> documented range
    ("linear_cka", "gram"): (0, 1),
    ("linear_cka", "features"): (0, 1),
    ("linear_cka", "debiased"): (-1, 1),
    ("rbf_cka", ""): (0, 1),
    ("rbf_cka", "debiased"): (-1, 1),
    ("mean_cca", ""): (0, 1),
    ("svcca", ""): (0, 1),
    ("pwcca", ""): (0, 1),
    ("procrustes", ""): (0, 1),
    ("rsa", "pearson"): (-1, 1),
    ("rsa", ""): (-1, 1),
    ("linear_predictivity", "ridge=0"): (0, 1),
}


@pytest.mark.parametrize(
    # float32 rounds past the bounds far more often; float64 with -m slow (suite time)
    "dtype",
    [pytest.param(np.float64, marks=pytest.mark.slow), np.float32],
)
def test_bounded_measures_stay_in_range(x64, rng, dtype):
    """Identical layers in a self-grid gave 1.0000000000000002 (float64; feature route, RBF
    CKA, Pearson RSA) and up to 1.0000007 in float32 (n = 1025, a power-law layer with an
    offset); every bounded measure stays in its documented range, also on unrelated layers."""
    n, d = 1025, 24
    x = (rng.normal(size=(n, d)) / np.arange(1, d + 1)) @ orthogonal(rng, d) + 3.0
    layers = [x.astype(dtype), (2 * x).astype(dtype), rng.normal(size=(n, 5)).astype(dtype)]
    for (metric, option), (lo, hi) in BOUNDS.items():
        opts = {
            "gram": {"method": "gram"},
            "features": {"method": "features"},
            "debiased": {"debiased": True},
            "pearson": {"compare": "pearson"},
            "ridge=0": {"ridge": 0.0},
            "": {},
        }[option]
        if metric in ("mean_cca", "svcca", "pwcca"):
            opts = {**opts, "warn": False}
        if metric == "rsa":
            layers_here = [a[:300] for a in layers]  # ranks of n^2 / 2 entries: keep it small
        else:
            layers_here = layers
        values = np.asarray(
            jaxsim.similarity_grid(layers_here, metric=metric, progress=False, **opts).values
        )
        assert values.max() <= hi and values.min() >= lo, (metric, option, values)
        np.testing.assert_allclose(
            values[0, 1], 1.0, atol=1e-5 if dtype == np.float32 else 1e-9, err_msg=(metric, option)
        )


def _r2_cca_measure():
    """The docs' user-defined measure: Yanai's R^2_CCA, the mean squared canonical
    correlation, from an orthonormal basis of each centered layer."""

    def prepare(x):
        q, _ = jnp.linalg.qr(x - x.mean(axis=0))
        return q

    def pair(qa, qb):
        return jnp.sum(jnp.matmul(qa.T, qb, precision="highest") ** 2) / min(
            qa.shape[1], qb.shape[1]
        )

    return jaxsim.Measure("r2_cca", prepare, pair)


def test_a_user_defined_measure_in_grids_statistics_and_jit(x64, rng):
    """A jaxsim.Measure works wherever a metric name does: self- and cross-grids (against
    NumPy's squared canonical correlations: cosines of the principal angles, from SVDs of
    orthonormal bases), under jit, and in the permutation test."""
    r2cca = _r2_cca_measure()
    layers = {"a": rng.normal(size=(200, 6)), "b": rng.normal(size=(200, 9))}
    layers["c"] = np.tanh(layers["a"] @ rng.normal(size=(6, 4))) + 0.1 * rng.normal(size=(200, 4))

    def reference(x, y):
        qx = np.linalg.qr(x - x.mean(0))[0]
        qy = np.linalg.qr(y - y.mean(0))[0]
        rho = np.linalg.svd(qx.T @ qy, compute_uv=False)
        return np.mean(rho[: min(x.shape[1], y.shape[1])] ** 2)

    grid = jaxsim.similarity_grid(layers, metric=r2cca)
    assert grid.metric == "r2_cca" and grid.rows == ("a", "b", "c")
    want = [[reference(x, y) for y in layers.values()] for x in layers.values()]
    np.testing.assert_allclose(grid.values, want, rtol=1e-10)
    cross = jaxsim.similarity_grid([layers["c"]], [layers["a"], layers["b"]], metric=r2cca)
    np.testing.assert_allclose(cross.values, [want[2][:2]], rtol=1e-10)
    jitted = jax.jit(lambda acts: jaxsim.similarity_grid(acts, metric=r2cca).values)
    np.testing.assert_allclose(jitted(layers), want, rtol=1e-10)
    test = jaxsim.stats.permutation_test(
        r2cca, layers["a"], layers["c"], key=jax.random.key(0), num_permutations=50
    )
    assert float(test.p_value) == pytest.approx(1 / 51)
    with pytest.raises(TypeError, match="r2_cca.*unexpected option.*epsilon"):
        jaxsim.similarity_grid(layers, metric=r2cca, epsilon=0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_compiled_programs_dropped_before_the_mapping_limit(rng, monkeypatch):
    """XLA:CPU's compiled programs hold memory mappings until the process ends, and at the
    kernel's limit (vm.max_map_count) the process crashes (a session calling measures on
    a few hundred new shapes got there). After an eager call that compiled, past 3/4 of
    the limit, jaxsim drops JAX's compiled programs and warns; a call that compiled
    nothing reads nothing."""
    from jaxsim import _programs

    cleared = []
    monkeypatch.setattr(_programs.jax, "clear_caches", lambda: cleared.append(1))
    x, y = rng.normal(size=(37, 5)), rng.normal(size=(37, 6))
    jaxsim.linear_cka(x, y)  # compiled here, under the real limit
    assert not cleared
    monkeypatch.setattr(_programs, "_limit", lambda: 4 * _programs._mappings() // 3 - 1)
    jaxsim.linear_cka(x, y)  # nothing compiled: nothing read
    assert not cleared
    with pytest.warns(RuntimeWarning, match=r"vm.max_map_count.*jax.clear_caches"):
        jaxsim.mean_cca(x[:33], y[:33])
    with pytest.warns(RuntimeWarning, match=r"memory mappings"):
        jaxsim.similarity_grid([x[:35], y[:35]], metric="svcca", keep_dims=3, progress=False)
    with pytest.warns(RuntimeWarning, match=r"memory mappings"):
        jaxsim.cca(x[:31], y[:31])
    assert len(cleared) == 3
