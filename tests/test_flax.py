"""Activation capture from linen and nnx models, and streaming grids from models."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsim
from jaxsim.flax import (
    capture_linen,
    capture_nnx,
    collect_activations,
    minibatch_grid,
    minibatch_state,
)

# --------------------------------------------------------------------------- models


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(6, name="fc1")(x))
        h = nn.relu(nn.Dense(5, name="fc2")(h))
        self.sow("intermediates", "hidden", h)
        return nn.Dense(3, name="head")(h)


class LinenResBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.Conv(3, (3, 3), use_bias=False, name="conv")(x)
        h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
        return nn.relu(h + x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(3, (3, 3), name="stem")(x)
        x = LinenResBlock(name="block1")(x, train)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 6, rngs=rngs)
        self.fc2 = nnx.Linear(6, 5, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.fc2(nnx.relu(self.fc1(x))))
        self.sow(nnx.Intermediate, "hidden", h)
        return self.head(h)


class NnxResBlock(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 3, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)) + x)


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(2, 3, (3, 3), rngs=rngs)
        self.block1 = NnxResBlock(rngs)
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(self.block1(self.stem(x)), (2, 2), strides=(2, 2))
        return self.head(x.mean(axis=(1, 2)))


def conv(x, kernel, bias=None):
    x = jnp.asarray(x)
    y = jax.lax.conv_general_dilated(
        x, jnp.asarray(kernel, x.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y if bias is None else y + bias


def batch_norm(x, mean, var, scale, bias, eps=1e-5):
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


# --------------------------------------------------------------------------- linen


def test_linen_mlp_by_hand(x64):
    x = np.random.default_rng(0).normal(size=(10, 4))
    model = LinenMLP()
    variables = model.init(jax.random.key(0), x)
    acts = capture_linen(model, variables, x)
    # the model's output is its head's output: listed once, under the layer's name
    assert list(acts) == ["fc1", "fc2", "hidden", "head"]
    p = variables["params"]
    h1 = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h2 = np.maximum(h1, 0) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    out = np.maximum(h2, 0) @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(acts["fc1"], h1, rtol=1e-12)
    np.testing.assert_allclose(acts["fc2"], h2, rtol=1e-12)
    np.testing.assert_allclose(acts["hidden"], np.maximum(h2, 0), rtol=1e-12)
    np.testing.assert_allclose(acts["head"], out, rtol=1e-12)
    assert list(capture_linen(model, variables, x, filter="output")) == ["output"]


def test_linen_cnn_with_batch_norm_eval_mode(x64):
    x = np.random.default_rng(1).normal(size=(4, 6, 6, 2))
    model = LinenCNN()
    variables = model.init(jax.random.key(0), x, train=False)
    # non-trivial running statistics, so eval mode is visible in the numbers
    stats = variables["batch_stats"]["block1"]["bn"]
    variables = {
        "params": variables["params"],
        "batch_stats": {"block1": {"bn": {"mean": stats["mean"] + 0.3, "var": stats["var"] * 2.0}}},
    }
    acts = capture_linen(model, variables, x, train=False)
    assert list(acts) == ["stem", "block1/conv", "block1/bn", "block1", "head"]
    p = variables["params"]
    bs = variables["batch_stats"]["block1"]["bn"]
    stem = conv(x, p["stem"]["kernel"], p["stem"]["bias"])
    c = conv(stem, p["block1"]["conv"]["kernel"])
    bn = batch_norm(c, bs["mean"], bs["var"], p["block1"]["bn"]["scale"], p["block1"]["bn"]["bias"])
    block = np.maximum(bn + stem, 0)
    pooled = nn.avg_pool(block, (2, 2), strides=(2, 2)).mean(axis=(1, 2))
    for key, ref in [
        ("stem", stem),
        ("block1/conv", c),
        ("block1/bn", bn),
        ("block1", block),
        ("head", pooled @ p["head"]["kernel"] + p["head"]["bias"]),
    ]:
        np.testing.assert_allclose(acts[key], ref, rtol=1e-6, atol=1e-7)  # flax convs in float32


def test_linen_filters_and_jit(rng):
    x = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
    model = LinenCNN()
    variables = model.init(jax.random.key(0), x, train=False)
    cap = lambda f: list(capture_linen(model, variables, x, filter=f, train=False))
    assert cap(nn.Conv) == ["stem", "block1/conv"]
    assert cap((nn.Conv, nn.BatchNorm)) == ["stem", "block1/conv", "block1/bn"]
    assert cap("block1/*") == ["block1/conv", "block1/bn"]
    assert cap(re.compile(r"^block1$|head")) == ["block1", "head"]
    assert cap(["stem", nn.Dense]) == ["stem", "head"]
    assert cap(lambda path, m: path.endswith("bn")) == ["block1/bn"]
    with pytest.raises(
        ValueError,
        match=r"filter: 'conv9' matched no layer; available paths: "
        r"stem, block1/conv, block1/bn, block1, head, output",
    ):
        cap("conv9")
    eager = capture_linen(model, variables, x, train=False)
    jitted = jax.jit(lambda v: capture_linen(model, variables, v, train=False))(x)
    assert set(jitted) == set(eager)
    for k in eager:
        np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- nnx


def test_nnx_mlp_by_hand(x64):
    x = np.random.default_rng(0).normal(size=(10, 4))
    model = NnxMLP(nnx.Rngs(0))
    acts = capture_nnx(model, x)
    assert list(acts) == ["fc1", "fc2", "hidden", "head"]
    h1 = x @ model.fc1.kernel[...] + model.fc1.bias[...]
    h2 = np.maximum(h1, 0) @ model.fc2.kernel[...] + model.fc2.bias[...]
    np.testing.assert_allclose(acts["fc1"], h1, rtol=1e-12)
    np.testing.assert_allclose(acts["fc2"], h2, rtol=1e-12)
    np.testing.assert_allclose(acts["hidden"], np.maximum(h2, 0), rtol=1e-12)
    out = np.maximum(h2, 0) @ model.head.kernel[...] + model.head.bias[...]
    np.testing.assert_allclose(acts["head"], out, rtol=1e-12)


def test_nnx_cnn_with_batch_norm(x64):
    x = np.random.default_rng(1).normal(size=(4, 6, 6, 2))
    model = NnxCNN(nnx.Rngs(0))
    model.block1.bn.mean[...] = model.block1.bn.mean[...] + 0.3
    model.eval()
    acts = capture_nnx(model, x)
    assert list(acts) == ["stem", "block1/conv", "block1/bn", "block1", "head"]
    stem = conv(x, model.stem.kernel[...], model.stem.bias[...])
    c = conv(stem, model.block1.conv.kernel[...])
    bn_layer = model.block1.bn
    bn = batch_norm(
        c, bn_layer.mean[...], bn_layer.var[...], bn_layer.scale[...], bn_layer.bias[...]
    )
    np.testing.assert_allclose(acts["block1/bn"], bn, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(acts["block1"], np.maximum(bn + stem, 0), rtol=1e-6, atol=1e-7)
    # filters, jit, and the model left untouched
    assert list(capture_nnx(model, x, filter=nnx.Conv)) == ["stem", "block1/conv"]
    assert list(capture_nnx(model, x, filter="block1*")) == ["block1/conv", "block1/bn", "block1"]
    with pytest.raises(ValueError, match=r"available paths: stem, block1/conv"):
        capture_nnx(model, x, filter=nnx.Embed)
    jitted = jax.jit(lambda v: capture_nnx(model, v))(x)
    np.testing.assert_allclose(jitted["block1"], acts["block1"], rtol=1e-12)
    assert not hasattr(model, "__captures__") or not model.__captures__


# ------------------------------------------------------------------------ streaming


def test_streaming_grid_equals_minibatch_cka_of_captured(x64, rng):
    model = NnxMLP(nnx.Rngs(0))
    data = rng.normal(size=(60, 4))
    batches = [data[i : i + 20] for i in range(0, 60, 20)]
    grid = minibatch_grid(model, batches, progress=False)
    assert grid.rows == ("fc1", "fc2", "hidden", "head")
    full = collect_activations(model, batches, progress=False)
    assert list(full) == list(grid.rows) and full["fc1"].shape == (60, 6)
    state = jaxsim.minibatch_cka_init(4)
    for i in range(0, 60, 20):
        state = jaxsim.minibatch_cka_update(state, [a[i : i + 20] for a in full.values()])
    np.testing.assert_allclose(grid.values, jaxsim.minibatch_cka_result(state).values, rtol=1e-10)


def test_long_stream_runs_in_scans_equal_to_a_loop_of_updates(x64, rng):
    """A model's stream runs SCAN_CHUNK equal batches as one compiled scan, the rest
    (a size change, the tail) batch by batch: the values are the loop's."""
    from jaxsim import flax as jflax

    model = NnxMLP(nnx.Rngs(0))
    sizes = [8] * (jflax.SCAN_CHUNK + 3) + [6, 6] + [8] * (jflax.SCAN_CHUNK + 1)
    edges = np.cumsum([0] + sizes)
    data = rng.normal(size=(edges[-1], 4))
    batches = [data[a:b] for a, b in zip(edges[:-1], edges[1:])]
    with pytest.warns(UserWarning, match=r"6 examples where the first batch had 8"):
        grid = minibatch_grid(model, batches, progress=False)
    full = collect_activations(model, batches, progress=False)
    state = jaxsim.minibatch_cka_init(4)
    for a, b in zip(edges[:-1], edges[1:]):
        state = jaxsim.minibatch_cka_update(state, [v[a:b] for v in full.values()])
    np.testing.assert_allclose(grid.values, jaxsim.minibatch_cka_result(state).values, rtol=1e-10)


