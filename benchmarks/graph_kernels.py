"""What Inductor generates for one training step (forward and backward graphs)
of the plain low-precision model and of GNMR's graphs, on this machine's
device: per compiled graph, the fused kernels it defines, the library calls
it makes (GEMMs through ``extern_kernels``, ATen fallbacks such as
``_scaled_mm``), GNMR's ``select_mm`` calls and the buffers it allocates. GNMR's model is compiled with ``GNMRConfig(low_graph=True)``,
so its dual-path graph and its all-low copy are both there.

    python -m benchmarks.graph_kernels            # real fp8 (CPU _scaled_mm) and emulated mxfp4

Two cases: the perf benchmark's Llama (hidden 64, 2 layers) with real
``fp8_e4m3`` kernels against ``convert_to_lowp``, and TinyGPT 2 x 64 with
emulated ``mxfp4`` under bf16 autocast against the hand fake-quantized model
of ``bench emulation``. Inductor's caches are off, so every graph is compiled
here. On a CPU the kernels are C++ (``cpp_fused_*``); on a GPU Triton.
"""

from __future__ import annotations

import re
import sys

import torch
from tabulate import tabulate

import gnmr_fx
from gnmr_fx.backends import real_kernels
from gnmr_fx.benchmarks.emulation import FakeQuantGPT
from gnmr_fx.benchmarks.perf import Llama, LlamaSpec
from gnmr_fx.config import GNMRConfig
from gnmr_fx.models import GPTConfig, TinyGPT

_KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.(?:cpp_pybinding|cpp|triton)\(", re.M)
# Calls on code lines (comments and asserts name ops too): library kernels
# (extern_kernels.mm, ...), ATen ops run as fallbacks (torch.ops.aten._scaled_mm, ...),
# and GNMR's select_mm.
_LIBRARY_CALL = re.compile(r"^\s+(?:\w+ = )?(?:extern_kernels\.\w+|torch\.ops\.aten\.\w+\.\w+)\(", re.M)
_SELECT_CALL = re.compile(r"^\s+(?:\w+ = )?torch\.ops\.gnmr\.select_mm\.default\(", re.M)
_ALLOC = re.compile(r"^\s+\w+ = empty_strided_(?:cpu|cuda)\(", re.M)


def code_stats(code: str) -> tuple[int, int, int, int]:
    """(fused kernels defined, library / ATen fallback calls, GNMR select_mm calls, buffers allocated)
    of one graph's code."""
    return (len(_KERNEL_DEF.findall(code)), len(_LIBRARY_CALL.findall(code)), len(_SELECT_CALL.findall(code)),
            len(_ALLOC.findall(code)))


def step_codes(model, args, autocast: bool, device: torch.device) -> list[str]:
    """The Inductor code of the graphs one forward + backward compiles, in order."""
    from torch._inductor.utils import run_and_get_code

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(*args)
        loss.backward()

    _, codes = run_and_get_code(step)
    return codes


def _label(codes: list[str], names: list[str]) -> list[tuple[str, str]]:
    if len(codes) != len(names):
        names = [f"graph {i}" for i in range(len(codes))]
    return list(zip(names, codes))


def rows(device: torch.device) -> list[list]:
    out = []
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        spec = LlamaSpec(hidden=64, intermediate=176, heads=4, layers=2, vocab=256, seq=64, batch=2)
        for kind in ("plain fp8", "GNMR fp8"):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = Llama(spec).to(device=device, dtype=torch.bfloat16)
            idx = torch.randint(0, spec.vocab, (spec.batch, spec.seq), device=device)
            if kind == "plain fp8":
                compiled, names = torch.compile(real_kernels.convert_to_lowp(model, "fp8_e4m3")), ["forward", "backward"]
            else:
                cfg = GNMRConfig(recipe="fp8_e4m3", emulate=False, threshold=1e30, delta_threshold=1e30, low_graph=True)
                compiled = gnmr_fx.compile(model, cfg)
                names = ["dual-path forward", "dual-path backward", "all-low forward", "all-low backward"]
            for name, code in _label(step_codes(compiled, (idx, idx), False, device), names):
                out.append(["Llama 2x64, real fp8_e4m3", kind, name, *code_stats(code)])
        cfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64)
        for kind in ("fake_quant", "GNMR mxfp4"):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = TinyGPT(cfg).to(device)
            idx = torch.randint(0, cfg.vocab_size, (4, 32), device=device)
            if kind == "fake_quant":
                compiled, names = torch.compile(FakeQuantGPT(model, "mxfp4")), ["forward", "backward"]
            else:
                compiled = gnmr_fx.compile(model, GNMRConfig(recipe="mxfp4", policy="always_low", low_graph=True))
                names = ["dual-path forward", "dual-path backward", "all-low forward", "all-low backward"]
            for name, code in _label(step_codes(compiled, (idx, torch.roll(idx, -1, 1)), True, device), names):
                out.append(["TinyGPT 2x64, emulated mxfp4, bf16 autocast", kind, name, *code_stats(code)])
    return out


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head = ["case", "model", "graph", "fused kernels", "library calls", "select_mm calls", "buffers"]
    print(f"device {device}, torch {torch.__version__}")
    print(tabulate(rows(device), headers=head, tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
