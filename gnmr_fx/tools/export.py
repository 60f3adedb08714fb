"""``gnmr_fx.export_onnx``: an ONNX model with the GNMR plan frozen.

The export starts from the graph the GNMR pass rewrote (Dynamo capture of
the model, eager inner compiler) and freezes the plan into it:

* a unit on the **high path** keeps only its high branch: a plain
  ``MatMul`` / ``Gemm`` in ONNX;
* a unit on the **low path** keeps only its low branch, with each rounded
  operand written as a standard ``QuantizeLinear`` -> ``DequantizeLinear``
  pair (QDQ), which ONNX runtimes recognize as a quantized matmul;
* statistics nodes (identity in forward) and the plan select disappear.

The file is written by ``torch.onnx.export(..., dynamo=True)`` (torch.export,
then onnxscript), the exporter PyTorch maintains: it converts what the
deprecated TorchScript exporter cannot, such as
``scaled_dot_product_attention(enable_gqa=True)`` in grouped-query attention
(Hugging Face Llama, Mistral, Qwen2). Each rounded operand is a custom op
with its own ONNX translation (:mod:`gnmr_fx.backends.onnx_qdq`, which also
holds the recipes written as QDQ; the plan is frozen by
:func:`gnmr_fx.passes.freeze_plan.freeze_plan`).

How the ``int8`` recipe maps to QDQ. The recipe is symmetric int8 with one
scale per row along the reduction dim K: per token for activations, per
output channel for weights. ``QuantizeLinear`` takes a 1-D scale along one
``axis``, so each operand is viewed as ``[rows, K]`` (K moved last, the
other dims flattened) and quantized with ``axis=0``. Activation scales are
dynamic: they are computed in the graph (``Abs`` -> ``ReduceMax`` -> ``Div``
by 127 -> ``Clip`` at 1e-12) from the same tensor, exactly as the recipe
does, and fed to QuantizeLinear as an input.

A recipe with ``Recipe.onnx == "fp8_e4m3"`` (per-tensor e4m3 scaling, as the
registered ``fp8_e4m3``) is written as QDQ with a float8e4m3fn zero point,
which needs opset 19. Recipes whose ``Recipe.onnx`` is None (fp8_rowwise,
blockwise fp8, MX, NVFP4, int4) raise a ``ValueError`` naming the recipe
when a unit on the low path would need them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.fx

from gnmr_fx.backends.onnx_qdq import MIN_OPSET, QDQ, onnx_translations, unsupported_message
from gnmr_fx.backends.recipes import get_recipe
from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.freeze_plan import freeze_plan
from gnmr_fx.tools.capture import as_inputs, capture, unwrap
# torch.onnx.export(dynamo=True) writes opset 18 and up (its torch library's opset).
_EXPORTER_MIN_OPSET = 18

PlanLike = Union[None, str, torch.Tensor, Sequence[bool], Mapping[str, bool]]


class _FrozenModel(torch.nn.Module):
    """Calls the frozen graph with the user's inputs and the model's own
    parameters and buffers (so the exporter stores them as initializers)."""

    def __init__(self, model: torch.nn.Module, gm: torch.fx.GraphModule, bindings: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.model = model
        self.frozen = gm
        self.bindings = bindings

    def forward(self, *inputs: torch.Tensor) -> Any:
        args = []
        for kind, key in self.bindings:
            if kind == "input":
                args.append(inputs[key])
            elif kind == "param":
                args.append(self.model.get_parameter(key))
            else:
                args.append(self.model.get_buffer(key))
        out = self.frozen(*args)
        if isinstance(out, (tuple, list)) and len(out) == 1:
            return out[0]
        return out


def _bindings(record: Any, model: torch.nn.Module, inputs: Sequence) -> list[tuple[str, Any]]:
    params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {id(b): n for n, b in model.named_buffers(remove_duplicate=False)}
    out = []
    placeholders = list(record.rewritten.graph.find_nodes(op="placeholder"))
    for ph, x in zip(placeholders, record.extra["example_inputs"]):
        j = next((j for j, y in enumerate(inputs) if y is x), None)
        if j is not None:
            out.append(("input", j))
        elif id(x) in params:
            out.append(("param", params[id(x)]))
        elif id(x) in buffers:
            out.append(("buffer", buffers[id(x)]))
        else:
            raise ValueError(
                f"export_onnx: graph input {ph.name!r} is neither an example input nor a parameter or "
                "buffer of the model; pass every tensor the forward reads as an example input"
            )
    return out


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: str
    opset: int
    recipe: str
    plan: dict[str, str]  # unit -> "high" / "low"
    excluded: list[str] = field(default_factory=list)  # units the filter left as written

    @property
    def low_units(self) -> list[str]:
        return [u for u, p in self.plan.items() if p == "low"]

    @property
    def high_units(self) -> list[str]:
        return [u for u, p in self.plan.items() if p == "high"]


def _resolve_plan(plan: PlanLike, names: list[str], live: Any) -> dict[str, bool]:
    if plan is None:
        if live is not None and live.controller.num_units:
            cur = dict(zip(live.controller.names, live.controller.plan.detach().cpu().tolist()))
            return {n: bool(cur.get(n, False)) for n in names}
        return None  # caller uses its fresh controller's initial plan
    if isinstance(plan, str):
        if plan not in ("high", "low"):
            raise ValueError(f"plan as a string must be 'high' or 'low' (got {plan!r})")
        return {n: plan == "high" for n in names}
    if isinstance(plan, Mapping):
        unknown = sorted(set(plan) - set(names))
        if unknown:
            raise ValueError(f"plan names unknown unit(s) {unknown}; units are: {', '.join(names)}")
        return {n: bool(plan.get(n, False)) for n in names}
    flags = plan.detach().cpu().tolist() if isinstance(plan, torch.Tensor) else list(plan)
    if len(flags) != len(names):
        raise ValueError(f"plan has {len(flags)} entries for {len(names)} units ({', '.join(names)})")
    return {n: bool(f) for n, f in zip(names, flags)}


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Sequence,
    path: str,
    plan: PlanLike = None,
    *,
    config: Optional[GNMRConfig] = None,
    opset: Optional[int] = None,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
) -> OnnxExport:
    """Export ``model`` to ONNX with the GNMR plan frozen.

    Args:
        model: the model (plain, or compiled with ``gnmr_fx.compile``).
        example_inputs: tensors for one forward pass (fixed shapes).
        path: the ``.onnx`` file to write.
        plan: the plan to freeze. None: the compiled model's current plan
            (or, for a model never compiled, the initial plan). Or ``"high"``
            / ``"low"`` for all units, a ``{unit: high}`` dict (others low),
            or bools in controller unit order.
        config: GNMR config (default: the compiled model's, else defaults);
            its ``recipe`` is the low path.
        opset: ONNX opset; default 18 (the lowest the dynamo exporter
            writes), or 19 when a low unit needs fp8 (float8 QuantizeLinear).

    The export runs in eval mode (restored afterwards) and needs one graph:
    a model with graph breaks raises ``ValueError`` listing them.

    >>> import torch, tempfile, os, gnmr_fx
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> f = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> ex = gnmr_fx.export_onnx(m, (torch.randn(4, 8),), f, plan={"2": True},
    ...                          config=gnmr_fx.GNMRConfig(recipe="int8"))
    >>> ex.plan
    {'0': 'low', '2': 'high'}
    """
    root = unwrap(model)
    live = root.__dict__.get("_gnmr_runtime")
    if config is None:
        config = live.config if live is not None else GNMRConfig()
    inputs = as_inputs(example_inputs)
    with _eval_mode(root):
        rt = capture(root, inputs, config, keep_inputs=True)
        if len(rt.records) != 1:
            reasons = "; ".join(r.graph_break_reason or "?" for r in rt.records if r.graph_break_reason)
            raise ValueError(
                f"export_onnx needs the forward as one graph, Dynamo captured {len(rt.records)} "
                f"(graph breaks: {reasons}); remove the breaks (see `gnmr-fx inspect`)"
            )
        names = list(rt.controller.names)
        high = _resolve_plan(plan, names, live)
        if high is None:
            high = dict(zip(names, rt.controller.plan.tolist()))
        fmt = get_recipe(config.recipe).onnx
        need = _EXPORTER_MIN_OPSET
        if not all(high.values()):
            if fmt not in QDQ:
                raise ValueError(unsupported_message(config.recipe))
            if opset is not None and opset < MIN_OPSET[fmt]:
                raise ValueError(f"opset {opset} cannot express recipe {config.recipe!r} ({fmt}); "
                                 f"use opset >= {max(need, MIN_OPSET[fmt])}")
            need = max(need, MIN_OPSET[fmt])
        if opset is None:
            opset = need
        if opset < need:
            raise ValueError(f"opset {opset} is below {need}, the lowest that torch.onnx.export(dynamo=True) writes")
        record = rt.records[0]
        gm = torch.fx.GraphModule(record.rewritten, copy.deepcopy(record.rewritten.graph))
        freeze_plan(gm, high)
        wrapper = _FrozenModel(root, gm, _bindings(record, root, inputs)).eval()
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, inputs, dynamo=True, opset_version=opset, verbose=False,
                custom_translation_table=onnx_translations(),
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
            )
        program.save(str(path))
    return OnnxExport(
        path=str(path), opset=opset, recipe=config.recipe,
        plan={n: "high" if high[n] else "low" for n in names},
        excluded=[u.name for u in rt.units if not u.included],
    )


# --------------------------------------------------------------------------
# python -m gnmr_fx.tools.export SPEC OUT.onnx: export, then check with onnxruntime
# --------------------------------------------------------------------------


def _copy_without_gnmr(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the user's modules without their GNMR attachments.

    The runtime (graphs, controller) and its views are left out of the copy
    through deepcopy's memo, so the copy can be compiled with a fresh one.
    """
    memo: dict = {}
    for m in model.modules():
        for k, v in m.__dict__.items():
            if k.startswith("_gnmr"):
                memo[id(v)] = None
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        for k in [k for k in m.__dict__ if k.startswith("_gnmr")]:
            del m.__dict__[k]
    return clone


def ort_session_options(export: OnnxExport) -> Any:
    """onnxruntime session options that load ``export`` and run the plan's numerics.

    * fp8: onnxruntime's extended graph optimizations fuse DequantizeLinear
      -> MatMul into MatMulIntegerToFloat even for float8 inputs, which that
      kernel rejects (INVALID_GRAPH at load): fp8 exports load with basic
      optimizations.
    * int8: the extended optimizations turn each constant int8 weight's
      DequantizeLinear -> MatMul into a ``MatMulNBits`` kernel, which at its
      default accuracy level (4) quantizes the *activation* once more, to
      int8 with its own block scales: 46 dB from the plan's numerics on
      TinyGPT instead of 140 dB. Accuracy level 1 (fp32 compute) keeps the
      kernel and the recipe's numerics; level 4 is a deployment choice that
      adds its own rounding.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if export.low_units and get_recipe(export.recipe).onnx == "fp8_e4m3":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return opts


def verify_with_onnxruntime(export: OnnxExport, model: torch.nn.Module, example_inputs: Sequence,
                            config: GNMRConfig) -> dict:
    """Run the file in onnxruntime and compare with the GNMR model (eager
    backend) under the same plan. Returns op counts and error figures."""
    import collections

    import onnx
    import onnxruntime as ort

    from gnmr_fx.api import compile as gnmr_compile
    from gnmr_fx.backends.recipes import sqnr
    from gnmr_fx.runtime import runtime_of

    sess = ort.InferenceSession(export.path, ort_session_options(export), providers=["CPUExecutionProvider"])
    feed = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), example_inputs)}
    got = torch.from_numpy(sess.run(None, feed)[0])
    ref_model = _copy_without_gnmr(unwrap(model))
    with _eval_mode(ref_model):
        cm = gnmr_compile(ref_model, config, backend="eager")
        rt = runtime_of(cm)
        with torch.no_grad():
            # Compile the no-grad graph first: the plan is set on existing
            # graphs, and a graph compiled later starts from the initial
            # host-side plan until the next step publishes one.
            cm(*example_inputs)
            rt.set_plan(torch.tensor([export.plan[n] == "high" for n in rt.controller.names]))
            ref = cm(*example_inputs)
    ref = (ref if isinstance(ref, torch.Tensor) else ref[0]).detach().float().cpu()
    ops = collections.Counter(n.op_type for n in onnx.load(export.path).graph.node)
    return {
        "max_abs_err": float((got - ref).abs().max()),
        "sqnr_db": sqnr(ref, got),
        "ops": {k: ops[k] for k in ("QuantizeLinear", "DequantizeLinear", "MatMul", "Gemm")},
    }


def _main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import sys

    from gnmr_fx.tools.examples import load_spec

    p = argparse.ArgumentParser(prog="python -m gnmr_fx.tools.export",
                                description="export a model with a frozen GNMR plan; check it with onnxruntime")
    p.add_argument("spec", metavar="SPEC", help="built-in example (tiny_gpt, hf_gpt2) or package.module:factory")
    p.add_argument("out", metavar="OUT.onnx")
    p.add_argument("--recipe", default="int8")
    p.add_argument("--high", nargs="*", default=[], metavar="UNIT", help="units on the high path (others low)")
    p.add_argument("--all-high", action="store_true")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--device", default="cpu", help="where the model and the PyTorch reference run (e.g. cuda)")
    a = p.parse_args(argv)
    try:
        model, inputs = load_spec(a.spec, a.device)
        cfg = GNMRConfig(recipe=a.recipe)
        plan: PlanLike = "high" if a.all_high else {u: True for u in a.high}
        ex = export_onnx(model, inputs, a.out, plan, config=cfg, opset=a.opset)
    except ValueError as e:
        print(f"export_onnx: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {ex.path} (opset {ex.opset}, recipe {ex.recipe}, model on {a.device}): "
          f"{len(ex.low_units)} units low, {len(ex.high_units)} high"
          f"{' ' + str(ex.high_units) if 0 < len(ex.high_units) <= 4 else ''}")
    v = verify_with_onnxruntime(ex, model, inputs, cfg)
    print(f"onnxruntime vs PyTorch (GNMR, same plan): max abs err {v['max_abs_err']:.3g}, "
          f"SQNR {v['sqnr_db']:.1f} dB; ops {v['ops']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
