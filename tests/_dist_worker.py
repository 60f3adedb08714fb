"""One rank of the data-parallel GNMR runs in tests/test_distributed.py.

``python tests/_dist_worker.py RANK WORLD PORT OUT_DIR`` joins a gloo group on
127.0.0.1:PORT, runs every scenario below and writes ``OUT_DIR/rank{RANK}.json``:
per scenario, the unit names and, per step, the plan and the reduced norms.

The test imports this file too, for the model, the data and the
single-process reference runs, so both sides use the same definitions.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import gnmr_fx
import gnmr_fx.distributed
from gnmr_fx.benchmarks.dist_scenario import (  # noqa: F401 - the test reads them through this module
    BATCH, D, D_IN, D_OUT, FAULT_RANK, FAULT_STEP, LR, SAVE_AFTER, SEQ, STEPS, Block, Net, global_batch, local_batch,
    fsdp_blocks_model, make_model,
)

# low_graph=True: under the eager compiler too, each graph also has its all-low
# copy, run on the steps where none of its units is high (the default makes it
# under Inductor only), so every scenario switches between the two graphs.
CONFIG = gnmr_fx.GNMRConfig(recipe="int8", warmup_steps=3, threshold=3.0, delta_threshold=1.5,
                            max_o=1, lock_steps=2, low_graph=True)


def _recorder(rt, log: list) -> None:
    def cb(runtime) -> None:
        ctl = runtime.controller
        log.append({"plan": ctl.plan.tolist(), "denied": ctl.denied.tolist(), "norm": ctl.norm.tolist(),
                    "low_graph_calls": runtime.low_graph_calls})

    rt.callbacks.append(cb)


def train(model: nn.Module, step_fn: Callable[[int], torch.Tensor], opt, steps: range) -> None:
    for s in steps:
        step_fn(s).backward()
        opt.step()
        opt.zero_grad()


# ----------------------------------------------------------------- reference
def reference(kind: str, world: int) -> dict:
    """One process, same global batch as ``world`` micro-batches of loss / world."""
    torch._dynamo.reset()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if kind == "blocks":
        rt = gnmr_fx.distributed.compile_blocks(model, model.blocks, CONFIG, backend="eager", optimizer=opt)
        run = model
    else:
        run = gnmr_fx.compile(model, CONFIG, backend="eager", optimizer=opt)
        rt = gnmr_fx.runtime(run)
    log: list = []
    _recorder(rt, log)
    for s in range(STEPS):
        for r in range(world):
            x, y = local_batch(s, r, world)
            (F.mse_loss(run(x), y) / world).backward()
        opt.step()
        opt.zero_grad()
    return {"names": rt.unit_names, "steps": log}


# ------------------------------------------------------------------ scenarios
def run_ddp(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    cm = gnmr_fx.compile(ddp, CONFIG, backend="eager", optimizer=opt)
    rt = gnmr_fx.distributed.enable(cm)
    log: list = []
    _recorder(rt, log)

    def step(s: int) -> torch.Tensor:
        x, y = local_batch(s, rank, world)
        return F.mse_loss(cm(x), y)

    train(cm, step, opt, range(STEPS))
    return {"names": rt.unit_names, "steps": log, "dp_scale": rt.dp_scale, "graphs": len(rt.records)}


def run_ddp_of_compiled(rank: int, world: int) -> dict:
    """The other DDP order: DDP(gnmr_fx.compile(model)); units keep the model's names."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ddp = DDP(gnmr_fx.compile(model, CONFIG, backend="eager", optimizer=opt))
    rt = gnmr_fx.distributed.enable(ddp)
    log: list = []
    _recorder(rt, log)

    def step(s: int) -> torch.Tensor:
        x, y = local_batch(s, rank, world)
        return F.mse_loss(ddp(x), y)

    train(ddp, step, opt, range(STEPS))
    return {"names": rt.unit_names, "steps": log, "graphs": len(rt.records)}


