"""The experiment scripts, each in its --quick configuration (full runs are marked slow)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def check_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path


def test_width_depth_quick(tmp_path):
    summary = load("width_depth").main(["--quick", "--no-progress", "--out", str(tmp_path)])
    for f in ("cka_grids.png", "cross_seed.png"):
        check_png(tmp_path / f)
    saved = json.loads((tmp_path / "grids.json").read_text())
    assert set(saved["models"]) == {f"depth {d}, width {w}" for d in (1, 2) for w in (4, 8)}
    for model in saved["models"].values():
        values = [v for row in model["grid"]["values"] for v in row]
        assert all(math.isfinite(v) and -0.2 <= v <= 1 + 1e-5 for v in values)
        assert 1 <= model["block_size"] <= model["layers"]
        assert 0 < model["first_pc_share_block"] <= 1
    assert len(saved["cross_seed"]["grid"]["rows"]) == 6  # stem, 2 blocks, down, 2 blocks
    assert summary["cross_seed"]["mean_diagonal"] <= 1


def test_svcca_baselines_quick(tmp_path):
    load("svcca_baselines").main(["--quick", "--no-progress", "--out", str(tmp_path)])
    for f in ("q1_mean_cca_vs_baseline.png", "q2_cca_vs_datapoints.png", "q3a_topk_cca.png",
              "q3b_svcca_pwcca.png"):
        check_png(tmp_path / f)
    r = json.loads((tmp_path / "results.json").read_text())
    assert all(0 <= v <= 1 for v in numbers({k: r[k] for k in (
        "mean_cca", "mean_cca_gaussian", "svcca", "pwcca", "topk_trained", "topk_gaussian")}))
    # the tutorial's falling curve: random data look less correlated with more datapoints
    curve = r["mean_cca_vs_n_gaussian"]
    assert curve[0] > 0.5 and curve[-1] < curve[0] / 2


def test_layer_identification_quick(tmp_path):
    r = load("layer_identification").main(["--quick", "--no-progress", "--out", str(tmp_path)])
    check_png(tmp_path / "grids.png")
    assert set(r["accuracy"]) == {"linear CKA", "RBF CKA", "mean CCA", "SVCCA", "PWCCA"}
    assert all(0 <= a <= 1 for a in r["accuracy"].values())
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == 2


def test_transferability_quick(tmp_path):
    r = load("transferability").main(["--quick", "--no-progress", "--out", str(tmp_path)])
    check_png(tmp_path / "similarity.png")
    check_png(tmp_path / "transfer_gain.png")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert all(math.isfinite(v) for v in numbers(saved["similarity"]))
    assert all(-1 <= v <= 1 for v in numbers(saved["transfer_gain"]))
    assert 0 <= saved["spearman"]["p"] <= 1 and -1 <= saved["pearson"]["r"] <= 1
    assert r["similarity"].shape == (6, 6)


@pytest.mark.slow
def test_width_depth_default_run(tmp_path):
    """The README's main job, in full (minutes): not part of CI."""
    summary = load("width_depth").main(["--no-progress", "--out", str(tmp_path)])
    assert summary["seconds"] < 300
    assert all(m["test_accuracy"] > 0.8 for m in summary["models"].values())


def test_cifar10_loader_reads_python_batches(tmp_path):
    import pickle

    import numpy as np

    common = load("_common")
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, size=4))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    data = common.load_data("cifar10", str(tmp_path))
    assert data["train"][0].shape == (20, 32, 32, 3) and data["test"][0].shape == (4, 32, 32, 3)
    np.testing.assert_allclose(data["train"][0].mean((0, 1, 2)), 0, atol=1e-5)
    with pytest.raises(SystemExit, match="CIFAR-10 not found"):
        common.load_data("cifar10", str(tmp_path / "missing"))
