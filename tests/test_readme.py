"""The README's usage example and the demo harness really run."""

import os
import pathlib
import re
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_usage_and_profile_examples_run():
    """The first example, then the gnmr_fx.profile example on its model (one process for both)."""
    blocks = _python_blocks((ROOT / "README.md").read_text())
    block = blocks[0]
    assert "gnmr_fx.compile(" in block
    prof = next(b for b in blocks if "gnmr_fx.profile(" in b)
    marker = "print('--- profile')\n"
    code = block + marker + prof + "print(int(gnmr_fx.controller(model).pinned.sum()))"
    # One CPU thread, as tests/conftest.py gives the test processes: after the example's
    # Inductor graphs have run, the profile's eager passes take seconds with 2 threads.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    usage, profiled = out.stdout.split("--- profile\n")
    # report(top=3): a title line naming the step, then a table of 3 units.
    assert re.search(r"GNMR step 3: \d+/13 units high", usage), usage
    assert len([l for l in usage.splitlines() if l.startswith("blocks.") or l.startswith("head")]) == 3
    # The profile: its table (3 rows) and the all-low line, then the picked units are pinned.
    assert "every unit low: grad error" in profiled and "(2 batches)" in profiled
    assert len([l for l in profiled.splitlines() if l.startswith("blocks.") or l.startswith("head")]) == 3
    assert int(profiled.split()[-1]) >= 1


def test_readme_starts_with_install_and_test_commands():
    text = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert len(first) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert first[0] in ci and first[1] in ci  # CI runs exactly the README's commands


def test_demo_harness_tiny(tmp_path):
    from gnmr_fx.benchmarks.demo import DemoConfig, format_results, run_demo
    from gnmr_fx.models import GPTConfig

    cfg = DemoConfig(steps=6, eval_every=3, eval_batches=1, batch_size=2,
                     model=GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    import io

    res = run_demo(cfg, stream=io.StringIO())
    assert set(res["arms"]) == {"always_high", "always_low", "gnmr"}
    assert res["arms"]["always_high"]["pct_unit_steps_high"] == 100.0
    assert res["arms"]["always_low"]["pct_unit_steps_high"] == 0.0
    assert 0.0 <= res["arms"]["gnmr"]["pct_unit_steps_high"] <= 10.0 + 1e-9  # max_o=0.1 of FLOPs, 7 units
    text = format_results(res)
    assert "always_low" in text and "gap vs high" in text


def test_cli_demo_exit_code_and_bad_recipe():
    out = subprocess.run([sys.executable, "-m", "gnmr_fx.cli", "demo", "--recipe", "fp7", "--steps", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown recipe 'fp7'" in out.stderr
