"""gnmr_fx.export_onnx: QDQ for low units, plain MatMul/Gemm for high ones, checked with onnxruntime."""

import collections

import numpy as np
import pytest
import torch

import gnmr_fx
from gnmr_fx.backends.recipes import sqnr
from gnmr_fx.tools.examples import load_spec
from gnmr_fx.tools.export import _copy_without_gnmr, ort_session_options

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx.numpy_helper")
ort = pytest.importorskip("onnxruntime")

pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) translates through it

CFG = gnmr_fx.GNMRConfig(recipe="int8")
HIGH = ("blocks.0.fc", "head")


@pytest.fixture(scope="module")
def tiny():
    model, inputs = load_spec("tiny_gpt")
    return model.eval(), inputs


@pytest.fixture(scope="module")
def mixed(tiny, tmp_path_factory):
    """TinyGPT exported with blocks.0.fc and head high, the other 11 units int8."""
    model, inputs = tiny
    path = tmp_path_factory.mktemp("onnx") / "mixed.onnx"
    return gnmr_fx.export_onnx(model, inputs, path, plan={u: True for u in HIGH}, config=CFG)


def _run(export, inputs):
    opts = ort_session_options(export)  # the plan's numerics (see its docstring)
    opts.intra_op_num_threads = 1  # tiny graphs; the CPU is shared
    s = ort.InferenceSession(export.path, opts, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(s.get_inputs(), inputs)}
    return torch.from_numpy(s.run(None, feed)[0])


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _gnmr_reference(model, inputs, high):
    """The GNMR-compiled model (eager backend) under the same frozen plan."""
    cm = gnmr_fx.compile(_copy_without_gnmr(model), CFG, backend="eager")  # leave the fixture's model uncompiled
    rt = gnmr_fx.runtime(cm)
    with torch.no_grad():
        cm(*inputs)  # compile the no-grad graph before setting the plan
        rt.set_plan(torch.tensor([n in high for n in rt.controller.names]))
        return cm(*inputs)


