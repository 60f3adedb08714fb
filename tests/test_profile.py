"""gnmr_fx.profile: which units bend the whole model's gradient when they run low."""

from __future__ import annotations

import math

import pytest
import torch

import gnmr_fx
from gnmr_fx.models import GPTConfig, TinyGPT
from gnmr_fx.tools.profile import Profile


def _compiled(recipe="mxfp4_sr"):
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64))
    g = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, 256, (4, 32), generator=g) for _ in range(2)) for _ in range(2)]
    cm = gnmr_fx.compile(model, gnmr_fx.GNMRConfig(recipe=recipe), backend="eager")
    cm(*batches[0]).backward()  # one step's graphs and units
    gnmr_fx.runtime(cm).step()
    return model, cm, batches


def test_profile_ranks_the_head_first_where_gnmr_statistic_barely_moves():
    """TinyGPT at its initial weights, every matmul in MXFP4 with SR-FP4 output gradients: the
    head alone low moves the whole gradient far more than any other unit, while its own
    gradient norm (the statistic GNMR watches) stays within a factor 1.5 of the high path's."""
    _, cm, batches = _compiled()
    prof = gnmr_fx.profile(cm, batches)
    assert prof.units == list(gnmr_fx.controller(cm).names) and prof.batches == 2
    err = prof.grad_error
    assert bool(torch.isfinite(err).all()) and bool((err > 0).all())
    head = prof.units.index("head")
    assert prof.order()[0] == head
    others = torch.cat([err[:head], err[head + 1:]])
    assert float(err[head]) > 0.25 and float(err[head]) > 3 * float(others.max())
    assert 1 / 1.5 < float(prof.stat_ratio[head]) < 1.5
    # Every unit low moves it at least as far as the worst single unit, give or take the
    # interaction of errors.
    assert prof.all_low_error > 0.8 * float(err.max())
    assert prof.rows()[0]["unit"] == "head" and "every unit low" in prof.table(top=3)


def test_profile_error_is_the_relative_gradient_change_with_only_that_unit_low():
    model, cm, batches = _compiled()
    prof = gnmr_fx.profile(cm, batches, seed=7)
    rt = gnmr_fx.runtime(cm)
    n = rt.controller.num_units
    params = [p for p in model.parameters() if p.requires_grad]

    def grad(plan):
        rt.force_plan(plan)
        torch.manual_seed(7)
        for p in params:
            p.grad = None
        with rt.paused():
            for b in batches:
                cm(*b).backward()
        return torch.cat([p.grad.flatten() for p in params])

    g_high = grad(torch.ones(n, dtype=torch.bool))
    u = prof.units.index("blocks.1.fc")
    plan = torch.ones(n, dtype=torch.bool)
    plan[u] = False
    direct = float((grad(plan) - g_high).norm() / g_high.norm())
    assert prof.grad_error[u].item() == pytest.approx(direct, rel=1e-5)


def test_profile_leaves_plan_controller_grads_and_rng_as_they_were():
    model, cm, batches = _compiled()
    rt = gnmr_fx.runtime(cm)
    ctl = rt.controller
    cm(*batches[1]).backward()  # pending gradients the user has not stepped on yet
    plan = torch.zeros(ctl.num_units, dtype=torch.bool)
    plan[1] = True
    rt.force_plan(plan)
    grads = [p.grad for p in model.parameters()]
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ctl.state_dict().items()}
    rng = torch.get_rng_state()
    gnmr_fx.profile(cm, batches)
    assert torch.equal(ctl.plan, plan)
    assert all(a is b for a, b in zip(grads, [p.grad for p in model.parameters()]))
    assert torch.equal(rng, torch.get_rng_state())
    after = ctl.state_dict()
    for k, v in before.items():
        assert (torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k]), k
    # The controller steps again after the profile (paused() restored the step).
    cm(*batches[0]).backward()
    assert ctl.state_dict()["step"] != before["step"]


def test_profile_pick_and_errors():
    p = Profile(["a", "b", "c", "d"], torch.tensor([0.1, float("nan"), 0.3, 0.2]), torch.ones(4),
                torch.tensor([1.0, 1.0, 6.0, 2.0]), 0.5, 1)
    assert p.order() == [1, 2, 3, 0]  # a non-finite error ranks first
    assert p.pick(2).tolist() == [False, True, True, False]
    assert p.pick(0.4).tolist() == [True, True, False, True]  # 4 of 10 FLOPs: c does not fit
    assert p.pick("40%").tolist() == p.pick(0.4).tolist()
    for bad in (-1, 1.5, "x"):
        with pytest.raises(ValueError, match="max_o"):
            p.pick(bad)
    _, cm, batches = _compiled()
    with pytest.raises(ValueError, match="batches is empty"):
        gnmr_fx.profile(cm, [])
    with pytest.raises(ValueError, match="scalar"):
        gnmr_fx.profile(cm, batches, loss_fn=lambda m, b: torch.stack([m(*b), m(*b)]))
    with pytest.raises(ValueError, match="no GNMR runtime"):
        gnmr_fx.profile(TinyGPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8)), batches)
    assert math.isfinite(gnmr_fx.profile(cm, batches[:1]).all_low_error)


def test_profile_doctests():
    import doctest

    import gnmr_fx.tools.profile

    assert doctest.testmod(gnmr_fx.tools.profile, optionflags=doctest.ELLIPSIS).failed == 0
