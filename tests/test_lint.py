"""The habits the project holds itself to: ruff's lint rules and mypy, both configured in
pyproject.toml."""

import os
import subprocess
import sys


def test_ruff_finds_nothing():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", root],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_mypy_finds_nothing(tmp_path):
    """jaxsim/ type-checks (settings in pyproject.toml)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_code_is_ruff_formatted():
    """``ruff format`` leaves every Python file as it is (run it to fix)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs = ["jaxsim", "tests", "benchmarks", "experiments"]
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", *dirs],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