class TestTinyGPT:
    def test_int8_plan_matches_pytorch(self, tiny, mixed):
        model, inputs = tiny
        ex = mixed
        assert ex.high_units == list(HIGH) and len(ex.low_units) == 11
        got = _run(ex, inputs)
        ref = _gnmr_reference(model, inputs, HIGH)
        with torch.no_grad():
            fp32 = model(*inputs)
        # ONNX == GNMR's low path up to float rounding (>= 100 dB; measured ~130 dB),
        # while int8 itself is far from fp32: the QDQ really quantizes.
        assert sqnr(ref, got) >= 100.0, sqnr(ref, got)
        assert (got - ref).abs().max() <= 1e-4
        assert 25.0 <= sqnr(fp32, got) <= 60.0, sqnr(fp32, got)

    def test_select_dispatch_exports_the_same_graph(self, tiny, mixed, tmp_path):
        # freeze_plan keeps one branch of a dispatch_path unit (the default) or of a select.
        model, inputs = tiny
        cfg = gnmr_fx.GNMRConfig(recipe="int8", dispatch="select")
        ex = gnmr_fx.export_onnx(model, inputs, tmp_path / "s.onnx", plan={u: True for u in HIGH}, config=cfg)
        assert _ops(ex.path) == _ops(mixed.path)
        assert torch.equal(_run(ex, inputs), _run(mixed, inputs))

    def test_all_high_within_1e5(self, tiny, tmp_path):
        model, inputs = tiny
        ex = gnmr_fx.export_onnx(model, inputs, tmp_path / "h.onnx", plan="high", config=CFG)
        with torch.no_grad():
            ref = model(*inputs)
        assert (_run(ex, inputs) - ref).abs().max() <= 1e-5
        ops = _ops(ex.path)
        assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0
        assert ops["MatMul"] + ops["Gemm"] == 13  # one per unit

    def test_qdq_pairs_only_on_low_units(self, tiny, mixed, tmp_path):
        model, inputs = tiny
        ops = _ops(mixed.path)
        assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 2 * 11  # two operands per low unit
        # Only blocks.1.fc low: exactly one QDQ pair on its activation and one on its weight.
        names = gnmr_fx.inspect(model, inputs, CFG).names
        one = gnmr_fx.export_onnx(model, inputs, tmp_path / "one.onnx",
                                  plan={n: n != "blocks.1.fc" for n in names}, config=CFG)
        assert one.low_units == ["blocks.1.fc"]
        graph = onnx.load(one.path).graph
        assert collections.Counter(n.op_type for n in graph.node)["QuantizeLinear"] == 2
        producers = {o: n for n in graph.node for o in n.output}
        inits = {i.name: i for i in graph.initializer}

        def source(name):
            while name in producers and producers[name].op_type in ("Reshape", "Transpose", "Identity"):
                name = producers[name].input[0]
            return name

        q_sources = [source(n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"]
        # One operand is the activation, the other the fc weight (an initializer, which
        # the exporter may rename): identify it by value.
        weights = [onnx.numpy_helper.to_array(inits[q]) for q in q_sources if q in inits]
        assert len(weights) == 1
        assert np.array_equal(weights[0], model.blocks[1].fc.weight.detach().numpy())
        assert all(
            (n.attribute[0].name, n.attribute[0].i) == ("axis", 0)
            for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        )

    def test_default_plan_is_the_controllers(self, tiny, tmp_path):
        model, inputs = tiny
        cm = gnmr_fx.compile(model, CFG, backend="eager", example_inputs=inputs)
        rt = gnmr_fx.runtime(cm)
        rt.set_plan(torch.tensor([n == "blocks.0.out" for n in rt.controller.names]))
        ex = gnmr_fx.export_onnx(cm, inputs, tmp_path / "c.onnx")
        assert ex.high_units == ["blocks.0.out"] and ex.recipe == "int8"

    def test_registered_fp8_recipe_exports_bitwise(self, tiny, tmp_path):
        model, inputs = tiny
        ex = gnmr_fx.export_onnx(model, inputs, tmp_path / "e.onnx", plan="low",
                                 config=gnmr_fx.GNMRConfig(recipe="fp8_e4m3"))
        assert ex.opset >= 19 and len(ex.low_units) == 13

    def test_unexpressible_recipe_names_it(self, tiny, tmp_path):
        model, inputs = tiny
        with pytest.raises(ValueError, match=r"recipe 'int4' cannot be expressed as ONNX QuantizeLinear"):
            gnmr_fx.export_onnx(model, inputs, tmp_path / "f.onnx", config=gnmr_fx.GNMRConfig(recipe="int4"))
        # All units high: the recipe is never used, so the export works.
        ex = gnmr_fx.export_onnx(model, inputs, tmp_path / "f.onnx", plan="high",
                                 config=gnmr_fx.GNMRConfig(recipe="int4"))
        assert ex.low_units == []

    def test_bad_plans(self, tiny, tmp_path):
        model, inputs = tiny
        with pytest.raises(ValueError, match="unknown unit"):
            gnmr_fx.export_onnx(model, inputs, tmp_path / "x.onnx", plan={"blocks.9.fc": True}, config=CFG)
        with pytest.raises(ValueError, match="3 entries for 13 units"):
            gnmr_fx.export_onnx(model, inputs, tmp_path / "x.onnx", plan=[True] * 3, config=CFG)

    def test_graph_break_is_an_error(self, tmp_path):
        model, inputs = load_spec("tiny_gpt_graph_break")
        with pytest.raises(ValueError, match=r"one graph, Dynamo captured 2 .*item\(\)"):
            gnmr_fx.export_onnx(model, inputs, tmp_path / "b.onnx", config=CFG)


def test_hf_gpt2_int8(tmp_path):
    pytest.importorskip("transformers")
    model, inputs = load_spec("hf_gpt2")
    ex = gnmr_fx.export_onnx(model, inputs, tmp_path / "gpt2.onnx", config=CFG)
    assert len(ex.low_units) == 9
    ops = _ops(ex.path)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 18
    ref = _gnmr_reference(model, inputs, ()).logits
    assert sqnr(ref, _run(ex, inputs)) >= 100.0


def test_fp8_e4m3_per_tensor(tiny, tmp_path):
    # The registered fp8_e4m3 recipe has no Recipe.onnx yet; a recipe with the
    # same quantizers that declares onnx="fp8_e4m3" exports as float8 QDQ.
    from gnmr_fx.backends.recipes import Recipe, fake_quant_fp8, register_recipe
    from gnmr_fx.tools.export import verify_with_onnxruntime

    q = lambda t, kdim: fake_quant_fp8(t, kdim=None)  # noqa: E731
    register_recipe(Recipe("fp8_e4m3_onnx_test", "fp8 e4m3 per-tensor (export test)", q, q, onnx="fp8_e4m3"),
                    overwrite=True)
    cfg = gnmr_fx.GNMRConfig(recipe="fp8_e4m3_onnx_test")
    model, inputs = tiny
    ex = gnmr_fx.export_onnx(model, inputs, tmp_path / "f8.onnx", plan={"head": True}, config=cfg)
    assert ex.opset == 19 and len(ex.low_units) == 12
    v = verify_with_onnxruntime(ex, model, inputs, cfg)
    assert v["sqnr_db"] >= 100.0 and v["ops"]["QuantizeLinear"] == v["ops"]["DequantizeLinear"] == 24
    graph = onnx.load(ex.path).graph
    # Zero points: Constant nodes, or initializers once the exporter's optimizer lifted them.
    dtypes = {o: n.attribute[0].t.data_type for n in graph.node if n.op_type == "Constant" for o in n.output}
    dtypes.update({i.name: i.data_type for i in graph.initializer})
    zps = [dtypes[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert set(zps) == {onnx.TensorProto.FLOAT8E4M3FN}
    with pytest.raises(ValueError, match="opset 17 cannot express recipe 'fp8_e4m3_onnx_test'"):
        gnmr_fx.export_onnx(model, inputs, tmp_path / "x.onnx", config=cfg, opset=17)


def host_dispatch_graph(recipe):
    """A captured nn.Linear whose unit is rewritten the way insert_dual_path
    does on a GPU with a real kernel: one ``dual_linear`` node reading a
    host-resident plan (built by hand here: this CPU has no such kernel)."""
    import copy

    from gnmr_fx.backends.host_dispatch import dual_linear
    from gnmr_fx.passes.state import PLAN_HOST
    from gnmr_fx.tools.capture import capture
    from gnmr_fx.passes.nodes import select_path

    torch.manual_seed(0)
    model, x = torch.nn.Linear(16, 8), torch.randn(4, 16)
    rt = capture(model, (x,), gnmr_fx.GNMRConfig(recipe="int8", dispatch="select"), keep_inputs=True)
    rec = rt.records[0]
    gm = torch.fx.GraphModule(rec.rewritten, copy.deepcopy(rec.rewritten.graph))
    gm.register_buffer(PLAN_HOST, torch.zeros(1, dtype=torch.bool))
    g = gm.graph
    sel = next(n for n in g.nodes if n.target is select_path)
    hp, lp = sel.args[2], sel.args[3]
    with g.inserting_before(sel):
        plan = g.get_attr(PLAN_HOST)
        dual = g.call_function(dual_linear, tuple(hp.args), {"plan": plan, "slot": 0, "recipe": recipe, "high": "native"})
    dual.meta["gnmr_dual"] = sel.meta["gnmr_dual"]
    sel.replace_all_uses_with(dual)
    for n in (sel, hp, lp):
        g.erase_node(n)
    for n in list(g.find_nodes(op="get_attr")):
        if n.target == "_gnmr_plan" and not n.users:  # the pass adds none when every unit is host-dispatched
            g.erase_node(n)
    gm.recompile()
    return model, x, rec, gm


@pytest.mark.parametrize("high", [True, False])
def test_freeze_host_dispatch_unit(high):
    from gnmr_fx.backends.recipes import fake_quant_int
    from gnmr_fx.passes.freeze_plan import freeze_plan

    model, x, rec, gm = host_dispatch_graph("int8")
    freeze_plan(gm, {"weight": high})
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert not any(getattr(t, "__name__", "") == "dual_linear" for t in targets)
    (out,) = gm(*rec.extra["example_inputs"])
    w, b = model.weight.detach(), model.bias.detach()
    if high:
        expected = torch.nn.functional.linear(x, w, b)
    else:
        expected = torch.nn.functional.linear(fake_quant_int(x, bits=8, kdim=-1), fake_quant_int(w, bits=8, kdim=-1), b)
    assert torch.equal(out.detach(), expected)
