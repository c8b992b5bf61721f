"""The jaxsim command line against the library call."""

import subprocess
import sys

import numpy as np

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
    assert main(["grid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--metric", "svcca",
                 "--keep-dims", "2", "--out", str(out), "--plot", str(png)]) == 0
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
        state = jaxsim.minibatch_cka_update(state, [v[s:s + 16] for v in a.values()])
    np.testing.assert_allclose(jaxsim.Grid.load(out).values,
                               jaxsim.minibatch_cka_result(state).values, rtol=1e-6)
    np.savez(tmp_path / "c.npz", c1=rng.normal(size=(8, 4, 4, 3)), c2=rng.normal(size=(8, 2, 2, 3)))
    assert main(["grid", str(tmp_path / "c.npz"), "--reduce", "flatten", "--out", str(out)]) == 2
    assert main(["grid", str(tmp_path / "c.npz"), "--reduce", "average", "--out", str(out)]) == 0


def test_generic_options(tmp_path, rng):
    a = write(tmp_path / "a.npz", rng, (4, 6))
    out = tmp_path / "g.npz"
    assert main(["grid", str(tmp_path / "a.npz"), "--metric", "rsa", "--option", "compare=kendall",
                 "--option", "dissimilarity='euclidean'", "--out", str(out)]) == 0
    ref = jaxsim.similarity_grid(a, metric="rsa", compare="kendall", dissimilarity="euclidean")
    np.testing.assert_allclose(jaxsim.Grid.load(out).values, ref.values, rtol=1e-6)
    assert main(["grid", str(tmp_path / "a.npz"), "--option", "nonsense", "--out", str(out)]) == 2


def test_help_lists_metrics():
    out = subprocess.run([sys.executable, "-m", "jaxsim.cli", "grid", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for name in ("linear_cka", "rbf_cka", "mean_cca", "svcca", "pwcca"):
        assert name in out


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "jaxsim.cli", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_failures_are_one_line_and_nothing_is_overwritten(tmp_path, rng):
    out = run_cli("grid", "missing.npz", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "jaxsim: cannot read missing.npz: No such file or directory"
    (tmp_path / "junk.npz").write_text("not an npz")
    out = run_cli("grid", "junk.npz", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("jaxsim: cannot read junk.npz")
    assert len(out.stderr.strip().splitlines()) == 1

    write(tmp_path / "a.npz", rng, (4, 6))
    first = run_cli("grid", "a.npz", cwd=tmp_path)
    assert first.returncode == 0 and "saved grid.npz" in first.stdout
    before = (tmp_path / "grid.npz").read_bytes()
    again = run_cli("grid", "a.npz", "--metric", "svcca", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().startswith("jaxsim: grid.npz exists; pass --out PATH")
    assert (tmp_path / "grid.npz").read_bytes() == before
    # an explicit --out may overwrite; the message names the file numpy really wrote
    named = run_cli("grid", "a.npz", "--out", "result", cwd=tmp_path)
    assert named.returncode == 0 and "saved result.npz" in named.stdout
    assert (tmp_path / "result.npz").exists()


def test_version():
    out = subprocess.run([sys.executable, "-m", "jaxsim.cli", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"jaxsim {jaxsim.__version__}"
