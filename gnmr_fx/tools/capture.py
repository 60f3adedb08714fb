"""Capture: compile a model once with a private GNMR runtime and record its graphs.

The tools (inspect, diff, export) all start here: :func:`capture` runs the
real GNMR backend (``gnmr_fx.backend.compile_graph``, inner compiler
``eager``) on one forward pass and returns the runtime, whose ``units`` and
``records`` (original and rewritten graph of every captured graph) they read.

It leaves the user's model as it was: no runtime is attached to it, RNG
state is forked, buffers (e.g. BatchNorm statistics) are restored, the
forward runs under ``torch.no_grad()`` so no ``.grad`` is touched, and the
compiled code lives on a fresh code object so it neither shares nor uses up
Dynamo's per-function cache entries of the user's own ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Any, Iterator, Optional, Sequence

import torch

from gnmr_fx.arguments import InputError
from gnmr_fx.backend import compile_graph
from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.discover_units import normalize_source_path
from gnmr_fx.runtime import GNMRRuntime

# Extra Dynamo cache entries inspection may add to a user function that
# breaks its graph (the resumed frames are the user's own code objects).
_RECOMPILE_HEADROOM = 64


class _RecordingBackend:
    """The GNMR backend (eager inner compiler) that also keeps, per graph,
    Dynamo's reason for ending it and the tensors it was called with."""

    def __init__(self, runtime: GNMRRuntime, keep_inputs: bool) -> None:
        self.runtime = runtime
        self.keep_inputs = keep_inputs

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        reason = getattr(gm, "compile_subgraph_reason", None)
        # Dynamo drops its per-placeholder source records after compiling;
        # keep the model path of each input for readable diffs.
        for ph in gm.graph.find_nodes(op="placeholder"):
            source = getattr(ph.meta.get("grapharg"), "source", None)
            if source is not None:
                ph.meta["gnmr_source"] = normalize_source_path(source.name)
        fn = compile_graph(self.runtime, gm, example_inputs, "eager")
        rec = self.runtime.records[-1]
        if reason is not None and getattr(reason, "graph_break", False):
            rec.graph_break_reason = _short_reason(reason)
        if self.keep_inputs:
            rec.extra["example_inputs"] = list(example_inputs)
        return fn


def _short_reason(reason: Any) -> str:
    text = str(getattr(reason, "reason", reason)).strip().splitlines()[0]
    stack = getattr(reason, "user_stack", None) or []
    if stack:
        frame = stack[-1]
        text += f" (at {_rel(frame.filename)}:{frame.lineno} in {frame.name})"
    return text


def _rel(path: str) -> str:
    """A path relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _fresh_caller(tag: int) -> Any:
    """``lambda model, *args, **kwargs: model(*args, **kwargs)`` on a code object of its own.

    Dynamo keeps compiled code per code object, and a code object holds at
    most ``recompile_limit`` entries across all backends. Compiling a new
    code object each time means inspection never evicts or blocks the
    user's compiled entries for ``Model.forward``, however often it runs.
    """

    def call(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return model(*args, **kwargs)

    code = call.__code__.replace(co_name=f"gnmr_capture_{tag}")
    return types.FunctionType(code, call.__globals__, code.co_name)


_TAG = [0]


def as_inputs(example_inputs: Any) -> tuple:
    """Example inputs as a tuple (a lone tensor is one input, not a sequence)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}")
    return tuple(example_inputs)


def as_call(example_inputs: Any, example_kwargs: Optional[dict] = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the example call ``model(*args, **kwargs)``.

    ``example_inputs`` is a tuple of positional inputs, a lone tensor, or a
    dict of keyword inputs (``dict(input_ids=ids, labels=ids)``);
    ``example_kwargs`` adds keyword inputs to positional ones.

    >>> as_call({"input_ids": 1, "labels": 2})
    ((), {'input_ids': 1, 'labels': 2})
    """
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = as_inputs(example_inputs), {}
    if example_kwargs is not None:
        if not isinstance(example_kwargs, dict):
            raise TypeError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
        twice = sorted(set(kwargs) & set(example_kwargs))
        if twice:
            raise TypeError(f"keyword inputs given twice (in example_inputs and example_kwargs): {twice}")
        kwargs.update(example_kwargs)
    return args, kwargs


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module behind a ``torch.compile`` wrapper."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else model


@contextlib.contextmanager
def untouched(model: torch.nn.Module, example_inputs: Sequence) -> Iterator[None]:
    """Run a forward pass that leaves RNG state and buffers as they were."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    devices = sorted({x.device.index or 0 for x in tensors if x.is_cuda})
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in saved and saved[name].shape == b.shape:
                        b.copy_(saved[name])


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    config: GNMRConfig,
    *,
    example_kwargs: Optional[dict] = None,
    keep_inputs: bool = False,
) -> GNMRRuntime:
    """Compile ``model`` with a private GNMR runtime and run one forward,
    ``model(*example_inputs, **example_kwargs)`` (see :func:`as_call`).

    Returns the runtime: its ``units`` and ``records`` (original and
    rewritten graph of every captured graph). ``keep_inputs`` keeps the
    tensors each graph was called with on ``record.extra["example_inputs"]``
    (the ONNX export needs them to bind placeholders).

    >>> import torch
    >>> rt = capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),), GNMRConfig())
    >>> [u.name for u in rt.units], len(rt.records)
    (['weight'], 1)
    """
    root = unwrap(model)
    args, kwargs = as_call(example_inputs, example_kwargs)
    rt = GNMRRuntime(config, root)
    _TAG[0] += 1
    fn = torch.compile(_fresh_caller(_TAG[0]), backend=_RecordingBackend(rt, keep_inputs), dynamic=False)
    limit = torch._dynamo.config.recompile_limit + _RECOMPILE_HEADROOM
    inputs = (*args, *kwargs.values())
    with torch._dynamo.config.patch(recompile_limit=limit), untouched(root, inputs), torch.no_grad():
        fn(root, *args, **kwargs)
    if not rt.records:
        raise InputError(
            "Dynamo captured no graph from this model (is its forward empty, or "
            "disabled with torch.compiler.disable?)"
        )
    return rt
