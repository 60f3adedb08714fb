"""GNMR under data parallelism (DDP, FSDP2): the same plan on every rank.

GNMR's plan chooses which kernel each unit runs. If two ranks chose
differently they would train different numerics, so the ranks must decide
from the same statistics:

* :func:`enable` makes a compiled model's runtime combine the ranks'
  statistics once per step: one ``all_reduce`` (SUM) of one vector
  ``[sumsq | seen]`` of length ``2 * num_units`` over the data-parallel
  group, in ``GNMRRuntime._reduce``. No collective per unit. Every rank then
  runs the identical, deterministic controller update on identical inputs.
* :func:`compile_blocks` compiles each transformer block on its own with one
  runtime shared at the root (the order torchtitan uses: compile per block,
  then shard).

Which quantity is measured
--------------------------
On rank ``r`` a unit's grad-stats node sits on the operand the compiled graph
multiplies with. Under DDP that is the rank's local weight; under FSDP2 it
is the *unsharded* weight that FSDP all-gathered before the block ran. So
``s_r[u]`` is the sum, over the rank's micro-batches ``m``, of the squared
norm of the *local* gradient ``||dL_{r,m}/dW_u||^2`` (for a weightless unit:
of its output gradient), computed in backward before DDP's all-reduce or
FSDP2's reduce-scatter. No shard is involved.

DDP and FSDP2 divide the summed gradients by ``F`` (the group size unless
changed, e.g. FSDP2 ``set_gradient_divide_factor``), so the update follows
``sum_r grad(L_r) / F``. The reduced statistic is::

    S[u] = (1 / F**2) * sum_r s_r[u] = sum_{r,m} ||d(L_{r,m} / F) / dW_u||^2

which is exactly what one process records when it runs the same global batch
as the same per-rank micro-batches, each loss divided by ``F`` (gradient
accumulation that reproduces the data-parallel update). Tested in
``tests/test_distributed.py`` to float tolerance.

It is not ``||sum_r grad(L_r) / F||^2``, the norm of the averaged gradient:
that needs the cross terms between ranks, i.e. a per-unit gradient reduction
that weightless units do not have, and it would differ from the
single-process definition, which also sums squared norms over micro-batches.
GNMR is a ratio to the unit's own history, so the factor ``1 / F**2`` does not
change decisions; it makes logged norms comparable with single-process runs.
A NaN or inf on any rank makes ``S`` non-finite on every rank, so every rank
triggers the unit together.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from gnmr_fx.backend import COMPILERS, GNMRBackend
from gnmr_fx.checkpoint import expose_state
from gnmr_fx.compiled_call import compile_module
from gnmr_fx.config import GNMRConfig
from gnmr_fx.runtime import GNMRRuntime, runtime_of


def enable(
    model: nn.Module,
    process_group: Optional[dist.ProcessGroup] = None,
    *,
    grad_divide_factor: Optional[float] = None,
) -> GNMRRuntime:
    """Make every rank of ``process_group`` compute the same plan for ``model``.

    Call it once, after ``gnmr_fx.compile`` / :func:`compile_blocks` and before
    the first optimizer step, with ``torch.distributed`` initialized.

    Args:
        model: a model compiled with GNMR (the compiled wrapper, the model
            itself, or a DDP wrapper of it).
        process_group: the data-parallel group (default: the world). With
            tensor / pipeline parallelism pass the data-parallel group of
            this rank: ranks of one group must own the same units.
        grad_divide_factor: what the data-parallel engine divides summed
            gradients by (default: the group size, as DDP and FSDP2 do); the
            summed statistics are scaled by ``1 / grad_divide_factor**2``.

    Returns:
        the model's :class:`GNMRRuntime`.

    Example, under ``torchrun --nproc_per_node=2`` (the full script is in
    ``docs/multi_gpu.md``; tested by ``tests/test_distributed.py``)::

        torch.distributed.init_process_group("nccl")
        model = DDP(model.cuda())
        model = gnmr_fx.compile(model, config, optimizer=opt)
        gnmr_fx.distributed.enable(model)  # rt.dp_scale == 1 / 2**2
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "gnmr_fx.distributed.enable needs torch.distributed initialized: "
            "call torch.distributed.init_process_group first (torchrun sets the environment)"
        )
    group = process_group if process_group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    factor = float(size if grad_divide_factor is None else grad_divide_factor)
    if not factor > 0:
        raise ValueError(f"grad_divide_factor must be > 0 (got {grad_divide_factor!r})")
    rt = runtime_of(model)
    rt.set_data_parallel(group, 1.0 / (factor * factor))
    _expose_state(rt)
    return rt


