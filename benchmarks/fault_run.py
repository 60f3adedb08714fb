"""A short TinyGPT run with an injected fault, for ``gnmr-fx report``.

``python -m gnmr_fx.benchmarks.fault_run run.jsonl`` trains TinyGPT for 80
steps (eager backend, recipe int8, budget ``max_o=2``) with the weight
gradient of one unit multiplied by 30 during a few steps
(``gnmr_fx.faults``, kind ``weight_grad_blowup``), and writes the telemetry
that ``gnmr-fx report`` reads (docs/inspect.md walks through it).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional

import torch

import gnmr_fx
from gnmr_fx.faults import Fault, FaultInjector
from gnmr_fx.models import GPTConfig, TinyGPT


def train_with_fault(
    log: Optional[str],
    *,
    steps: int = 80,
    fault_unit: str = "blocks.1.fc",
    fault_steps: tuple[int, int] = (40, 46),
    scale: float = 30.0,
    config: Optional[gnmr_fx.GNMRConfig] = None,
    seed: int = 0,
    on_step: Optional[Callable[[Any], None]] = None,
) -> torch.nn.Module:
    """Train TinyGPT for ``steps`` steps (eager backend, CPU-sized) with the
    weight gradient of ``fault_unit`` multiplied by ``scale`` during
    ``fault_steps`` = [start, stop). Telemetry (with the loss) goes to ``log``.

    Returns the compiled model; ``gnmr_fx.controller(model)`` has the state.
    ``on_step(runtime)`` is called after every controller update.
    """
    config = config or gnmr_fx.GNMRConfig(recipe="int8", max_o=2, warmup_steps=10, lock_steps=8, log_every=16)
    torch.manual_seed(seed)
    gcfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = TinyGPT(gcfg)
    injector = FaultInjector(model, [Fault(fault_unit, "weight_grad_blowup", steps=range(*fault_steps), factor=scale)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cm = gnmr_fx.compile(model, config, backend="eager", optimizer=opt, log=log)
    rt = gnmr_fx.runtime(cm)
    if on_step is not None:
        rt.callbacks.append(on_step)
    import gnmr_fx.models as _models

    with open(_models.__file__, "rb") as f:  # offline text: this package's own source
        data = torch.tensor(list(f.read()), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        injector.set_step(step)
        ix = torch.randint(0, data.numel() - gcfg.block_size - 1, (8,), generator=g)
        x = torch.stack([data[i: i + gcfg.block_size] for i in ix])
        y = torch.stack([data[i + 1: i + 1 + gcfg.block_size] for i in ix])
        loss = cm(x, y)
        loss.backward()
        rt.log_metrics(loss=loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    rt.flush()
    return cm


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gnmr_fx.benchmarks.fault_run",
                                description="write the telemetry of a short TinyGPT run with an injected fault")
    p.add_argument("log", help="telemetry file to write (JSON lines)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--fault-unit", default="blocks.1.fc")
    p.add_argument("--fault-start", type=int, default=40)
    p.add_argument("--fault-stop", type=int, default=46)
    p.add_argument("--scale", type=float, default=30.0)
    a = p.parse_args(argv)
    if os.path.exists(a.log):
        os.remove(a.log)  # the writer appends; a fresh run wants a fresh file
    train_with_fault(a.log, steps=a.steps, fault_unit=a.fault_unit,
                     fault_steps=(a.fault_start, a.fault_stop), scale=a.scale)
    print(f"wrote {a.log}: {a.steps} steps, fault x{a.scale:g} on {a.fault_unit} "
          f"at steps [{a.fault_start}, {a.fault_stop})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
