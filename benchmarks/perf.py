"""``gnmr-fx bench perf``: training throughput of bf16, plain low precision (FP8 or INT8), the same + GNMR, and torchao.

A Llama-style decoder (RMSNorm, RoPE, causal SDPA, SwiGLU; built from
:class:`LlamaSpec`, random init, synthetic tokens) trains with AdamW at a few
sizes. All arms share the same parameters and optimizer and run interleaved
in one process, round by round, so their ratios hold on a noisy machine:

* ``bf16``: ``torch.compile(model)``;
* ``lowp``: plain low precision, the same real recipe (``--recipe``: fp8
  tensorwise / rowwise, or int8 rowwise) with no GNMR (every ``nn.Linear``
  swapped to ``real_kernels.LowpLinear``), ``torch.compile``;
* ``gnmr`` / ``pin@5%`` / ``pin@10%``: ``gnmr_fx.compile`` with real kernels
  (host dispatch): every unit on the low path / the largest units that fit
  in 5% / 10% of the FLOPs pinned on the high path (``GNMRRuntime.pin``; one
  compiled model, only the plan changes);
* ``torchao``: ``torchao.float8.convert_to_float8_training`` (tensorwise),
  when torchao imports.

Per arm: tokens/s (median over timed steps, each timed with device events),
ratio to bf16 and to plain FP8, peak memory, compile time (first step minus a
median step) and graphs compiled after the first step (recompiles). Prints a
tabulate table and writes JSON (``--out``) and a markdown table (``--md``).

    gnmr-fx bench perf --sizes 1b,8b --out perf.json --md perf.md
    gnmr-fx bench perf --model hf-llama --sizes 1b --arms bf16,lowp,gnmr,pin@10%,torchao
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ARMS = ("bf16", "lowp", "gnmr", "pin@5%", "pin@10%", "torchao", "torchao_int8")
# torchao_int8 (not a default arm): torchao's int8 mixed-precision training
# (torchao.prototype.quantized_training, row-wise int8 in all three GEMMs), the
# reference for the int8_rowwise recipe. Its weights become new parameters
# (a tensor subclass), so the arm has its own AdamW over its own parameters.
DEFAULT_ARMS = tuple(a for a in ARMS if a != "torchao_int8")
# Diagnostics (not run by default): gnmr without the per-step plan copy to
# the host (``nosync``), without the runtime step at all (``nostep``), or
# with the plan copied one step late (``lag``, GNMRConfig.plan_lag=1), or
# with the step's host copy waited for at the step (``drain``: the behaviour
# before the copy was deferred to the next forward), or with the controller's
# rule compiled (``compiled``: GNMRConfig.compile_controller=True). ``gnmr_lowg``
# and ``gnmr_dual`` are GNMR compiled a second time (their own model and
# runtime on the shared parameters) with GNMRConfig(low_graph=True) /
# (low_graph=False): no unit high, so every step runs the all-low copy of the
# graph (whose units are the plain recipe's GEMMs; under Inductor the default
# ``gnmr`` arm does too, since session 27) / the dual-path graph (the default
# before session 27).
DIAGNOSTIC_ARMS = ("gnmr_nosync", "gnmr_nostep", "gnmr_lag", "gnmr_drain", "gnmr_compiled", "gnmr_lowg", "gnmr_dual")
# The arms compiled on their own, and their GNMRConfig.low_graph.
SEPARATE_GNMR = {"gnmr_lowg": True, "gnmr_dual": False}
# The share of the FLOPs each GNMR arm pins on the high path (budget max_o as a fraction).
GNMR_HIGH_FRACTION = {"gnmr": 0.0, "pin@5%": 0.05, "pin@10%": 0.10, "gnmr_nosync": 0.0, "gnmr_nostep": 0.0,
                      "gnmr_lag": 0.0, "gnmr_drain": 0.0, "gnmr_compiled": 0.0, "gnmr_lowg": 0.0, "gnmr_dual": 0.0}


@dataclass(frozen=True)
class LlamaSpec:
    """Shape of the benchmark decoder (Llama layer geometry, fewer layers)."""

    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int = 32000
    seq: int = 2048
    batch: int = 1

    @property
    def tokens(self) -> int:
        return self.seq * self.batch


SIZES = {
    "tiny": LlamaSpec(hidden=64, intermediate=176, heads=4, layers=2, vocab=256, seq=64, batch=2),
    "1b": LlamaSpec(hidden=2048, intermediate=5632, heads=16, layers=4, seq=2048, batch=8),
    "8b": LlamaSpec(hidden=4096, intermediate=14336, heads=32, layers=2, seq=2048, batch=4),
    "70b": LlamaSpec(hidden=8192, intermediate=28672, heads=64, layers=1, seq=2048, batch=4),
}


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, s: LlamaSpec) -> None:
        super().__init__()
        self.heads = s.heads
        self.q_proj = nn.Linear(s.hidden, s.hidden, bias=False)
        self.k_proj = nn.Linear(s.hidden, s.hidden, bias=False)
        self.v_proj = nn.Linear(s.hidden, s.hidden, bias=False)
        self.o_proj = nn.Linear(s.hidden, s.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        shape = (b, t, self.heads, c // self.heads)
        q = _rope(self.q_proj(x).view(shape).transpose(1, 2), cos, sin)
        k = _rope(self.k_proj(x).view(shape).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, s: LlamaSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, s: LlamaSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden)
        self.mlp = MLP(s)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """A compact Llama-style decoder; ``forward(idx, targets)`` returns the loss."""

    def __init__(self, s: LlamaSpec) -> None:
        super().__init__()
        self.spec = s
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList([Layer(s) for _ in range(s.layers)])
        self.norm = RMSNorm(s.hidden)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)
        hd = s.hidden // s.heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(s.seq).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


class HFLlama(nn.Module):
    """``transformers.LlamaForCausalLM`` built from config (random init, sdpa
    attention), with the benchmark's ``forward(idx, targets)`` -> loss: the
    model class users train, beside the built-in :class:`Llama`."""

    def __init__(self, s: LlamaSpec) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                          num_attention_heads=s.heads, num_key_value_heads=s.heads, vocab_size=s.vocab,
                          max_position_embeddings=s.seq, tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"
        self.spec = s
        self.model = LlamaForCausalLM(cfg)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=idx, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


MODELS = {"llama": Llama, "hf-llama": HFLlama}
# Units of the HF model: the decoder layers' linears; lm_head stays bf16 in
# every arm (as in the measurement of LlamaForCausalLM).
HF_UNITS = ["model.model.layers.*"]


def _converted(model_kind: str, name: str, mod: nn.Module) -> bool:
    """Whether a linear runs in low precision in the lowp / torchao arms."""
    return _aligned(mod) and (model_kind != "hf-llama" or not name.endswith("lm_head"))


def llama_flops_per_token(s: LlamaSpec) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention (causal, fwd+bwd)."""
    per_layer = 4 * s.hidden * s.hidden + 3 * s.hidden * s.intermediate
    mm_params = s.layers * per_layer + s.hidden * s.vocab
    attn = s.layers * 6 * s.seq * s.hidden  # 12 * L * seq * hidden / 2 for causal
    return 6.0 * mm_params + attn