def test_streaming_two_linen_models(x64, rng):
    x0 = rng.normal(size=(4, 6, 6, 2))
    m = LinenCNN()
    va, vb = m.init(jax.random.key(0), x0, train=False), m.init(jax.random.key(1), x0, train=False)
    batches = [(rng.normal(size=(8, 6, 6, 2)), np.zeros(8)) for _ in range(3)]  # (x, labels)
    grid = minibatch_grid(
        (m, va),
        batches,
        (m, vb),
        filter=nn.Conv,
        filter_b="block1",
        progress=False,
        apply_kwargs={"train": False},
    )
    # the keyword given directly, as capture_linen takes it, means the same
    same = minibatch_grid(
        (m, va), batches, (m, vb), filter=nn.Conv, filter_b="block1", progress=False, train=False
    )
    np.testing.assert_array_equal(same.values, grid.values)
    assert grid.rows == ("stem", "block1/conv") and grid.cols == ("block1",)
    xs = np.concatenate([b[0] for b in batches])
    a = capture_linen(m, va, xs, filter=nn.Conv, train=False)
    b = capture_linen(m, vb, xs, filter="block1", train=False)
    state = jaxsim.minibatch_cka_init(2, 1)
    for i in range(0, 24, 8):
        state = jaxsim.minibatch_cka_update(
            state, [v[i : i + 8] for v in a.values()], [v[i : i + 8] for v in b.values()]
        )
    np.testing.assert_allclose(grid.values, jaxsim.minibatch_cka_result(state).values, rtol=1e-10)


