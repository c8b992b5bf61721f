"""Conv-layer reductions against NumPy, and their use in grids."""

import jax
import numpy as np
import pytest
from references import np_linear_cka

import jaxsim
from jaxsim import conv


def test_reductions_against_numpy(x64, rng):
    a = rng.normal(size=(3, 4, 5, 2))
    np.testing.assert_array_equal(conv.flatten_spatial(a), a.reshape(60, 2))
    np.testing.assert_allclose(conv.average_pool(a), a.mean(axis=(1, 2)), rtol=1e-12)
    same = conv.resize_spatial(a, (4, 5))
    np.testing.assert_allclose(same, a, rtol=1e-12)
    up = np.asarray(conv.resize_spatial(a, (8, 10), method="nearest"))
    np.testing.assert_array_equal(up, a.repeat(2, axis=1).repeat(2, axis=2))
    assert conv.resize_spatial(a, (2, 3)).shape == (3, 2, 3, 2)


def test_rank_errors(rng):
    with pytest.raises(
        ValueError,
        match=(
            r"a: expected a conv activation of shape \(n, h, w, "
            r"c\), got shape \(3, 4\) \(rank 2\)"
        ),
    ):
        conv.flatten_spatial(rng.normal(size=(3, 4)))
    with pytest.raises(ValueError, match=r"rank 3"):
        conv.average_pool(rng.normal(size=(3, 4, 5)))
    with pytest.raises(ValueError, match=r"size: expected two positive ints"):
        conv.resize_spatial(rng.normal(size=(1, 2, 2, 1)), (0, 2))


def test_grid_reductions(x64, rng):
    a = {"c1": rng.normal(size=(10, 4, 4, 3)), "c2": rng.normal(size=(10, 4, 4, 5))}
    a["c2"][..., :3] += a["c1"]
    g = jaxsim.similarity_grid(a, reduce="flatten")
    ref = np_linear_cka(a["c1"].reshape(-1, 3), a["c2"].reshape(-1, 5))
    np.testing.assert_allclose(g["c1", "c2"], ref, rtol=1e-10)
    g = jaxsim.similarity_grid(a, reduce="average")
    np.testing.assert_allclose(
        g["c1", "c2"], np_linear_cka(a["c1"].mean((1, 2)), a["c2"].mean((1, 2))), rtol=1e-10
    )
    g = jaxsim.similarity_grid(a)  # default: each example's h*w*c values are its features
    np.testing.assert_allclose(
        g["c1", "c2"], np_linear_cka(a["c1"].reshape(10, -1), a["c2"].reshape(10, -1)), rtol=1e-10
    )
    b = dict(a, c3=rng.normal(size=(10, 2, 2, 3)))
    with pytest.raises(
        ValueError,
        match=r"different spatial sizes \(acts_a\['c1'\]: "
        r"4x4.*c3'\]: 2x2\); "
        r"use reduce='average' or reduce='resize'",
    ):
        jaxsim.similarity_grid(b, reduce="flatten")
    g = jaxsim.similarity_grid(b, reduce="resize")  # to the smallest, 2x2
    small = {
        k: np.asarray(conv.resize_spatial(v, (2, 2))).reshape(-1, v.shape[-1]) for k, v in b.items()
    }
    np.testing.assert_allclose(g["c1", "c3"], np_linear_cka(small["c1"], small["c3"]), rtol=1e-10)
    half = jaxsim.similarity_grid(a, reduce="flatten", subsample=0.5, key=jax.random.key(0))
    full = jaxsim.similarity_grid(a, reduce="flatten")
    assert abs(float(half["c1", "c2"]) - float(full["c1", "c2"])) < 0.1
    assert float(half["c1", "c2"]) != float(full["c1", "c2"])
    with pytest.raises(ValueError, match=r"key: subsample needs a jax.random key"):
        jaxsim.similarity_grid(a, reduce="flatten", subsample=0.5)
    with pytest.raises(ValueError, match=r"reduce: expected one of 'flatten', 'average', 'resize'"):
        jaxsim.similarity_grid(a, reduce="max")
    # a dense layer among conv layers: the message says why, not "n mismatch"
    mixed = dict(b, fc=rng.normal(size=(10, 7)))
    for how in ("resize", "flatten"):
        with pytest.raises(
            ValueError,
            match=rf"reduce='{how}': makes every spatial position.*"
            r"not \(n, h, w, c\): acts_a\['fc'\] \(10, 7\); use "
            r"reduce='average'",
        ):
            jaxsim.similarity_grid(mixed, reduce=how)
    avg = jaxsim.similarity_grid(mixed, reduce="average")
    np.testing.assert_allclose(
        avg["c1", "fc"], np_linear_cka(a["c1"].mean((1, 2)), mixed["fc"]), rtol=1e-10
    )
