"""Sweeps: every model of an ensemble (or a training run) against every other, in one grid.

References are per-pair NumPy computations of the published formulas (tests/references.py)
and per-pair jaxsim calls; the summaries are checked against loops written here."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization
from references import np_cca, np_linear_cka, np_pwcca

import jaxsim
from jaxsim.flax import capture_linen, capture_nnx, minibatch_grid, stack_models
from jaxsim.sweeps import corresponding_layers, layer_identification, within_across


def sweep_layers(rng, models=3, n=48, widths=(5, 7, 9)):
    """{layer: (M, n, width)}: models sharing a latent signal, each with its own noise."""
    z = rng.normal(size=(n, 4))
    return {
        f"l{k}": np.stack(
            [
                np.tanh(z @ rng.normal(size=(4, w)) + 0.5 * rng.normal(size=(n, w)))
                for _ in range(models)
            ]
        )
        for k, w in enumerate(widths)
    }


def test_self_sweep_equals_numpy_per_pair(x64, rng):
    acts = sweep_layers(rng)
    sweep = jaxsim.similarity_grid(acts, model_axis=0)
    assert isinstance(sweep, jaxsim.SweepGrid) and sweep.self_sweep
    assert sweep.shape == (3, 3, 3, 3) and sweep.models_a == ("0", "1", "2")
    assert sweep.rows == sweep.cols == ("l0", "l1", "l2")
    layers = list(acts.values())
    for i in range(3):
        for j in range(3):
            for k in range(3):
                for l in range(3):
                    np.testing.assert_allclose(
                        sweep.values[i, j, k, l],
                        np_linear_cka(layers[k][i], layers[l][j]),
                        rtol=1e-10,
                    )
    # one model pair is the grid of those two models' layers
    pair = sweep.pair(0, "2")
    ref = jaxsim.similarity_grid(
        {k: v[0] for k, v in acts.items()}, {k: v[2] for k, v in acts.items()}
    )
    np.testing.assert_allclose(pair.values, ref.values, rtol=1e-12)
    assert pair.rows == ref.rows and pair.row_label == "model 0" and pair.col_label == "model 2"


def test_sweep_saves_and_loads(tmp_path, rng):
    sweep = jaxsim.similarity_grid(sweep_layers(rng, models=2), model_axis=0, models=["a", "b"])
    back = jaxsim.SweepGrid.load(sweep.save(tmp_path / "sweep"))
    np.testing.assert_array_equal(back.values, sweep.values)
    assert (back.models_a, back.rows, back.metric, back.self_sweep) == (
        ("a", "b"), sweep.rows, "linear_cka", True,
    )  # fmt: skip


@pytest.mark.parametrize("metric", ["mean_cca", "pwcca"])
def test_cross_sweep_of_pairwise_measures(x64, rng, metric):
    """A pairwise measure over two sweeps (2 x 3 models): each cell is the reference on that
    model pair's layers, in its order (PWCCA is not symmetric)."""
    a, b = sweep_layers(rng, models=2, n=120), sweep_layers(rng, models=3, n=120, widths=(6, 4))
    sweep = jaxsim.similarity_grid(
        a, b, metric=metric, model_axis=0, models=(["s0", "s1"], ["t0", "t1", "t2"]),
        warn=False, progress=False,
    )  # fmt: skip
    assert sweep.shape == (2, 3, 3, 2) and not sweep.self_sweep
    assert sweep.models_b == ("t0", "t1", "t2") and sweep.cols == ("l0", "l1")
    ref = (lambda x, y: np_cca(x, y)[0].mean()) if metric == "mean_cca" else np_pwcca
    for i, j, k, l in [(0, 0, 0, 0), (1, 2, 2, 1), (0, 1, 1, 0), (1, 0, 2, 0)]:
        np.testing.assert_allclose(
            sweep.values[i, j, k, l], ref(a[f"l{k}"][i], b[f"l{l}"][j]), rtol=1e-8
        )


def test_model_axis_anywhere_and_under_jit(x64, rng):
    acts = sweep_layers(rng)
    moved = {k: np.moveaxis(v, 0, 1) for k, v in acts.items()}  # (n, M, d)
    base = jaxsim.similarity_grid(acts, model_axis=0)
    np.testing.assert_allclose(
        jaxsim.similarity_grid(moved, model_axis=1).values, base.values, rtol=1e-12
    )
    jitted = jax.jit(lambda a: jaxsim.similarity_grid(a, model_axis=0, progress=False))(acts)
    assert isinstance(jitted, jaxsim.SweepGrid)
    np.testing.assert_allclose(jitted.values, base.values, rtol=1e-12)


