"""Permutation tests, bootstrap intervals and Gaussian baselines."""

import jax
import numpy as np
import pytest
from conftest import related

import jaxsim
from jaxsim import stats


@pytest.mark.parametrize(
    "metric,opts",
    [
        ("linear_cka", {"method": "features"}),
        ("linear_cka", {"method": "gram"}),
        ("linear_cka", {"debiased": True, "method": "features"}),
        ("rbf_cka", {}),
        ("mean_cca", {}),
        ("rsa", {"compare": "pearson"}),
        ("mutual_knn", {"k": 4}),
    ],
)
def test_vmapped_permutations_equal_loop(x64, rng, metric, opts):
    x, y = related(rng, 40, 5, 4)
    key = jax.random.key(3)
    res = stats.permutation_test(metric, x, y, key=key, num_permutations=7, batch_size=3, **opts)
    single = {
        "linear_cka": jaxsim.linear_cka,
        "rbf_cka": jaxsim.rbf_cka,
        "mean_cca": jaxsim.mean_cca,
        "rsa": jaxsim.rsa,
        "mutual_knn": jaxsim.mutual_knn,
    }[metric]
    kw = {k: v for k, v in opts.items() if k != "method"}
    loop = [
        float(single(x, y[np.asarray(jax.random.permutation(k, 40))], **kw))
        for k in jax.random.split(key, 7)
    ]
    np.testing.assert_allclose(res.null, loop, rtol=1e-9)
    np.testing.assert_allclose(res.statistic, single(x, y, **kw), rtol=1e-9)
    assert float(res.p_value) == (1 + sum(v >= float(res.statistic) for v in loop)) / 8


def test_p_values_under_the_null_and_for_related_data(rng):
    ps = []
    for i in range(40):
        x, y = rng.normal(size=(30, 3)), rng.normal(size=(30, 4))
        ps.append(
            float(
                stats.permutation_test(
                    "linear_cka", x, y, key=jax.random.key(i), num_permutations=99
                ).p_value
            )
        )
    ps = np.array(ps)
    assert 0 < ps.min() and ps.max() <= 1
    assert 0.3 < ps.mean() < 0.7 and ps.min() < 0.15 and ps.max() > 0.85
    x, y = related(rng, 60, 5, 4, noise=0.1)
    res = stats.permutation_test("linear_cka", x, y, key=jax.random.key(0), num_permutations=200)
    assert float(res.p_value) == pytest.approx(1 / 201)


def test_classic_bootstrap_on_request(x64, rng):
    x, y = related(rng, 80, 5, 4)
    key = jax.random.key(1)
    res = stats.bootstrap(
        "linear_cka", x, y, key=key, num_samples=200, confidence=0.9, resample="replacement"
    )
    np.testing.assert_allclose(res.statistic, jaxsim.linear_cka(x, y), rtol=1e-10)
    idx = np.asarray(jax.random.randint(key, (200, 80), 0, 80))
    loop = [float(jaxsim.linear_cka(x[i], y[i])) for i in idx[:5]]
    np.testing.assert_allclose(res.samples[:5], loop, rtol=1e-9)
    np.testing.assert_allclose(
        [res.low, res.high], np.quantile(res.samples, [0.05, 0.95]), rtol=1e-9
    )
    # the repr names the samples' shape instead of printing all 200 of them
    assert "samples=<array of shape (200,)>" in repr(res) and len(repr(res)) < 400
    with pytest.raises(ValueError, match=r"confidence: must lie in \(0, 1\)"):
        stats.bootstrap("linear_cka", x, y, key=key, confidence=1.5)
    with pytest.raises(ValueError, match=r"resample: expected one of 'half', 'replacement'"):
        stats.bootstrap("linear_cka", x, y, key=key, resample="jackknife")


def np_half_sample_interval(stat, half, quarter, confidence):
    """The interval of jaxsim.stats.bootstrap, written out: the estimate corrected by
    Richardson extrapolation of the half- and quarter-sample means (bias b/n + c/n^2),
    plus or minus z times the half-samples' spread and the correction's Monte Carlo
    error."""
    from scipy.stats import norm

    h, q, num = half.mean(), quarter.mean(), len(half)
    v = ((q - h) - 2 * (h - stat)) / 6
    u = (h - stat) - 3 * v
    second = abs(v) <= abs(u) / 2
    bias = u + v if second else h - stat
    mc = (4 * half.var() + quarter.var() / 9) / num if second else half.var() / num
    sd = np.sqrt(half.var() + mc)
    z = norm.ppf((1 + confidence) / 2)
    return stat - bias - z * sd, stat - bias + z * sd, stat - bias


def test_half_sample_interval_by_hand(x64, rng):
    x, y = related(rng, 80, 5, 4)
    key = jax.random.key(2)
    res = stats.bootstrap("linear_cka", x, y, key=key, num_samples=40, confidence=0.9)
    rows = [np.asarray(jax.random.permutation(k, 80))[:40] for k in jax.random.split(key, 40)]
    half = np.array([float(jaxsim.linear_cka(x[i], y[i])) for i in rows])
    np.testing.assert_allclose(res.samples, half, rtol=1e-9)
    quarter_keys = jax.random.split(jax.random.fold_in(key, 1), 40)
    quarter = np.array(
        [
            float(jaxsim.linear_cka(x[i], y[i]))
            for i in (np.asarray(jax.random.permutation(k, 80))[:20] for k in quarter_keys)
        ]
    )
    low, high, estimate = np_half_sample_interval(float(res.statistic), half, quarter, 0.9)
    np.testing.assert_allclose([res.low, res.high, res.estimate], [low, high, estimate], rtol=1e-9)