# ---------------------------------------------------------------------------
# Arms
# ---------------------------------------------------------------------------


def _shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its parameters (not buffers)."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _aligned(mod: nn.Module) -> bool:
    return mod.in_features % 16 == 0 and mod.out_features % 16 == 0


@dataclass
class Arm:
    name: str
    model: Callable
    before: Callable[[], None] = lambda: None  # set the plan (GNMR arms)
    note: str = ""
    compile_s: float = float("nan")
    graphs_first: int = 0
    step_ms: list = dataclasses.field(default_factory=list)
    peak_gib: float = 0.0
    recompiles: int = 0
    high_flops: float = 0.0
    runtime: Any = None  # the GNMR arms' runtime
    opt: Any = None  # the arm's own optimizer (None: the shared one)
    low_graph_calls: int = 0  # timed calls of an all-low graph copy (GNMRConfig.low_graph)


def build_arms(base: nn.Module, names: list[str], recipe: str, backend: str, device: torch.device,
               model_kind: str = "llama") -> tuple[list[Arm], dict]:
    import gnmr_fx
    from gnmr_fx.backends import real_kernels

    info: dict = {}
    arms: list[Arm] = []
    compile_kw = {} if backend == "inductor" else {"backend": backend}
    if "bf16" in names:
        arms.append(Arm("bf16", torch.compile(base, **compile_kw)))
    if "lowp" in names:
        m = real_kernels.convert_to_lowp(_shared_copy(base), recipe, lambda n, mod: _converted(model_kind, n, mod))
        arms.append(Arm("lowp", torch.compile(m, **compile_kw)))
    cfg = _gnmr_config(recipe, device)
    if model_kind == "hf-llama":
        cfg = cfg.replace(unit_filter=HF_UNITS)
    gnmr_names = [n for n in names if n in GNMR_HIGH_FRACTION and n not in SEPARATE_GNMR]
    if gnmr_names:
        gm = gnmr_fx.compile(_shared_copy(base), cfg, backend=backend)
        rt = gnmr_fx.runtime(gm)
        for n in gnmr_names:
            arms.append(Arm(n, gm, before=_plan_setter(rt, GNMR_HIGH_FRACTION[n], n), runtime=rt))
        info["gnmr_runtime"] = rt
    for name, low_graph in SEPARATE_GNMR.items():
        if name in names:
            gm = gnmr_fx.compile(_shared_copy(base), cfg.replace(low_graph=low_graph), backend=backend)
            rt = gnmr_fx.runtime(gm)
            arms.append(Arm(name, gm, before=_plan_setter(rt, 0.0, name), runtime=rt))
            info.setdefault("gnmr_runtime", rt)
    if "torchao" in names:
        try:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        except ImportError as e:  # an optional arm: say so in the table
            info["torchao"] = f"not run: {e}"
        else:
            import torchao

            m = _shared_copy(base)
            convert_to_float8_training(m, config=Float8LinearConfig.from_recipe_name("tensorwise"),
                                       module_filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear)
                                       and _converted(model_kind, fqn, mod))
            shared = {id(p) for p in base.parameters()}
            info["torchao"] = f"torchao {torchao.__version__}, shares params: {all(id(p) in shared for p in m.parameters())}"
            arms.append(Arm("torchao", torch.compile(m, **compile_kw)))
    if "torchao_int8" in names:
        try:
            from torchao import quantize_
            from torchao.prototype.quantized_training import int8_mixed_precision_training
        except ImportError as e:
            info["torchao_int8"] = f"not run: {e}"
        else:
            m = _shared_copy(base)
            quantize_(m, int8_mixed_precision_training(),
                      filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and _converted(model_kind, fqn, mod))
            own = torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True)
            shared = {id(p) for p in base.parameters()}
            info["torchao_int8"] = (f"torchao int8_mixed_precision_training, "
                                    f"{sum(id(p) not in shared for p in m.parameters())} parameters of its own")
            arms.append(Arm("torchao_int8", torch.compile(m, **compile_kw), opt=own))
    return arms, info