def run_fsdp_root(rank: int, world: int) -> dict:
    """fully_shard on the root only, then gnmr_fx.compile of the whole model."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    cm = gnmr_fx.compile(model, CONFIG, backend="eager", optimizer=opt)
    rt = gnmr_fx.distributed.enable(cm)
    log: list = []
    _recorder(rt, log)

    def step(s: int) -> torch.Tensor:
        x, y = local_batch(s, rank, world)
        return F.mse_loss(cm(x), y)

    train(cm, step, opt, range(STEPS))
    return {"names": rt.unit_names, "steps": log}


SEQ_STEPS = 3
# (scenario, wrapper, compiler, layer width, DDP bucket cap in MB). A model of
# torch.nn modules only: no frame of its own for Dynamo to compile. At width
# 512 the middle Linear is 1 MiB, so DDP's 1 MiB buckets make DDPOptimizer
# split the graph.
SEQUENTIAL = (
    ("ddp_seq_eager", "ddp", "eager", 16, 25),
    ("ddp_seq_aot_eager", "ddp", "aot_eager", 16, 25),
    ("ddp_seq_inductor", "ddp", "inductor", 16, 25),
    ("ddp_seq_split", "ddp", "eager", 512, 1),
    ("fsdp_root_seq_aot_eager", "fsdp", "aot_eager", 16, 25),
)


def make_sequential(width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, D_OUT))


def run_sequential(rank: int, world: int, wrapper: str, compiler: str, width: int, bucket_mb: float) -> dict:
    """gnmr_fx.compile(DDP(nn.Sequential)) / of a root-only fully_shard nn.Sequential."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_sequential(width)
    if wrapper == "ddp":
        model = DDP(model, bucket_cap_mb=bucket_mb)
    else:
        fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    cm = gnmr_fx.compile(model, CONFIG, backend=compiler, optimizer=opt)
    rt = gnmr_fx.distributed.enable(cm)
    log: list = []
    _recorder(rt, log)

    def step(s: int) -> torch.Tensor:
        x, y = local_batch(s, rank, world)
        return F.mse_loss(cm(x), y)

    train(cm, step, opt, range(SEQ_STEPS))
    return {"names": rt.unit_names, "steps": log, "graphs": len(rt.records), "step": rt.controller.step}


def _fsdp_blocks_model():
    return fsdp_blocks_model(CONFIG, "eager")


def run_fsdp_blocks(rank: int, world: int, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.tensor import DTensor

    model, opt, rt = _fsdp_blocks_model()
    log: list = []
    _recorder(rt, log)

    def step_of(m):
        def step(s: int) -> torch.Tensor:
            x, y = local_batch(s, rank, world)
            return F.mse_loss(m(x), y)
        return step

    train(model, step_of(model), opt, range(SAVE_AFTER + 1))
    # torchtitan's path: the distributed state-dict API, then DCP.
    sd = get_model_state_dict(model)
    gnmr_keys = sorted(k for k in sd if k.startswith("_gnmr."))
    sharded = any(isinstance(v, DTensor) for v in sd.values())
    dcp.save(sd, checkpoint_id=ckpt)
    train(model, step_of(model), opt, range(SAVE_AFTER + 1, STEPS))

    # Resume: a fresh model built the same way; one forward and backward of
    # a zero loss creates the units (so the _gnmr.* tensors have their saved
    # shapes) with the graphs training uses, then DCP loads in place and
    # set_model_state_dict restores the controller.
    torch._dynamo.reset()
    model2, opt2, rt2 = _fsdp_blocks_model()
    (model2(local_batch(0, rank, world)[0]).sum() * 0.0).backward()
    opt2.zero_grad()
    sd2 = get_model_state_dict(model2)
    dcp.load(sd2, checkpoint_id=ckpt)
    set_model_state_dict(model2, sd2)
    resumed_step = rt2.controller.step
    resumed_plan = rt2.controller.plan.tolist()
    log2: list = []
    _recorder(rt2, log2)
    train(model2, step_of(model2), opt2, range(SAVE_AFTER + 1, STEPS))
    return {"names": rt.unit_names, "steps": log, "gnmr_keys": gnmr_keys, "sharded": sharded,
            "resumed": {"names": rt2.unit_names, "step": resumed_step, "plan": resumed_plan, "steps": log2}}


def main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result: dict = {}
    try:
        for name, fn in (("ddp", run_ddp), ("ddp_of_compiled", run_ddp_of_compiled), ("fsdp_root", run_fsdp_root)):
            torch._dynamo.reset()
            result[name] = fn(rank, world)
        torch._dynamo.reset()
        result["fsdp_blocks"] = run_fsdp_blocks(rank, world, os.path.join(out, "ckpt"))
        for name, *args in SEQUENTIAL:
            result[name] = run_sequential(rank, world, *args)
        # The runtime refuses to decide per rank when nobody said so.
        torch._dynamo.reset()
        model = make_model()
        cm = gnmr_fx.compile(model, CONFIG, backend="eager")
        try:
            F.mse_loss(cm(local_batch(0, rank, world)[0]), local_batch(0, rank, world)[1]).backward()
            result["unreduced_error"] = None
        except RuntimeError as e:
            result["unreduced_error"] = str(e)
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    # Results written, group destroyed: skip interpreter finalization, where gloo can
    # abort a finished rank (an error above still exits non-zero with its traceback).
    from gnmr_fx.benchmarks.dist_check import exit_now

    exit_now(0)
