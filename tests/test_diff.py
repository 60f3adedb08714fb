"""gnmr_fx.diff and `gnmr-fx diff`: structural entries, renaming, exit codes."""

import json
import operator

import pytest
import torch
import torch.fx

import gnmr_fx
from gnmr_fx.cli import main as cli
from gnmr_fx.tools.examples import load_spec
from gnmr_fx.tools.capture import capture


@pytest.fixture(scope="module", params=["host", "select"])
def tiny_record(request):
    model, inputs = load_spec("tiny_gpt")
    rt = capture(model, inputs, gnmr_fx.GNMRConfig(recipe="int8", dispatch=request.param))
    return rt


def _traced():
    class M(torch.nn.Module):
        def forward(self, x, w):
            h = torch.relu(x @ w)
            return h * 2.0

    return torch.fx.symbolic_trace(M())


class TestDiffAPI:
    def test_graph_with_itself_is_empty(self, tiny_record):
        rec = tiny_record.records[0]
        for gm in (rec.original, rec.rewritten):
            d = gnmr_fx.diff(gm, gm)
            assert not d and d.entries == [] and d.unified == []

    def test_before_after_one_replaced_entry_per_unit(self, tiny_record):
        rec = tiny_record.records[0]
        d = gnmr_fx.diff(rec.original, rec.rewritten)
        names = [u.name for u in tiny_record.units]
        assert [e.unit for e in d.replaced] == names
        # The only other changes: the plan buffer and the probe parameter.
        assert sorted(e.name for e in d.added) == ["_gnmr_plan", "_gnmr_probe"] and d.removed == []
        e = d.replaced[0]
        assert e.before.startswith("blocks_0_attn_qkv = torch._C._nn.linear(")
        det = e.detail["after"]
        dispatch = tiny_record.config.dispatch
        if dispatch == "select":
            assert (det["select"], det["high"], det["low"], det["stats"]) == (
                "blocks_0_attn_qkv", "blocks_0_attn_qkv_hp", "blocks_0_attn_qkv_lp", "blocks_0_attn_qkv_stats")
        else:
            assert (det["node"], det["stats"]) == ("blocks_0_attn_qkv", "blocks_0_attn_qkv_stats")
        assert (det["recipe"], det["high_path"]) == ("int8", "native")
        node = "select_path" if dispatch == "select" else "dispatch_path"
        assert e.after == f"dual path linear: high [native] | low [int8] -> {node}; stats on weight"
        # Unified diff: only unit lines (and the two GNMR attributes) change.
        changed = [l for l in d.unified if l[:1] in "+-" and l[:3] not in ("+++", "---")]
        assert sum(l.startswith("-") for l in changed) == 13 + 4  # 13 units + 4 readers of weightless stats
        assert sum(f"{node}(" in l for l in changed) == 13

    def test_matching_ignores_node_names(self):
        a, b = _traced(), _traced()
        for i, n in enumerate(b.graph.nodes):
            n.name = f"renamed_{i}"
        assert not gnmr_fx.diff(a, b)

    def test_changed_target_is_one_replaced_entry(self):
        a, b = _traced(), _traced()
        relu = next(n for n in b.graph.nodes if n.target is torch.relu)
        relu.target = torch.tanh
        d = gnmr_fx.diff(a, b)
        assert [(e.kind, e.before, e.after) for e in d.entries] == [
            ("replaced", "relu = torch.relu(matmul)", "relu = torch.tanh(matmul)")]
        assert [l for l in d.unified if l.startswith(("-r", "+r"))] == [
            "-relu = torch.relu(matmul)", "+relu = torch.tanh(matmul)"]

    def test_added_and_removed_nodes(self):
        a, b = _traced(), _traced()
        relu = next(n for n in b.graph.nodes if n.target is torch.relu)
        with b.graph.inserting_after(relu):
            neg = b.graph.call_function(operator.neg, (relu,))
        mul = next(n for n in b.graph.nodes if n.target is operator.mul)
        mul.replace_input_with(relu, neg)
        d = gnmr_fx.diff(a, b)
        assert [(e.kind, e.after) for e in d.added] == [("added", "neg = _operator.neg(relu)")]
        # The reader of the new node is a replacement, not remove + add.
        assert [e.name for e in d.replaced] == ["mul"] and d.removed == []
        d2 = gnmr_fx.diff(b, a)
        assert [e.kind for e in d2.entries] == ["removed", "replaced"]

    def test_two_configs(self):
        model, inputs = load_spec("tiny_gpt")
        a = capture(model, inputs, gnmr_fx.GNMRConfig(recipe="int8")).records[0].rewritten
        b = capture(model, inputs, gnmr_fx.GNMRConfig(recipe="int8", unit_filter=["blocks.1.*"])).records[0].rewritten
        d = gnmr_fx.diff(a, b)
        assert [e.unit for e in d.replaced] == ["blocks.0.attn.qkv", "blocks.0.attn.matmul", "blocks.0.attn.matmul_1",
                                                "blocks.0.attn.proj", "blocks.0.fc", "blocks.0.out", "head"]
        assert d.added == [] and d.removed == []


