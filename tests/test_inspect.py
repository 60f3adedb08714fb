"""gnmr_fx.inspect and `gnmr-fx inspect`: unit tables, graph breaks, filters, exit codes."""

import json

import pytest
import torch

import gnmr_fx
from gnmr_fx.cli import main as cli
from gnmr_fx.tools.examples import load_spec

TINY_UNITS = [
    f"blocks.{i}.{u}" for i in range(2)
    for u in ("attn.qkv", "attn.matmul", "attn.matmul_1", "attn.proj", "fc", "out")
] + ["head"]


class TestInspectTinyGPT:
    def test_units_named_after_modules(self):
        model, inputs = load_spec("tiny_gpt")
        res = gnmr_fx.inspect(model, inputs, gnmr_fx.GNMRConfig(recipe="int8"))
        assert res.names == TINY_UNITS
        assert [u.op for u in res.units].count("linear") == 9
        assert [u.op for u in res.units].count("matmul") == 4
        qkv = res.units[0]
        assert (qkv.input_shape, qkv.weight_shape, qkv.weight) == ((2, 16, 32), (96, 32), "blocks.0.attn.qkv.weight")
        assert qkv.flops == 2 * 2 * 16 * 96 * 32
        assert res.units[1].weight_shape is None  # q @ k^T is weightless
        assert sum(u.flops_share for u in res.units) == pytest.approx(1.0)
        assert {u.plan for u in res.units} == {"low"} and {u.recipe for u in res.units} == {"int8"}
        assert (res.graphs, res.graph_breaks, res.not_recoverable) == (1, [], {"embedding": 2})

    def test_user_state_untouched(self):
        model, inputs = load_spec("tiny_gpt")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        gnmr_fx.inspect(model, inputs)
        assert "_gnmr_runtime" not in model.__dict__
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(p.grad is None for p in model.parameters())
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    def test_repeated_inspection_never_hits_recompile_limit(self):
        # Dynamo keeps at most recompile_limit entries per code object and
        # then silently runs eager; inspection must still see every unit.
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        x = torch.randn(2, 8)
        with torch._dynamo.config.patch(recompile_limit=2):
            counts = [len(gnmr_fx.inspect(model, (x,)).units) for _ in range(4)]
            compiled = gnmr_fx.compile(model, backend="eager", example_inputs=(x,))
        assert counts == [2] * 4
        assert len(gnmr_fx.runtime(compiled).records) == 1  # the user's own compile still captures

    def test_plan_comes_from_the_compiled_models_controller(self):
        model, inputs = load_spec("tiny_gpt")
        cfg = gnmr_fx.GNMRConfig(recipe="int8", max_o=2)
        compiled = gnmr_fx.compile(model, cfg, backend="eager", example_inputs=inputs)
        plan = torch.zeros(13, dtype=torch.bool)
        plan[[4, 12]] = True
        gnmr_fx.runtime(compiled).set_plan(plan)
        res = gnmr_fx.inspect(compiled, inputs)
        assert [u.name for u in res.units if u.plan == "high"] == ["blocks.0.fc", "head"]
        assert res.plan_source.startswith("controller")

    @pytest.mark.parametrize("low_graph,copies", [(True, [0]), (False, []), (None, [])])
    def test_which_graphs_have_an_all_low_copy(self, low_graph, copies):
        # Of a compiled model, inspect says which graphs run an all-low copy on
        # all-low steps, and how often one ran (None under eager: no copy).
        model, inputs = load_spec("tiny_gpt")
        assert gnmr_fx.inspect(model, inputs).low_copies is None  # not compiled: nothing to say
        cfg = gnmr_fx.GNMRConfig(recipe="int8", low_graph=low_graph)
        compiled = gnmr_fx.compile(model, cfg, backend="eager", example_inputs=inputs)
        compiled(*inputs)
        res = gnmr_fx.inspect(compiled, inputs)
        ran = 2 if copies else 0  # example_inputs's capture call, then this one
        assert (res.low_copies, res.compiled_graphs, res.low_graph_calls) == (copies, 1, ran)
        assert res.to_dict()["totals"]["low_copies"] == len(copies)
        which = "0" if copies else "none"
        assert f"all-low copies (GNMRConfig.low_graph) in the compiled model: graphs {which} of 1; " \
               f"calls that ran one: {ran}" in res.table()

    def test_filter_marks_excluded_units(self):
        model, inputs = load_spec("tiny_gpt")
        res = gnmr_fx.inspect(model, inputs, gnmr_fx.GNMRConfig(unit_filter=["blocks.1.*"]))
        included = [u.name for u in res.units if u.included]
        assert included == TINY_UNITS[6:12]
        assert all(u.plan == "excluded" and u.recipe is None for u in res.units if not u.included)

    def test_graph_break_reason(self):
        model, inputs = load_spec("tiny_gpt_graph_break")
        res = gnmr_fx.inspect(model, inputs)
        assert res.graphs == 2 and len(res.graph_breaks) == 1
        assert "item()" in res.graph_breaks[0].reason and "examples.py" in res.graph_breaks[0].reason
        assert len(res.units) == 13 and res.units[0].name == "gpt.blocks.0.attn.qkv"
        assert {u.graph for u in res.units} == {0, 1}


