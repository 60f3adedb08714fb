"""The data-parallel consistency scenario, shared by ``tests/_dist_worker.py``
(``tests/test_distributed.py``) and ``benchmarks/dist_check.py`` (the same
checks on GPUs): a small net of linear and weightless units, and per-rank
batches with a fault on one rank at one step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

STEPS = 8
FAULT_STEP = 5  # rank 1's batch gets large input channels at this step
FAULT_RANK = 1
SAVE_AFTER = 3  # the DCP checkpoint is taken after this step's optimizer step
BATCH = 4  # per rank
SEQ = 6
D_IN, D, D_OUT = 8, 16, 4
LR = 0.01


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A weightless unit pair (x @ x^T, then @ x) next to the weight units.
        mix = torch.softmax((x @ x.transpose(-1, -2)) * 0.25, dim=-1) @ x
        return x + 0.5 * mix + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, n_blocks: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.blocks = nn.ModuleList([Block(D) for _ in range(n_blocks)])
        self.head = nn.Linear(D, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](self.inp(x))
        # Units spread over two graphs: one reduction must cover both. (Not
        # inside the loop: Dynamo does not resume a frame in a loop body.)
        torch._dynamo.graph_break()
        for b in self.blocks[1:]:
            h = b(h)
        return self.head(h)


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def global_batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch, rank r's slice is rows [r*BATCH, (r+1)*BATCH)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * BATCH, SEQ, D_IN, generator=g)
    y = torch.randn(world * BATCH, SEQ, D_OUT, generator=g)
    if step == FAULT_STEP:
        rows = slice(FAULT_RANK * BATCH, (FAULT_RANK + 1) * BATCH)
        x[rows, :, :3] *= 10.0  # a few input channels blow up on one rank only
    return x, y


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step, world)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    return x[rows], y[rows]


def fsdp_blocks_model(config: Any, backend: str, device: Any = "cpu") -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The torchtitan order: compile per block, fully_shard each block and the root, enable.

    Returns ``(model, optimizer, runtime)``; needs torch.distributed initialized.
    """
    from torch.distributed.fsdp import fully_shard

    import gnmr_fx.distributed

    model = make_model().to(device)
    rt = gnmr_fx.distributed.compile_blocks(model, model.blocks, config, backend=backend)
    for b in model.blocks:
        fully_shard(b)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rt.attach_optimizer(opt)
    gnmr_fx.distributed.enable(model)
    return model, opt, rt
