"""Accelerator dtypes: float32 against float64 on realistic layers, half-precision inputs,
scale invariance in practice, and derivatives (against finite differences in float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import related
from hypothesis import given
from hypothesis import strategies as st
from references import power_law, relu_layers

import jaxsim
from jaxsim import _gram_route, _row_blocks

# ------------------------------------------------------------------ realistic layers


def rank_deficient(rng, n, d1, d2):
    rank = d1 * 3 // 4
    x, y = power_law(rng, n, rank, rank, 1.0, offset=0.0)
    return x @ rng.normal(size=(rank, d1)), y @ rng.normal(size=(rank, d2))


def dead_units(rng, n, d1, d2):
    x, y = power_law(rng, n, d1, d2, 1.5, offset=0.0)
    x[:, ::7] = 0.0  # dead ReLU units, then a common offset
    y[:, ::5] = 0.0
    return x + 3.0, y - 2.0


# Every case in CI has one shape, so each dtype compiles once; the widest run with -m slow.
SHAPE = (1200, 256, 128)
CASES = {
    "k^-2": lambda rng: power_law(rng, *SHAPE, 2.0),
    "k^-1.5": lambda rng: power_law(rng, *SHAPE, 1.5),
    "k^-1": lambda rng: power_law(rng, *SHAPE, 1.0),
    "post-ReLU": lambda rng: relu_layers(rng, *SHAPE),
    "rank 192 of width 256": lambda rng: rank_deficient(rng, *SHAPE),
    "dead units and offsets": lambda rng: dead_units(rng, *SHAPE),
}
WIDE = {
    "k^-2, 2000 x 512/256": lambda rng: power_law(rng, 2000, 512, 256, 2.0),
    "k^-1.5, 4000 x 1024/512": lambda rng: power_law(rng, 4000, 1024, 512, 1.5),
    "post-ReLU, 2000 x 1024/512": lambda rng: relu_layers(rng, 2000, 1024, 512),
}

MEASURES = {
    "linear_cka": jaxsim.linear_cka,
    "linear_cka debiased": functools.partial(jaxsim.linear_cka, debiased=True),
    "mean_cca": jaxsim.mean_cca,
    "svcca keep_dims=20": functools.partial(jaxsim.svcca, keep_dims=20),
    "svcca 99% variance": jaxsim.svcca,
    "pwcca": jaxsim.pwcca,
    "pwcca variates": functools.partial(jaxsim.pwcca, directions="variates"),
    "pwcca epsilon": functools.partial(jaxsim.pwcca, epsilon=1e-6),
    "procrustes": jaxsim.procrustes_similarity,
    "procrustes alpha=0.5": functools.partial(jaxsim.procrustes_similarity, alpha=0.5),
    "procrustes alpha=0": functools.partial(jaxsim.procrustes_similarity, alpha=0.0),
    "linear_predictivity": jaxsim.linear_predictivity,
}

# measures whose cost grows with n^2: compared on the first 600 examples
SMALL_N = {
    "rbf_cka": jaxsim.rbf_cka,
    "rsa": jaxsim.rsa,
    "mutual_knn": jaxsim.mutual_knn,
}

# all measures in one jitted call (validation is jit-safe): one compile per shape and dtype
_ALL = jax.jit(
    lambda x, y, xs, ys: (
        {k: f(x, y) for k, f in MEASURES.items()},
        {k: f(xs, ys) for k, f in SMALL_N.items()},
    )
)


@functools.lru_cache(maxsize=None)
def case_values(case):
    """float64 and float32 values of every measure on one case (computed once)."""
    x, y = {**CASES, **WIDE}[case](np.random.default_rng(0))
    with jax.enable_x64(True):
        ref = {k: float(v) for part in _ALL(x, y, x[:600], y[:600]) for k, v in part.items()}
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    got = {k: v for part in _ALL(x32, y32, x32[:600], y32[:600]) for k, v in part.items()}
    return ref, got


# mutual kNN counts neighbours: float32 rounding can swap two nearly tied ones (a large
# common offset makes cosine similarities nearly equal), a step of 1/(n k) each
TOLERANCE = {"mutual_knn": 3e-3}


# k^-1.5 and k^-1 lie between k^-2 (the worst conditioned) and post-ReLU: with -m slow
IN_BETWEEN = ("k^-1.5", "k^-1")


@pytest.mark.parametrize(
    "case",
    [c for c in sorted(CASES) if c not in IN_BETWEEN]
    + [pytest.param(c, marks=pytest.mark.slow) for c in IN_BETWEEN + tuple(sorted(WIDE))],
)
def test_float32_agrees_with_float64_on_realistic_layers(case):
    ref, got = case_values(case)
    assert all(v.dtype == np.float32 for v in got.values())
    errors = {k: abs(float(got[k]) - ref[k]) for k in ref}
    bad = {
        k: (round(ref[k], 6), round(float(got[k]), 6))
        for k, e in errors.items()
        if e > TOLERANCE.get(k, 1e-3)
    }
    assert not bad, f"float64 vs float32 off by more than 1e-3: {bad}"


@pytest.mark.slow  # suite time; float32 grids: the narrow-side and small-grid tests
def test_float32_grids_agree_with_float64(rng):
    x, y = power_law(rng, 800, 128, 64, 2.0)
    layers = [x, y, np.maximum(y, 0)]
    # the feature route is linear_cka's pair function, covered on every realistic case above
    # (the RBF and Pearson-RSA grids form their blocks from the features, not from the
    # pair's kernel or RDM; the third layer is constant: 0 everywhere, also debiased)
    for metric, opts in [
        ("linear_cka", {"method": "gram"}),
        ("mean_cca", {}),
        ("pwcca", {}),
        ("procrustes", {"alpha": 0.5}),
        ("rbf_cka", {}),
        ("rbf_cka", {"debiased": True}),
        ("rsa", {"compare": "pearson"}),
        ("rsa", {"compare": "pearson", "dissimilarity": "euclidean"}),
    ]:
        with jax.enable_x64(True):
            ref = np.asarray(jaxsim.similarity_grid(layers, metric=metric, **opts).values)
        got = jaxsim.similarity_grid([a.astype(np.float32) for a in layers], metric=metric, **opts)
        np.testing.assert_allclose(got.values, ref, atol=1e-3, err_msg=metric)


@pytest.mark.slow  # suite time; the blockwise median in float32: test_kernel.py
def test_float32_rbf_grid_bandwidth_in_blocks(rng, monkeypatch):
    """n = 1100 (3 blocks): each layer's RBF bandwidth (radix selection) and centering row
    are found over distance blocks; in float32 on a power-law spectrum with an offset, a
    post-ReLU and a constant layer (one width: shared compiles), biased and debiased,
    against float64, U-centered also in the Gram route's accelerator form (the four
    layers' blocks one batched product; forced here); bfloat16 activations are computed
    in float32."""

    x, y = power_law(rng, 1100, 24, 24, 1.5)
    layers = [x, y, np.maximum(y, 0), np.full((1100, 24), 7.0)]
    for debiased in (False, True):
        with jax.enable_x64(True):
            ref = np.asarray(
                jaxsim.similarity_grid(layers, metric="rbf_cka", debiased=debiased).values
            )
        got = jaxsim.similarity_grid(
            [a.astype(np.float32) for a in layers], metric="rbf_cka", debiased=debiased
        ).values
        np.testing.assert_allclose(got, ref, atol=1e-3, err_msg=str(debiased))
        if not debiased:
            continue
        with monkeypatch.context() as patch:
            patch.setattr(_gram_route, "batched_blocks", lambda: True)
            batched = jaxsim.similarity_grid(
                [a.astype(np.float32) for a in layers], metric="rbf_cka", debiased=debiased
            ).values
        np.testing.assert_allclose(batched, ref, atol=2e-6, err_msg=str(debiased))
    half = [jnp.asarray(a, jnp.bfloat16) for a in layers]
    got = jaxsim.similarity_grid(half, metric="rbf_cka").values
    assert got.dtype == np.float32
    np.testing.assert_allclose(
        got,
        jaxsim.similarity_grid([a.astype(np.float32) for a in half], metric="rbf_cka").values,
        atol=1e-6,
    )


def test_float32_neighbours_found_in_row_blocks(rng):
    """Mutual kNN's blocked neighbour search in float32 against the float64 value (the
    whole row at once), within the tolerance for nearly tied neighbours."""

    x, y = relu_layers(rng, 600, 64, 32)
    with jax.enable_x64(True):
        ref = float(jaxsim.mutual_knn(x, y))
    blocked = jax.jit(
        lambda a, b: _row_blocks.knn_pair(
            _row_blocks.knn_indices(a, 10, block_entries=600 * 64),
            _row_blocks.knn_indices(b, 10, block_entries=600 * 64),
        )
    )
    got = blocked(x.astype(np.float32), y.astype(np.float32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=TOLERANCE["mutual_knn"])


def test_small_float32_grids_as_accurate_as_one_pair(rng):
    # one or two stacked layers: the grid's block product must not lose what the pair keeps
    x = rng.normal(size=(4000, 64))
    y = np.tanh(x[:, :32]) + rng.normal(size=(4000, 32))
    with jax.enable_x64(True):
        ref = float(jaxsim.linear_cka(x, y))
        state = jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(1, 1), [x[:2000]], [y[:2000]])
        ref_mb = float(jaxsim.minibatch_cka_result(state).values[0, 0])
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    assert abs(float(jaxsim.linear_cka(x32, y32)) - ref) < 1e-6
    grid = jaxsim.similarity_grid([x32], [y32], method="gram")
    assert abs(float(grid.values[0, 0]) - ref) < 2e-6
    state = jaxsim.minibatch_cka_update(
        jaxsim.minibatch_cka_init(1, 1, dtype=np.float32), [x32[:2000]], [y32[:2000]]
    )
    assert abs(float(jaxsim.minibatch_cka_result(state).values[0, 0]) - ref_mb) < 2e-6


def test_float32_cross_grids_with_a_narrow_side(rng, monkeypatch):
    """A cross-grid forms only its row-column products: with one row layer (or one
    column layer) that product has a side of 1, which XLA's CPU dot accumulates in one
    long float32 sum; it must keep the accuracy of the pair (n = 2000: 4 blocks of 504),
    also in the Gram route's accelerator form (equal-width layers' blocks one batched
    product; forced here), and the union's self-grid too."""

    x = rng.normal(size=(2000, 64)) * np.arange(1, 65) ** -1.0 + 3.0
    others = [
        np.tanh(x[:, :32]) + rng.normal(size=(2000, 32)),
        np.maximum(x[:, :48], 3.0),
        rng.normal(size=(2000, 16)),
        x[:, ::2] ** 2,
        np.sin(x[:, :40]),
    ]
    with jax.enable_x64(True):
        ref = np.asarray(jaxsim.similarity_grid([x], others, method="gram").values)
        state = jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(5, 1), others, [x])
        ref_mb = np.asarray(jaxsim.minibatch_cka_result(state).values)
    x32, o32 = x.astype(np.float32), [o.astype(np.float32) for o in others]
    grid = jaxsim.similarity_grid([x32], o32, method="gram").values
    np.testing.assert_allclose(grid, ref, atol=2e-6)
    state = jaxsim.minibatch_cka_update(
        jaxsim.minibatch_cka_init(5, 1, dtype=np.float32), o32, [x32]
    )
    np.testing.assert_allclose(jaxsim.minibatch_cka_result(state).values, ref_mb, atol=2e-6)
    half = [jnp.asarray(a, jnp.bfloat16) for a in [x32] + o32]
    got = jaxsim.similarity_grid(half[:1], half[1:], method="gram").values
    assert got.dtype == np.float32
    np.testing.assert_allclose(
        got,
        jaxsim.similarity_grid(
            [np.asarray(a, np.float32) for a in half[:1]],
            [np.asarray(a, np.float32) for a in half[1:]],
            method="gram",
        ).values,
        atol=1e-6,
    )
    with jax.enable_x64(True):  # (U-centered blocks: the minibatch's)
        union = jaxsim.similarity_grid([x] + others, method="gram").values
    monkeypatch.setattr(_gram_route, "batched_blocks", lambda: True)
    grid = jaxsim.similarity_grid([x32], o32, method="gram").values
    np.testing.assert_allclose(grid, ref, atol=2e-6)
    state = jaxsim.minibatch_cka_update(
        jaxsim.minibatch_cka_init(5, 1, dtype=np.float32), o32, [x32]
    )
    np.testing.assert_allclose(jaxsim.minibatch_cka_result(state).values, ref_mb, atol=2e-6)
    np.testing.assert_allclose(
        jaxsim.similarity_grid([x32] + o32, method="gram").values, union, atol=2e-6
    )
    got = jaxsim.similarity_grid(half, method="gram").values
    np.testing.assert_allclose(
        got,
        jaxsim.similarity_grid([np.asarray(a, np.float32) for a in half], method="gram").values,
        atol=1e-6,
    )