class TestDiffCLI:
    def test_before_after_exits_1(self, capsys):
        assert cli(["diff", "tiny_gpt", "--config", "recipe=int8", "--color", "never"]) == 1
        out = capsys.readouterr().out
        assert "13 replaced, 2 added, 0 removed" in out
        assert ("+blocks_0_fc = dispatch_path(layer_norm_1, blocks_0_fc_stats, blocks.0.fc.bias, plan=_gnmr_plan, "
                "slot=4, op='linear', recipe='int8', high='native', b_is_weight=True)") in out
        assert "\x1b[" not in out  # piped: plain text

    def test_identical_configs_exit_0(self, capsys):
        assert cli(["diff", "tiny_gpt", "--config-a", "recipe=int8", "--config-b", "recipe=int8"]) == 0
        assert "identical" in capsys.readouterr().out

    def test_recipe_change_json(self, capsys):
        assert cli(["diff", "tiny_gpt", "--config-a", "recipe=int8", "--config-b", "recipe=fp8_e4m3",
                    "--format", "json"]) == 1
        d = json.loads(capsys.readouterr().out)["diffs"][0]
        assert len(d["entries"]) == 13 and {e["kind"] for e in d["entries"]} == {"replaced"}
        assert {(e["detail"]["before"]["recipe"], e["detail"]["after"]["recipe"]) for e in d["entries"]} == {
            ("int8", "fp8_e4m3")}

    def test_dispatch_change_is_one_entry_per_unit(self, capsys):
        assert cli(["diff", "tiny_gpt", "--config-a", "recipe=int8", "--config-b", "recipe=int8", "dispatch=select",
                    "--format", "json"]) == 1
        d = json.loads(capsys.readouterr().out)["diffs"][0]
        assert len(d["entries"]) == 13 and {e["kind"] for e in d["entries"]} == {"replaced"}
        e = d["entries"][0]
        assert e["before"].endswith("-> dispatch_path; stats on weight")
        assert e["after"].endswith("-> select_path; stats on weight")

    def test_color_always(self, capsys):
        cli(["diff", "tiny_gpt", "--color", "always"])
        assert "\x1b[32m+" in capsys.readouterr().out

    def test_bad_config_exits_2(self, capsys):
        assert cli(["diff", "tiny_gpt", "--config-a", "recipe=int3"]) == 2
        assert "unknown recipe 'int3'" in capsys.readouterr().err


def test_host_dispatch_unit_is_one_entry():
    from test_onnx_export import host_dispatch_graph

    _, _, rec, gm = host_dispatch_graph("fp8_e4m3")
    d = gnmr_fx.diff(rec.original, gm)
    assert [(e.kind, e.unit) for e in d.replaced] == [("replaced", "weight")]
    assert d.replaced[0].after.startswith("host-dispatch linear (dual_linear): high [native] | low [fp8_e4m3]")
    assert sorted(e.name for e in d.added) == ["_gnmr_plan_host", "_gnmr_probe"] and d.removed == []
