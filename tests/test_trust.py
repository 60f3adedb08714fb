"""GNMR is never silently off (issue 9).

One class per way it used to be off without a word: a ``torch.compile(...,
backend="gnmr")`` runtime nobody could reach, the 9th compile of a model
class running uncompiled, and models that GNMR controls nothing of (now an
error at the first optimizer step, or the end of the first backward).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import warnings

import pytest
import torch
import torch.nn as nn

import gnmr_fx
from gnmr_fx import GNMRConfig
from gnmr_fx.benchmarks import stability
from gnmr_fx.models import GPTConfig, TinyGPT

TINY = GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)
TINY_UNITS = ["blocks.0.attn.qkv", "blocks.0.attn.matmul", "blocks.0.attn.matmul_1", "blocks.0.attn.proj",
              "blocks.0.fc", "blocks.0.out", "head"]


def _args_kwargs_decorator(fn):
    """Wraps forward as ``wrapper(*args, **kwargs)``, as transformers 5 does."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class DecoratedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    @_args_kwargs_decorator
    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class BreakNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(torch.relu(h)) @ h.t()


class ConvNet(nn.Module):
    """Weights, but no recoverable op."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, idx):
        return self.conv(self.emb(idx).unsqueeze(1)).sum()


class DisabledNet(nn.Module):
    """A forward Dynamo must not trace."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    @torch.compiler.disable
    def forward(self, x):
        return self.fc(x)


class HalfDisabledNet(nn.Module):
    """``b``'s forward runs outside Dynamo: its weight never enters a graph."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.forward = torch.compiler.disable(self.b.forward)

    def forward(self, x):
        return self.b(self.a(x))


def _step(model, opt, x):
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


class TestRuntimeOfTorchCompile:
    """``torch.compile(model, backend="gnmr")``: the runtime is found from the model's parameters."""

    def test_decorated_forward_keeps_the_runtime_on_the_model(self):
        # The captured frame is the decorator's (args, kwargs), not self: the
        # runtime used to be rootless, unreachable and absent from checkpoints.
        model = DecoratedMLP()
        compiled = torch.compile(model, backend="gnmr", options={"recipe": "int8", "max_o": 1})
        compiled(torch.randn(4, 8)).sum().backward()
        rt = gnmr_fx.runtime(model)
        assert gnmr_fx.runtime(compiled) is rt
        assert rt.root is model
        assert rt.unit_names == ["fc1", "fc2"]
        assert rt.controller.step == 1
        assert {"_gnmr.names", "_gnmr.step"} <= set(model.state_dict())
        assert "_orig_mod._gnmr.names" in compiled.state_dict()

    # The tests below check what the entry point does before its inner compiler runs:
    # aot_eager in place of Inductor (the test above keeps Inductor).
    def test_model_passed_as_an_argument_is_the_root(self, gnmr_backend_aot_eager):
        model = DecoratedMLP()
        fn = torch.compile(lambda m, x: m(x), backend="gnmr", options={"recipe": "int8"})
        fn(model, torch.randn(4, 8)).sum().backward()
        assert gnmr_fx.runtime(model).unit_names == ["fc1", "fc2"]
        assert gnmr_backend_aot_eager == ["inductor"]

    def test_two_models_of_one_class_each_get_their_runtime(self, gnmr_backend_aot_eager):
        a, b = DecoratedMLP(), DecoratedMLP()
        opts = {"recipe": "int8"}
        ca = torch.compile(a, backend="gnmr", options=opts, isolate_recompiles=True)
        cb = torch.compile(b, backend="gnmr", options=opts, isolate_recompiles=True)
        ca(torch.randn(2, 8)).sum().backward()
        for _ in range(2):
            cb(torch.randn(2, 8)).sum().backward()
        ra, rb = gnmr_fx.runtime(a), gnmr_fx.runtime(b)
        assert ra is not rb and ra.root is a and rb.root is b
        assert (ra.controller.step, rb.controller.step) == (1, 2)
        # Without isolation Dynamo reuses c's graph for d: that is an error,
        # not c's runtime recording d's statistics.
        c, d = DecoratedMLP(), DecoratedMLP()
        torch.compile(c, backend="gnmr", options=opts)(torch.randn(2, 8))
        with pytest.raises(RuntimeError, match=r"isolate_recompiles=True"):
            torch.compile(d, backend="gnmr", options=opts)(torch.randn(2, 8))
        assert gnmr_backend_aot_eager == ["inductor"] * 3  # a, b and c: d reused c's graph

    def test_graph_without_a_model_raises(self):
        fn = torch.compile(lambda a, b: a @ b, backend="gnmr", options={"recipe": "int8"})
        with pytest.raises(Exception, match="could not find the model of this graph"):
            fn(torch.randn(4, 8), torch.randn(8, 2))