def test_intervals_contain_their_estimate(rng):
    # the case: duplicated rows pushed the classic interval above its statistic
    x = rng.normal(size=(1024, 64)).astype(np.float32)
    y = (x[:, :32] + rng.normal(size=(1024, 32))).astype(np.float32)
    key = jax.random.key(0)
    classic = stats.bootstrap("linear_cka", x, y, key=key, num_samples=100, resample="replacement")
    assert float(classic.low) > float(classic.statistic)  # what was wrong
    for metric, opts in [("svcca", {"keep_dims": 5}), ("pwcca", {}), ("procrustes", {})]:
        res = stats.bootstrap(
            metric, x[:400, :16], y[:400, :8], key=key, num_samples=40, batch_size=40, **opts
        )
        assert float(res.low) <= float(res.estimate) <= float(res.high), metric
    debiased = stats.bootstrap("linear_cka", x, y, key=key, num_samples=100, debiased=True)
    assert float(debiased.low) <= float(debiased.estimate) <= float(debiased.high)
    assert float(debiased.low) <= float(debiased.statistic) <= float(debiased.high)


def coverage(metric, opts, make, truth, reps, num):
    rng = np.random.default_rng(1)
    hits = 0
    for r in range(reps):
        x, y = make(rng)
        res = stats.bootstrap(
            metric, x, y, key=jax.random.key(r), num_samples=num, batch_size=num, **opts
        )
        hits += float(res.low) <= truth <= float(res.high)
    return hits / reps


def cka_population(rng, n=512):
    # x ~ N(0, I_32), y = x[:, :16] + N(0, I_16): population CKA = 16 / (sqrt(32) sqrt(64))
    x = rng.normal(size=(n, 32))
    return x.astype(np.float32), (x[:, :16] + rng.normal(size=(n, 16))).astype(np.float32)


LAMBDA = 2.0 ** -np.arange(12)


def svcca_population(rng, n=512):
    # diagonal spectra, y_i = x_i + noise of x_i's variance: the top 4 directions of both
    # are the first 4 coordinates, with canonical correlations 1/sqrt(2)
    x = rng.normal(size=(n, 12)) * np.sqrt(LAMBDA)
    y = x[:, :8] + rng.normal(size=(n, 8)) * np.sqrt(LAMBDA[:8])
    return x.astype(np.float32), y.astype(np.float32)


CKA_TRUTH = 16 / (np.sqrt(32) * 8)
COVERAGE = [
    pytest.param("linear_cka", {}, cka_population, CKA_TRUTH, id="cka"),
    # the same bootstrap on other estimators: with -m slow (suite time)
    pytest.param(
        "linear_cka",
        {"debiased": True},
        cka_population,
        CKA_TRUTH,
        id="debiased",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "svcca",
        {"keep_dims": 4},
        svcca_population,
        1 / np.sqrt(2),
        id="svcca",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("metric,opts,make,truth", COVERAGE)
def test_nominal_95_percent_intervals_cover_the_population_value(metric, opts, make, truth):
    # at n=512, biased CKA overestimates this population value by ~0.05, about 5 of its
    # standard errors: no interval around the raw statistic could cover it
    assert coverage(metric, opts, make, truth, reps=50, num=150) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("metric,opts,make,truth", COVERAGE, ids=["cka", "debiased", "svcca"])
def test_coverage_with_more_replications(metric, opts, make, truth):
    assert coverage(metric, opts, make, truth, reps=300, num=400) >= 0.92


def test_random_baseline(x64, rng):
    x, y = related(rng, 50, 20, 10)
    res = stats.random_baseline(
        "mean_cca", x, y, key=jax.random.key(0), num_samples=30, batch_size=30
    )
    assert res.samples.shape == (30,)
    assert 0 < float(res.mean) < float(jaxsim.mean_cca(x, y))
    more = stats.random_baseline(
        "mean_cca",
        np.zeros((500, 20)),
        np.zeros((500, 10)),
        key=jax.random.key(0),
        num_samples=10,
        batch_size=10,
    )
    assert float(more.mean) < float(res.mean)  # more data points, a lower baseline
    np.testing.assert_allclose(res.std, np.std(res.samples), rtol=1e-9)


def test_on_grids(x64, rng):
    x, y = related(rng, 40, 4, 4, noise=0.2)  # one width: every pair shares its compiles
    noise = rng.normal(size=(40, 4))
    layers = {"x": x, "y": y, "noise": noise}
    key = jax.random.key(0)
    res = stats.permutation_test("linear_cka", layers, None, key=key, num_permutations=50)
    assert res.p_value.rows == ("x", "y", "noise") and res.null.shape == (3, 3, 50)
    assert float(res.p_value["x", "y"]) == pytest.approx(1 / 51)
    single = stats.permutation_test("linear_cka", y, noise, key=key, num_permutations=50)
    np.testing.assert_allclose(res.p_value["y", "noise"], single.p_value)
    boot = stats.bootstrap("svcca", [x, y], [noise], key=key, num_samples=20, keep_dims=2)
    assert boot.low.values.shape == (2, 1) and boot.samples.shape == (2, 1, 20)
    assert boot.estimate.values.shape == (2, 1)
    single = stats.bootstrap("svcca", y, noise, key=key, num_samples=20, keep_dims=2)
    np.testing.assert_allclose(boot.high.values[1, 0], single.high, rtol=1e-9)
    base = stats.random_baseline("linear_cka", [x], [y, noise], key=key, num_samples=5)
    assert base.mean.values.shape == (1, 2)
    with pytest.raises(ValueError, match=r"num_permutations: expected a positive int, got 0"):
        stats.permutation_test("linear_cka", x, y, key=key, num_permutations=0)
