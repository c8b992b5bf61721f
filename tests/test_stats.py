"""Permutation tests, bootstrap intervals and Gaussian baselines."""

import jax
import numpy as np
import pytest

import jaxsim
from conftest import related
from jaxsim import stats


@pytest.mark.parametrize("metric,opts", [
    ("linear_cka", {"method": "features"}), ("linear_cka", {"method": "gram"}),
    ("linear_cka", {"debiased": True, "method": "features"}), ("rbf_cka", {}),
    ("mean_cca", {}), ("rsa", {"compare": "pearson"}),
])
def test_vmapped_permutations_equal_loop(x64, rng, metric, opts):
    x, y = related(rng, 40, 5, 4)
    key = jax.random.key(3)
    res = stats.permutation_test(metric, x, y, key=key, num_permutations=7, batch_size=3, **opts)
    single = {"linear_cka": jaxsim.linear_cka, "rbf_cka": jaxsim.rbf_cka,
              "mean_cca": jaxsim.mean_cca, "rsa": jaxsim.rsa}[metric]
    kw = {k: v for k, v in opts.items() if k != "method"}
    loop = [float(single(x, y[np.asarray(jax.random.permutation(k, 40))], **kw))
            for k in jax.random.split(key, 7)]
    np.testing.assert_allclose(res.null, loop, rtol=1e-9)
    np.testing.assert_allclose(res.statistic, single(x, y, **kw), rtol=1e-9)
    assert float(res.p_value) == (1 + sum(v >= float(res.statistic) for v in loop)) / 8


def test_p_values_under_the_null_and_for_related_data(rng):
    ps = []
    for i in range(40):
        x, y = rng.normal(size=(30, 3)), rng.normal(size=(30, 4))
        ps.append(float(stats.permutation_test("linear_cka", x, y, key=jax.random.key(i),
                                               num_permutations=99).p_value))
    ps = np.array(ps)
    assert 0 < ps.min() and ps.max() <= 1
    assert 0.3 < ps.mean() < 0.7 and ps.min() < 0.15 and ps.max() > 0.85
    x, y = related(rng, 60, 5, 4, noise=0.1)
    res = stats.permutation_test("linear_cka", x, y, key=jax.random.key(0), num_permutations=200)
    assert float(res.p_value) == pytest.approx(1 / 201)


def test_bootstrap(x64, rng):
    x, y = related(rng, 80, 5, 4)
    key = jax.random.key(1)
    res = stats.bootstrap("linear_cka", x, y, key=key, num_samples=200, confidence=0.9)
    assert float(res.low) <= float(res.statistic) <= float(res.high)
    np.testing.assert_allclose(res.statistic, jaxsim.linear_cka(x, y), rtol=1e-10)
    idx = np.asarray(jax.random.randint(key, (200, 80), 0, 80))
    loop = [float(jaxsim.linear_cka(x[i], y[i])) for i in idx[:5]]
    np.testing.assert_allclose(res.samples[:5], loop, rtol=1e-9)
    np.testing.assert_allclose([res.low, res.high], np.quantile(res.samples, [0.05, 0.95]),
                               rtol=1e-9)
    with pytest.raises(ValueError, match=r"confidence: must lie in \(0, 1\)"):
        stats.bootstrap("linear_cka", x, y, key=key, confidence=1.5)


def test_random_baseline(x64, rng):
    x, y = related(rng, 50, 20, 10)
    res = stats.random_baseline("mean_cca", x, y, key=jax.random.key(0), num_samples=30)
    assert res.samples.shape == (30,)
    assert 0 < float(res.mean) < float(jaxsim.mean_cca(x, y))
    more = stats.random_baseline("mean_cca", np.zeros((500, 20)), np.zeros((500, 10)),
                                 key=jax.random.key(0), num_samples=10)
    assert float(more.mean) < float(res.mean)  # more data points, a lower baseline
    np.testing.assert_allclose(res.std, np.std(res.samples), rtol=1e-9)


def test_on_grids(x64, rng):
    x, y = related(rng, 40, 5, 4, noise=0.2)
    noise = rng.normal(size=(40, 3))
    layers = {"x": x, "y": y, "noise": noise}
    key = jax.random.key(0)
    res = stats.permutation_test("linear_cka", layers, None, key=key, num_permutations=50)
    assert res.p_value.rows == ("x", "y", "noise") and res.null.shape == (3, 3, 50)
    assert float(res.p_value["x", "y"]) == pytest.approx(1 / 51)
    single = stats.permutation_test("linear_cka", y, noise, key=key, num_permutations=50)
    np.testing.assert_allclose(res.p_value["y", "noise"], single.p_value)
    boot = stats.bootstrap("svcca", [x, y], [noise], key=key, num_samples=20, keep_dims=2)
    assert boot.low.values.shape == (2, 1) and boot.samples.shape == (2, 1, 20)
    base = stats.random_baseline("linear_cka", [x], [y, noise], key=key, num_samples=5)
    assert base.mean.values.shape == (1, 2)
    with pytest.raises(ValueError, match=r"num_permutations: expected a positive int, got 0"):
        stats.permutation_test("linear_cka", x, y, key=key, num_permutations=0)
