"""The README's usage example and the demo harness really run."""

import pathlib
import re
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_usage_example_runs():
    block = _python_blocks((ROOT / "README.md").read_text())[0]
    assert "gnmr_fx.compile(" in block
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    # report(top=3): a title line naming the step, then a table of 3 units.
    assert re.search(r"GNMR step 3: \d+/13 units high", out.stdout), out.stdout
    assert len([l for l in out.stdout.splitlines() if l.startswith("blocks.") or l.startswith("head")]) == 3


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


def test_readme_profile_example_runs_after_the_usage_example():
    blocks = _python_blocks((ROOT / "README.md").read_text())
    prof = next(b for b in blocks if "gnmr_fx.profile(" in b)
    out = subprocess.run([sys.executable, "-c", blocks[0] + prof + "print(int(gnmr_fx.controller(model).pinned.sum()))"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "every unit low: grad error" in out.stdout and "(2 batches)" in out.stdout
    assert int(out.stdout.split()[-1]) >= 1  # the picked units are pinned
