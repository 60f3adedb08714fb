"""`gnmr-fx` errors: bad input is one line on stderr and exit code 2; bugs keep their traceback."""

import argparse
import doctest
import json
import re
import subprocess
import sys
import textwrap

import pytest

import gnmr_fx.arguments
import gnmr_fx.cli
from gnmr_fx.arguments import InputError, parse_max_o
from gnmr_fx.benchmarks import arms
from gnmr_fx.cli import build_parser, main as cli


def _check_one_line_error(capsys, argv, expected):
    """`gnmr-fx ARGV` exits 2 with exactly one stderr line, ``<prog>: error: ...expected...``."""
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    sub = " ".join(argv[:2]) if argv[0] == "bench" else argv[0]
    assert err.startswith(f"gnmr-fx {sub}: error: "), err
    assert expected in err, err


BAD_INPUT = {
    "spec is a class": (["inspect", "gnmr_fx.models:TinyGPT"], "gives a TinyGPT without example inputs"),
    "spec needs args": (["inspect", "json:loads"], "needs arguments"),
    "spec not a factory": (["inspect", "os:getcwd"], "got str"),
    "spec module missing": (["inspect", "no_such_module_x:f"], "cannot import module 'no_such_module_x'"),
    "inspect device": (["inspect", "--device", "nonsense", "tiny_gpt"], "unknown device 'nonsense'"),
    "inspect max-o": (["inspect", "tiny_gpt", "--max-o", "2.0"], "max_o '2.0' is neither a unit count"),
    "inspect recipe": (["inspect", "tiny_gpt", "--recipe", "bogus"], "unknown recipe 'bogus'"),
    "inspect policy": (["inspect", "tiny_gpt", "--policy", "sometimes"], "invalid choice: 'sometimes'"),
    "missing spec": (["inspect"], "the following arguments are required: SPEC"),
    "unknown flag": (["inspect", "tiny_gpt", "--bogus"], "unrecognized arguments: --bogus"),
    "stability arm": (["bench", "stability", "--arms", "nosuch_arm"], "unknown arm 'nosuch_arm'"),
    "stability arm budget": (["bench", "stability", "--arms", "gnmr@1.5"], "arm 'gnmr@1.5': max_o '1.5'"),
    "stability set field": (["bench", "stability", "--set", "a.nosuch=3"], "only recipe, lr"),
    "diff device": (["diff", "--device", "nonsense", "tiny_gpt"], "unknown device 'nonsense'"),
    "diff config value": (["diff", "tiny_gpt", "--config", "threshold=0.5"], "GNMRConfig.threshold must be"),
    "diff config item": (["diff", "tiny_gpt", "--config", "recipe"], "must look like key=value"),
    "diff max-o": (["diff", "tiny_gpt", "--config", "max_o=2.0"], "max_o '2.0' is neither a unit count"),
    "perf arms": (["bench", "perf", "--arms", "bogus"], "--arms: unknown arm(s) ['bogus']"),
    "perf sizes": (["bench", "perf", "--sizes", "nope"], "--sizes: unknown size(s) ['nope']"),
    "regimes no results": (["bench", "regimes", "/nonexistent_dir_x"], "no results.json"),
    "stability set value": (["bench", "stability", "--scenarios", "a", "--set", "a.threshold=0.5"],
                            "GNMRConfig.threshold must be a finite number > 1"),
    "stability set scenario": (["bench", "stability", "--scenarios", "a", "--set", "b.lr=1"],
                               "scenario 'b' is not selected"),
    "stability device": (["bench", "stability", "--device", "nonsense"], "unknown device 'nonsense'"),
    "overhead units": (["bench", "overhead", "--units", "abc"], "comma list of unit counts"),
    "overhead reps": (["bench", "overhead", "--reps", "0"], "expected an integer >= 1, got '0'"),
    "demo steps": (["demo", "--steps", "0"], "expected an integer >= 1, got '0'"),
    "demo recipe": (["demo", "--recipe", "bogus"], "unknown recipe 'bogus'"),
    "demo max-o": (["demo", "--max-o", "-1"], "max_o '-1' is neither"),
    "demo json folder": (["demo", "--json", "/no/such/folder/out.json"], "folder '/no/such/folder' does not exist"),
    "report missing": (["report", "/no/such/run.jsonl"], "No such file or directory: /no/such/run.jsonl"),
    "report top": (["report", "run.jsonl", "--top", "0"], "expected an integer >= 1"),
    "no benchmark": (["bench"], "the following arguments are required: benchmark"),
}