def _gnmr_config(recipe: str, device: torch.device) -> Any:
    from gnmr_fx.config import GNMRConfig

    # max_o caps what the controller may choose; the pin@5% / pin@10% arms pin
    # units directly, so the cap is the larger of the two. The thresholds are
    # out of reach so that gnmr puts no unit on the high path: the arms share one
    # model that all of them train, and a trigger would put units on the
    # high path in the middle of a timed arm. The controller still runs its
    # full update every step, so its cost is measured.
    kw = dict(recipe=recipe, max_o=0.1, threshold=1e30, delta_threshold=1e30)
    # On a GPU demand the real kernels: a silent fall back to emulation would
    # time the wrong thing.
    return GNMRConfig(emulate=False if device.type == "cuda" else None, **kw)


def _plan_setter(rt: Any, fraction: float, arm: str) -> Callable[[], None]:
    """Pin the largest units whose FLOPs fit in ``fraction`` of the total on
    the high path (the budget fully used), or unpin all (fraction 0)."""

    def apply() -> None:
        # Diagnostic arms switch parts of the per-step work off; others restore it.
        rt.configure_step(update=arm != "gnmr_nostep", host_copy=arm != "gnmr_nosync")
        compiled = arm == "gnmr_compiled"
        if rt.config.compile_controller != compiled:
            # A fresh controller with the rule eager or compiled (its state is
            # nothing to keep: the thresholds are out of reach); first, since
            # a reset re-applies the config's plan_lag.
            rt.reset_controller(rt.config.replace(compile_controller=compiled))
        rt.set_plan_lag(1 if arm == "gnmr_lag" else 0)
        rt.before_forward()  # a copy pending from the arm before lands now
        rt.defer_host_copy = arm != "gnmr_drain"
        ctl = rt.controller
        if ctl.num_units == 0:  # not compiled yet: the first step discovers the units
            return
        costs = ctl.costs.detach().cpu()
        high = torch.zeros(ctl.num_units, dtype=torch.bool)
        cap, used = fraction * float(costs.sum()), 0.0
        for i in torch.argsort(costs, descending=True).tolist():
            if used + float(costs[i]) <= cap * (1 + 1e-6):
                high[i] = True
                used += float(costs[i])
        rt.pin(high)  # held high through every controller update; unpinning returns them

    return apply