class TestEveryCompileIsCompiled:
    """Each ``gnmr_fx.compile`` has its own Dynamo cache; the recompile limit is an error."""

    @pytest.mark.parametrize("make,x,units", [
        (lambda: TinyGPT(TINY), torch.randint(0, 256, (1, 8)), TINY_UNITS),
        (BreakNet, torch.randn(2, 8), ["a", "b", "matmul"]),
    ], ids=["tiny_gpt", "graph_break"])
    def test_twelve_compiles_of_one_class_all_have_units(self, make, x, units):
        # Before: compiles 9-12 captured nothing (recompile_limit 8 on Model.forward).
        got = []
        for _ in range(12):
            model = make()
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            m = gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend="eager", optimizer=opt)
            m(x).float().square().mean().backward()
            opt.step()
            rt = gnmr_fx.runtime(m)
            got.append((rt.unit_names, rt.controller.step))
        assert got == [(units, 1)] * 12

    def test_other_compiles_do_not_count_towards_the_accumulated_limit(self):
        # Dynamo caps the entries of one code object over all isolated
        # regions (accumulated_recompile_limit, 256): each compile's entry
        # lives on a code object of its own (the 257th compile failed).
        with torch._dynamo.config.patch(accumulated_recompile_limit=3):
            for _ in range(5):
                m = gnmr_fx.compile(nn.Linear(4, 4), GNMRConfig(recipe="int8"), backend="eager")
                m(torch.randn(2, 4))
                assert gnmr_fx.runtime(m).unit_names == ["weight"]
                del m

    def test_recompile_limit_raises_instead_of_running_uncompiled(self):
        m = gnmr_fx.compile(nn.Linear(8, 4), GNMRConfig(recipe="int8"), backend="eager")
        with torch._dynamo.config.patch(recompile_limit=1):
            m(torch.randn(2, 8))
            with pytest.raises(RuntimeError, match=r"Dynamo hit its recompile limit \(torch._dynamo.config"):
                m(torch.randn(3, 8))  # a new shape: a second entry
        assert torch._dynamo.config.fail_on_recompile_limit_hit is False  # set only during the call

    def test_stability_bench_jobs_1_keeps_units_in_every_task(self, tmp_path):
        # `gnmr-fx bench stability --jobs 1` compiles one TinyGPT per task in
        # one process: tasks after the 8th ran with 0 units.
        parser = argparse.ArgumentParser()
        stability.add_arguments(parser)
        seeds = [str(s) for s in range(12)]
        args = parser.parse_args(["--preset", "smoke", "--scenarios", "a", "--seeds", *seeds, "--arms", "always_high",
                                  "--jobs", "1", "--steps", "2", "--no-plots", "--out", str(tmp_path)])
        assert stability.run(args) == 0
        doc = json.loads((tmp_path / "results.json").read_text())
        runs = doc["scenarios"]["a"]["runs"]
        assert sorted(r["seed"] for r in runs) == list(range(12))
        n = len(doc["scenarios"]["a"]["units"])
        assert n == 7
        # always_high: every unit high at every step, read from each task's compiled graphs.
        assert [r["plans"] for r in runs] == [[list(range(n))] * 2] * 12


