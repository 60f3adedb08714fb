"""``gnmr_fx.generate``: Hugging Face ``generate`` under the trained precision.

``gnmr_fx.compile`` compiles the model's ``forward`` in place, so the
model's own ``generate`` already calls the GNMR graphs: each decoding
forward runs every unit on its path in the current plan (a unit on the low
path rounds with the recipe). Two things can still take a decoding forward
off those graphs, and :func:`generate` rules both out:

* a model whose ``forward`` is not GNMR-compiled (compiled with
  ``torch.compile(model, backend="gnmr")``, whose wrapper ``generate``
  bypasses, or a ``forward`` replaced after compiling): it raises;
* transformers' own auto-compilation of the decoding step (a static cache on
  GPU, or a ``compile_config``): that ``torch.compile`` traces the model's
  call and inlines the *original* forward, so decoding would run as written.
  :func:`generate` passes ``disable_compile=True``.

With the KV cache (the default), a decoding step runs the plan on the new
token's activations only. Recipes whose scales are per token and per output
channel (``int8``, ``fp8_rowwise``) then round each token as the
full-sequence forward does; recipes whose scale groups span tokens
(per-tensor: ``int4`` activations, ``fp8_e4m3``; the per-column scales of a
weightless attention unit's second operand) see different groups, so
logits differ from a full-sequence forward. ``exact=True`` decodes without
the cache and computes the logits of every position: every step is the
compiled forward on the whole sequence, the forward that training ran, so
greedy tokens equal greedy decoding with the compiled forward exactly (at
quadratic cost in the length). Without it, transformers' ``logits_to_keep=1``
also feeds the output layer the last token alone.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from gnmr_fx.compiled_call import CompiledCall
from gnmr_fx.runtime import runtime_of


def generate(model: torch.nn.Module, *args: Any, exact: bool = False, **generate_kwargs: Any) -> Any:
    """``model.generate(*args, **generate_kwargs)`` with every decoding forward on the GNMR graphs.

    Args:
        model: a Hugging Face model compiled with ``gnmr_fx.compile`` (in
            place or not) or trained with ``GNMRCallback``.
        exact: decode without the KV cache (``use_cache=False``) and with
            every position's logits (``logits_to_keep=0``), so each step is
            the compiled forward on the whole sequence (see the module
            docstring for when the cached steps round differently).
        generate_kwargs: passed to ``generate`` as they are, with
            ``disable_compile=True`` added.

    >>> import torch, transformers, gnmr_fx
    >>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
    ...                               bos_token_id=0, eos_token_id=0, pad_token_id=0)
    >>> model = gnmr_fx.compile(transformers.GPT2LMHeadModel(cfg).eval(),
    ...                         gnmr_fx.GNMRConfig(recipe="int8"), backend="eager", inplace=True)
    >>> ids = torch.tensor([[5, 9, 12]])
    >>> gnmr_fx.generate(model, ids, max_new_tokens=4, do_sample=False).shape
    torch.Size([1, 7])
    """
    root = _hf_model(model)
    rt = runtime_of(root)
    forward = root.forward
    if not (isinstance(forward, CompiledCall) and forward.runtime is rt):
        raise ValueError(
            "gnmr_fx.generate: this model's forward is not GNMR-compiled, so generate would run it as written "
            "(torch.compile(model, backend='gnmr') compiles a wrapper's call, which generate does not use; or the "
            "forward was replaced after compiling). Compile it with gnmr_fx.compile(model, config, inplace=True)"
        )
    if generate_kwargs.get("compile_config") is not None or generate_kwargs.get("disable_compile") is False:
        raise ValueError(
            "gnmr_fx.generate: transformers' compilation of the decoding step (compile_config, "
            "disable_compile=False) would trace the model's original forward and decode without GNMR; the "
            "forward is already compiled by GNMR: leave them out"
        )
    if exact:
        if generate_kwargs.get("use_cache", False) or generate_kwargs.get("logits_to_keep", 0):
            raise ValueError("gnmr_fx.generate: exact=True runs the whole sequence through every unit; "
                             "leave out use_cache=True and logits_to_keep")
        generate_kwargs["use_cache"] = False
        if "logits_to_keep" in inspect.signature(forward).parameters:
            # generate's default (1) would feed the output layer the last
            # token alone: another scale group for a per-tensor recipe.
            generate_kwargs["logits_to_keep"] = 0
    generate_kwargs["disable_compile"] = True
    return root.generate(*args, **generate_kwargs)


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that owns ``generate``, behind a torch.compile or DDP wrapper."""
    for m in (model, getattr(model, "_orig_mod", None), getattr(model, "module", None)):
        if isinstance(m, torch.nn.Module) and "generate" in dir(type(m)):
            return m
    raise TypeError(
        f"gnmr_fx.generate needs a model with a Hugging Face generate method (got {type(model).__name__})"
    )
