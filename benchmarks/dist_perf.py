"""FSDP2 + real low-precision kernels + GNMR against bf16 and torchao float8, on every GPU of one host.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --standalone --nproc_per_node=2 benchmarks/dist_perf.py --size 8b --out OUT_DIR

The configuration users run (the multi-GPU issue): the torchtitan order for
every arm (compile each decoder layer, ``fully_shard`` each layer, then the
root; FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``
on a GPU; AdamW), on the Llama-geometry decoder of ``gnmr-fx bench perf``
(``--size``: 1b, 8b, 70b; ``tiny`` for a CPU smoke run). Every arm is its
own model from the same initial weights; the arms run interleaved, round by
round, and the step time of an arm is the median over its timed steps of the
slowest rank:

* ``bf16``: each layer ``torch.compile``-d;
* ``torchao``: ``torchao.float8.convert_to_float8_training`` (tensorwise),
  bf16 all-gather;
* ``torchao_fp8ag``: the same with ``enable_fsdp_float8_all_gather=True`` and
  ``precompute_float8_dynamic_scale_for_fsdp`` after each optimizer step;
* ``gnmr``: ``gnmr_fx.distributed.compile_blocks`` with the real recipe
  (``--recipe``; ``GNMRConfig(emulate=False)`` on a GPU: a silent fall back
  to emulation would time the wrong thing), the controller updating every
  step with thresholds out of reach (no unit triggers in a timed arm), one
  ``all_reduce`` of the statistics per step (``gnmr_fx.distributed.enable``);
* ``pin@10%``: the same model with the largest units that fit in 10% of the
  FLOPs pinned on the high path (only the plan changes: no recompile).

Per arm: tokens/s per GPU, ratios to bf16 and to torchao, the arm's peak
memory (its own parameters and optimizer state plus the peak of its steps
above what was allocated before them: the other arms' models are resident
too), and graphs compiled during the timed rounds (recompiles). The
``consistency`` part is ``dist_check.py``'s (identical plans and norms on
every rank across a fault on one rank, equal to one process on the same
global batch). torchao arms that cannot import are reported as not run.
Writes ``OUT_DIR/dist_perf.json`` (after each part) and ``dist_perf.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

import gnmr_fx
import gnmr_fx.distributed
from gnmr_fx.benchmarks.dist_check import _sync, consistency, exit_now, run_to_end, start_run
from gnmr_fx.benchmarks.perf import (SIZES, Llama, _aligned, _gnmr_config, _graph_count, _plan_setter,
                                     llama_flops_per_token)

# NVLink multicast stays off on shared hosts (device notes); set before NCCL starts.
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

ARMS = ("bf16", "torchao", "torchao_fp8ag", "gnmr", "pin@10%")
PIN = {"gnmr": 0.0, "pin@10%": 0.10}


@dataclass
class Arm:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    after_step: Callable[[], None] = lambda: None
    before: Callable[[], None] = lambda: None
    step_ms: list = field(default_factory=list)
    peak_gib: float = 0.0
    recompiles: int = 0
    first_step_s: float = 0.0
    high_flops: float = 0.0  # GNMR arms: share of the units' FLOPs on the high path while timed
    runtime: Any = None  # GNMR arms: the GNMRRuntime (shared by gnmr and pin@10%)


def _state_gib(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """This rank's bytes of the arm's parameters (local shards) and optimizer state."""

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    n = sum(local(p) for p in model.parameters())
    n += sum(local(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    return n / 2**30


def build_arm(name: str, init: dict, s: Any, args: argparse.Namespace, device: torch.device) -> Arm:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = Llama(s)
    model.load_state_dict(init)
    model = model.to(device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()  # gloo on a CPU: fp32
    after: Callable[[], None] = lambda: None
    rt = None
    if name.startswith("torchao"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training, precompute_float8_dynamic_scale_for_fsdp

        fp8ag = name == "torchao_fp8ag"
        convert_to_float8_training(model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=fp8ag),
                                   module_filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and _aligned(mod))
        if fp8ag:
            after = lambda: precompute_float8_dynamic_scale_for_fsdp(model)  # noqa: E731
    if name in PIN:
        cfg = _gnmr_config(args.recipe, device)
        if args.kernels == "real":
            cfg = cfg.replace(emulate=False)  # on a CPU: torch's CPU kernels (the smoke test of this path)
        rt = gnmr_fx.distributed.compile_blocks(model, model.layers, cfg, backend=args.compiler)
    else:
        for layer in model.layers:
            layer.compile(backend=args.compiler)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    arm = Arm(name, model, opt, after)
    if rt is not None:
        rt.attach_optimizer(opt)
        gnmr_fx.distributed.enable(model)
        arm.before = _plan_setter(rt, PIN[name], name)
        arm.runtime = rt
    return arm


def throughput(rank: int, world: int, device: torch.device, args: argparse.Namespace) -> dict:
    torch._dynamo.reset()
    s = SIZES[args.size]
    torch.manual_seed(0)
    init = Llama(s).state_dict()
    arms: list[Arm] = []
    not_run: dict = {}
    # The GNMR arms share one model (only the plan differs), as in bench perf.
    shared: Optional[Arm] = None
    for name in args.arms:
        try:
            if name in PIN and shared is not None:
                arm = Arm(name, shared.model, shared.opt, shared.after_step,
                          _plan_setter(shared.runtime, PIN[name], name), runtime=shared.runtime)
            else:
                arm = build_arm(name, init, s, args, device)
                if name in PIN:
                    shared = arm
        except ImportError as e:  # torchao missing: an optional arm, said so in the table
            not_run[name] = f"not run: {e}"
            continue
        arms.append(arm)
    del init
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.randint(0, s.vocab, (s.batch, s.seq), generator=g).to(device)

    def step(arm: Arm) -> None:
        arm.model(idx, idx).backward()
        arm.opt.step()
        arm.after_step()
        arm.opt.zero_grad(set_to_none=True)

    for arm in arms:  # compile (first step) and warm up
        arm.before()
        _sync(device)
        t0 = time.perf_counter()
        step(arm)
        _sync(device)
        arm.first_step_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            step(arm)
    _sync(device)
    for _ in range(args.rounds):
        for arm in arms:
            arm.before()
            g0 = _graph_count()
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            for _ in range(args.steps):
                _sync(device)
                t0 = time.perf_counter()
                step(arm)
                _sync(device)
                arm.step_ms.append(1e3 * (time.perf_counter() - t0))
            if device.type == "cuda":
                working = (torch.cuda.max_memory_allocated(device) - base) / 2**30
                arm.peak_gib = max(arm.peak_gib, working + _state_gib(arm.model, arm.opt))
            arm.recompiles += _graph_count() - g0
            if arm.runtime is not None:
                ctl = arm.runtime.controller
                arm.high_flops = float((ctl.costs * ctl.plan).sum() / ctl.costs.sum())
    rows = []
    for arm in arms:
        # The slowest rank sets the pace; memory and recompiles: the worst rank.
        mine = (statistics.median(arm.step_ms), arm.peak_gib, arm.recompiles, arm.first_step_s)
        every: list = [None] * world
        dist.all_gather_object(every, mine)
        ms = max(e[0] for e in every)
        row = {"arm": arm.name, "step_ms": ms, "tokens_per_s_per_gpu": s.tokens / (ms / 1e3),
               "peak_gib": max(e[1] for e in every) if device.type == "cuda" else None,
               "recompiles": max(e[2] for e in every), "first_step_s": max(e[3] for e in every)}
        rt = arm.runtime
        if rt is not None:
            ctl = rt.controller
            row["units"] = ctl.num_units
            row["high_flops"] = arm.high_flops
            row["kernels"] = sorted({site.extra.get("kernel", "emulated") for r in rt.records for site in r.sites
                                     if site.slot is not None})
        rows.append(row)
    med = {r["arm"]: r["step_ms"] for r in rows}
    for r in rows:
        r["vs_bf16"] = med["bf16"] / r["step_ms"] if "bf16" in med else None
        r["vs_torchao"] = med["torchao"] / r["step_ms"] if "torchao" in med else None
    tflops = llama_flops_per_token(s)
    for r in rows:
        r["tflops_per_gpu"] = r["tokens_per_s_per_gpu"] * tflops / 1e12
    return {"size": args.size, "spec": dataclasses.asdict(s), "rows": rows,
            "not_run": not_run}


def markdown(result: dict) -> str:
    from tabulate import tabulate

    t = result.get("throughput", {})
    head = ["arm", "tokens/s per GPU", "step ms", "vs bf16", "vs torchao", "peak GiB", "recompiles",
            "first step s", "units / % FLOPs high / kernels"]
    body = []
    for r in t.get("rows", []):
        g = f"{r['units']} / {100 * r['high_flops']:.1f}% / {', '.join(r['kernels'])}" if "units" in r else ""
        body.append([r["arm"], f"{r['tokens_per_s_per_gpu']:,.0f}", f"{r['step_ms']:.1f}",
                     r["vs_bf16"] and f"{r['vs_bf16']:.3f}", r["vs_torchao"] and f"{r['vs_torchao']:.3f}",
                     r["peak_gib"] and f"{r['peak_gib']:.1f}", r["recompiles"], f"{r['first_step_s']:.1f}", g])
    lines = [f"command: `{result['command']}`", f"{result['device']} x{result['world']}, torch {result['torch']}, "
             f"{result['date_utc']}", "", tabulate(body, headers=head, tablefmt="github")]
    for name, why in t.get("not_run", {}).items():
        lines.append(f"\n{name}: {why}")
    c = result.get("consistency")
    if c:
        lines.append(f"\nconsistency: identical on all ranks {c['identical_on_all_ranks']}, equals one process "
                     f"{c['equals_single_process']}, plan changed by the fault {c['plan_changed_by_fault']}: "
                     f"{c['plans']}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".", help="folder for dist_perf.json and dist_perf.md")
    p.add_argument("--parts", default="consistency,throughput")
    p.add_argument("--size", default="8b", choices=sorted(SIZES))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--recipe", default="fp8_e4m3", choices=("fp8_e4m3", "fp8_rowwise", "int8_rowwise"))
    p.add_argument("--kernels", default="auto", choices=("auto", "real"),
                   help="GNMR arms: auto = real kernels demanded on a GPU, emulated on a CPU; "
                        "real = real kernels everywhere (torch's CPU kernels on a CPU)")
    p.add_argument("--compiler", default="inductor", choices=("eager", "aot_eager", "inductor"))
    p.add_argument("--check-compiler", default="aot_eager", choices=("eager", "aot_eager", "inductor"))
    p.add_argument("--steps", type=int, default=10, help="timed steps per arm per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in args.arms if a not in ARMS]
    if bad:
        p.error(f"--arms: unknown arm(s) {bad}; choose from {list(ARMS)}")

    device, rank, world, result = start_run("dist_perf.py", argv, args)
    s = SIZES[args.size]
    # Every arm compiles each layer through the same Layer.forward code: one cache entry per layer and arm.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(args.arms) * s.layers)

    def dump() -> None:
        if rank == 0:
            with open(os.path.join(args.out, "dist_perf.json"), "w") as f:
                json.dump(result, f, indent=1, default=str)
            with open(os.path.join(args.out, "dist_perf.md"), "w") as f:
                f.write(markdown(result))

    parts = args.parts.split(",")
    with run_to_end(dump):
        if "consistency" in parts:
            result["consistency"] = consistency(rank, world, device, args.check_compiler, "fp8_e4m3")
            dump()
        if "throughput" in parts:
            result["throughput"] = throughput(rank, world, device, args)
            dump()
        if rank == 0:
            print(markdown(result), flush=True)
    return 0 if result.get("consistency", {}).get("ok", True) else 1


if __name__ == "__main__":
    exit_now(main())
