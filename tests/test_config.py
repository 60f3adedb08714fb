"""GNMRConfig rejects every wrong type and absurd size up front, naming the field."""

import dataclasses
import math
import pathlib
import re

import pytest

from gnmr_fx import GNMRConfig
from gnmr_fx.config import MAX_DELTA_WINDOW, MAX_LOG_EVERY, MAX_STEPS, MAX_UNITS

# field: values that must raise ValueError("GNMRConfig.<field> ..."). Per field:
# bool for int (True is an int in Python), int for bool, float for int, str,
# list, and the out-of-range / absurd sizes.
BAD = {
    "recipe": [["int8"], 8, None, True],
    "high_path": [["native"], 1, None, True],
    "policy": [["gnmr"], 0, None, False],
    "max_o": [True, False, "2", [2], 2**40, MAX_UNITS + 1, -1, 1.5, 0.0, 1.0, math.nan, math.inf],
    "threshold": [True, "3", [3.0], None, 1, 0.5, math.nan, math.inf],
    "delta_threshold": [False, "1.5", [1.5], None, 0.0, -1, math.nan, math.inf],
    "delta_window": [True, 3.0, "3", [3], None, 0, MAX_DELTA_WINDOW + 1, 2**40],
    "beta": [True, "0.98", [0.98], None, 0.0, 1.0, 1, math.nan],
    "warmup_steps": [True, 20.0, "20", [20], None, -1, MAX_STEPS + 1, 2**63],
    "lock_steps": [True, 10.0, "10", [10], None, 0, MAX_STEPS + 1, 2**63],
    "max_lock_steps": [True, 50.0, "50", [50], None, 0, MAX_STEPS + 1, 2**63],
    "high_start_steps": [True, 100.0, "100", [100], None, -1, MAX_STEPS + 1, 2**63],
    "emulate": [1, 0, 1.0, "True", [True]],
    "dispatch": [["host"], 1, None, True, "cond", "where", "HOST"],
    "plan_lag": [True, False, 1.0, "1", [1], None, 2, -1],
    "compile_controller": [1, 0, None, "True", [True], 1.0],
    "low_graph": [1, 0, "True", [True], 1.0, "auto"],
    "unit_filter": [{"blocks.*": 1}, {"blocks.*"}, frozenset(["head"]), iter(["head"]), 3, True,
                    "blocks.*", [1], [], [None]],
    "log": [True, False, 3, 0, 3.0, b"run.jsonl", "", ["run.jsonl"]],
    "log_every": [True, 50.0, "50", [50], None, 0, MAX_LOG_EVERY + 1, 2**40],
}
CASES = [(f, v) for f, vals in BAD.items() for v in vals]
IDS = [f"{f}={v!r}" if " at 0x" not in repr(v) else f"{f}={type(v).__name__}" for f, v in CASES]


def test_every_field_has_bad_values():
    fields = [f.name for f in dataclasses.fields(GNMRConfig)]
    assert sorted(BAD) == sorted(fields), f"list wrong values for {sorted(set(fields) - set(BAD))} in BAD"


@pytest.mark.parametrize("field,value", CASES, ids=IDS)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError) as e:
        GNMRConfig(**{field: value})
    msg = str(e.value)
    assert msg.startswith(f"GNMRConfig.{field} "), msg
    assert f"(got {value!r}" in msg, msg


def test_messages_say_what_is_allowed():
    cases = {
        "emulate": (1, "GNMRConfig.emulate must be None, True or False (got 1)"),
        "plan_lag": (1.0, "GNMRConfig.plan_lag must be the int 0 or 1 (got 1.0)"),
        "dispatch": ("cond", "GNMRConfig.dispatch must be one of ('host', 'select') (got 'cond')"),
        "delta_window": (2**40, "GNMRConfig.delta_window must be an int in [1, 10000] (got 1099511627776)"),
        "lock_steps": (2**63, "GNMRConfig.lock_steps must be an int in [1, 1000000] (got 9223372036854775808)"),
        "log_every": (True, "GNMRConfig.log_every must be an int in [1, 10000] (got True)"),
        "recipe": (["int8"], "GNMRConfig.recipe must be a recipe name (a str) (got ['int8'])"),
        "log": (True, "GNMRConfig.log must be a file path (a str or os.PathLike) (got True)"),
        "beta": (1, "GNMRConfig.beta must be a finite number in (0, 1) (got 1)"),
        "threshold": (math.inf, "GNMRConfig.threshold must be a finite number > 1 (got inf)"),
        "max_o": (2**40, "GNMRConfig.max_o must be an int in [0, 1000000] (units) or a float in (0, 1) "
                         "(a FLOPs fraction) (got 1099511627776)"),
        "unit_filter": ({"head"}, "GNMRConfig.unit_filter must be None, a list of fnmatch patterns or a "
                                  "callable (name, op) -> bool (got {'head'})"),
    }
    for field, (value, want) in cases.items():
        with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
            GNMRConfig(**{field: value})


def test_unknown_recipe_still_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown recipe 'fp7'; registered recipes: .*int8"):
        GNMRConfig(recipe="fp7")


def test_good_values_are_kept():
    cfg = GNMRConfig(
        max_o=MAX_UNITS, threshold=3, delta_threshold=2, delta_window=MAX_DELTA_WINDOW, beta=0.5,
        warmup_steps=0, lock_steps=MAX_STEPS, emulate=False, plan_lag=1,
        unit_filter=["blocks.*"], log=pathlib.Path("runs") / "a.jsonl", log_every=MAX_LOG_EVERY,
    )
    assert (cfg.max_o, cfg.threshold, cfg.delta_window, cfg.lock_steps) == (MAX_UNITS, 3, MAX_DELTA_WINDOW, MAX_STEPS)
    assert cfg.unit_filter == ("blocks.*",)  # a list is stored as a tuple: the config stays hashable
    assert cfg.log == "runs/a.jsonl" and isinstance(cfg.log, str)
    assert GNMRConfig(max_o=0).max_o == 0 and GNMRConfig(max_o=0.25).budget_is_fraction
    assert GNMRConfig(emulate=True).emulate is True and GNMRConfig().emulate is None
    assert GNMRConfig().dispatch == "host" and GNMRConfig(dispatch="select").dispatch == "select"
    # replace() validates again and accepts what __post_init__ stored.
    assert cfg.replace(beta=0.9).unit_filter == ("blocks.*",)
    with pytest.raises(ValueError, match=r"^GNMRConfig\.lock_steps "):
        cfg.replace(lock_steps=0)


def test_options_dict_is_validated_too():
    with pytest.raises(ValueError, match=r"^GNMRConfig\.emulate must be None, True or False \(got 0\)$"):
        GNMRConfig.from_options({"recipe": "int8", "emulate": 0})
