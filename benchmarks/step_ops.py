"""ATen ops GNMR dispatches per training step besides the model: one update
of the controller (6 units) and one whole ``GNMRRuntime.step`` (statistics
read, controller update, plan write; TinyGPT 2 x 32, one graph, 13 units),
with the eager rule and with ``GNMRConfig(compile_controller=True)``. On a
GPU every top-level op is a kernel launch of the host-bound step.

    python -m benchmarks.step_ops

Uses the public API only, so the same file counts an older checkout too
(``PYTHONPATH=<checkout> python benchmarks/step_ops.py``).
"""

from __future__ import annotations

import sys

import torch

import gnmr_fx
from gnmr_fx import GNMRConfig, GNMRController
from gnmr_fx.models import GPTConfig, TinyGPT


def _count(fn) -> tuple[int, int]:
    """(all ATen events, top-level ATen events) of one call of ``fn``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(aten), len(top)


def update_ops(compiled: bool) -> tuple[int, int]:
    """Ops of one controller update, 6 units, past warm-up (compiled before the count)."""
    ctl = GNMRController(6, GNMRConfig(warmup_steps=2, max_o=2, compile_controller=compiled))
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        ctl.update(torch.exp(0.05 * torch.randn(6, generator=g)))
    return _count(lambda: ctl.update(torch.ones(6)))


def runtime_step_ops(compiled: bool) -> tuple[int, int]:
    """Ops of one ``GNMRRuntime.step`` after a backward (three steps before the count)."""
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cm = gnmr_fx.compile(model, GNMRConfig(recipe="int8", compile_controller=compiled), backend="eager",
                         optimizer=opt)
    rt = gnmr_fx.runtime(cm)
    idx = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        cm(idx, idx).backward()
        opt.step()
        opt.zero_grad()
    cm(idx, idx).backward()
    counts = _count(rt.step)
    opt.zero_grad()
    return counts


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m benchmarks.step_ops (no arguments)", file=sys.stderr)
        return 2
    print("what                           rule      all ATen  top-level")
    for name, fn in (("controller update, 6 units", update_ops), ("runtime step, TinyGPT 2x32", runtime_step_ops)):
        for compiled in (False, True):
            n_all, n_top = fn(compiled)
            print(f"{name:30s} {'compiled' if compiled else 'eager':8s} {n_all:9d} {n_top:10d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
