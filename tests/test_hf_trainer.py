"""GNMR under transformers.Trainer: GNMRCallback, in-place compile, save_model, resume."""

import doctest
import os
import shutil

import pytest
import torch

import gnmr_fx
from gnmr_fx import GNMRConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from gnmr_fx.integrations.transformers import CONTROLLER_FILE, GNMRCallback  # noqa: E402

VOCAB = 128
STEPS, ACCUM, SAVE = 12, 4, 6
# Thresholds low enough that a 12-step run triggers, locks and denies units.
CFG = GNMRConfig(recipe="int4", warmup_steps=2, max_o=3, threshold=1.2, delta_threshold=0.15, lock_steps=2)


class TokenDataset(torch.utils.data.Dataset):
    """Random token ids, plus a text column the model does not take (Trainer drops it)."""

    def __init__(self, n=96, length=16):
        self.ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "text": f"sample {i}"}


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg)


def _args(out, **kw):
    # Defaults otherwise: remove_unused_columns=True, torch_compile=False.
    base = dict(use_cpu=True, per_device_train_batch_size=2, gradient_accumulation_steps=ACCUM, max_steps=STEPS,
                logging_steps=4, save_steps=SAVE, learning_rate=3e-3, report_to="none", disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(str(out), **{**base, **kw})


class PlanRecorder(transformers.TrainerCallback):
    """The controller's step, plan and triggers after every optimizer step."""

    def __init__(self):
        self.plans = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        ctl = gnmr_fx.controller(model)
        self.plans[state.global_step] = (ctl.step, ctl.plan.tolist(), ctl.triggered.tolist(), ctl.denied.tolist())


def _train(out, resume=None, model=None, callback=None, **kw):
    model = model if model is not None else _gpt2()
    rec = PlanRecorder()
    callback = callback if callback is not None else GNMRCallback(CFG, backend="eager")
    trainer = transformers.Trainer(model=model, args=_args(out, **kw), train_dataset=TokenDataset(),
                                   callbacks=[callback, rec])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec.plans


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run: 12 optimizer steps of 4 micro-batches, checkpoints at 6 and 12."""
    out = tmp_path_factory.mktemp("trainer")
    torch._dynamo.reset()
    trainer, plans = _train(out)
    return out, trainer, plans


class TestGNMRCallback:
    def test_controller_steps_once_per_optimizer_step(self, run):
        _, trainer, plans = run
        model = trainer.model
        assert not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)  # compiled in place
        assert trainer.state.global_step == STEPS
        assert gnmr_fx.controller(model).step == STEPS  # not 48 (one per micro-batch)
        assert [plans[s][0] for s in sorted(plans)] == list(range(1, STEPS + 1))
        # A unit that never triggered learned from every step: 12 observations, not 48.
        assert int(gnmr_fx.controller(model).n_obs.max()) == STEPS

    def test_gnmr_scalars_in_the_logs(self, run):
        _, trainer, plans = run
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert [h["step"] for h in logs] == [4, 8, 12]
        assert [h["gnmr/step"] for h in logs] == [4, 8, 12]
        for h in logs:
            last = plans[h["step"]]
            assert h["gnmr/units_high"] == sum(last[1])
            assert h["gnmr/budget"] == 3.0 and h["gnmr/budget_used"] == float(sum(last[1]))
        # Summed over each window of 4 steps.
        for h in logs:
            window = [plans[s] for s in range(h["step"] - 3, h["step"] + 1)]
            assert h["gnmr/triggered"] == sum(sum(p[2]) for p in window)
            assert h["gnmr/denied"] == sum(sum(p[3]) for p in window)
        assert sum(h["gnmr/triggered"] for h in logs) > 0  # the run exercises the controller

    def test_save_model_loads_with_from_pretrained(self, run, tmp_path):
        _, trainer, _ = run
        model = trainer.model
        trainer.save_model(str(tmp_path))
        loaded, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), output_loading_info=True)
        assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
        # The training state dict keeps the controller; the saved weights do not.
        sd = model.state_dict()
        gnmr_keys = {k for k in sd if k.startswith("_gnmr.")}
        assert "_gnmr.ema" in gnmr_keys and "_gnmr.step" in gnmr_keys
        assert set(loaded.state_dict()) == set(sd) - gnmr_keys
        assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
        # Equal logits: the loaded fp32 model vs the trained model on the high path
        # (eager inner compiler: the high path is bitwise the model as written).
        rt = gnmr_fx.runtime(model)
        saved_plan = rt.controller.plan.clone()
        ids = TokenDataset().ids[:2]
        model.eval(), loaded.eval()
        try:
            with torch.no_grad():
                model(input_ids=ids)  # compile the no-grad graph before forcing the plan
                rt.set_plan(torch.ones_like(saved_plan))
                assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
        finally:
            rt.set_plan(saved_plan)
            model.train()

    def test_checkpoints_hold_the_controller_state(self, run):
        out, _, _ = run
        from safetensors.torch import load_file

        for step in (SAVE, STEPS):
            folder = out / f"checkpoint-{step}"
            assert not [k for k in load_file(str(folder / "model.safetensors")) if "_gnmr" in k]
            state = torch.load(folder / CONTROLLER_FILE, weights_only=True)
            assert int(state["_gnmr.step"]) == step and int(state["trainer_global_step"]) == step

    def test_resume_gives_the_identical_plan_sequence(self, run):
        out, trainer, plans = run
        torch._dynamo.reset()
        resumed, plans_b = _train(out, resume=str(out / f"checkpoint-{SAVE}"))
        assert sorted(plans_b) == list(range(SAVE + 1, STEPS + 1))
        assert {s: plans[s] for s in plans_b} == plans_b
        assert len({str(p[1]) for p in plans.values()}) > 1  # the plan changes within the run
        a, b = gnmr_fx.controller(trainer.model), gnmr_fx.controller(resumed.model)
        for key in ("ema", "n_obs", "hist", "lock", "streak", "n_triggers", "n_denied", "plan"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key

    def test_resume_without_controller_state(self, run, tmp_path):
        out, _, _ = run
        ckpt = tmp_path / "elsewhere"
        shutil.copytree(out / f"checkpoint-{SAVE}", ckpt)
        os.remove(ckpt / CONTROLLER_FILE)
        torch._dynamo.reset()
        with pytest.raises(FileNotFoundError, match=r"resumes at global step 6 but .*gnmr_controller.pt does not exist"):
            _train(tmp_path / "out", resume=str(ckpt))
        # The controller state is where the Trainer wrote it: point the callback there.
        torch._dynamo.reset()
        cb = GNMRCallback(CFG, backend="eager", resume_from=str(out / f"checkpoint-{SAVE}"))
        trainer, _ = _train(tmp_path / "out", resume=str(ckpt), callback=cb, max_steps=SAVE + 1)
        assert gnmr_fx.controller(trainer.model).step == SAVE + 1
        torch._dynamo.reset()
        with pytest.warns(RuntimeWarning, match="starts fresh"):
            cb = GNMRCallback(CFG, backend="eager", strict_resume=False)
            trainer, _ = _train(tmp_path / "out", resume=str(ckpt), callback=cb, max_steps=SAVE + 1)
        assert gnmr_fx.controller(trainer.model).step == 1


def test_model_compiled_in_place_by_the_user(tmp_path):
    # The model the user compiled in place keeps its forward's signature, so
    # the Trainer's default remove_unused_columns keeps input_ids and labels
    # (the "text" column would not collate); the callback attaches the
    # Trainer's optimizer, so the controller steps once per optimizer step.
    model = gnmr_fx.compile(_gpt2(), CFG, backend="eager", inplace=True)
    trainer, _ = _train(tmp_path, model=model, max_steps=3, save_steps=100)
    assert trainer.model is model and gnmr_fx.controller(model).step == 3
    with pytest.raises(ValueError, match="already compiled with a different GNMRConfig"):
        _train(tmp_path, model=model, callback=GNMRCallback(GNMRConfig(recipe="int8"), backend="eager"), max_steps=1)
    wrapper = gnmr_fx.compile(_gpt2(), CFG, backend="eager")  # not in place: saves as _orig_mod.*
    with pytest.raises(ValueError, match=r"got a torch.compile wrapper .* inplace=True"):
        _train(tmp_path, model=wrapper, max_steps=1)


class LogRecorder(transformers.TrainerCallback):
    """Stands for a report_to integration: the Trainer calls those before the callbacks passed in."""

    def __init__(self):
        self.keys = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.keys.append(sorted(k for k in logs if k.startswith("gnmr/")))


def test_attach_puts_the_callback_before_the_loggers(tmp_path):
    gnmr_keys = ["gnmr/budget", "gnmr/budget_used", "gnmr/denied", "gnmr/pinned", "gnmr/step", "gnmr/triggered",
                 "gnmr/units_high"]
    args = _args(tmp_path, max_steps=4, logging_steps=2, save_steps=100)
    # Passed in callbacks=, GNMR runs after a logger that comes before it: the logger sees no gnmr/* key.
    logger = LogRecorder()
    trainer = transformers.Trainer(model=_gpt2(), args=args, train_dataset=TokenDataset(),
                                   callbacks=[logger, GNMRCallback(CFG, backend="eager")])
    trainer.train()
    assert logger.keys == [[], []]
    # Attached, it runs first: the same logger sees every gnmr/* scalar at every log.
    logger = LogRecorder()
    trainer = transformers.Trainer(model=_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[logger])
    cb = GNMRCallback(CFG, backend="eager").attach(trainer)
    assert trainer.callback_handler.callbacks[0] is cb
    trainer.train()
    assert logger.keys == [gnmr_keys, gnmr_keys] and gnmr_fx.controller(trainer.model).step == 4
    with pytest.raises(ValueError, match="already has a GNMRCallback"):
        GNMRCallback(CFG).attach(trainer)
    with pytest.raises(TypeError, match="takes a transformers.Trainer"):
        GNMRCallback(CFG).attach(object())
    compiling = transformers.Trainer(model=_gpt2(), args=_args(tmp_path, torch_compile=True,
                                                                torch_compile_backend="aot_eager"),
                                     train_dataset=TokenDataset())
    with pytest.raises(ValueError, match=r"torch_compile=True\)"):
        GNMRCallback(CFG).attach(compiling)


def test_torch_compile_in_training_arguments_is_refused(tmp_path):
    args = _args(tmp_path, torch_compile=True, torch_compile_backend="aot_eager")
    with pytest.raises(ValueError, match=r"torch_compile=True\) makes accelerate wrap the model .* set torch_compile=False"):
        transformers.Trainer(model=_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[GNMRCallback(CFG)])
    # What accelerate itself says about torch_compile_backend="gnmr" (no custom backends).
    args = _args(tmp_path, torch_compile=True, torch_compile_backend="gnmr")
    with pytest.raises(ValueError, match="'GNMR' is not a valid DynamoBackend"):
        transformers.Trainer(model=_gpt2(), args=args, train_dataset=TokenDataset())


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        GNMRCallback(CFG, backend="tvm")
    with pytest.raises(TypeError, match="config must be a GNMRConfig"):
        GNMRCallback({"recipe": "int8"})


def test_module_doctests():
    import gnmr_fx.integrations.transformers as integration

    assert doctest.testmod(integration, optionflags=doctest.ELLIPSIS).failed == 0


def test_bf16_mixed_precision_after_an_inplace_compile(tmp_path):
    # accelerate's mixed precision replaces model.forward with an autocast
    # wrapper of the *original* forward function: the callback compiles the
    # forward the Trainer calls, keeping the model's runtime.
    model = gnmr_fx.compile(_gpt2(), CFG, backend="eager", inplace=True)
    rt = gnmr_fx.runtime(model)
    trainer, _ = _train(tmp_path, model=model, max_steps=2, gradient_accumulation_steps=1, save_steps=100, bf16=True)
    assert gnmr_fx.runtime(trainer.model) is rt and rt.controller.step == 2
    assert len(rt.unit_names) == 9  # 2 x (c_attn, c_proj, c_fc, mlp c_proj) + lm_head: sdpa attention


class RngAtFirstStep(transformers.TrainerCallback):
    def __init__(self):
        self.state = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.state is None:
            self.state = torch.get_rng_state()


def test_pin_profile_pins_the_profiles_units_and_a_resume_keeps_them(tmp_path):
    """GNMRCallback(pin_profile=2): the two units of largest gradient error on the first
    training batches are pinned before the first step and stay high on every step; the
    profile leaves the run's RNG as it was; a resumed run takes the pins from the checkpoint
    and profiles nothing."""
    torch._dynamo.reset()
    rng_plain = RngAtFirstStep()
    model = _gpt2()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "plain", max_steps=1, save_steps=100),
                                   train_dataset=TokenDataset(), callbacks=[GNMRCallback(CFG, backend="eager"), rng_plain])
    trainer.train()
    torch._dynamo.reset()
    cb = GNMRCallback(CFG, backend="eager", pin_profile=2, profile_batches=2)
    rng_prof = RngAtFirstStep()
    rec = PlanRecorder()
    trainer = transformers.Trainer(model=_gpt2(), args=_args(tmp_path / "p", max_steps=6, save_steps=3),
                                   train_dataset=TokenDataset(), callbacks=[cb, rec, rng_prof])
    trainer.train()
    assert torch.equal(rng_plain.state, rng_prof.state)
    prof = cb.profile
    assert prof is not None and prof.batches == 2 and prof.units == list(gnmr_fx.controller(trainer.model).names)
    top = sorted(prof.order()[:2])
    ctl = gnmr_fx.controller(trainer.model)
    assert ctl.pinned.nonzero().flatten().tolist() == top
    assert all(all(rec.plans[s][1][i] for i in top) for s in rec.plans)  # high on every step
    assert all(h["gnmr/pinned"] == 2 for h in trainer.state.log_history if "loss" in h)
    # Resume at step 3: the pins come back from the checkpoint's controller state.
    torch._dynamo.reset()
    cb2 = GNMRCallback(CFG, backend="eager", pin_profile=2, profile_batches=2)
    trainer2 = transformers.Trainer(model=_gpt2(), args=_args(tmp_path / "p", max_steps=6, save_steps=3),
                                    train_dataset=TokenDataset(), callbacks=[cb2])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "p" / "checkpoint-3"))
    assert cb2.profile is None
    assert gnmr_fx.controller(trainer2.model).pinned.nonzero().flatten().tolist() == top


@pytest.mark.parametrize("kw,match", [({"pin_profile": 0}, "pin_profile must be"),
                                      ({"pin_profile": 1.5}, "pin_profile must be"),
                                      ({"pin_profile": "x%"}, "pin_profile"),
                                      ({"pin_profile": 2, "profile_batches": 0}, "profile_batches must be")])
def test_pin_profile_arguments_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        GNMRCallback(CFG, **kw)


def _six_steps_with_high_start(tmp_path, **kw):
    """Train 6 steps with GNMRCallback(high_start=0.5, **kw); the callback, the
    plans recorded per step and the controller."""
    torch._dynamo.reset()
    cb = GNMRCallback(CFG, backend="eager", high_start=0.5, **kw)
    rec = PlanRecorder()
    trainer = transformers.Trainer(model=_gpt2(), args=_args(tmp_path, max_steps=6, save_steps=100),
                                   train_dataset=TokenDataset(), callbacks=[cb, rec])
    trainer.train()
    return cb, rec, gnmr_fx.controller(trainer.model)


def test_high_start_is_a_fraction_of_max_steps_then_the_policy_plans(tmp_path):
    """GNMRCallback(high_start=0.5) with max_steps=6: every unit high for steps 0-2
    (GNMRConfig.high_start_steps=3, resolved at train begin), then GNMR's own plan,
    which never holds more than max_o=3 units."""
    cb, rec, ctl = _six_steps_with_high_start(tmp_path)
    assert ctl.config.high_start_steps == 3 and ctl.step == 6
    n = ctl.num_units
    assert n > 3
    # rec.plans[s]: the plan after optimizer step s, i.e. the plan of step s (0-based).
    assert [sum(rec.plans[s][1]) for s in (1, 2)] == [n, n]
    assert all(sum(rec.plans[s][1]) <= 3 for s in (3, 4, 5, 6))


def test_high_start_with_pin_profile_then_pins_stay_high(tmp_path):
    """The setting the GPU evidence measured in both pretraining regimes
    (`gnmr@M+pin_grad@K+high_first@N`): high_start=0.5 and pin_profile=2 together,
    max_steps=6: every unit high for steps 0-2, then the profile's two units high on
    every step under GNMR's plan, never more than max_o=3 units."""
    cb, rec, ctl = _six_steps_with_high_start(tmp_path, pin_profile=2, profile_batches=2)
    assert ctl.config.high_start_steps == 3 and ctl.step == 6
    top = sorted(cb.profile.order()[:2])
    assert ctl.pinned.nonzero().flatten().tolist() == top
    n = ctl.num_units
    assert [sum(rec.plans[s][1]) for s in (1, 2)] == [n, n]
    for s in (3, 4, 5, 6):
        assert all(rec.plans[s][1][i] for i in top) and 2 <= sum(rec.plans[s][1]) <= 3, (s, rec.plans[s])


@pytest.mark.parametrize("kw,match", [({"high_start": 0}, "high_start must be"),
                                      ({"high_start": 1.0}, "high_start must be"),
                                      ({"high_start": "x%"}, "high_start"),
                                      ({"high_start": 5, "config": CFG.replace(high_start_steps=2)},
                                       "already has high_start_steps=2")])
def test_high_start_arguments_are_checked(kw, match):
    config = kw.pop("config", CFG)
    with pytest.raises(ValueError, match=match):
        GNMRCallback(config, **kw)
