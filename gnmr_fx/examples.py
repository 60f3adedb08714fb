"""Built-in example models for ``gnmr-fx inspect / diff SPEC``.

A SPEC is either one of the names in :data:`EXAMPLES` or
``package.module:factory``, where ``factory()`` returns
``(model, example_inputs)``. Every example is small enough for a CPU and
needs no download: the Hugging Face one is built from a config.

>>> model, inputs = load_spec("tiny_gpt")
>>> type(model).__name__, tuple(inputs[0].shape)
('TinyGPT', (2, 16))
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

ExampleFactory = Callable[[], tuple[torch.nn.Module, tuple]]


def tiny_gpt() -> tuple[torch.nn.Module, tuple]:
    """TinyGPT (2 layers, n_embd 32, block 16): 13 units, one graph."""
    from gnmr_fx.models import GPTConfig, TinyGPT

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyGPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 256, (2, 16), generator=g)
    return model, (idx,)


class _BreakingGPT(torch.nn.Module):
    """TinyGPT with a data-dependent Python branch between its blocks: the
    ``.item()`` splits the forward into two graphs (a graph break)."""

    def __init__(self, gpt: torch.nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        g = self.gpt
        t = idx.shape[1]
        x = g.tok(idx) + g.pos(torch.arange(t, device=idx.device))
        x = g.blocks[0](x)
        if x.abs().max().item() > 1e4:  # a guard users write; Dynamo must break here
            x = x / x.abs().max()
        x = g.blocks[1](x)
        return g.head(g.ln_f(x))


def tiny_gpt_graph_break() -> tuple[torch.nn.Module, tuple]:
    """TinyGPT whose forward has a ``.item()`` branch: two graphs, one break."""
    model, inputs = tiny_gpt()
    return _BreakingGPT(model), inputs


def hf_gpt2() -> tuple[torch.nn.Module, tuple]:
    """A Hugging Face ``GPT2LMHeadModel`` from a tiny ``GPT2Config`` (no download).

    GPT-2's ``Conv1D`` layers run ``torch.addmm``, so its units are addmm
    units; attention runs SDPA, which inspect lists as not recoverable.
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:  # optional: only this example needs it
        raise ValueError("the hf_gpt2 example needs `transformers` (pip install transformers)") from e
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=256,
                     bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    return model, (torch.randint(0, 256, (1, 16), generator=g),)


EXAMPLES: dict[str, ExampleFactory] = {
    "tiny_gpt": tiny_gpt,
    "tiny_gpt_graph_break": tiny_gpt_graph_break,
    "hf_gpt2": hf_gpt2,
}


def load_spec(spec: str) -> tuple[torch.nn.Module, tuple]:
    """Build ``(model, example_inputs)`` from a built-in name or ``module:factory``."""
    if spec in EXAMPLES:
        model, inputs = EXAMPLES[spec]()
    elif ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"SPEC {spec!r}: cannot import module {mod_name!r} ({e})") from e
        factory = getattr(mod, attr, None)
        if not callable(factory):
            raise ValueError(f"SPEC {spec!r}: {mod_name} has no callable {attr!r}")
        model, inputs = factory()
    else:
        raise ValueError(
            f"SPEC {spec!r} is neither a built-in example ({', '.join(EXAMPLES)}) "
            "nor 'package.module:factory'"
        )
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"SPEC {spec!r}: factory must return (nn.Module, inputs), got {type(model).__name__}")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return model, tuple(inputs)