@given(seed=st.integers(0, 2**31 - 1), offset=st.floats(-10, 10), scale=st.floats(0.1, 10))
def test_float32_matches_float64_on_well_conditioned_inputs(seed, offset, scale):
    # one shape: every example runs the same compiled functions
    x, y = related(np.random.default_rng(seed), 120, 8, 5)
    x, y = scale * x + offset, y - offset
    fns = [
        jaxsim.linear_cka,
        jaxsim.mean_cca,
        jaxsim.pwcca,
        jaxsim.procrustes_similarity,
        jaxsim.linear_predictivity,
        functools.partial(jaxsim.svcca, keep_dims=2),
    ]
    with jax.enable_x64(True):
        ref = [float(f(x, y)) for f in fns]
    got = [float(f(x.astype(np.float32), y.astype(np.float32))) for f in fns]
    np.testing.assert_allclose(got, ref, atol=1e-5)


# ------------------------------------------------------------------ half precision


def gram(x):
    """A Gram matrix in x's dtype, from the float32 product (rounded once)."""
    wide = x.astype(jnp.float32)
    return (wide @ wide.T).astype(x.dtype)


PUBLIC = {
    "linear_cka": lambda x, y: jaxsim.linear_cka(x, y),
    "linear_cka gram": lambda x, y: jaxsim.linear_cka(x, y, method="gram"),
    "rbf_cka": lambda x, y: jaxsim.rbf_cka(x, y),
    "cka": lambda x, y: jaxsim.cka(gram(x), gram(y)),
    "hsic": lambda x, y: jaxsim.hsic(gram(x), gram(y)),
    "center_gram": lambda x, y: jaxsim.center_gram(gram(x))[0, 1],
    "mean_cca": jaxsim.mean_cca,
    "cca": lambda x, y: jaxsim.cca(x, y).coefficients[0],
    "svcca": lambda x, y: jaxsim.svcca(x, y, keep_dims=3),
    "pwcca": jaxsim.pwcca,
    "procrustes_distance": jaxsim.procrustes_distance,
    "rsa": jaxsim.rsa,
    "mutual_knn": lambda x, y: jaxsim.mutual_knn(x, y, k=5),
    "linear_predictivity": jaxsim.linear_predictivity,
    "grid": lambda x, y: jaxsim.similarity_grid([x], [y]).values[0, 0],
    "grid pwcca": lambda x, y: jaxsim.similarity_grid([x, y], metric="pwcca").values[0, 1],
    "minibatch": lambda x, y: jaxsim.minibatch_cka_result(
        jaxsim.minibatch_cka_update(jaxsim.minibatch_cka_init(1, 1), [x], [y])
    ).values[0, 0],
}


