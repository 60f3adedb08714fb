"""Built-in example models for ``gnmr-fx inspect / diff SPEC``.

A SPEC is either one of the names in :data:`EXAMPLES` or
``package.module:factory``, where ``factory()`` returns
``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``:
the call the training loop makes, ``model(*example_inputs,
**example_kwargs)`` (``example_inputs`` may also be a dict of keyword
inputs). Every example is small enough for a CPU and needs no download: the
Hugging Face one is built from a config.

>>> model, inputs = load_spec("tiny_gpt")
>>> type(model).__name__, tuple(inputs[0].shape)
('TinyGPT', (2, 16))
"""

from __future__ import annotations

import importlib
import inspect as pyinspect
from typing import Any, Callable, Optional

import torch

from gnmr_fx.arguments import InputError

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
        raise InputError("the hf_gpt2 example needs `transformers` (pip install transformers)") from e
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=256,
                     bos_token_id=0, eos_token_id=0, use_cache=False)
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


def load_example(spec: str, device: Optional[str] = None) -> tuple[torch.nn.Module, tuple, dict]:
    """Build ``(model, args, kwargs)`` from a built-in name or ``module:factory``,
    moved to ``device`` when one is given. A SPEC that names no factory, or a
    factory that does not take zero arguments or does not return
    ``(model, inputs[, kwargs])``, raises :class:`InputError`; an exception
    raised inside the factory is the factory's own.

    >>> model, args, kwargs = load_example("tiny_gpt")
    >>> type(model).__name__, len(args), kwargs
    ('TinyGPT', 1, {})
    """
    if spec in EXAMPLES:
        factory = EXAMPLES[spec]
    elif ":" in spec:
        factory = _factory(spec)
    else:
        raise InputError(
            f"SPEC {spec!r} is neither a built-in example ({', '.join(EXAMPLES)}) "
            "nor 'package.module:factory'"
        )
    made = factory()
    shape = "(nn.Module, inputs) or (nn.Module, inputs, kwargs)"
    if isinstance(made, torch.nn.Module):
        raise InputError(f"SPEC {spec!r} gives a {type(made).__name__} without example inputs: "
                         f"a SPEC names a factory that returns {shape}")
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3):
        raise InputError(f"SPEC {spec!r}: the factory must return {shape}, got {type(made).__name__}")
    model, inputs, kwargs = made[0], made[1], (made[2] if len(made) == 3 else {})
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"SPEC {spec!r}: the factory must return {shape}, got {type(model).__name__} as the model")
    if isinstance(inputs, dict):
        inputs, kwargs = (), {**inputs, **kwargs}
    elif isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not isinstance(kwargs, dict):
        raise InputError(f"SPEC {spec!r}: the factory must return {shape}, got inputs of type "
                         f"{type(inputs).__name__} and kwargs of type {type(kwargs).__name__}")
    if device is not None:
        model = model.to(device)
        inputs = [x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs]
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return model, tuple(inputs), dict(kwargs)


def load_spec(spec: str, device: Optional[str] = None) -> tuple[torch.nn.Module, tuple]:
    """Build ``(model, example_inputs)`` from a built-in name or ``module:factory``,
    moved to ``device`` when one is given; for commands that call the model
    with positional inputs only (a SPEC with keyword inputs raises
    :class:`InputError`; :func:`load_example` returns them)."""
    model, inputs, kwargs = load_example(spec, device)
    if kwargs:
        raise InputError(f"SPEC {spec!r} gives keyword inputs ({', '.join(kwargs)}); this command passes "
                         "positional inputs only (gnmr-fx inspect takes both)")
    return model, inputs


def _factory(spec: str) -> Callable[[], Any]:
    """The zero-argument callable ``package.module:factory`` names."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"SPEC {spec!r}: cannot import module {mod_name!r} ({e})") from e
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise InputError(f"SPEC {spec!r}: {mod_name} has no callable {attr!r}")
    try:
        pyinspect.signature(factory).bind()
    except TypeError:
        raise InputError(
            f"SPEC {spec!r}: {attr}{pyinspect.signature(factory)} needs arguments; a SPEC names a factory "
            "that takes none and returns (model, example_inputs)"
        ) from None
    except ValueError:
        pass  # no signature to read (some builtins): calling it will tell
    return factory