@pytest.mark.parametrize("argv,expected", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(capsys, argv, expected):
    _check_one_line_error(capsys, argv, expected)


def test_bad_input_in_a_real_process():
    out = subprocess.run([sys.executable, "-m", "gnmr_fx.cli", "inspect", "json:loads"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [out.stderr.strip()] and "Traceback" not in out.stderr
    assert out.stderr.startswith("gnmr-fx inspect: error: SPEC 'json:loads'")
    assert out.stdout == ""


@pytest.fixture
def spec_module(tmp_path, monkeypatch):
    """Write ``name.py`` with ``source`` on sys.path; returns the module name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name, source):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def test_a_bug_keeps_its_traceback(spec_module):
    # A ValueError that is not an InputError is not the user's input: it propagates.
    mod = spec_module("gnmr_buggy_spec", """
        def make():
            raise ValueError("bug inside the factory")
        """)
    with pytest.raises(ValueError, match="bug inside the factory") as info:
        cli(["inspect", f"{mod}:make"])
    assert not isinstance(info.value, InputError)


# --------------------------------------------------------------------------
# report: JSON that is not telemetry, and a log cut mid-write
# --------------------------------------------------------------------------

UNITS = ["a", "b"]


def _step_line(step, hot=()):
    return json.dumps({"step": step, "norm": [1.0, 2.0], "gnmr": [1.0, 1.0], "delta_gnmr": [0.0, 0.0],
                       "plan": list(hot), "triggered": list(hot), "denied": [], "budget_used": float(len(hot)),
                       "budget": 1.0, "loss": 5.0 - step})


HEADER = json.dumps({"header": True, "units": UNITS, "recipe": "int8", "policy": "gnmr", "max_o": 1, "budget": 1.0})


def _write(path, lines, tail=""):
    path.write_text("".join(line + "\n" for line in lines) + tail)
    return str(path)


@pytest.mark.parametrize("line,expected", [
    ("[1, 2, 3]", ":2: not a telemetry line (a JSON list, expected an object)"),
    ('{"step": 1}', ":2: step line has no budget_used, budget, norm"),
    ('{"step": 1, "norm": [1], "gnmr": [1], "delta_gnmr": [0], "plan": [], "triggered": [], "denied": [], '
     '"budget_used": 0, "budget": 1}', ":2: step line does not have one norm/gnmr/delta_gnmr value per unit"),
    (_step_line(1, hot=["zz"]), ":2: step line names units in plan/triggered/denied that its header does not have"),
], ids=["list", "missing keys", "wrong length", "unknown unit"])
def test_report_json_that_is_not_telemetry(capsys, tmp_path, line, expected):
    path = _write(tmp_path / "run.jsonl", [HEADER, line])
    _check_one_line_error(capsys, ["report", path, "--no-plots"], path + expected)


def test_report_reads_a_log_cut_mid_write(capsys, tmp_path):
    path = _write(tmp_path / "run.jsonl", [HEADER, _step_line(1), _step_line(2, hot=["b"]), _step_line(3)],
                  tail=_step_line(4)[:37])  # the process died while writing step 4
    assert cli(["report", path, "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("steps 1..3 (3 lines), 2 units")
    assert "loss: first 4, last 2" in captured.out
    assert captured.err.splitlines() == [
        f"gnmr-fx report: warning: dropped 1 incomplete line(s) of {path} "
        "(line 5: not complete JSON, as a run that stopped mid-write leaves)"
    ]


def test_report_reads_a_restart_appended_to_a_cut_line(tmp_path):
    from gnmr_fx.tools.report import load_run

    # Steps 1-3, step 4 cut mid-write; the run restarts from its step-2
    # checkpoint and appends (header glued to the fragment) steps 3-5.
    path = _write(tmp_path / "run.jsonl", [HEADER, _step_line(1), _step_line(2), _step_line(3),
                                           _step_line(4)[:20] + HEADER, _step_line(3, hot=["a"]),
                                           _step_line(4), _step_line(5)])
    run = load_run(path)
    assert run.steps.tolist() == [1, 2, 3, 4, 5]
    assert run.plan[:, 0].tolist() == [False, False, True, False, False]  # step 3 from the restart
    assert run.extra["dropped_lines"] == [5]


def test_report_with_no_complete_line(capsys, tmp_path):
    path = _write(tmp_path / "run.jsonl", [], tail=HEADER[:15])
    _check_one_line_error(capsys, ["report", path], "no complete step line (1 line(s) not complete JSON)")


# --------------------------------------------------------------------------
# max_o: one parser for every --max-o and arm budget
# --------------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [("2", 2), ("0", 0), ("0.05", 0.05), ("5%", 0.05), ("12.5%", 0.125)])
def test_parse_max_o(text, value):
    got = parse_max_o(text)
    assert got == value and type(got) is type(value)  # an int counts units, a float is a FLOP fraction


@pytest.mark.parametrize("text", ["2.0", "1.5", "-1", "0.0", "100%", "nan", "abc", ""])
def test_parse_max_o_rejects(text):
    with pytest.raises(InputError, match="neither a unit count"):
        parse_max_o(text)


@pytest.mark.parametrize("flag,value", [("0", 0), ("2", 2), ("5%", 0.05), ("0.05", 0.05)])
def test_inspect_and_demo_read_max_o_alike(flag, value):
    parser = build_parser()
    demo = parser.parse_args(["demo", "--max-o", flag]).max_o
    inspect = parser.parse_args(["inspect", "tiny_gpt", "--max-o", flag]).max_o
    assert demo == inspect == value and type(demo) is type(inspect) is type(value)


def test_demo_accepts_max_o_zero():
    from gnmr_fx.config import GNMRConfig
    from gnmr_fx.benchmarks.demo import config_from_args

    cfg = config_from_args(build_parser().parse_args(["demo", "--max-o", "0", "--steps", "1"]))
    assert cfg.max_o == 0 and GNMRConfig(recipe=cfg.recipe, max_o=cfg.max_o).max_o == 0  # 0: no unit ever high


def test_arm_budgets_use_the_same_parser():
    assert arms.parse_arm("gnmr@0.05") == arms.ArmSpec("gnmr@5%", "gnmr", 0.05)
    assert arms.parse_arm("gnmr@0") == arms.ArmSpec("gnmr@0", "gnmr", 0)
    assert arms.parse_arm("low+zclip") == arms.ArmSpec("low+zclip", "zclip")
    for bad in ("gnmr", "always_high@2", "low+nothing", "gnmr@2.0"):
        with pytest.raises(InputError, match=re.escape(repr(bad))):
            arms.parse_arm(bad)


def test_overhead_units_are_parsed_at_parse_time():
    from gnmr_fx.benchmarks import overhead

    parser = argparse.ArgumentParser()
    overhead.add_arguments(parser)
    assert parser.parse_args(["--units", "100,10"]).units == [10, 100]


def test_doctests():
    import gnmr_fx.cli
    import gnmr_fx.benchmarks.demo

    for mod in (gnmr_fx.arguments, gnmr_fx.cli, gnmr_fx.benchmarks.demo):
        assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0, mod.__name__


@pytest.mark.parametrize("argv", [[name] for name in gnmr_fx.cli.SUBCOMMANDS]
                         + [["bench", name] for name in gnmr_fx.cli.BENCHMARKS], ids=" ".join)
def test_every_subcommand_prints_its_help(capsys, argv):
    # argparse formats each help string with %: a literal '%' (an arm like pin@10%) must be '%%'.
    with pytest.raises(SystemExit) as exit_:
        cli([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gnmr-fx " + " ".join(argv)) and "--help" in out, out[:300]