# float16 takes bfloat16's path (both cast to float32 first): with -m slow (suite time)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)])
def test_half_precision_inputs_computed_in_float32(rng, dtype):
    x, y = related(rng, 80, 6, 5)
    half_x, half_y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    # the same rounded values given in float32 are the reference (Gram inputs are rounded
    # to the half dtype once, by ``gram``, in both)
    wide = lambda fn, a, b: fn(a.astype(jnp.float32), b.astype(jnp.float32))
    for name, fn in PUBLIC.items():
        got = fn(half_x, half_y)
        assert got.dtype == jnp.float32, name
        if name in ("cka", "hsic", "center_gram"):
            ref = {
                "cka": jaxsim.cka,
                "hsic": jaxsim.hsic,
                "center_gram": lambda k, l: jaxsim.center_gram(k)[0, 1],
            }[name](gram(half_x).astype(jnp.float32), gram(half_y).astype(jnp.float32))
        else:
            ref = wide(fn, half_x, half_y)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=name)
    assert jaxsim.gram_linear(half_x).dtype == jnp.float32


def test_bfloat16_flax_model_streams(rng):
    from flax import nnx

    from jaxsim.flax import minibatch_grid

    model = nnx.Sequential(
        nnx.Linear(4, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
        nnx.relu,
        nnx.Linear(8, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)),
    )
    batches = [rng.normal(size=(16, 4)).astype(np.float32) for _ in range(3)]
    grid = minibatch_grid(model, batches, progress=False)
    assert grid.values.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(grid.values)))