def test_streaming_errors():
    with pytest.raises(ValueError, match=r"batches: the iterable yielded no batch"):
        minibatch_grid(NnxMLP(nnx.Rngs(0)), [], progress=False)
    with pytest.raises(TypeError, match=r"model: expected an nnx.Module"):
        minibatch_grid(3, [np.zeros((4, 4))], progress=False)
    with pytest.raises(TypeError, match=r"a linen module needs its variables"):
        minibatch_grid(LinenMLP(), [np.zeros((4, 4))], progress=False)
    # a layer that does not keep the examples on axis 0: named, with the batch index
    bad = lambda x: {"fc": x, "pooled": x[:2]}
    with pytest.raises(ValueError, match=r"batches\[0\]: batch_acts_a\['pooled'\]: has 2 examples"):
        minibatch_grid(bad, [np.ones((8, 4))], progress=False)


def test_streaming_short_batches_resume_and_names(x64, rng):
    model = NnxMLP(nnx.Rngs(0))
    data = rng.normal(size=(70, 4))
    full = [data[i : i + 20] for i in range(0, 60, 20)]
    ref = minibatch_grid(model, full, progress=False)
    # a loader's short last batch (< 4 examples) is skipped with a warning, not fatal
    with pytest.warns(
        UserWarning,
        match=(
            r"batches\[3\]: 2 example\(s\), fewer than the "
            r"4.*drop_last=True"
        ),
    ):
        got = minibatch_grid(model, full + [data[60:62]], progress=False)
    np.testing.assert_array_equal(got.values, ref.values)
    with pytest.warns(UserWarning, match=r"batches\[3\]: 10 examples where the first batch had 20"):
        minibatch_grid(model, full + [data[60:70]], progress=False)
    # resume: half the stream, its state (saved and restored with numpy), the other half
    state = minibatch_state(model, full[:2], progress=False)
    assert isinstance(state, jaxsim.MinibatchCKAState)  # one return type per function
    restored = jaxsim.MinibatchCKAState(*[jnp.asarray(np.asarray(v)) for v in state])
    resumed = minibatch_grid(model, full[2:], progress=False, state=restored)
    np.testing.assert_allclose(resumed.values, ref.values, rtol=1e-12)
    assert resumed.rows == ref.rows
    with pytest.raises(
        ValueError,
        match=(
            r"state: compares 4 x 4 layers but the model\(s\) "
            r"give 2 x 2"
        ),
    ):
        minibatch_grid(model, full, progress=False, state=state, filter=["fc1", "fc2"])