def test_stacked_models_without_model_axis_warn_and_bad_sweeps_raise(rng):
    acts = sweep_layers(rng, models=4)
    with pytest.warns(UserWarning, match=r"first axis has 4 entries.*model_axis=0"):
        jaxsim.similarity_grid(acts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxsim.similarity_grid(acts, warn=False)  # examples, on purpose
        jaxsim.similarity_grid({k: v[0] for k, v in acts.items()})  # (n, d): no warning
    uneven = {**acts, "l1": acts["l1"][:3]}
    with pytest.raises(ValueError, match=r"same number of models.*'l0': 4.*'l1': 3"):
        jaxsim.similarity_grid(uneven, model_axis=0)
    with pytest.raises(ValueError, match=r"acts_a\['l0'\]: model_axis=0 needs a layer of shape"):
        jaxsim.similarity_grid({"l0": acts["l0"][0]}, model_axis=0)
    with pytest.raises(ValueError, match=r"models: 4 distinct names needed"):
        jaxsim.similarity_grid(acts, model_axis=0, models=["a", "b"])
    with pytest.raises(TypeError, match=r"model_axis: expected an int"):
        jaxsim.similarity_grid(acts, model_axis="0")
    # n below the estimator's minimum is an error, model axis or not
    with pytest.raises(ValueError, match=r"need at least 4 examples.*got n=3"):
        jaxsim.similarity_grid({k: v[:, :3] for k, v in acts.items()}, model_axis=0, debiased=True)


def test_summaries_against_loops(rng):
    m, L = 4, 5
    values = rng.uniform(size=(m, m, L, L))
    sweep = jaxsim.SweepGrid(
        jnp.asarray(values), tuple("abcd"), tuple("abcd"), tuple(f"l{i}" for i in range(L)),
        tuple(f"l{i}" for i in range(L)), "linear_cka", self_sweep=True,
    )  # fmt: skip
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    diag = np.array([[values[i, j, l, l] for l in range(L)] for i, j in pairs])
    c = corresponding_layers(sweep)
    np.testing.assert_allclose(c.mean, diag.mean(0), rtol=1e-6)
    np.testing.assert_allclose(c.std, diag.std(0), rtol=1e-5)
    assert c.pairs.shape == (len(pairs), L) and c.layers == sweep.rows
    hits = np.array([[np.argmax(values[i, j, l]) == l for l in range(L)] for i, j in pairs])
    ident = layer_identification(sweep)
    np.testing.assert_allclose(ident.accuracy, hits.mean(), rtol=1e-6)
    np.testing.assert_allclose(ident.per_layer, hits.mean(0), rtol=1e-6)
    within, across = within_across(sweep)
    np.testing.assert_allclose(
        within.values, np.mean([values[i, i] for i in range(m)], 0), rtol=1e-6
    )
    np.testing.assert_allclose(
        across.values, np.mean([values[i, j] for i, j in pairs], 0), rtol=1e-6
    )
    # a cross sweep counts every model pair; identity is recovered when it is planted
    planted = np.tile(np.eye(L) + 0.1, (2, 3, 1, 1))
    cross = jaxsim.SweepGrid(
        jnp.asarray(planted), ("0", "1"), ("0", "1", "2"), sweep.rows, sweep.cols
    )
    assert float(layer_identification(cross).accuracy) == 1.0
    assert corresponding_layers(cross).pairs.shape == (6, L)
    with pytest.raises(ValueError, match=r"needs a self-sweep"):
        within_across(cross)
    with pytest.raises(TypeError, match=r"expected a SweepGrid, got Grid"):
        layer_identification(sweep.pair(0, 1))
    with pytest.raises(ValueError, match=r"no pair of distinct models"):
        corresponding_layers(
            jaxsim.SweepGrid(
                jnp.ones((1, 1, 2, 2)), ("0",), ("0",), ("a", "b"), ("a", "b"), self_sweep=True
            )
        )


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 12, rngs=rngs)
        self.head = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def test_nnx_ensemble_to_sweep_grid_stream_and_figure(x64, rng, monkeypatch):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def ensemble(rngs):
        return MLP(rngs)

    models = ensemble(nnx.Rngs(0))
    x = rng.normal(size=(64, 6))
    acts = capture_nnx(models, x, model_axis=0)
    assert list(acts) == ["fc1", "fc2", "head"] and acts["fc2"].shape == (3, 64, 12)
    # without model_axis the ensemble fails inside the model: the error says why
    with pytest.raises(ValueError, match=r"leading axis of 3.*pass model_axis=0"):
        capture_nnx(models, x)
    graphdef, state = nnx.split(models)
    for i in range(3):  # each member's own activations
        member = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[i], state))
        for k, v in capture_nnx(member, x).items():
            np.testing.assert_allclose(acts[k][i], v, rtol=1e-12)
    # the members in turn (a CPU's path) and vmapped (an accelerator's): the same arrays
    for sequential in (True, False):
        monkeypatch.setattr(jaxsim.flax, "_SEQUENTIAL_MODELS", lambda s=sequential: s)
        again = capture_nnx(models, x, model_axis=0)
        assert list(again) == list(acts)
        for k in acts:
            np.testing.assert_allclose(again[k], acts[k], rtol=1e-12)
    sweep = jaxsim.similarity_grid(acts, model_axis=0)
    assert sweep.shape == (3, 3, 3, 3)
    np.testing.assert_allclose(jnp.diagonal(sweep.values[0, 0]), 1.0, rtol=1e-10)
    # streamed: one state for all (M L)^2 pairs equals minibatch CKA of the members' layers
    batches = [x[i : i + 16] for i in range(0, 64, 16)]
    streamed = minibatch_grid(models, batches, model_axis=0, progress=False)
    assert isinstance(streamed, jaxsim.SweepGrid) and streamed.rows == ("fc1", "fc2", "head")
    flat = [acts[k][m] for m in range(3) for k in acts]
    state = jaxsim.minibatch_cka_init(len(flat))
    for i in range(0, 64, 16):
        state = jaxsim.minibatch_cka_update(state, [a[i : i + 16] for a in flat])
    ref = jaxsim.SweepGrid.from_grid(jaxsim.minibatch_cka_result(state), 3)
    np.testing.assert_allclose(streamed.values, ref.values, rtol=1e-10)
    pytest.importorskip("matplotlib")
    from jaxsim.plot import heatmap

    fig = heatmap(sweep)
    assert len(fig.axes) == 10 and "3 x 3 models" in fig._suptitle.get_text()


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        return nn.Dense(3, name="head")(x)