# ------------------------------------------------------------------ scale


def test_scale_invariant_measures_never_overflow(rng):
    x, y = related(rng, 300, 8, 6)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    invariant = {
        "linear_cka": jaxsim.linear_cka,
        "linear_cka gram": functools.partial(jaxsim.linear_cka, method="gram"),
        "linear_cka debiased": functools.partial(jaxsim.linear_cka, debiased=True),
        "rbf_cka": jaxsim.rbf_cka,
        "mean_cca": jaxsim.mean_cca,
        "pwcca": jaxsim.pwcca,
        "svcca": functools.partial(jaxsim.svcca, keep_dims=3),
        "procrustes": jaxsim.procrustes_similarity,
        "rsa": jaxsim.rsa,
        "rsa euclidean": functools.partial(jaxsim.rsa, dissimilarity="euclidean"),
        "linear_predictivity": jaxsim.linear_predictivity,
        "mutual_knn": jaxsim.mutual_knn,
        "grid": lambda a, b: jaxsim.similarity_grid([a], [b], method="gram").values[0, 0],
        "rsa grid": lambda a, b: jaxsim.similarity_grid(
            [a], [b], metric="rsa", compare="pearson", dissimilarity="euclidean"
        ).values[0, 0],
    }
    for name, fn in invariant.items():
        base = float(fn(x32, y32))
        for scale in (1e18, 1e-18, 1e25, 1e-25):
            np.testing.assert_allclose(
                fn(x32 * scale, y32), base, rtol=1e-4, atol=1e-6, err_msg=f"{name} at scale {scale}"
            )


