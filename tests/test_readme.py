"""The README's first example runs as written."""

import re
from pathlib import Path


def test_measures_example_runs():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert 0 < float(namespace["jaxsim"].linear_cka(namespace["x"], namespace["y"])) < 1
    assert namespace["res"].coefficients.shape == (32,)