class TestActiveCheck:
    """At the first optimizer step (or backward), a model GNMR controls nothing of raises with the cause."""

    def test_forward_dynamo_skips_raises_at_first_step(self):
        model = DisabledNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m = gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend="eager", optimizer=opt)
        m(torch.randn(2, 8)).sum().backward()
        with pytest.raises(RuntimeError, match="Dynamo captured no graph from the model's forward"):
            opt.step()

    def test_no_recoverable_op_raises_at_first_step(self):
        model = ConvNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m = gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend="eager", optimizer=opt)
        m(torch.randint(0, 10, (2, 5))).backward()
        with pytest.raises(RuntimeError, match=r"no recoverable op \(seen: conv2d x1, embedding x1\)"):
            opt.step()

    def test_without_optimizer_raises_at_end_of_first_backward(self):
        m = gnmr_fx.compile(ConvNet(), GNMRConfig(recipe="int8"), backend="eager")
        loss = m(torch.randint(0, 10, (2, 5)))  # a forward alone is fine (inspection, evaluation)
        with pytest.raises(RuntimeError, match="no recoverable op"):
            loss.backward()

    def test_never_called_raises(self):
        model = nn.Linear(8, 8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend="eager", optimizer=opt)
        with pytest.raises(RuntimeError, match="the compiled module was never called"):
            opt.step()

    def test_filter_excluding_every_unit_raises_at_first_step(self):
        model = nn.Linear(8, 8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = GNMRConfig(recipe="int8", unit_filter=lambda name, op: False)
        m = gnmr_fx.compile(model, cfg, backend="eager", optimizer=opt)
        m(torch.randn(2, 8)).sum().backward()
        with pytest.raises(ValueError, match="excludes every unit"):
            opt.step()

    def test_warn_option_warns_once_and_trains(self):
        model = ConvNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m = gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend="eager", optimizer=opt, on_inactive="warn")
        x = torch.randint(0, 10, (2, 5))
        with pytest.warns(RuntimeWarning, match=r"no recoverable op \(seen: conv2d x1, embedding x1\)"):
            m(x).backward()
            opt.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m(x).backward()
            opt.step()
        assert not [w for w in caught if "GNMR" in str(w.message)]
        with pytest.raises(ValueError, match="on_inactive must be 'raise' or 'warn'"):
            gnmr_fx.compile(ConvNet(), on_inactive="ignore")

    def test_weights_outside_every_graph_are_reported_with_their_flop_share(self):
        model = HalfDisabledNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m = gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend="eager", optimizer=opt)
        # a's FLOPs: 2*4*8*8; b's, outside: the same. Estimated share: 50%.
        with pytest.warns(RuntimeWarning, match=r"1 weight\(s\) .* \(about 50% of the forward matmul FLOPs, "
                                                r"estimated\): b.weight \[8, 8\]"):
            _step(m, opt, torch.randn(4, 8))
        rt = gnmr_fx.runtime(m)
        assert rt.unit_names == ["a"]
        assert rt.uncovered_weights() == [("b.weight", (8, 8))]

    def test_a_model_gnmr_controls_passes_the_check(self):
        model = TinyGPT(TINY)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m = gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend="eager", optimizer=opt)
        idx = torch.randint(0, 256, (2, 8))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m(idx, idx).backward()
            opt.step()
        assert not [w for w in caught if "GNMR" in str(w.message)]
        assert gnmr_fx.runtime(m).uncovered_weights() == []
        assert gnmr_fx.controller(m).step == 1


def test_a_copy_of_a_compiled_model_runs_uncompiled():
    # The model is compiled in place (its forward): a deep copy must neither
    # run nor record into the original's graphs and runtime.
    model = TinyGPT(TINY)
    ref = copy.deepcopy(model)
    m = gnmr_fx.compile(model, GNMRConfig(recipe="int8", policy="always_low"), backend="eager")
    idx = torch.randint(0, 256, (2, 8))
    m(idx, idx).backward()
    rt = gnmr_fx.runtime(m)
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    assert torch.equal(clone(idx, idx), ref(idx, idx))  # fp32, not the int8 low path
    assert not torch.equal(model(idx, idx), ref(idx, idx))
    assert len(rt.records) == 1 and rt.controller.step == 1


@pytest.mark.parametrize("module", ["gnmr_fx.backends.ops", "gnmr_fx.passes.discover_units", "gnmr_fx.api",
                                    "gnmr_fx.runtime", "gnmr_fx.backends.paths", "gnmr_fx.backends.recipes",
                                    "gnmr_fx.passes", "gnmr_fx.passes.assign_slots", "gnmr_fx.passes.nodes",
                                    "gnmr_fx.controller"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1 and result.failed == 0