def test_cka_of_grams_with_an_offset_is_documented():
    assert "float32" in jaxsim.cka.__doc__ and "offset" in jaxsim.cka.__doc__


# ------------------------------------------------------------------ derivatives


def finite_difference(fn, x, direction, h=1e-6):
    return (fn(x + h * direction) - fn(x - h * direction)) / (2 * h)


DIFFERENTIABLE = {
    "linear_cka": jaxsim.linear_cka,
    "linear_cka gram": functools.partial(jaxsim.linear_cka, method="gram"),
    "linear_cka debiased": functools.partial(jaxsim.linear_cka, debiased=True),
    "rbf_cka": jaxsim.rbf_cka,
    "mean_cca": jaxsim.mean_cca,
    "svcca": functools.partial(jaxsim.svcca, keep_dims=3),
    "pwcca": jaxsim.pwcca,
    "pwcca variates": functools.partial(jaxsim.pwcca, directions="variates"),
    "procrustes": jaxsim.procrustes_similarity,
    "procrustes alpha=0.5": functools.partial(jaxsim.procrustes_similarity, alpha=0.5),
    "linear_predictivity": jaxsim.linear_predictivity,
}


@pytest.mark.parametrize("name", sorted(DIFFERENTIABLE))
def test_gradients(x64, rng, name):
    """Against central finite differences on generic layers, and finite at degenerate
    points (all with one shape, so each gradient compiles once)."""
    fn = DIFFERENTIABLE[name]
    x, y = related(rng, 40, 4, 4)
    direction = rng.normal(size=x.shape)
    loss = lambda a: fn(a, y)
    grad_x = jax.jit(jax.grad(fn, argnums=0))  # compiled once, for every y below
    grad = grad_x(x, y)
    np.testing.assert_allclose(
        np.vdot(grad, direction), finite_difference(loss, x, direction), rtol=1e-5, atol=1e-8
    )
    # the second argument too
    grad_y = jax.jit(jax.grad(fn, argnums=1))(x, y)
    direction_y = rng.normal(size=y.shape)
    np.testing.assert_allclose(
        np.vdot(grad_y, direction_y),
        finite_difference(lambda b: fn(x, b), y, direction_y),
        rtol=1e-5,
        atol=1e-8,
    )
    degenerate = {
        "zero variance": np.zeros((40, 4)),
        "constant": np.full((40, 4), 2.0),
        "rank deficient": np.concatenate([x[:, :2], x[:, :2] @ rng.normal(size=(2, 2))], axis=1),
        "identical": x,
    }
    for label, y in degenerate.items():
        assert bool(jnp.all(jnp.isfinite(grad_x(x, y)))), f"{name}: {label}"


