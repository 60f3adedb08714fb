"""Compiling a module's forward in place, in a Dynamo cache of its own.

``gnmr_fx.compile`` and ``gnmr_fx.distributed.compile_blocks`` replace a
module's ``forward`` by a :class:`CompiledCall`, whose compiled frame runs
the GNMR backend (``gnmr_fx.backend``) on every graph Dynamo captures.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import types
from typing import TYPE_CHECKING, Any, Callable

import torch

from gnmr_fx.runtime import GNMRRuntime

if TYPE_CHECKING:
    from gnmr_fx.backend import GNMRBackend


def compile_module(module: torch.nn.Module, backend: "GNMRBackend") -> "CompiledCall":
    """Compile ``module.forward`` with ``backend``, in place and in a cache of its own.

    ``module.forward`` becomes a :class:`CompiledCall`; ``module(...)`` runs
    its hooks as written and then the compiled forward (what
    ``nn.Module.compile`` does for a module with a user-defined forward).
    Three choices make every call reach the GNMR backend:

    * The compiled frame is a function of this file that calls the forward.
      Dynamo never compiles a frame of ``torch.nn`` code (``_call_impl``,
      ``nn.Sequential.forward``, ``nn.Linear.forward``) on its own, only
      inlined into a frame it traces, so a model made only of ``torch.nn``
      modules whose call graph-breaks before its forward (DDP's forward,
      FSDP2's pre-forward hook, both untraceable) would give 0 graphs.
    * The hooks run outside the compiled frame: the graph break they cause
      would, inside it, give up the whole call (Dynamo resumes only in the
      frame it compiles, not in an inlined call).
    * Each compile has a Dynamo cache of its own. Dynamo keeps compiled code
      per code object, and each compile has its own backend object, so
      every compile of a model class would otherwise add an entry to one
      shared cache and the 9th would run uncompiled (``recompile_limit``
      8). The compiled function gets a code object of its own (so other
      compiles never count towards ``accumulated_recompile_limit``, and
      its entries are freed with the module), and ``isolate_recompiles=True``
      gives the frames below it (graph breaks inside ``forward``) a region
      of their own in their code objects' caches.

    A second compile of the same module compiles its original forward again.
    """
    forward = module.forward
    if isinstance(forward, CompiledCall):
        forward = forward.forward

    def gnmr_forward(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    code = gnmr_forward.__code__.replace(co_name=f"gnmr_forward_{next(_COMPILES)}")
    fresh = types.FunctionType(code, gnmr_forward.__globals__, code.co_name, None, gnmr_forward.__closure__)
    call = CompiledCall(backend.runtime, torch.compile(fresh, backend=backend, **ISOLATE), forward)
    # Every forward of this runtime's graphs now starts in CompiledCall, so
    # the step's host copy of the plan can finish there.
    backend.runtime.defer_host_copy = True
    module.forward = call
    return call


_COMPILES = itertools.count()
# torch.compile(isolate_recompiles=...) is torch 2.13+. Older torch (the
# 2.11 of the GPU image) still gets a code object per compile; only frames
# resumed after a graph break inside forward then share their cache across
# compiles of one class, and a compile that would overflow it raises
# (CompiledCall) instead of running uncompiled.
ISOLATE = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


class CompiledCall:
    """A compiled module call that never runs uncompiled without an error.

    ``torch._dynamo.config.fail_on_recompile_limit_hit`` is set for the
    duration of the call only, so other compiled code in the process keeps
    Dynamo's default (fall back to eager). After each call, until its check
    ran, the runtime sees the output (``GNMRRuntime.note_call``).
    """

    def __init__(self, runtime: GNMRRuntime, fn: Callable, forward: Callable) -> None:
        self.runtime = runtime
        self.fn = fn
        self.forward = forward  # the module's own forward, as compiled
        # Like the bound method it replaces: module paths that Dynamo reads
        # through it (``model.forward.__self__.head``) name the module
        # (``split_source_path``).
        self.__self__ = getattr(forward, "__self__", None)
        self.__func__ = getattr(forward, "__func__", None)
        # inspect.signature follows __wrapped__: callers that read the
        # forward's parameters (transformers.Trainer keeps only the dataset
        # columns the model accepts) see the model's, not (*args, **kwargs).
        self.__wrapped__ = forward

    def __deepcopy__(self, memo: dict) -> Callable:
        # A copy of a compiled module is an uncompiled module: its forward is
        # the one this module had before compiling, bound to the copy (the
        # copy is in the memo before its attributes are copied).
        return copy.deepcopy(self.forward, memo)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # Traced by an enclosing torch.compile (gnmr_fx.inspect's capture):
            # the forward is inlined into its graph, as Dynamo does with any
            # nested compiled function.
            if self.__func__ is not None:
                return self.__func__(self.__self__, *args, **kwargs)
            return self.forward(*args, **kwargs)
        self.runtime.before_forward()
        cfg = torch._dynamo.config
        prior = cfg.fail_on_recompile_limit_hit
        # suppress_errors (the user's explicit choice of eager fallbacks) and
        # fail_on_recompile_limit_hit cannot both be set.
        cfg.fail_on_recompile_limit_hit = not cfg.suppress_errors
        try:
            out = self.fn(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise RuntimeError(
                f"Dynamo hit its recompile limit (torch._dynamo.config.recompile_limit = {cfg.recompile_limit}, "
                f"accumulated_recompile_limit = {cfg.accumulated_recompile_limit}) on this GNMR-compiled model: "
                "it would run this call uncompiled, without GNMR. Find what recompiles with "
                "TORCH_LOGS=recompiles (new input shapes: mark_dynamic or pad; a new model per call: reuse one) "
                "or raise the limit"
            ) from e
        finally:
            cfg.fail_on_recompile_limit_hit = prior
        self.runtime.note_call(out)
        return out
