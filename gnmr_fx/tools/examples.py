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
import os
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from gnmr_fx.arguments import InputError

if TYPE_CHECKING:
    from gnmr_fx.config import GNMRConfig

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


# --------------------------------------------------------------------------
# A short training run with an injected fault (for `gnmr-fx report`)
# --------------------------------------------------------------------------


class _GradScale(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by ``k`` in backward."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(k)
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (k,) = ctx.saved_tensors
        return grad * k, None


def inject_grad_fault(module: torch.nn.Module) -> torch.Tensor:
    """Make ``module``'s weight gradient ``k`` times too large, and nothing else.

    Returns ``k`` (a 0-d tensor, 1.0 = no fault); set it in place to switch
    the fault on or off without recompiling. The output gradient is scaled
    by ``k`` and the input gradient by ``1/k``, so only this unit's dL/dW
    (what GNMR measures) changes: a fault confined to one unit.
    """
    k = torch.ones(())
    module.register_buffer("_fault_k", k, persistent=False)
    module.register_forward_pre_hook(lambda m, args: (_GradScale.apply(args[0], 1.0 / m._fault_k), *args[1:]))
    module.register_forward_hook(lambda m, args, out: _GradScale.apply(out, m._fault_k))
    return module._fault_k


def train_with_fault(
    log: Optional[str],
    *,
    steps: int = 80,
    fault_unit: str = "blocks.1.fc",
    fault_steps: tuple[int, int] = (40, 46),
    scale: float = 30.0,
    config: Optional["GNMRConfig"] = None,
    seed: int = 0,
    on_step: Optional[Callable[[Any], None]] = None,
) -> torch.nn.Module:
    """Train TinyGPT for ``steps`` steps (eager backend, CPU-sized) with the
    weight gradient of ``fault_unit`` multiplied by ``scale`` during
    ``fault_steps`` = [start, stop). Telemetry (with the loss) goes to ``log``.

    Returns the compiled model; ``gnmr_fx.controller(model)`` has the state.
    ``on_step(runtime)`` is called after every controller update.
    """
    import gnmr_fx
    from gnmr_fx.config import GNMRConfig
    from gnmr_fx.models import GPTConfig, TinyGPT

    config = config or GNMRConfig(recipe="int8", max_o=2, warmup_steps=10, lock_steps=8, log_every=16)
    torch.manual_seed(seed)
    gcfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = TinyGPT(gcfg)
    k = inject_grad_fault(model.get_submodule(fault_unit))
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
        k.fill_(scale if fault_steps[0] <= step < fault_steps[1] else 1.0)
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


def _main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m gnmr_fx.examples",
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
    raise SystemExit(_main())