def test_inspect_hf_gpt2_from_config():
    pytest.importorskip("transformers")
    model, inputs = load_spec("hf_gpt2")
    res = gnmr_fx.inspect(model, inputs)
    expected = [f"transformer.h.{i}.{m}" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["lm_head"]
    assert res.names == expected
    assert [u.op for u in res.units] == ["addmm"] * 8 + ["linear"]
    assert res.not_recoverable == {"embedding": 2, "scaled_dot_product_attention": 2}


class TestInspectCLI:
    def test_table(self, capsys):
        assert cli(["inspect", "tiny_gpt", "--recipe", "int8", "--max-o", "2"]) == 0
        out = capsys.readouterr().out
        assert "blocks.0.attn.qkv" in out and "int8" in out
        assert "graphs captured: 1    graph breaks: 0" in out
        assert "units: 13 (13 included by the filter)" in out
        assert "seen but not recoverable: embedding x2" in out

    def test_json(self, capsys):
        assert cli(["inspect", "tiny_gpt", "--format", "json", "--filter", "head"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["totals"]["units"] == 13 and d["totals"]["included"] == 1
        assert [u["name"] for u in d["units"] if u["included"]] == ["head"]

    def test_filter_matching_nothing_is_an_error(self, capsys):
        assert cli(["inspect", "tiny_gpt", "--filter", "blocks.*.fc", "blocks.*.mlp"]) == 2
        err = capsys.readouterr().err
        assert "['blocks.*.mlp'] match no unit" in err and "blocks.0.fc" in err

    def test_filter_matching_nothing_raises_in_api(self):
        model, inputs = load_spec("tiny_gpt")
        with pytest.raises(ValueError, match=r"\['nope\*'\] match no unit"):
            gnmr_fx.inspect(model, inputs, gnmr_fx.GNMRConfig(unit_filter=["nope*"]))

    def test_bad_spec(self, capsys):
        assert cli(["inspect", "no_such_example"]) == 2
        assert "neither a built-in example" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Inspect what training runs: keyword inputs, and the live plan
# --------------------------------------------------------------------------


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_hf_gpt2_with_labels_inspects_as_it_trains():
    # GPT-2 called with labels= computes its loss after a graph break (a
    # logger call): two graphs, where input_ids alone give one.
    model, ids = _tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = gnmr_fx.compile(model, gnmr_fx.GNMRConfig(recipe="int8", max_o=2), backend="eager", optimizer=opt)
    compiled(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    rt = gnmr_fx.runtime(compiled)
    trained_breaks = set(torch._dynamo.utils.counters["graph_break"])  # distinct break sites
    plan = torch.zeros(13, dtype=torch.bool)
    plan[[0, 3]] = True
    rt.set_plan(plan)

    res = gnmr_fx.inspect(compiled, (), example_kwargs=dict(input_ids=ids, labels=ids))
    assert (res.graphs, len(res.graph_breaks)) == (len(rt.records), len(trained_breaks)) == (2, 1)
    assert res.names == rt.unit_names and len(res.names) == 13
    assert [u.name for u in res.units if u.plan == "high"] == ["transformer.h.0.attn.c_attn",
                                                              "transformer.h.0.attn.c_proj"]
    assert res.plan_source.startswith("controller of the compiled model at step 1")
    positional = gnmr_fx.inspect(compiled, (ids,))  # what inspect saw before it took keywords
    assert (positional.graphs, len(positional.graph_breaks)) == (1, 0)


def test_live_plan_follows_set_plan_and_controller_steps():
    model, inputs = load_spec("tiny_gpt")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    compiled = gnmr_fx.compile(model, gnmr_fx.GNMRConfig(recipe="int8", max_o=2), backend="eager", optimizer=opt)
    rt = gnmr_fx.runtime(compiled)

    def high():
        return [u.name for u in gnmr_fx.inspect(compiled, dict(idx=inputs[0])).units if u.plan == "high"]

    compiled(*inputs).square().mean().backward()
    opt.step()
    assert high() == []  # step 1: warm-up, nothing triggers
    plan = torch.zeros(13, dtype=torch.bool)
    plan[[4, 12]] = True
    rt.set_plan(plan)
    assert high() == ["blocks.0.fc", "head"]
    compiled(*inputs).square().mean().backward()
    opt.step()  # the controller decides again: no unit holds a lock, so all go low
    assert high() == [] and not rt.controller.plan.any()


def test_live_plan_through_a_ddp_wrapper():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model, inputs = load_spec("tiny_gpt")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        compiled = gnmr_fx.compile(ddp, gnmr_fx.GNMRConfig(recipe="int8", max_o=2), backend="eager",
                                   example_inputs=inputs)
        plan = torch.zeros(13, dtype=torch.bool)
        plan[[4, 12]] = True
        gnmr_fx.runtime(compiled).set_plan(plan)
        for wrapped in (compiled, ddp):
            res = gnmr_fx.inspect(wrapped, inputs)
            assert res.names == TINY_UNITS  # the runtime's names, no "module." prefix
            assert [u.name for u in res.units if u.plan == "high"] == ["blocks.0.fc", "head"]
    finally:
        dist.destroy_process_group()


def test_cli_passes_the_keyword_inputs_a_spec_gives(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    (tmp_path / "gnmr_gpt2_spec.py").write_text(
        "import torch, transformers\n"
        "def make():\n"
        "    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16,\n"
        "                                  bos_token_id=0, eos_token_id=0, attn_implementation='eager')\n"
        "    ids = torch.randint(0, 64, (1, 8))\n"
        "    return transformers.GPT2LMHeadModel(cfg), (ids,), {'labels': ids}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli(["inspect", "gnmr_gpt2_spec:make", "--format", "json"]) == 0
    totals = json.loads(capsys.readouterr().out)["totals"]
    assert (totals["graphs"], totals["graph_breaks"], totals["units"]) == (2, 1, 7)


def test_inspection_doctests():
    import doctest

    import gnmr_fx.tools.capture
    import gnmr_fx.tools.examples
    import gnmr_fx.tools.inspect

    for mod in (gnmr_fx.tools.capture, gnmr_fx.tools.inspect, gnmr_fx.tools.examples):
        assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0, mod.__name__