def disable(model: nn.Module) -> GNMRRuntime:
    """Let this rank decide from its own statistics alone (no collective).

    Only for models that are not data-parallel replicas (e.g. a per-rank
    evaluation model); replicas must use :func:`enable`.

    >>> import torch, gnmr_fx, gnmr_fx.distributed
    >>> model = gnmr_fx.compile(torch.nn.Linear(4, 4), gnmr_fx.GNMRConfig(recipe="int8"), backend="eager")
    >>> gnmr_fx.distributed.disable(model).dp_local
    True
    """
    rt = runtime_of(model)
    rt.set_data_parallel(None, local=True)
    return rt


def compile_blocks(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    config: Optional[GNMRConfig] = None,
    *,
    backend: str = "inductor",
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> GNMRRuntime:
    """Compile each block of ``model`` with GNMR, one runtime for the model.

    The torchtitan order: compile per block, then shard (``fully_shard`` on
    each block and on the root), then :func:`enable`. Each block is compiled
    in place (its forward, as ``gnmr_fx.compile`` does), so module paths, parameter names and
    state-dict keys stay those of the uncompiled model, and units are named
    by their full path (``blocks.3.attn.qkv``). Code outside the blocks (the
    embedding, the head) runs as written and holds no unit.

    Each block gets its own backend instance. With one shared backend Dynamo
    would reuse block 0's graph for every block of the same class (the
    parameters are graph inputs), and all blocks would share block 0's units
    and statistics. Distinct backends make one graph per block, each in its
    own Dynamo cache (``isolate_recompiles``), so the number of blocks is not
    limited by ``torch._dynamo.config.recompile_limit``.

    Args:
        model: the root model; the runtime and the controller state in its
            ``state_dict()`` (``_gnmr.*`` keys) live here.
        blocks: submodules of ``model`` to compile, e.g. ``model.layers``.
        config, backend, optimizer: as in ``gnmr_fx.compile``.

    Returns:
        the shared :class:`GNMRRuntime` (also ``gnmr_fx.runtime(model)``).

    >>> import torch, gnmr_fx, gnmr_fx.distributed
    >>> from gnmr_fx.models import TinyGPT, GPTConfig
    >>> model = TinyGPT(GPTConfig(n_layer=2, n_embd=16, block_size=8))
    >>> rt = gnmr_fx.distributed.compile_blocks(model, model.blocks, gnmr_fx.GNMRConfig(recipe="int8"), backend="eager")
    >>> idx = torch.randint(0, 256, (1, 8))
    >>> model(idx, idx).backward()
    >>> len(rt.records), rt.unit_names[6]
    (2, 'blocks.1.attn.qkv')
    """
    if backend not in COMPILERS:
        raise ValueError(f"backend must be one of {COMPILERS} (got {backend!r})")
    config = config if config is not None else GNMRConfig()
    if not isinstance(config, GNMRConfig):
        raise TypeError(f"config must be a GNMRConfig, got {type(config).__name__}")
    config.check_log_path()
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks is empty: pass the submodules to compile, e.g. model.layers")
    inside = {id(m) for m in model.modules()}
    for i, b in enumerate(blocks):
        if not isinstance(b, nn.Module) or id(b) not in inside or b is model:
            raise ValueError(
                f"blocks[{i}] is not a submodule of model: pass submodules such as model.layers "
                "(to compile the whole model use gnmr_fx.compile)"
            )
    rt = GNMRRuntime.attach(model, config)
    if optimizer is not None:
        rt.attach_optimizer(optimizer)
    fqns = {id(m): n for n, m in model.named_modules()}
    rt.set_compiled_scope([fqns[id(b)] for b in blocks])
    for block in blocks:
        # In place, hooks outside the compiled frame (FSDP2's all-gather).
        compile_module(block, _BlockBackend(rt, backend))
    _expose_state(rt)
    return rt


def _expose_state(rt: GNMRRuntime) -> None:
    root = rt.root
    if root is not None:
        expose_state(root, rt)


class _BlockBackend(GNMRBackend):
    """A GNMR backend that re-reads the root's parameters before each capture.

    FSDP2 swaps unsharded parameters into a block just before it runs (and
    ``fully_shard`` replaced the originals with DTensors), so the parameter
    objects Dynamo sees are not the ones the runtime indexed when it was
    attached. Re-indexing at capture time names units by the parameters that
    are really in the graph; clearing first drops ids of freed parameters,
    which Python may hand to new objects.
    """

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        self.runtime.reindex_root()
        return super().__call__(gm, example_inputs)
