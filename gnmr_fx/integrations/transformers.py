"""GNMR under Hugging Face ``transformers.Trainer``: :class:`GNMRCallback`.

``Trainer(model=model, args=args, train_dataset=ds, callbacks=[GNMRCallback(config)])``
trains an *uncompiled* model under GNMR with the Trainer's defaults
(``remove_unused_columns``, any ``gradient_accumulation_steps``). What the
callback does, by Trainer event:

* ``on_init_end``: refuses ``TrainingArguments(torch_compile=True)``:
  accelerate would wrap the model in ``torch.compile`` with its own backend,
  whose trace of the model's call inlines the original forward, so GNMR would
  never run. (``torch_compile_backend="gnmr"`` never gets this far:
  accelerate accepts only the names of its ``DynamoBackend`` enum and raises
  ``'GNMR' is not a valid DynamoBackend`` while the Trainer is built; it
  has no way to pass a custom backend. This callback is the way.)
* ``on_train_begin``: compiles the model in place
  (``gnmr_fx.compile(model, config, inplace=True)``: the Trainer's model stays
  the object it saves and calls) and attaches the controller to the torch
  optimizer inside accelerate's wrapper, so the controller steps once per
  optimizer step, not once per micro-batch. Under ``torch.distributed`` with
  several ranks it calls ``gnmr_fx.distributed.enable``. When the Trainer
  resumes (``global_step > 0``) it restores the controller from the
  checkpoint's ``gnmr_controller.pt``.
* ``on_log``: adds ``gnmr/step``, ``gnmr/units_high`` (units on the high
  path now), ``gnmr/triggered`` and ``gnmr/denied`` (summed over the steps
  since the last log), ``gnmr/budget_used`` and ``gnmr/budget`` (high-path
  cost now, and the cap, in the units of ``max_o``: units, or FLOPs for a
  fractional ``max_o``) to the training logs and ``trainer.state.log_history``.
  Loggers run in the Trainer's callback order: the console and callbacks
  after this one see them. ``report_to`` integrations (W&B, TensorBoard,
  MLflow, ...) run before the callbacks passed in ``callbacks=``, so to log
  the GNMR scalars there add the callback with
  ``GNMRCallback(config).attach(trainer)`` instead: it goes first.
* ``on_save``: writes the controller state (the ``_gnmr.*`` tensors of
  ``model.state_dict()``, ``torch.load(..., weights_only=True)``-safe) to
  ``checkpoint-N/gnmr_controller.pt``. The model's weights
  (``model.safetensors``) hold no ``_gnmr`` key: ``save_pretrained`` skips
  them, so ``from_pretrained`` loads the folder with no unexpected key.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import warnings
from typing import Any, Optional, Union

import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:  # an optional extra: say how to get it
    raise ImportError(
        "gnmr_fx.integrations.transformers needs Hugging Face transformers: pip install \"gnmr-fx[hf]\""
    ) from e

from gnmr_fx import distributed
from gnmr_fx.api import compile as gnmr_compile
from gnmr_fx.api import runtime as runtime_of
from gnmr_fx.arguments import InputError, parse_max_o
from gnmr_fx.backend import COMPILERS
from gnmr_fx.compiled_call import CompiledCall
from gnmr_fx.config import GNMRConfig
from gnmr_fx.runtime import GNMRRuntime
from gnmr_fx.tools.profile import Profile, profile, rng_devices

logger = logging.getLogger(__name__)

CONTROLLER_FILE = "gnmr_controller.pt"
_PREFIX = "_gnmr."
_GLOBAL_STEP = "trainer_global_step"  # which checkpoint the file belongs to


def _count_or_fraction(value: Any, field: str, what: str, *, top_inclusive: bool) -> Optional[Union[int, float]]:
    """A callback argument that is None, an int >= 1, or a fraction (a float
    or ``"10%"``, read as ``max_o`` is) in (0, 1) or (0, 1]; else ValueError naming ``field``."""
    if value is None:
        return None
    try:
        value = parse_max_o(value) if isinstance(value, str) else value
    except InputError as e:
        raise ValueError(f"{field}: {e}") from None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, int) and value < 1)
            or (isinstance(value, float) and not (0.0 < value <= 1.0 if top_inclusive else 0.0 < value < 1.0))):
        raise ValueError(f"{field} must be {what} (got {value!r})")
    return value


class GNMRCallback(TrainerCallback):
    """Train a Hugging Face model under GNMR with ``transformers.Trainer``.

    Args:
        config: the :class:`GNMRConfig` (defaults if None).
        backend: what runs the rewritten graphs (``gnmr_fx.compile``'s
            ``backend``): ``"inductor"``, ``"aot_eager"`` or ``"eager"``.
        on_inactive: ``gnmr_fx.compile``'s ``on_inactive`` (``"raise"``:
            a model GNMR controls no unit of raises at the first step).
        resume_from: the checkpoint folder (or ``gnmr_controller.pt`` file)
            to restore the controller from when the Trainer resumes. Default:
            ``args.output_dir/checkpoint-<global step>``, where the Trainer
            wrote it; pass the folder you resume from when it lies elsewhere.
        strict_resume: a resumed run whose checkpoint has no controller state
            raises (default); with False it warns and the controller starts
            fresh (warm-up again).
        pin_profile: at the start of a fresh run, profile the units on the
            first ``profile_batches`` training batches (``gnmr_fx.profile``:
            how far the whole gradient moves with only that unit low) and pin
            high the units of largest error within this budget (a unit count,
            a FLOP fraction such as ``0.1`` or ``"10%"``; pins count against
            ``max_o``: keep it below, or ``pin`` warns that GNMR has no room
            left). The profile is kept as ``callback.profile`` and the
            pinned units are logged; a resumed run takes its pins from the
            checkpoint's controller state instead. None (default): no profile.
        profile_batches: how many training batches the profile uses (>= 1).
        high_start: every unit on the high path for the first steps of the
            run (``GNMRConfig.high_start_steps``, outside ``max_o``): a step
            count (int >= 1) or a fraction of the Trainer's ``max_steps``
            (a float in (0, 1) or ``"10%"``), resolved at train begin. The
            remedy the GPU evidence supports where no unit stands out in the
            profile (benchmarks/RESULTS.md). None (default): the config's
            ``high_start_steps``; giving both raises.

    The model must be uncompiled, or compiled in place with the same config
    (``gnmr_fx.compile(model, config, inplace=True)``).

    >>> import tempfile, transformers, gnmr_fx
    >>> from gnmr_fx.integrations.transformers import GNMRCallback
    >>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
    ...                               bos_token_id=0, eos_token_id=0)
    >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), use_cpu=True, torch_compile=True,
    ...                                       torch_compile_backend="aot_eager", report_to="none")
    >>> transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args,
    ...                      callbacks=[GNMRCallback(gnmr_fx.GNMRConfig(recipe="int8"))])
    Traceback (most recent call last):
    ...
    ValueError: GNMRCallback: TrainingArguments(torch_compile=True) ...
    """

    def __init__(
        self,
        config: Optional[GNMRConfig] = None,
        *,
        backend: str = "inductor",
        on_inactive: str = "raise",
        resume_from: Optional[str] = None,
        strict_resume: bool = True,
        pin_profile: Optional[Union[int, float, str]] = None,
        profile_batches: int = 4,
        high_start: Optional[Union[int, float, str]] = None,
    ) -> None:
        config = config if config is not None else GNMRConfig()
        if not isinstance(config, GNMRConfig):
            raise TypeError(f"config must be a GNMRConfig, got {type(config).__name__}")
        if backend not in COMPILERS:
            raise ValueError(f"backend must be one of {COMPILERS} (got {backend!r})")
        if on_inactive not in ("raise", "warn"):
            raise ValueError(f"on_inactive must be 'raise' or 'warn' (got {on_inactive!r})")
        self.config = config
        self.backend = backend
        self.on_inactive = on_inactive
        self.resume_from = resume_from
        self.strict_resume = bool(strict_resume)
        pin_profile = _count_or_fraction(pin_profile, "pin_profile", "a unit count (int >= 1) or a FLOP fraction in (0, 1]",
                                         top_inclusive=True)
        if isinstance(profile_batches, bool) or not isinstance(profile_batches, int) or profile_batches < 1:
            raise ValueError(f"profile_batches must be an int >= 1 (got {profile_batches!r})")
        high_start = _count_or_fraction(high_start, "high_start",
                                        "a step count (int >= 1) or a fraction of max_steps in (0, 1)", top_inclusive=False)
        if high_start is not None and config.high_start_steps:
            raise ValueError(f"high_start: the config already has high_start_steps={config.high_start_steps}; "
                             "give one of them")
        self.pin_profile = pin_profile
        self.profile_batches = profile_batches
        self.high_start = high_start
        self.profile: Optional[Profile] = None
        self.runtime: Optional[GNMRRuntime] = None
        self._logged: Optional[tuple[int, int]] = None  # cumulative (triggers, denied) at the last log

    def attach(self, trainer: Any) -> "GNMRCallback":
        """Add this callback to ``trainer`` ahead of every other callback, and
        return it.

        The Trainer calls its ``report_to`` integrations before the callbacks
        passed in ``callbacks=``, so those loggers would log each step before
        this callback adds the ``gnmr/*`` scalars; attached first, every
        logger sees them. Use it instead of ``callbacks=[...]``, before
        ``trainer.train()``. A Trainer that already holds a GNMRCallback is
        refused (two would compile the model twice).
        """
        handler = getattr(trainer, "callback_handler", None)
        if handler is None:
            raise TypeError(f"GNMRCallback.attach takes a transformers.Trainer, got {type(trainer).__name__}")
        if any(isinstance(cb, GNMRCallback) for cb in handler.callbacks):
            raise ValueError("GNMRCallback.attach: this Trainer already has a GNMRCallback "
                             "(pass it in callbacks= or attach it, not both)")
        _check_args(trainer.args)  # what on_init_end checks: it has run already for this Trainer
        handler.callbacks.insert(0, self)
        return self

    # ----------------------------------------------------------- events
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _check_args(args)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[torch.nn.Module] = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        _check_args(args)
        if model is None or optimizer is None:
            raise RuntimeError("GNMRCallback: the Trainer passed no model or no optimizer at train begin")
        rt = self._compile(model, _torch_optimizer(optimizer))
        if self.high_start is not None:
            self._set_high_start(rt, state)
        if state.global_step > 0:
            self._restore(rt, args, state)
        elif self.pin_profile is not None:
            self._profile_and_pin(rt, model, kwargs.get("train_dataloader"))
        # A restored state reaches the controller as the units compile (the
        # first forward): count triggers from there, before the first update.
        self._logged = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._logged is None and self.runtime is not None:
            ctl = self.runtime.controller
            self._logged = (int(ctl.n_triggers.sum()), int(ctl.n_denied.sum()))

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        if self.runtime is None or self._logged is None or logs is None or "loss" not in logs:
            return  # evaluation and end-of-training summaries carry no GNMR step
        scalars = self.scalars()
        logs.update(scalars)
        # Trainer.log appended a copy of ``logs`` before calling back.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(scalars)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.runtime is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise RuntimeError(
                f"GNMRCallback: the Trainer saved a checkpoint but {folder} does not exist, so the GNMR controller "
                "state has nowhere to go (hyperparameter-search runs write elsewhere: not supported)"
            )
        save_controller(self.runtime, os.path.join(folder, CONTROLLER_FILE), global_step=state.global_step)

    # ----------------------------------------------------------- helpers
    def _profile_and_pin(self, rt: GNMRRuntime, model: torch.nn.Module, loader: Any) -> None:
        if loader is None:
            raise RuntimeError("GNMRCallback(pin_profile=...): the Trainer passed no train_dataloader at train begin")
        # A forked RNG: drawing the batches (and the profile's passes) leaves
        # the run's data order and randomness as they would be without it.
        with torch.random.fork_rng(devices=rng_devices(model)):
            batches = list(itertools.islice(iter(loader), self.profile_batches))
        if not batches:
            raise RuntimeError("GNMRCallback(pin_profile=...): the train dataloader yielded no batch to profile")
        self.profile = profile(model, batches)
        rt.pin(self.profile.pick(self.pin_profile))
        pinned = [n for n, p in zip(rt.controller.names, rt.controller.pinned.tolist()) if p]
        logger.info("GNMR: pinned %d unit(s) high from a profile of %d batch(es): %s",
                    len(pinned), len(batches), ", ".join(pinned))

    def _set_high_start(self, rt: GNMRRuntime, state: Any) -> None:
        if isinstance(self.high_start, int):
            steps = self.high_start
        else:
            max_steps = int(getattr(state, "max_steps", 0) or 0)
            if max_steps < 1:
                raise RuntimeError(f"GNMRCallback(high_start={self.high_start!r}): the Trainer's max_steps is "
                                   f"{max_steps} at train begin; give high_start as a step count")
            steps = max(1, round(self.high_start * max_steps))
        if rt.config.high_start_steps != steps:
            # Before the first update of this run (a resume restores the state after it).
            rt.reset_controller(rt.config.replace(high_start_steps=steps))
        logger.info("GNMR: every unit high for the first %d optimizer step(s)", steps)

    def scalars(self) -> dict[str, float]:
        """The GNMR scalars of a training log (read on the host: a few scalar copies per log, not per step)."""
        ctl = self.runtime.controller
        triggers, denied = int(ctl.n_triggers.sum()), int(ctl.n_denied.sum())
        out = {
            "gnmr/step": ctl.step,
            "gnmr/units_high": int(ctl.plan.sum()),
            "gnmr/triggered": triggers - self._logged[0],
            "gnmr/denied": denied - self._logged[1],
            "gnmr/budget_used": float(ctl.budget_used()),
            "gnmr/budget": float(ctl.budget),
            "gnmr/pinned": int(ctl.pinned.sum()),
        }
        self._logged = (triggers, denied)
        return out

    def _compile(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> GNMRRuntime:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            # Its state dict is the model's under "_orig_mod.": Trainer.save_model
            # would write weights that from_pretrained cannot load.
            raise ValueError(
                "GNMRCallback: the Trainer got a torch.compile wrapper (state keys _orig_mod.*, which "
                "save_model would write); give it the model itself, uncompiled or compiled with "
                "gnmr_fx.compile(model, config, inplace=True)"
            )
        rt = _existing_runtime(model)
        # The high start is resolved from max_steps at train begin (a second train() may see another).
        if rt is not None and rt.config.replace(high_start_steps=self.config.high_start_steps) != self.config:
            raise ValueError(
                "GNMRCallback: the model is already compiled with a different GNMRConfig; pass the same "
                "config, or give the Trainer an uncompiled model"
            )
        forward = getattr(model, "forward", None)
        if rt is not None and isinstance(forward, CompiledCall) and forward.runtime is rt:
            # Compiled in place already: by the user, or by an earlier train()
            # of this Trainer (which made a new optimizer).
            rt.attach_optimizer(optimizer)
        else:
            # Uncompiled, or compiled before accelerate replaced the forward
            # (mixed precision wraps ``model.forward.__func__``, the original
            # function): compile the forward the Trainer calls now. A model
            # compiled before keeps its runtime, units and controller.
            gnmr_compile(model, self.config, backend=self.backend, optimizer=optimizer,
                         on_inactive=self.on_inactive, inplace=True)
            rt = runtime_of(model)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            distributed.enable(model)  # every rank decides from the same statistics
        self.runtime = rt
        return rt

    def _restore(self, rt: GNMRRuntime, args: Any, state: Any) -> None:
        where = self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = where if os.path.isfile(where) else os.path.join(where, CONTROLLER_FILE)
        if not os.path.isfile(path):
            message = (
                f"GNMRCallback: the Trainer resumes at global step {state.global_step} but {path} does not exist, "
                "so the GNMR controller cannot resume. If you resume from a folder outside args.output_dir, pass "
                "GNMRCallback(config, resume_from=that_folder); to start the controller fresh (warm-up again), "
                "pass strict_resume=False"
            )
            if self.strict_resume:
                raise FileNotFoundError(message)
            warnings.warn(message.replace("cannot resume", "starts fresh"), RuntimeWarning, stacklevel=2)
            return
        saved_at = load_controller(rt, path)
        if saved_at != state.global_step:
            raise ValueError(
                f"GNMRCallback: {path} was saved at global step {saved_at}, but the Trainer resumes at global step "
                f"{state.global_step}: it belongs to another checkpoint"
            )


def save_controller(rt: GNMRRuntime, path: str, *, global_step: int) -> None:
    """Write ``rt``'s controller state (keys ``_gnmr.*``) and the Trainer's step to ``path``.

    Written to a temporary file first, then renamed: a crash never leaves a
    half-written state beside a complete checkpoint.
    """
    blob = {_PREFIX + k: v.detach().cpu() for k, v in rt.state_dict().items()}
    blob[_GLOBAL_STEP] = torch.tensor(int(global_step), dtype=torch.long)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_controller(rt: GNMRRuntime, path: str) -> int:
    """Restore ``rt``'s controller from :func:`save_controller`'s file; returns the Trainer step saved with it.

    The state is validated against the live config as any GNMR checkpoint is
    (``GNMRRuntime.load_state_dict``: ``ValueError`` naming the key).
    """
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if _GLOBAL_STEP not in blob:
        raise ValueError(f"{path} is not a GNMRCallback controller file (no {_GLOBAL_STEP!r})")
    step = int(blob.pop(_GLOBAL_STEP))
    rt.load_state_dict({k[len(_PREFIX):]: v for k, v in blob.items() if k.startswith(_PREFIX)}, prefix=_PREFIX)
    return step


def _check_args(args: Any) -> None:
    if getattr(args, "torch_compile", False):
        raise ValueError(
            "GNMRCallback: TrainingArguments(torch_compile=True) makes accelerate wrap the model in "
            f"torch.compile(backend={args.torch_compile_backend!r}), whose trace inlines the model's original "
            "forward: GNMR would never run. GNMRCallback compiles the model itself: set torch_compile=False and "
            "choose the inner compiler with GNMRCallback(config, backend='inductor' | 'aot_eager' | 'eager'). "
            "(torch_compile_backend='gnmr' cannot work either: accelerate accepts only its DynamoBackend names.)"
        )


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``.

    Its ``step`` runs once per optimizer step (the wrapper calls it only when
    gradients are synchronized), which is when the controller must step.
    """
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"GNMRCallback: the Trainer's optimizer is a {type(optimizer).__name__}, not a torch optimizer")
    return inner


def _existing_runtime(model: torch.nn.Module) -> Optional[GNMRRuntime]:
    try:
        return runtime_of(model)
    except ValueError:  # not compiled yet: the usual case
        return None
