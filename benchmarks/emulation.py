"""``gnmr-fx bench emulation``: what GNMR costs on an emulated recipe, against the models without it.

A TinyGPT (default 4 layers x 256, context 128, batch 8, AdamW, Inductor)
trains in these arms, interleaved round by round in one process so their
ratios hold on a noisy machine:

* ``plain``: ``torch.compile(model)``, no quantization;
* ``fake_quant``: the plain model with the recipe applied by hand (every
  linear and matmul through ``backends.paths.low_path``: :class:`FakeQuantGPT`),
  ``torch.compile``: what an always-low model costs without GNMR;
* ``high`` / ``low``: ``gnmr_fx.compile`` with ``policy="always_high"`` /
  ``"always_low"``, ``dispatch="host"`` and ``low_graph=False`` (one compiled
  model, its dual-path ``cond`` graph; the policy is switched with
  ``GNMRRuntime.reset_controller``, which recompiles nothing);
* ``high_select`` / ``low_select``: the same with ``dispatch="select"``
  (both branches and a ``torch.where``: the cost before issue 13);
* on request, ``low_graph`` (``GNMRConfig.low_graph=True``: the all-low copy,
  what the default makes under Inductor) and ``low_cc`` / ``low_graph_cc``
  (with ``compile_controller=True``).

Each GNMR arm is compared with the model that computes the same thing
without GNMR: ``high*`` with ``plain``, ``low*`` with ``fake_quant``. Per arm:
the median step (forward, backward, ``opt.step()`` with GNMR's update,
``zero_grad``), the ratio, compile time and graphs compiled after warm-up.
Prints a table and writes JSON (``--out``) and, with ``--md``, a markdown
table. ``--check`` exits 1 when a ratio misses ``--limit``.

    gnmr-fx bench emulation --out emulation.json                       # the CPU case of issue 13
    gnmr-fx bench emulation --device cuda --recipes mxfp4,nvfp4 --layers 12 --embd 1024 \\
        --context 1024 --batch 16 --autocast bf16 --limit 1.1           # the H200 case
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import gnmr_fx
from gnmr_fx.backends.paths import low_path
from gnmr_fx.models import GPTConfig, TinyGPT
from gnmr_fx.runtime import GNMRRuntime

ARMS = ("plain", "fake_quant", "high", "low", "high_select", "low_select", "low_graph", "low_cc", "low_graph_cc")
# Some arms only on request: low_graph (GNMRConfig.low_graph=True; under Inductor the default
# low_graph=None makes the same copy, the "low" / "high" arms set False to measure the cond
# graph) and the *_cc arms (GNMRConfig.compile_controller, off by default).
DEFAULT_ARMS = tuple(a for a in ARMS if a != "low_graph" and not a.endswith("_cc"))
# Arm -> (GNMR policy, dispatch, GNMRConfig.low_graph, GNMRConfig.compile_controller); the other
# arms are models without GNMR.
GNMR_ARMS = {"high": ("always_high", "host", False, False), "low": ("always_low", "host", False, False),
             "high_select": ("always_high", "select", False, False),
             "low_select": ("always_low", "select", False, False),
             "low_graph": ("always_low", "host", True, False),
             "low_cc": ("always_low", "host", False, True),
             "low_graph_cc": ("always_low", "host", True, True)}
# Arm -> the arm that computes the same numbers without GNMR (the ratio's denominator).
REFERENCE = {"fake_quant": "plain", "high": "plain", "low": "fake_quant", "high_select": "plain",
             "low_select": "fake_quant", "low_graph": "fake_quant", "low_cc": "fake_quant",
             "low_graph_cc": "fake_quant"}


# ---------------------------------------------------------------------------
# The always-low reference: TinyGPT with the recipe applied by hand
# ---------------------------------------------------------------------------


class FakeQuantGPT(nn.Module):
    """``TinyGPT``'s forward with every linear and matmul through ``low_path``.

    What a user who fake-quantizes by hand would train, and what GNMR's
    ``always_low`` computes (the same ops on the same tensors).
    """

    def __init__(self, gpt: TinyGPT, recipe: str) -> None:
        super().__init__()
        self.gpt = gpt
        self.recipe = recipe

    def _linear(self, x: torch.Tensor, mod: nn.Linear) -> torch.Tensor:
        return low_path("linear", x, mod.weight, mod.bias, recipe=self.recipe, a_index=0, b_index=1, b_kdim=-1,
                        b_is_weight=True)

    def _matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return low_path("matmul", a, b, recipe=self.recipe, a_index=0, b_index=1, b_kdim=-2, b_is_weight=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        g = self.gpt
        t = idx.shape[1]
        x = g.tok(idx) + g.pos(torch.arange(t, device=idx.device))
        for blk in g.blocks:
            a = blk.attn
            h = blk.ln1(x)
            b, _, c = h.shape
            q, k, v = self._linear(h, a.qkv).split(c, dim=2)
            q, k, v = (z.view(b, t, a.n_head, c // a.n_head).transpose(1, 2) for z in (q, k, v))
            att = self._matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(~a.mask[:, :, :t, :t], float("-inf")).softmax(dim=-1)
            y = self._matmul(att, v)
            x = x + self._linear(y.transpose(1, 2).reshape(b, t, c), a.proj)
            x = x + self._linear(F.gelu(self._linear(blk.ln2(x), blk.fc)), blk.out)
        logits = self._linear(g.ln_f(x), g.head)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


# ---------------------------------------------------------------------------
# Arms
# ---------------------------------------------------------------------------


@dataclass
class Arm:
    name: str
    recipe: Optional[str]
    step: Callable[[], None]
    before: Callable[[], None] = lambda: None
    step_ms: list = field(default_factory=list)
    compile_s: float = 0.0
    recompiles: int = 0


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def build_arms(args: argparse.Namespace, device: torch.device) -> list[Arm]:
    """One model (and AdamW) per compiled graph; GNMR arms of one dispatch share theirs."""
    cfg = GPTConfig(block_size=args.context, n_layer=args.layers, n_head=args.heads, n_embd=args.embd)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.context), generator=gen).to(device)
    tgt = torch.roll(idx, -1, dims=1)
    autocast = args.autocast == "bf16"

    def trainer(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(idx, tgt)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def fresh() -> TinyGPT:
        torch.manual_seed(0)
        return TinyGPT(cfg).to(device)

    def adamw(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-4)

    arms: list[Arm] = []
    if "plain" in args.arms:
        model = fresh()
        arms.append(Arm("plain", None, trainer(torch.compile(model, backend=args.backend), adamw(model))))
    gnmr_models: dict = {}
    for recipe in args.recipes:
        if "fake_quant" in args.arms:
            model = FakeQuantGPT(fresh(), recipe)
            arms.append(Arm("fake_quant", recipe, trainer(torch.compile(model, backend=args.backend), adamw(model))))
        for name in (a for a in ARMS if a in GNMR_ARMS and a in args.arms):
            policy, dispatch, low_graph, compiled = GNMR_ARMS[name]
            key = (recipe, dispatch, low_graph, compiled)
            if key not in gnmr_models:
                model = fresh()
                opt = adamw(model)
                config = gnmr_fx.GNMRConfig(recipe=recipe, policy=policy, dispatch=dispatch, emulate=True,
                                            low_graph=low_graph, compile_controller=compiled)
                cm = gnmr_fx.compile(model, config, backend=args.backend, optimizer=opt)
                gnmr_models[key] = (gnmr_fx.runtime(cm), trainer(cm, opt))
            rt, step = gnmr_models[key]
            arms.append(Arm(name, recipe, step, before=_policy_setter(rt, policy)))
    return arms


def _policy_setter(rt: GNMRRuntime, policy: str) -> Callable[[], None]:
    def apply() -> None:
        if rt.config.policy != policy:
            rt.reset_controller(rt.config.replace(policy=policy))  # writes the plan; compiles nothing
    return apply


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def measure(arms: list[Arm], args: argparse.Namespace, device: torch.device) -> None:
    """Compile and warm up each arm, then time ``rounds`` x ``steps`` steps per arm, interleaved."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for arm in arms:
        arm.before()
        sync()
        t0 = time.perf_counter()
        arm.step()
        sync()
        arm.compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            arm.step()
        sync()
        # Progress as it happens: a call cut by its timeout still shows where the time went.
        print(f"{arm.name} ({arm.recipe or 'none'}): first step (compile) {arm.compile_s:.1f} s, "
              f"warmed up after {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    for _ in range(args.rounds):
        for arm in arms:
            arm.before()
            g0 = _graph_count()
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                arm.step()
                sync()
                arm.step_ms.append(1e3 * (time.perf_counter() - t0))
            arm.recompiles += _graph_count() - g0


def profile_arms(arms: list[Arm], device: torch.device, rows: int = 12) -> dict:
    """One profiled step per arm (``torch.profiler``): where a step's time goes.

    Per arm: the step's wall time (under the profiler, whose overhead it
    includes: compare arms, not with the timed medians), the ATen ops the host dispatched (``aten_ops``:
    what each step costs in launches and dispatcher work whatever the device),
    and on a GPU the device kernels (``kernels``), their summed time
    (``device_ms``) and ``busy`` = device_ms / wall_ms: well under 1 means the
    step waits on the host (launches, Python, the dispatcher), not on the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {}
    for arm in arms:
        arm.before()
        arm.step()
        sync()
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            arm.step()
            sync()
            wall = 1e3 * (time.perf_counter() - t0)
        ka = prof.key_averages()
        aten = sum(e.count for e in ka if e.key.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU)
        rec = {"wall_ms": round(wall, 3), "aten_ops": int(aten)}
        if cuda:
            dev = [e for e in ka if e.device_type == torch.autograd.DeviceType.CUDA]
            rec["device_ms"] = round(sum(e.self_device_time_total for e in dev) / 1e3, 3)
            rec["kernels"] = int(sum(e.count for e in dev))
            rec["busy"] = round(rec["device_ms"] / wall, 3) if wall > 0 else None
            # Every kernel of the step (device ms, count): what benchmarks/profile_diff.py groups.
            rec["per_kernel_ms"] = {e.key: (round(e.self_device_time_total / 1e3, 4), int(e.count)) for e in dev}
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        rec["table"] = ka.table(sort_by=sort, row_limit=rows, max_name_column_width=60)
        key = arm.name if arm.recipe is None else f"{arm.name}:{arm.recipe}"
        out[key] = rec
        print(f"\n=== profile {key}: " + ", ".join(f"{k} {v}" for k, v in rec.items() if k != "table")
              + f" ===\n{rec['table']}", file=sys.stderr)
    return out


def rows_of(arms: list[Arm]) -> list[dict]:
    med = {(a.name, a.recipe): statistics.median(a.step_ms) for a in arms}
    rows = []
    for a in arms:
        ms = med[a.name, a.recipe]
        ref = REFERENCE.get(a.name)
        ref_ms = med.get((ref, None if ref == "plain" else a.recipe)) if ref else None
        rows.append({
            "arm": a.name, "recipe": a.recipe, "step_ms": ms, "step_ms_min": min(a.step_ms),
            "n_steps": len(a.step_ms), "vs": ref, "ratio": ms / ref_ms if ref_ms else None,
            "compile_s": a.compile_s - ms / 1e3, "recompiles": a.recompiles,
            "step_ms_all": [round(t, 3) for t in a.step_ms],
        })
    return rows


def targets_of(rows: list[dict], limit: float) -> list[dict]:
    """The issue's targets: each host-dispatch GNMR arm within ``limit`` of its reference."""
    return [{"arm": r["arm"], "recipe": r["recipe"], "vs": r["vs"], "ratio": r["ratio"], "limit": limit,
             "met": r["ratio"] <= limit}
            for r in rows if r["arm"] in ("high", "low") and r["ratio"] is not None]


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    from gnmr_fx.arguments import output_file, parse_device, positive_float, positive_int

    p.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                   help=f"comma list of arms (default {','.join(DEFAULT_ARMS)}; also: low_graph, low_cc, low_graph_cc)")
    p.add_argument("--recipes", default="int8", help="comma list of emulated recipes (default int8)")
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--embd", type=positive_int, default=256)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--context", type=positive_int, default=128)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per arm per round")
    p.add_argument("--rounds", type=positive_int, default=6, help="rounds of interleaved arms")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm after the compiling one")
    p.add_argument("--backend", choices=("inductor", "aot_eager", "eager"), default="inductor")
    p.add_argument("--device", type=parse_device, default="cpu")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none", help="bf16 autocast around forward")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads (torch.set_num_threads; default torch's): 1 keeps a shared machine's "
                        "other jobs from stalling every parallel region")
    p.add_argument("--limit", type=positive_float, default=1.2, help="target ratio for --check (default 1.2)")
    p.add_argument("--check", action="store_true", help="exit 1 when a high/low arm misses --limit")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one step per arm: ATen ops dispatched, and on a GPU kernels, "
                        "device time and how busy the device was")
    p.add_argument("--out", type=output_file, default="emulation.json", help="JSON results")
    p.add_argument("--md", type=output_file, default=None, help="also write a markdown table here")