# ------------------------------------------------------- full-precision products on GPU/TPU


def _reduced_precision_products(fn, *args):
    """The matrix products in ``fn``'s lowered program that do not ask for full precision:
    a float32 product at the default precision runs in TF32 on recent NVIDIA GPUs (10-bit
    mantissa) and in bfloat16 passes on TPUs, ~1e-3 relative error, which the CCA family
    turns into wrong answers on ill-conditioned layers."""
    import re

    text = jax.jit(fn).lower(*args).as_text()
    products = re.findall(r"stablehlo\.dot(?:_general)?\b.*", text)
    assert products, "no matrix product found: the check would pass vacuously"
    return [p[:120] for p in products if "HIGHEST" not in p]


def test_every_float32_product_is_full_precision(rng, monkeypatch):
    """Read on the CPU from the lowered programs, so it guards the GPU and TPU behavior:
    every public measure, grid, streaming update and gradient asks for HIGHEST, the Gram
    route's grids also in the form they take on an accelerator (batched products)."""

    x = rng.normal(size=(120, 24)).astype(np.float32)
    y = (x[:, :21] @ rng.normal(size=(21, 21)) + 1).astype(np.float32)
    direction = rng.normal(size=24).astype(np.float32)
    state = jaxsim.minibatch_cka_init(2, 1)
    programs = {
        **{name: (f, x, y) for name, f in {**MEASURES, **SMALL_N}.items()},
        **{
            f"grad {name}": (jax.grad(f, argnums=(0, 1)), x, y)
            for name, f in DIFFERENTIABLE.items()
        },
        "cca": (lambda a, b: jaxsim.cca(a, b, warn=False), x, y),
        "gram_linear": (jaxsim.gram_linear, x),
        "cka of grams": (
            lambda a, b: jaxsim.cka(jaxsim.gram_linear(a), jaxsim.gram_linear(b), debiased=True),
            x,
            y,
        ),
        "hsic": (lambda a, b: jaxsim.hsic(jaxsim.gram_rbf(a), jaxsim.gram_rbf(b)), x, y),
        "rdm": (jaxsim.rdm, x),
        "most_similar_neurons": (jaxsim.most_similar_neurons, x, y),
        "predict_direction": (jaxsim.predict_direction, x, y, direction),
        "minibatch_cka_update": (
            lambda a, b: jaxsim.minibatch_cka_update(state, [a, a], [b]),
            x,
            y,
        ),
        **{
            f"grid {metric}": (
                lambda a, b, m=metric: (
                    jaxsim.similarity_grid(
                        [a, 2 * a], [b], metric=m, progress=False, warn=False
                    ).values
                ),
                x,
                y,
            )
            for metric in [
                "linear_cka",
                "rbf_cka",
                "mean_cca",
                "svcca",
                "pwcca",
                "procrustes",
                "linear_predictivity",
                "rsa",
                "mutual_knn",
            ]
        },
    }
    reduced = {
        name: found
        for name, (fn, *args) in programs.items()
        if (found := _reduced_precision_products(fn, *args))
    }
    assert not reduced, reduced
    monkeypatch.setattr(_gram_route, "batched_blocks", lambda: True)
    for name in ("grid linear_cka", "grid rbf_cka", "minibatch_cka_update"):
        fn, *args = programs[name]
        fresh = lambda *a, fn=fn: fn(*a)  # not the traces cached above (nor their shapes)
        args = [a[:110] for a in args]
        assert "batching_dims" in jax.jit(fresh).lower(*args).as_text(), name
        assert not _reduced_precision_products(fresh, *args), name


