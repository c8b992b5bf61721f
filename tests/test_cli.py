"""The jaxsim command line against the library call."""

import subprocess
import sys

import numpy as np
import pytest

import jaxsim
from jaxsim.cli import main


def write(path, rng, widths, n=48):
    layers = {f"l{i}": rng.normal(size=(n, w)).astype(np.float32) for i, w in enumerate(widths)}
    np.savez(path, **layers)
    return layers


def test_grid_command(tmp_path, rng, capsys):
    a = write(tmp_path / "a.npz", rng, (4, 6, 5))
    b = write(tmp_path / "b.npz", rng, (3, 7))
    out, png = tmp_path / "g.npz", tmp_path / "g.png"
    assert (
        main(
            [
                "grid",
                str(tmp_path / "a.npz"),
                str(tmp_path / "b.npz"),
                "--metric",
                "svcca",
                "--keep-dims",
                "2",
                "--out",
                str(out),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    grid = jaxsim.Grid.load(out)
    ref = jaxsim.similarity_grid(a, b, metric="svcca", keep_dims=2)
    np.testing.assert_allclose(grid.values, ref.values, rtol=1e-6)
    assert grid.rows == ("l0", "l1", "l2") and grid.cols == ("l0", "l1")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "saved" in capsys.readouterr().out


def test_minibatch_and_conv_options(tmp_path, rng):
    a = write(tmp_path / "a.npz", rng, (4, 6), n=64)
    out = tmp_path / "g.npz"
    assert main(["grid", str(tmp_path / "a.npz"), "--batch-size", "16", "--out", str(out)]) == 0
    state = jaxsim.minibatch_cka_init(2)
    for s in range(0, 64, 16):
        state = jaxsim.minibatch_cka_update(state, [v[s : s + 16] for v in a.values()])
    np.testing.assert_allclose(
        jaxsim.Grid.load(out).values, jaxsim.minibatch_cka_result(state).values, rtol=1e-6
    )
    np.savez(tmp_path / "c.npz", c1=rng.normal(size=(8, 4, 4, 3)), c2=rng.normal(size=(8, 2, 2, 3)))
    assert main(["grid", str(tmp_path / "c.npz"), "--reduce", "flatten", "--out", str(out)]) == 2
    assert main(["grid", str(tmp_path / "c.npz"), "--reduce", "average", "--out", str(out)]) == 0


def test_generic_options(tmp_path, rng):
    a = write(tmp_path / "a.npz", rng, (4, 6))
    out = tmp_path / "g.npz"
    assert (
        main(
            [
                "grid",
                str(tmp_path / "a.npz"),
                "--metric",
                "rsa",
                "--option",
                "compare=kendall",
                "--option",
                "dissimilarity='euclidean'",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ref = jaxsim.similarity_grid(a, metric="rsa", compare="kendall", dissimilarity="euclidean")
    np.testing.assert_allclose(jaxsim.Grid.load(out).values, ref.values, rtol=1e-6)
    assert main(["grid", str(tmp_path / "a.npz"), "--option", "nonsense", "--out", str(out)]) == 2


def test_help_lists_metrics():
    out = subprocess.run(
        [sys.executable, "-m", "jaxsim.cli", "grid", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("linear_cka", "rbf_cka", "mean_cca", "svcca", "pwcca"):
        assert name in out


def test_failures_are_one_line_and_nothing_is_overwritten(tmp_path, rng, monkeypatch, capsys):
    # in-process (the CLI's main returns the exit status; any traceback would fail the
    # test): five interpreters would each import jax again
    monkeypatch.chdir(tmp_path)

    def cli(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = cli("grid", "missing.npz")
    assert code == 2 and err.strip() == "jaxsim: cannot read missing.npz: No such file or directory"
    (tmp_path / "junk.npz").write_text("not an npz")
    code, _, err = cli("grid", "junk.npz")
    assert code == 2 and err.startswith("jaxsim: cannot read junk.npz")
    assert len(err.strip().splitlines()) == 1

    write(tmp_path / "a.npz", rng, (4, 6))
    code, out, _ = cli("grid", "a.npz")  # no --out: the grid is printed, nothing written
    assert code == 0 and "saved" not in out and "--out" in out
    assert not (tmp_path / "grid.npz").exists()
    # an explicit --out may overwrite; the message names the file numpy really wrote
    code, out, _ = cli("grid", "a.npz", "--out", "result")
    assert code == 0 and "saved result.npz" in out
    before = (tmp_path / "result.npz").read_bytes()
    # a missing input is named, whatever output files exist (they used to block later runs)
    code, _, err = cli("grid", "nope.npz", "--out", "result")
    assert code == 2 and err.strip() == "jaxsim: cannot read nope.npz: No such file or directory"
    assert (tmp_path / "result.npz").read_bytes() == before
    # a .npy file (one array) gets a message, not a Python error
    np.save(tmp_path / "one.npy", rng.normal(size=(8, 3)))
    code, _, err = cli("grid", "one.npy")
    assert code == 2 and "one.npy: holds a single array (.npy)" in err and "np.savez" in err


def test_layers_are_described_and_transposed_files_read(tmp_path, rng, capsys):
    """How each file was read is printed (examples x features per layer), so a file in
    google/svcca's (neurons, n) layout shows at a glance; --layout neurons-first reads it."""
    layers = write(tmp_path / "a.npz", rng, (4, 6), n=48)
    np.savez(tmp_path / "t.npz", **{k: v.T for k, v in layers.items()})
    assert main(["grid", str(tmp_path / "a.npz")]) == 0
    out = capsys.readouterr().out
    assert "l0: 48 examples x 4 features" in out and "l1: 48 examples x 6 features" in out
    assert (
        main(
            [
                "grid",
                str(tmp_path / "t.npz"),
                "--layout",
                "neurons-first",
                "--out",
                str(tmp_path / "g.npz"),
            ]
        )
        == 0
    )
    assert "l1: 48 examples x 6 features" in capsys.readouterr().out
    np.testing.assert_allclose(
        jaxsim.Grid.load(tmp_path / "g.npz").values,
        jaxsim.similarity_grid(layers).values,
        rtol=1e-6,
    )
    np.savez(tmp_path / "c.npz", c=rng.normal(size=(3, 8, 2, 2)))
    assert main(["grid", str(tmp_path / "c.npz"), "--layout", "neurons-first"]) == 2
    assert "neurons-first: c has shape (3, 8, 2, 2)" in capsys.readouterr().err
    help_text = subprocess.run(
        [sys.executable, "-m", "jaxsim.cli", "grid", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "positions become examples" in help_text  # --reduce flatten, described as it is


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"jaxsim {jaxsim.__version__}"
