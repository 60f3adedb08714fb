"""``gnmr_fx.compile`` and the accessors users call from their training loop."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from gnmr_fx.backend import COMPILERS, GNMRBackend
from gnmr_fx.compiled_call import compile_module
from gnmr_fx.config import GNMRConfig
from gnmr_fx.controller import GNMRController
from gnmr_fx.runtime import GNMRRuntime, runtime_of


def compile(  # noqa: A001 - mirrors torch.compile on purpose
    model: torch.nn.Module,
    config: Optional[GNMRConfig] = None,
    *,
    backend: str = "inductor",
    optimizer: Optional[torch.optim.Optimizer] = None,
    example_inputs: Optional[Sequence] = None,
    log: Optional[str] = None,
    on_inactive: str = "raise",
    inplace: bool = False,
) -> torch.nn.Module:
    """Compile ``model`` with GNMR: one line in an existing training loop.

    Args:
        model: the model to train.
        config: a :class:`GNMRConfig` (defaults if None).
        backend: what runs the rewritten graphs: ``"inductor"``,
            ``"aot_eager"`` or ``"eager"``.
        optimizer: if given, the controller updates once per
            ``optimizer.step()`` (gradient accumulation friendly); otherwise
            once per backward.
        example_inputs: if given, one forward pass runs now (RNG state is
            preserved) so units are discovered and the unit filter is
            checked before training starts.
        log: path of a JSON-lines telemetry file (same as ``config.log``);
            its directory must exist and be writable (checked here).
        on_inactive: ``"raise"`` (default) or ``"warn"``: what happens at the
            first optimizer step (or the first backward without an optimizer)
            when GNMR controls no unit: no graph reached the GNMR backend
            (the compiled module was never called, Dynamo skipped the
            forward) or the graphs hold no recoverable op. The error says
            which; ``"warn"`` warns once instead, for models where that is
            expected. The check runs once (no per-step cost).
        inplace: return ``model`` itself instead of a ``torch.compile``
            wrapper. Its forward is compiled either way; in place, the object
            the user holds stays the one to call, with its own state-dict
            keys (plus ``_gnmr.*``) and methods (Hugging Face
            ``save_pretrained``, ``generate``), as libraries that inspect or
            save the model (``transformers.Trainer``) expect.

    Returns:
        the module to call: ``torch.compile``'s wrapper of ``model`` (state
        keys ``_orig_mod.*``); with ``inplace=True``, ``model`` itself (state
        keys as before, plus ``_gnmr.*``); or, for a
        ``DistributedDataParallel`` model, the DDP wrapper itself with its
        module compiled in place (DDP's forward and gradient hooks stay
        outside the graphs; state keys ``module.*``).

    >>> import torch, gnmr_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> model = gnmr_fx.compile(model, gnmr_fx.GNMRConfig(recipe="int8"), backend="eager", optimizer=opt)
    >>> loss = model(torch.randn(4, 8)).square().mean()
    >>> loss.backward(); opt.step(); opt.zero_grad()
    >>> gnmr_fx.controller(model).names
    ['0', '2']
    >>> gnmr_fx.controller(model).step
    1
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 2))
    >>> gnmr_fx.compile(net, gnmr_fx.GNMRConfig(recipe="int8"), backend="eager", inplace=True) is net
    True
    >>> sorted(k for k in net.state_dict() if not k.startswith("_gnmr."))
    ['0.bias', '0.weight']
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"gnmr_fx.compile expects an nn.Module, got {type(model).__name__}")
    if backend not in COMPILERS:
        raise ValueError(f"backend must be one of {COMPILERS} (got {backend!r})")
    config = config if config is not None else GNMRConfig()
    if not isinstance(config, GNMRConfig):
        raise TypeError(f"config must be a GNMRConfig, got {type(config).__name__}")
    if log is not None:
        config = config.replace(log=log)
    config.check_log_path()  # a bad path fails here, not log_every steps into training
    _check_wrapping(model)
    # A DDP wrapper's state dict is its module's with a "module." prefix: the
    # runtime belongs to the wrapped model, so unit names are the model's own.
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    root = model.module if ddp else model
    rt = GNMRRuntime.attach(root, config)
    rt.set_on_inactive(on_inactive)
    if optimizer is not None:
        rt.attach_optimizer(optimizer)
    # The model is compiled in place (its forward, see compile_module): the
    # hooks of the model and of its wrappers (DDP's forward, FSDP2's
    # all-gather) run as written around the compiled forward.
    compile_module(root, GNMRBackend(rt, backend))
    if ddp or inplace:
        compiled = model
    else:
        # torch.compile's wrapper keeps the interface (and the state-dict
        # keys, _orig_mod.*) of torch.compile(model). Its forward is the
        # model's call, which runs the compiled forward: a Dynamo frame of
        # its own there would trace the compiled call itself (its backend,
        # never called, is a placeholder).
        compiled = torch.compile(model, backend="eager")
        setattr(compiled, "_forward" if "_forward" in compiled.__dict__ else "forward", model.__call__)
    if example_inputs is not None:
        with torch.random.fork_rng(devices=_cuda_devices(example_inputs)):
            compiled(*example_inputs)
        rt.check_filter()
    return compiled


def runtime(model: torch.nn.Module) -> GNMRRuntime:
    """The GNMR runtime of a compiled model: units, graph records, step()."""
    return runtime_of(model)


def controller(model: torch.nn.Module) -> GNMRController:
    """The controller of a compiled model: ``names``, ``plan``, ``gnmr``,
    ``delta_gnmr``, ``report()``."""
    return runtime_of(model).controller


def _check_wrapping(model: torch.nn.Module) -> None:
    """Refuse orders of wrapping whose units could not be told apart."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return
    sharded = [n for n, m in model.named_modules() if n and isinstance(m, FSDPModule)]
    if sharded:
        raise ValueError(
            f"gnmr_fx.compile got a model whose submodules are sharded with fully_shard ({sharded[0]}, ...): "
            "the unsharded parameters FSDP2 swaps in are not the model's, so units of different blocks "
            "could not be told apart. Compile per block before sharding: "
            "gnmr_fx.distributed.compile_blocks(model, model.blocks, config)"
        )


def _cuda_devices(inputs: Sequence) -> list:
    return sorted({x.device.index or 0 for x in inputs if isinstance(x, torch.Tensor) and x.is_cuda})