def test_svds_never_use_the_polar_solver():
    """Read from the programs lowered for each platform (no GPU needed): no layer is
    factorised by cuSOLVER's polar SVD (gesvdp). It is ~3x faster than gesvd on a
    full-rank 10000 x 500 layer, but on rank-deficient layers its factors are wrong: on an
    H100 (jax 0.11.2) mean CCA, SVCCA, PWCCA and Procrustes of this file's rank-192 and
    dead-unit cases were off by 0.1-0.3 in float32 and a constant unit changed mean CCA
    by 3.6%."""
    import re

    from jaxsim import _linalg

    def solvers(shape, platform):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        text = jax.jit(_linalg.svd).trace(x).lower(lowering_platforms=(platform,)).as_text()
        return set(re.findall(r"\w*solver_gesv\w*", text))

    for shape in ((2000, 64), (64, 2000), (1000, 64)):
        found = solvers(shape, "cuda")
        assert found and "gesvdp" not in str(found), (shape, found)
    x = np.random.default_rng(0).normal(size=(1100, 6)).astype(np.float32)
    np.testing.assert_allclose(_linalg.svd(x)[1], np.linalg.svd(x, compute_uv=False), rtol=1e-5)


@pytest.mark.slow  # suite time; the padding itself: test_grid, test_geometry
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_padded_grids_in_low_precision_on_realistic_layers(rng, dtype):
    """Grids pad layers to their width bucket (narrow widths together, close wide ones
    together): on power-law and post-ReLU layers with a dead unit, in float32 (and from
    bfloat16 inputs, computed in float32), every padded cell of mean CCA, PWCCA
    (epsilon 0 and 1e-6, both orders) and Procrustes agrees with the float64 single call,
    whose PWCCA is the NumPy reference's (1e-9) where no unit is dead; and every padded
    cell equals the same dtype's single call. (A PWCCA side with a dead unit at epsilon
    0 is 1.4e-3 off float64 in float32, padded or not: left to its own issue.)"""
    from references import np_pwcca

    x, y = power_law(rng, 600, 60, 40, 1.5)
    wide, narrow = relu_layers(rng, 600, 112, 12)
    narrow[:, 3] = 0  # a dead unit
    layers = [x, y, wide, narrow, wide[:, :100] + 0.1 * rng.normal(size=(600, 100))]
    low = [jnp.asarray(a, dtype) for a in layers]
    layers = [np.asarray(a, np.float64) for a in low]  # the reference sees the same inputs
    cases = [
        ("mean_cca", {}, jaxsim.mean_cca),
        ("pwcca", {}, jaxsim.pwcca),
        ("pwcca", {"epsilon": 1e-6}, functools.partial(jaxsim.pwcca, epsilon=1e-6)),
        ("procrustes", {}, jaxsim.procrustes_similarity),
    ]
    # widths 60, 40 and 12 share one bucket (60), 112 and 100 another (112)
    pairs = [(0, 3), (3, 0), (1, 3), (2, 4), (4, 2), (0, 2)]
    for metric, opts, single in cases:
        grid = np.asarray(
            jaxsim.similarity_grid(low, metric=metric, progress=False, warn=False, **opts).values
        )
        with jax.enable_x64(True):
            for i, j in pairs:
                ref = float(single(layers[i], layers[j], warn=False) if metric != "procrustes"
                            else single(layers[i], layers[j]))  # fmt: skip
                # (the dead unit: at epsilon 0 the reference weighs its null direction,
                # jaxsim does not, docs/numerics.md)
                if metric == "pwcca" and not opts and 3 not in (i, j):
                    np.testing.assert_allclose(ref, np_pwcca(layers[i], layers[j]), rtol=1e-9)
                if metric == "pwcca" and not opts and 3 in (i, j):
                    continue  # checked against the same dtype's single call below
                np.testing.assert_allclose(
                    grid[i, j], ref, atol=2e-3 if dtype == jnp.bfloat16 else 1e-3,
                    err_msg=f"{metric} {opts} {i} {j}",
                )  # fmt: skip
        # padding adds nothing to the dtype's own error: the cells equal single calls
        for i, j in pairs:
            if metric == "pwcca" and 3 in (i, j):
                # the dead-unit side: at epsilon 1e-6 the reference's own value moves by
                # 5e-3 under a 1e-14 change of the inputs (LAPACK's signs; see
                # test_pwcca_where_the_reference_itself_is_unstable), at 0 the float32
                # call and the grid pick different vectors of its near-null space
                continue
            kw = {} if metric == "procrustes" else {"warn": False}
            one = float(single(low[i], low[j], **kw))
            np.testing.assert_allclose(grid[i, j], one, atol=1e-5, err_msg=f"{metric} {i} {j}")
