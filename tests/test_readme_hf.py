"""The README's Hugging Face Trainer example really runs."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_trainer_example_runs():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if "GNMRCallback(" in b]
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "controller step 8 global step 8" in out.stdout, out.stdout
    assert re.search(r"\{'gnmr/step': 8, 'gnmr/units_high': \d+, 'gnmr/triggered': \d+, 'gnmr/denied': \d+, "
                     r"'gnmr/budget_used': [\d.]+, 'gnmr/budget': 2.0, 'gnmr/pinned': 0\}", out.stdout), out.stdout
    assert re.search(r"tensor\(\[\[ *5, +9, +12(, +\d+){6}\]\]\)", out.stdout), out.stdout