def _low_graph_calls() -> int:
    from torch._dynamo.utils import counters

    return int(counters["gnmr"]["low_graph_calls"])


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_size(name: str, s: LlamaSpec, args: argparse.Namespace, device: torch.device) -> tuple[list[dict], dict]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = MODELS[args.model](s).to(device=device, dtype=dtype)
    if args.model == "llama":
        base.cos, base.sin = base.cos.float(), base.sin.float()
    opt = torch.optim.AdamW(base.parameters(), lr=1e-5, foreach=True)
    arms, info = build_arms(base, args.arms, args.recipe, args.backend, device, args.model)
    idx = torch.randint(0, s.vocab, (s.batch, s.seq), device=device)
    tgt = torch.randint(0, s.vocab, (s.batch, s.seq), device=device)
    cuda = device.type == "cuda"

    def step(arm: Arm) -> None:
        loss = arm.model(idx, tgt)
        loss.backward()
        o = arm.opt or opt
        o.step()
        o.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # Compile (first step) and warm up every arm.
    for arm in arms:
        arm.before()
        g0 = _graph_count()
        sync()
        t0 = time.perf_counter()
        step(arm)
        sync()
        arm.compile_s = time.perf_counter() - t0
        arm.graphs_first = _graph_count() - g0
        for _ in range(args.warmup):
            step(arm)
        sync()
    g_after_warm = _graph_count()

    # Timed rounds, arms interleaved.
    for _ in range(args.rounds):
        for arm in arms:
            arm.before()
            g0, l0 = _graph_count(), _low_graph_calls()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(args.steps)]
                for a, b in ev:
                    a.record()
                    step(arm)
                    b.record()
                torch.cuda.synchronize()
                arm.step_ms += [a.elapsed_time(b) for a, b in ev]
                arm.peak_gib = max(arm.peak_gib, torch.cuda.max_memory_allocated() / 2**30)
            else:
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step(arm)
                    arm.step_ms.append(1e3 * (time.perf_counter() - t0))
            arm.recompiles += _graph_count() - g0
            arm.low_graph_calls += _low_graph_calls() - l0
            if arm.runtime is not None:
                ctl = arm.runtime.controller
                arm.high_flops = float((ctl.costs * ctl.plan).sum() / ctl.costs.sum())
    rows = _rows(name, s, arms)
    extra = {k: v for k, v in info.items() if k != "gnmr_runtime"}
    extra["graphs_compiled_after_warmup"] = _graph_count() - g_after_warm
    if "gnmr_runtime" in info:
        rt = info["gnmr_runtime"]
        kernels: dict = {}
        for r in rt.records:
            for site in r.sites:
                if site.slot is None:  # left out by the unit filter: not a unit
                    continue
                k = site.extra.get("kernel", "emulated")
                kernels[k] = kernels.get(k, 0) + 1
        extra["gnmr_units"] = rt.controller.num_units  # units on the controller (the filter applied)
        extra["gnmr_kernels"] = kernels
    if args.profile and cuda:
        extra["profile"] = _profile(arms, step, args.profile_rows)
    del arms, opt, base
    if cuda:
        torch.cuda.empty_cache()
    return rows, extra