# ------------------------------------------------------------------- training mode


class NnxTrainable(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(nnx.relu(self.bn(self.fc(x))))


class LinenTrainable(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(6)(x))
        return nn.Dropout(0.5, deterministic=not train)(nn.relu(h))


def test_training_mode_is_named_not_a_trace_error(rng):
    x = rng.normal(size=(8, 4)).astype(np.float32)
    model = NnxTrainable(nnx.Rngs(0))
    for run in (lambda: capture_nnx(model, x), lambda: minibatch_grid(model, [x], progress=False)):
        with pytest.raises(
            ValueError,
            match=r"training mode \(bn, drop would use batch "
            r"statistics.*call model.eval\(\)",
        ):
            run()
    model.eval()
    assert list(capture_nnx(model, x)) == ["fc", "bn", "drop"]
    linen = LinenTrainable()
    variables = linen.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match=r"training mode.*train=False"):
        capture_linen(linen, variables, x)
    acts = capture_linen(linen, variables, x, train=False)
    np.testing.assert_allclose(acts["Dropout_0"], np.maximum(acts["BatchNorm_0"], 0))
    # dropout off in eval mode: the output is the ReLU of the batch norm, unchanged
    with pytest.raises(
        TypeError,
        match=r"expected a flax.nnx.Module, got tuple \(a linen "
        r"\(module, variables\) pair: use capture_linen",
    ):
        capture_nnx((linen, variables), x)
    with pytest.raises(
        TypeError,
        match=r"expected a flax.linen.Module, got NnxTrainable "
        r"\(for an nnx model use capture_nnx",
    ):
        capture_linen(model, {}, x)