def run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from gnmr_fx.arguments import InputError
    from gnmr_fx.backends.recipes import get_recipe

    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        raise InputError(f"--arms: unknown arm(s) {bad}; choose from {list(ARMS)}")
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for r in args.recipes:
        try:
            get_recipe(r)
        except ValueError as e:
            raise InputError(f"--recipes: {e}") from None
    if args.embd % args.heads:
        raise InputError(f"--embd {args.embd} must be a multiple of --heads {args.heads}")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch._dynamo.reset()
    arms = build_arms(args, device)
    measure(arms, args, device)
    profiles = profile_arms(arms, device) if args.profile else None
    rows = rows_of(arms)
    targets = targets_of(rows, args.limit)
    head = ["arm", "recipe", "step_ms", "step_ms_min", "vs", "ratio", "compile_s", "recompiles", "n_steps"]
    table = tabulate([[r[h] for h in head] for r in rows], headers=head, floatfmt=".3g")
    print(table)
    for t in targets:
        print(f"target: {t['arm']} ({t['recipe']}) / {t['vs']} = {t['ratio']:.2f} "
              f"{'<=' if t['met'] else '>'} {t['limit']:g}: {'met' if t['met'] else 'MISSED'}")
    result = {
        "benchmark": "emulation", "command": _command(args), "environment": _environment(device),
        "model": {"layers": args.layers, "embd": args.embd, "heads": args.heads, "context": args.context,
                  "batch": args.batch, "autocast": args.autocast},
        "backend": args.backend, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
        "rows": rows, "targets": targets,
    }
    if profiles is not None:
        result["profiles"] = profiles
        cols = ["wall_ms", "aten_ops"] + (["device_ms", "kernels", "busy"] if device.type == "cuda" else [])
        print(tabulate([[k] + [v.get(c) for c in cols] for k, v in profiles.items()], headers=["arm"] + cols))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    if args.md:
        env = result["environment"]
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(f"- machine: {env['machine']}, torch {env['torch']}, {env['threads']} threads\n"
                    f"- date (UTC): {env['date']}\n- command: `{result['command']}`\n\n"
                    + tabulate([[r[h] for h in head] for r in rows], headers=head, tablefmt="github",
                               floatfmt=".3g") + "\n")
            if profiles is not None:
                f.write("\nOne profiled step per arm (`--profile`):\n\n"
                        + tabulate([[k] + [v.get(c) for c in cols] for k, v in profiles.items()],
                                   headers=["arm"] + cols, tablefmt="github") + "\n")
    return 1 if args.check and not all(t["met"] for t in targets) else 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (from the parsed arguments)."""
    return (f"gnmr-fx bench emulation --arms {','.join(args.arms)} --recipes {','.join(args.recipes)} "
            f"--layers {args.layers} --embd {args.embd} --heads {args.heads} --context {args.context} "
            f"--batch {args.batch} --steps {args.steps} --rounds {args.rounds} --warmup {args.warmup} "
            f"--backend {args.backend} --device {args.device} --autocast {args.autocast}"
            + (f" --threads {args.threads}" if args.threads is not None else "")
            + (" --profile" if args.profile else ""))


def _environment(device: torch.device) -> dict:
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"machine": machine, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
