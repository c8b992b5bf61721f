"""Contract of the public surface as a whole: every measure under jit (arrays passed in or
closed over), as a training loss, and the package's namespace."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsim
from conftest import related

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


def test_namespace():
    # a fresh interpreter: other tests' imports must not make the submodules appear
    code = ("import jaxsim; jaxsim.stats.permutation_test; jaxsim.conv.average_pool; "
            "jaxsim.flax.capture_nnx; jaxsim.plot.heatmap; print(jaxsim.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == jaxsim.__version__
    assert set(jaxsim.__all__) <= set(dir(jaxsim))
