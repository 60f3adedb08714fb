"""Checkpoint glue: the controller state in ``model.state_dict()`` under ``_gnmr.*``.

The runtime's state dict is flat tensors (safe for ``torch.load(...,
weights_only=True)``): the controller's ``STATE_KEYS``, ``step`` and the unit
``names`` as UTF-8 JSON bytes. This module encodes and checks them, and hooks
them into the root model's ``state_dict`` / ``load_state_dict`` and attribute
path (``model._gnmr.ema``, for torch.distributed.checkpoint). What a load
*does* to the controller is the runtime's (``GNMRRuntime.load_state_dict``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

import torch

from gnmr_fx.controller import OPTIONAL_STATE_KEYS, STATE_KEYS

if TYPE_CHECKING:
    from gnmr_fx.runtime import GNMRRuntime

STATE_PREFIX = "_gnmr."


def attach_state(root: torch.nn.Module, runtime: "GNMRRuntime") -> None:
    """Put ``runtime``'s state into ``root.state_dict()`` and back: the
    ``_gnmr.*`` keys, and the ``root._gnmr`` attribute path that resolves them."""
    expose_state(root, runtime)
    root.register_state_dict_post_hook(_state_dict_hook)
    root.register_load_state_dict_pre_hook(_load_state_dict_hook)
    skip_state_on_save(root)


def skip_state_on_save(root: torch.nn.Module) -> None:
    """Keep the controller state out of weights saved for inference.

    The controller state is training state: it belongs in a training
    checkpoint (``model.state_dict()``), not in a folder of weights that a
    fresh, uncompiled model loads. Hugging Face ``save_pretrained`` (and so
    ``Trainer.save_model``) drops the keys a model lists in
    ``_keys_to_ignore_on_save``; listing the ``_gnmr.*`` keys there makes the
    saved folder load with ``from_pretrained`` with no unexpected key.
    """
    if not hasattr(root, "save_pretrained") or not hasattr(root, "_keys_to_ignore_on_save"):
        return
    keys = {STATE_PREFIX + k for k in ("names", "step", *STATE_KEYS)}
    # An instance attribute: the class's value (shared by every instance) stays as it was.
    root._keys_to_ignore_on_save = set(root._keys_to_ignore_on_save or ()) | keys


def expose_state(root: torch.nn.Module, runtime: "GNMRRuntime") -> None:
    """``root._gnmr.<key>`` resolves the state-dict keys by attribute, as
    torch.distributed.checkpoint's get/set_model_state_dict require. A plain
    attribute, not a submodule: the model's module tree stays the user's."""
    root.__dict__[STATE_PREFIX.rstrip(".")] = StateView(runtime)


def encode_state(sd: dict) -> dict[str, torch.Tensor]:
    """A controller state dict as flat tensors (``names`` as UTF-8 JSON bytes)."""
    sd = dict(sd)
    names = sd.pop("names")
    out = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    out["names"] = torch.tensor(list(json.dumps(names).encode("utf-8")), dtype=torch.uint8)
    out["step"] = torch.tensor(sd["step"], dtype=torch.long)
    return out


def decode_state(flat: dict, prefix: str, strict: bool) -> dict:
    """The controller state dict from its flat tensors, or ``ValueError`` naming the key."""
    known = {"names", "step", *STATE_KEYS}
    absent = [k for k in ("names", "step", *STATE_KEYS) if k not in flat and k not in OPTIONAL_STATE_KEYS]
    if absent:
        raise ValueError(f"GNMR checkpoint: missing {', '.join(prefix + k for k in absent)} "
                         "(not a GNMR state dict, or saved by an older gnmr_fx)")
    unexpected = sorted(k for k in flat if k not in known)
    if unexpected and strict:
        raise ValueError(f"GNMR checkpoint: unexpected {', '.join(prefix + k for k in unexpected)} "
                         "(gnmr_fx.runtime(model).set_strict_load(False) ignores them)")
    t = flat["names"]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{prefix}names must be a 1-D torch.uint8 tensor of UTF-8 JSON (got {got})")
    try:
        text = bytes(t.tolist()).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{prefix}names is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        names = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{prefix}names is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{prefix}names must be a JSON list of distinct unit names (got {text[:120]!r})")
    t = flat["step"]
    if (not isinstance(t, torch.Tensor) or t.dim() != 0 or t.dtype.is_floating_point or t.dtype.is_complex
            or t.dtype == torch.bool):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{prefix}step must be a 0-d integer tensor (got {got})")
    sd = {k: v for k, v in flat.items() if k in known}
    sd["names"], sd["step"] = names, int(t)
    return sd


def subset_state(sd: dict, names: list[str]) -> Optional[dict]:
    """The part of a decoded state dict for ``names`` (None if empty)."""
    if not names:
        return None
    keep = set(names)
    idx = torch.tensor([i for i, n in enumerate(sd["names"]) if n in keep], dtype=torch.long)
    out = {"names": [n for n in sd["names"] if n in keep], "step": sd["step"]}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[:, idx] if k == "hist" else v[idx]
    return out


class StateView:
    """``root._gnmr.<key>``: the controller state under its state-dict key.

    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (and
    ``set_model_state_dict``, which torchtitan's checkpointer uses) resolve
    every state-dict key by ``getattr`` along its dotted path; without this
    attribute the ``_gnmr.*`` keys raise ``AttributeError: ... no attribute
    '_gnmr'``. A plain attribute, not a submodule: the module tree, the
    parameters and ``state_dict()`` itself are unchanged.
    """

    def __init__(self, runtime: "GNMRRuntime") -> None:
        self._runtime = runtime

    def __getattr__(self, name: str) -> torch.Tensor:
        # copy.deepcopy / pickle build the object without __init__ and probe
        # dunders: never recurse through a missing _runtime.
        if name == "_runtime" or name.startswith("__"):
            raise AttributeError(name)
        state = self._runtime.state_dict()
        if name not in state:
            raise AttributeError(f"the GNMR controller state has no entry {name!r}")
        return state[name]


def _state_dict_hook(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    rt = module.__dict__.get("_gnmr_runtime")
    if rt is None:
        return
    for k, v in rt.state_dict().items():
        state_dict[prefix + STATE_PREFIX + k] = v


def _load_state_dict_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    rt = module.__dict__.get("_gnmr_runtime")
    head = prefix + STATE_PREFIX
    keys = [k for k in state_dict if k.startswith(head)]
    if not keys:
        return  # a weights-only checkpoint: the controller starts fresh
    # Raised here, before any parameter is loaded, rather than appended to
    # error_msgs: a bad GNMR state is a ValueError naming its key.
    flat = {k[len(head):]: state_dict.pop(k) for k in keys}
    if rt is not None:
        rt.load_state_dict(flat, prefix=head)  # `strict` here is always True: see set_strict_load
