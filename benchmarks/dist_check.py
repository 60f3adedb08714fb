"""Multi-GPU check of GNMR under FSDP2: identical plans on every rank, and throughput.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc_per_node=2 benchmarks/dist_check.py --out OUT_DIR

Two parts, on every GPU of the host (NCCL; gloo on CPU for a smoke run):

1. **consistency**: the scenario of ``tests/test_distributed.py`` on GPUs.
   Blocks compiled with ``gnmr_fx.distributed.compile_blocks``, then
   ``fully_shard`` on each block and the root (the torchtitan order), fp32,
   a fault on rank 1's inputs at one step. Checks that every rank's plan,
   denials and reduced norms are identical at every step, and that rank 0's
   single-process run on the same global batch (the per-rank batches as
   micro-batches, loss / world) gives the same plans and norms.
2. **throughput**: FSDP2 with bf16 parameters (``MixedPrecisionPolicy``),
   a TinyGPT decoder, AdamW. ``bf16``: each block ``torch.compile``-d with
   Inductor; ``fp8_gnmr``: each block compiled by ``compile_blocks`` with the
   emulated ``fp8_e4m3`` recipe (fake quantization: both branches run, so
   this measures the cost of emulation + GNMR, not an FP8 speed-up).
   Tokens/s over the timed steps (global, all ranks), peak memory.

Prints a tabulate table and writes ``OUT_DIR/dist_check.json`` (rewritten
after each part, so a run cut short keeps what it finished).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gnmr_fx
import gnmr_fx.distributed
from gnmr_fx.benchmarks.dist_scenario import FAULT_RANK, FAULT_STEP, LR, STEPS, Net, fsdp_blocks_model, local_batch
from gnmr_fx.models import GPTConfig, TinyGPT

# NVLink multicast stays off on shared hosts (device notes); set before NCCL starts.
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

# ---------------------------------------------------------------- consistency
def _batch(step: int, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = local_batch(step, rank, world)
    return x.to(device), y.to(device)


def _record(rt, log: list) -> None:
    rt.callbacks.append(lambda r: log.append({
        "plan": r.controller.plan.tolist(), "denied": r.controller.denied.tolist(),
        "norm": r.controller.norm.tolist()}))


def consistency(rank: int, world: int, device: torch.device, compiler: str, recipe: str) -> dict:
    cfg = gnmr_fx.GNMRConfig(recipe=recipe, warmup_steps=3, threshold=3.0, max_o=1, lock_steps=2)
    torch._dynamo.reset()
    model, opt, rt = fsdp_blocks_model(cfg, compiler, device)
    log: list = []
    _record(rt, log)
    for s in range(STEPS):
        x, y = _batch(s, rank, world, device)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    logs: list = [None] * world
    dist.all_gather_object(logs, log)
    identical = all(lg == logs[0] for lg in logs)

    ref_match: Optional[bool] = None
    max_rel = None
    if rank == 0:
        # Single process on the same global batch: world micro-batches, loss / world.
        torch._dynamo.reset()
        torch.manual_seed(0)
        ref = Net().to(device)
        ropt = torch.optim.SGD(ref.parameters(), lr=LR)
        rrt = gnmr_fx.distributed.compile_blocks(ref, ref.blocks, cfg, backend=compiler, optimizer=ropt)
        gnmr_fx.distributed.disable(ref)
        rlog: list = []
        _record(rrt, rlog)
        for s in range(STEPS):
            for r in range(world):
                x, y = _batch(s, r, world, device)
                (F.mse_loss(ref(x), y) / world).backward()
            ropt.step()
            ropt.zero_grad()
        plans_equal = [a["plan"] == b["plan"] and a["denied"] == b["denied"] for a, b in zip(log, rlog)]
        max_rel = max(abs(u - v) / max(abs(v), 1e-12) for a, b in zip(log, rlog) for u, v in zip(a["norm"], b["norm"]))
        ref_match = all(plans_equal) and max_rel < 1e-3
    out: list = [None] * world
    dist.all_gather_object(out, (ref_match, max_rel))
    ref_match, max_rel = out[0]
    triggered = any(any(st["plan"]) for st in log)
    return {
        "units": rt.unit_names, "steps": STEPS, "fault_step": FAULT_STEP, "fault_rank": FAULT_RANK,
        "identical_on_all_ranks": identical, "equals_single_process": ref_match,
        "max_rel_norm_diff_vs_single_process": max_rel, "plan_changed_by_fault": triggered,
        "plans": [[n for n, p in zip(rt.unit_names, st["plan"]) if p] for st in log],
        "ok": bool(identical and ref_match and triggered),
    }


# ----------------------------------------------------------------- throughput
def throughput(arm: str, rank: int, world: int, device: torch.device, args: argparse.Namespace) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch._dynamo.reset()
    torch.manual_seed(0)
    gcfg = GPTConfig(block_size=args.seq, n_layer=args.layers, n_head=args.heads, n_embd=args.dim)
    model = TinyGPT(gcfg).to(device)
    if arm == "bf16":
        for b in model.blocks:
            b.compile(backend=args.compiler)
    else:
        cfg = gnmr_fx.GNMRConfig(recipe=args.recipe, max_o=0.1)
        gnmr_fx.distributed.compile_blocks(model, model.blocks, cfg, backend=args.compiler)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for b in model.blocks:
        fully_shard(b, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rt = None
    if arm != "bf16":
        rt = gnmr_fx.runtime(model)
        rt.attach_optimizer(opt)
        gnmr_fx.distributed.enable(model)
    g = torch.Generator(device=device).manual_seed(100 + rank)
    idx = torch.randint(0, gcfg.vocab_size, (args.batch, args.seq), device=device, generator=g)

    def step() -> None:
        model(idx, idx).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    times: list = [None] * world
    dist.all_gather_object(times, dt)
    dt = max(times)  # the slowest rank sets the pace
    tokens = args.batch * args.seq * world
    res = {
        "arm": arm, "step_ms": dt * 1e3, "tokens_per_s": tokens / dt, "first_step_s": first,
        "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
    }
    if rt is not None:
        res["units"] = len(rt.unit_names)
        res["graphs"] = len(rt.records)
        res["units_high_at_end"] = int(rt.controller.plan.sum())
    return res


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def run_to_end(dump: Callable[[], None]) -> Iterator[None]:
    """The body of a torchrun benchmark: ``dump()`` (write the results) and
    tear the process group down, on success and on error alike.

    On success every rank drops its references (``gc``), meets the others
    (``barrier``: nobody leaves while a peer is still in a collective) and
    destroys the group while Python is fully alive; :func:`exit_now` then
    skips finalization (a CI run aborted there once). After an error the
    barrier is skipped, since a peer may never reach it (torchtitan does the
    same), and the error propagates."""
    ok = False
    try:
        yield
        ok = True
    finally:
        try:
            dump()  # on an error: what finished before it
        finally:
            gc.collect()
            if ok:
                dist.barrier()
            dist.destroy_process_group()
            gc.collect()


def exit_now(code: int) -> None:
    """End a torchrun benchmark process with ``code`` once its results are
    written, skipping interpreter finalization: Gloo's worker threads can
    still own work objects whose tensors Python frees there, and the process
    then aborts (SIGABRT, "terminate called without an active exception";
    pytorch/pytorch#179291), failing a run that has finished."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_run(script: str, argv: Optional[list[str]], args: argparse.Namespace) -> tuple[torch.device, int, int, dict]:
    """The set-up every torchrun benchmark here shares: this rank's device
    (NCCL on GPUs, gloo on a CPU), the process group, ``args.out``, and the
    result header (command, date, versions, device, NVLink settings, config).
    TF32 is off: the consistency check compares fp32 norms across processes."""
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 consistency: no TF32 rounding differences
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)
    header: dict[str, Any] = {
        "command": "torchrun --nproc_per_node=%d benchmarks/%s %s" % (world, script, " ".join(argv or sys.argv[1:])),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "world": world, "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
        "config": vars(args),
    }
    return device, dist.get_rank(), world, header


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".", help="folder for dist_check.json")
    p.add_argument("--parts", default="consistency,throughput")
    p.add_argument("--check-compiler", default="aot_eager", choices=("eager", "aot_eager", "inductor"))
    p.add_argument("--compiler", default="inductor", choices=("eager", "aot_eager", "inductor"),
                   help="compiler of the throughput arms")
    p.add_argument("--recipe", default="fp8_e4m3")
    p.add_argument("--arms", default="bf16,fp8_gnmr")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)

    device, rank, world, result = start_run("dist_check.py", argv, args)
    # One graph per block (compile_blocks); the benchmark, not the library, raises the limit.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * args.layers)

    def dump() -> None:
        if rank == 0:
            with open(os.path.join(args.out, "dist_check.json"), "w") as f:
                json.dump(result, f, indent=1)

    parts = args.parts.split(",")
    with run_to_end(dump):
        if "consistency" in parts:
            t0 = time.perf_counter()
            result["consistency"] = consistency(rank, world, device, args.check_compiler, args.recipe)
            result["consistency"]["wall_s"] = time.perf_counter() - t0
            dump()
            if rank == 0:
                c = result["consistency"]
                print(f"consistency: identical on all ranks={c['identical_on_all_ranks']} "
                      f"equals single process={c['equals_single_process']} "
                      f"(max rel norm diff {c['max_rel_norm_diff_vs_single_process']:.2e}) "
                      f"plan changed by fault={c['plan_changed_by_fault']} plans={c['plans']}", flush=True)
        if "throughput" in parts:
            result["throughput"] = []
            for arm in args.arms.split(","):
                result["throughput"].append(throughput(arm, rank, world, device, args))
                dump()
                if rank == 0:
                    print(json.dumps(result["throughput"][-1]), flush=True)
            base = result["throughput"][0]["tokens_per_s"]
            for r in result["throughput"]:
                r["ratio_to_first"] = r["tokens_per_s"] / base
            dump()
            if rank == 0:
                from tabulate import tabulate

                rows = [[r["arm"], f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}", f"{r['ratio_to_first']:.2f}",
                         f"{r['first_step_s']:.1f}", r["peak_mem_gib"] and f"{r['peak_mem_gib']:.1f}"]
                        for r in result["throughput"]]
                print(tabulate(rows, headers=["arm", "tokens/s", "step ms", "ratio", "first step s", "peak GiB"]))
    return 0 if result.get("consistency", {}).get("ok", True) else 1


if __name__ == "__main__":
    exit_now(main())