def _rows(size: str, s: LlamaSpec, arms: list[Arm]) -> list[dict]:
    med = {a.name: statistics.median(a.step_ms) for a in arms}
    fpt = llama_flops_per_token(s)
    rows = []
    for a in arms:
        ms = med[a.name]
        tps = s.tokens / (ms / 1e3)
        rows.append({
            "size": size, "arm": a.name, "hidden": s.hidden, "layers": s.layers, "seq": s.seq, "batch": s.batch,
            "step_ms": ms, "step_ms_iqr": _iqr(a.step_ms), "tokens_per_s": tps,
            "tflops": tps * fpt / 1e12,
            "vs_bf16": med["bf16"] / ms if "bf16" in med else float("nan"),
            "vs_lowp": med["lowp"] / ms if "lowp" in med else float("nan"),
            "vs_torchao": med["torchao"] / ms if "torchao" in med else float("nan"),
            "vs_torchao_int8": med["torchao_int8"] / ms if "torchao_int8" in med else float("nan"),
            "peak_gib": a.peak_gib,
            "compile_s": a.compile_s - ms / 1e3,
            "graphs": a.graphs_first, "recompiles": a.recompiles,
            "high_flops": a.high_flops, "n_steps": len(a.step_ms), "low_graph_calls": a.low_graph_calls,
        })
    return rows


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def _profile(arms: list[Arm], step: Callable, rows: int) -> dict:
    """Kernel-time summary of one step of each arm (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for arm in arms:
        if arm.name not in ("bf16", "lowp", "gnmr", *SEPARATE_GNMR, "torchao"):
            continue
        arm.before()
        step(arm)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(arm)
            torch.cuda.synchronize()
        ka = prof.key_averages()
        table = ka.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
        kernels = {e.key: [round(e.self_device_time_total / 1e3, 4), e.count] for e in ka
                   if e.device_type == torch.autograd.DeviceType.CUDA}
        dev = sum(v[0] for v in kernels.values())
        n_kernels = sum(v[1] for v in kernels.values())
        out[arm.name] = {"device_ms": dev, "kernels": n_kernels, "table": table, "per_kernel_ms": kernels}
        print(f"\n=== profile {arm.name}: device time {dev:.1f} ms, {n_kernels} device events ===\n{table}")
    return out


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="1b,8b,70b", help=f"comma list of {list(SIZES)}")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma list of {list(ARMS)} (default: all but torchao_int8)".replace("%", "%%"))
    p.add_argument("--model", default="llama", choices=sorted(MODELS),
                   help="llama: the built-in decoder; hf-llama: transformers' LlamaForCausalLM from config "
                        "(lm_head stays bf16 in every arm)")
    p.add_argument("--recipe", default="fp8_e4m3", choices=("fp8_e4m3", "fp8_rowwise", "int8_rowwise"),
                   help="the real recipe of the lowp and GNMR arms (torchao is float8 tensorwise whatever this is)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per arm per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm after compiling")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    p.add_argument("--batch", type=int, default=None, help="override every size's batch")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler summary per arm")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--out", default="perf.json", help="JSON results")
    p.add_argument("--md", default=None, help="also write the table as markdown here")


def run(args: argparse.Namespace) -> int:
    from gnmr_fx.arguments import InputError

    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS + DIAGNOSTIC_ARMS]
    if bad:
        raise InputError(f"--arms: unknown arm(s) {bad}; choose from {list(ARMS + DIAGNOSTIC_ARMS)}")
    sizes = [x.strip() for x in args.sizes.split(",") if x.strip()]
    bad = [x for x in sizes if x not in SIZES]
    if bad:
        raise InputError(f"--sizes: unknown size(s) {bad}; choose from {list(SIZES)}")
    device = torch.device(args.device)
    env = _environment(device)
    env["command"] = _command(args, sizes)
    all_rows, extras = [], {}
    for name in sizes:
        s = SIZES[name]
        if args.batch is not None:
            s = dataclasses.replace(s, batch=args.batch)
        rows, extra = run_size(name, s, args, device)
        all_rows += rows
        extras[name] = extra
        print(_table(rows), flush=True)
    table = _table(all_rows)
    print("\n" + table)
    result = {"environment": env, "rows": all_rows,
              "extras": {k: {kk: vv for kk, vv in v.items() if kk != "profile"} for k, v in extras.items()},
              "profiles": {k: {a: {kk: vv for kk, vv in p.items()} for a, p in v.get("profile", {}).items()}
                           for k, v in extras.items()}}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(_markdown(env, all_rows, extras))
    return 0


def _command(args: argparse.Namespace, sizes: list[str]) -> str:
    """The command line that reproduces this run (from the parsed arguments)."""
    parts = ["gnmr-fx bench perf", f"--model {args.model}", f"--sizes {','.join(sizes)}", f"--arms {','.join(args.arms)}",
             f"--recipe {args.recipe}", f"--steps {args.steps}", f"--rounds {args.rounds}",
             f"--warmup {args.warmup}", f"--device {args.device}", f"--backend {args.backend}"]
    if args.batch is not None:
        parts.append(f"--batch {args.batch}")
    if args.profile:
        parts.append("--profile")
    return " ".join(parts)


_HEAD = ["size", "arm", "step_ms", "tokens_per_s", "tflops", "vs_bf16", "vs_lowp", "vs_torchao", "peak_gib",
         "compile_s", "graphs", "recompiles", "high_flops"]


def _table(rows: list[dict], fmt: str = "simple") -> str:
    from tabulate import tabulate

    head = list(_HEAD)
    if any(r["arm"] == "torchao_int8" for r in rows):
        head.insert(head.index("vs_torchao") + 1, "vs_torchao_int8")
    if any(r["low_graph_calls"] for r in rows):
        head.append("low_graph_calls")
    return tabulate([[r[h] for h in head] for r in rows], headers=head, tablefmt=fmt, floatfmt=".3g")


def _markdown(env: dict, rows: list[dict], extras: dict) -> str:
    lines = [f"- machine: {env['gpu']}, torch {env['torch']}, python {env['python']}",
             f"- date (UTC): {env['date']}",
             f"- command: `{env['command']}`", ""]
    lines.append(_table(rows, "github"))
    lines.append("")
    for k, v in extras.items():
        lines.append(f"- {k}: " + ", ".join(f"{kk}={vv}" for kk, vv in v.items() if kk != "profile"))
    return "\n".join(lines) + "\n"


def _environment(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
