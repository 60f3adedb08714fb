"""gnmr_fx.compile(..., inplace=True): the user's module stays the thing to call and save."""

import doctest
import inspect

import pytest
import torch

import gnmr_fx
from gnmr_fx import GNMRConfig

CFG = GNMRConfig(recipe="int8", warmup_steps=1, max_o=2)


def _train_steps(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gnmr_fx.runtime(model).attach_optimizer(opt)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_inplace_keeps_the_module_keys_and_signature():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=128, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    keys, signature = set(model.state_dict()), inspect.signature(model.forward)
    assert gnmr_fx.compile(model, CFG, backend="eager", inplace=True) is model
    assert inspect.signature(model.forward) == signature  # what Trainer reads to keep dataset columns
    _train_steps(model)
    sd = model.state_dict()
    assert {k for k in sd if not k.startswith("_gnmr.")} == keys
    assert int(sd["_gnmr.step"]) == 3


def test_save_pretrained_has_no_controller_keys_and_state_dict_resumes(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=128, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = gnmr_fx.compile(transformers.GPT2LMHeadModel(cfg), CFG, backend="eager", inplace=True)
    _train_steps(model)
    model.save_pretrained(str(tmp_path))
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    # The training checkpoint (state_dict) still carries the controller, and restores it.
    sd = model.state_dict()
    fresh = gnmr_fx.compile(transformers.GPT2LMHeadModel(cfg), CFG, backend="eager", inplace=True)
    fresh.load_state_dict(sd)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    fresh(input_ids=ids)  # units register; the pending controller state applies
    a, b = gnmr_fx.controller(model), gnmr_fx.controller(fresh)
    assert b.step == a.step == 3 and torch.equal(a.ema, b.ema) and torch.equal(a.plan, b.plan)


def test_api_doctests():
    import gnmr_fx.api

    assert doctest.testmod(gnmr_fx.api, optionflags=doctest.ELLIPSIS).failed == 0