def test_training_run_checkpoints_as_a_sweep(x64, rng, tmp_path):
    """Checkpoints of one run, saved and restored with flax.serialization, stacked and
    compared with the final model layer by layer (and checkpoint against checkpoint)."""
    module = LinenMLP()
    x = rng.normal(size=(40, 6))
    variables = module.init(jax.random.key(0), x)
    paths = []
    for step in range(4):  # a "training run": parameters drifting step by step
        variables = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape), variables)
        paths.append(tmp_path / f"step{step}.msgpack")
        paths[-1].write_bytes(serialization.to_bytes(variables))
    restored = [serialization.from_bytes(variables, p.read_bytes()) for p in paths]
    run = stack_models(restored)
    acts = capture_linen(module, run, x, model_axis=0)
    assert acts["fc1"].shape == (4, 40, 16)
    with pytest.raises(ValueError, match=r"variables: .*leading axis of 4.*pass model_axis=0"):
        capture_linen(module, run, x)
    sweep = jaxsim.similarity_grid(acts, model_axis=0, models=[f"step{i}" for i in range(4)])
    for i, ckpt in enumerate(restored):
        own = capture_linen(module, ckpt, x)
        final = capture_linen(module, restored[-1], x)
        np.testing.assert_allclose(
            sweep.values[i, 3, 0, 0], np_linear_cka(own["fc1"], final["fc1"]), rtol=1e-10
        )
    to_final = sweep.values[:, -1, 0, 0]
    assert float(to_final[-1]) == pytest.approx(1.0) and float(to_final[0]) < 1.0
    nnx_models = stack_models([MLP(nnx.Rngs(i)) for i in range(2)])
    assert capture_nnx(nnx_models, x, model_axis=0)["head"].shape == (2, 40, 3)
    with pytest.raises(ValueError, match=r"models: nothing to stack"):
        stack_models([])
