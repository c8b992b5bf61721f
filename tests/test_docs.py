"""The documentation cannot rot: every Python block of the README and of docs/ runs as
written (file by file, in order, one namespace a file), and the docs site builds with
``mkdocs build --strict`` (broken links, unknown references and docstring parameters that
do not match their signatures fail it)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
SKIP = "<!-- not run"  # a comment right above a block that needs what tests lack (hosts)


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown page, but those marked as not run."""
    found = re.finditer(r"(<!-- not run[^\n]*-->\n)?```python\n(.*?)```", text, re.S)
    return [m.group(2) for m in found if not m.group(1)]


def test_pages_have_examples():
    assert len(python_blocks((ROOT / "README.md").read_text())) >= 6
    assert len(python_blocks((ROOT / "docs" / "tutorial.md").read_text())) >= 5


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run_as_written(page, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)  # whatever a page writes lands here
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks((ROOT / page).read_text())):
        exec(compile(block, f"{page} (block {i + 1})", "exec"), namespace)


def test_docs_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "api" / "grid" / "index.html").exists()


def test_sharding_example_runs_on_several_devices(tmp_path):
    """docs/sharding.md's example on 4 host devices: the layers really are spread."""
    from conftest import subprocess_env

    blocks = python_blocks((ROOT / "docs" / "sharding.md").read_text())
    script = (
        "\n".join(blocks) + "\nassert jax.device_count() == 4 and len(layers[0].devices()) == 4\n"
    )
    env = subprocess_env("--xla_force_host_platform_device_count=4")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Grid(linear_cka, 2 x 2)" in out.stdout
