"""The fault injector fires exactly on the requested unit and steps, inside the compiled model."""

import copy

import pytest
import torch

import gnmr_fx
from gnmr_fx.faults import Fault, FaultInjector
from gnmr_fx.models import GPTConfig, TinyGPT

CFG = GPTConfig(block_size=8, n_layer=2, n_head=2, n_embd=16)


def _model():
    torch.manual_seed(0)
    return TinyGPT(CFG)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 8), generator=g)
    return x, torch.roll(x, -1, 1)


def _compile(model, **cfg):
    # always_high: the compiled model computes exactly the eager model.
    config = gnmr_fx.GNMRConfig(policy=cfg.pop("policy", "always_high"), **cfg)
    return gnmr_fx.compile(model, config, backend="eager")


def test_outlier_fires_on_requested_unit_and_steps_in_compiled_model():
    model = _model()
    ref = copy.deepcopy(model)
    fault = Fault("blocks.0.fc", "outlier", steps=(2, 4), channels=(1, 5), factor=50.0)
    inj = FaultInjector(model, [fault])
    # Reference: the same outlier applied by hand, to the same module only.
    armed = {"on": False}

    def manual(module, args):
        if not armed["on"]:
            return None
        x = args[0].clone()
        x[..., [1, 5]] *= 50.0
        return (x,)

    ref.blocks[0].fc.register_forward_pre_hook(manual)
    cm = _compile(model)
    differs = []
    for step in range(6):
        x, _ = _batch(step)
        active = inj.set_step(step)
        armed["on"] = bool(active)
        out = cm(x)
        assert torch.equal(out, ref(x)), step  # fires exactly as specified, nothing else
        armed["on"] = False
        differs.append(not torch.equal(out, ref(x)))
    assert differs == [False, False, True, False, True, False]
    # Arming a fault rewrites tensors in place: no recompile, one graph.
    assert len(gnmr_fx.runtime(cm).records) == 1


def test_grad_blowup_scales_only_that_units_backward():
    model = _model()
    clean = copy.deepcopy(model)
    inj = FaultInjector(model, [Fault("blocks.1.fc", "grad_blowup", steps=(1,), factor=20.0)])
    cm = _compile(model)
    for step in range(3):
        x, y = _batch(step)
        inj.set_step(step)
        model.zero_grad(set_to_none=True)
        clean.zero_grad(set_to_none=True)
        loss = cm(x, y)
        loss_ref = clean(x, y)
        assert torch.equal(loss, loss_ref)  # forward untouched
        loss.backward()
        loss_ref.backward()
        g = dict(model.named_parameters())
        r = dict(clean.named_parameters())
        if step != 1:
            assert all(torch.equal(g[k].grad, r[k].grad) for k in g)
            continue
        # The faulted unit's weight gradient is 20x; the head (downstream) is untouched;
        # upstream units see the blow-up through the chain rule.
        assert torch.allclose(g["blocks.1.fc.weight"].grad, 20.0 * r["blocks.1.fc.weight"].grad, rtol=1e-4, atol=1e-7)
        assert torch.equal(g["head.weight"].grad, r["head.weight"].grad)
        assert torch.equal(g["blocks.1.out.weight"].grad, r["blocks.1.out.weight"].grad)
        assert not torch.allclose(g["blocks.0.attn.qkv.weight"].grad, r["blocks.0.attn.qkv.weight"].grad)


def test_gnmr_controller_sees_the_fault_at_its_step():
    model = _model()
    inj = FaultInjector(model, [Fault("blocks.0.attn.proj", "grad_blowup", steps=(12,), factor=30.0)])
    cm = _compile(model, policy="gnmr", recipe="fp8_e4m3", warmup_steps=5, max_o=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: only the fault moves norms
    x, y = _batch(0)
    hits = []
    for step in range(14):
        inj.set_step(step)
        cm(x, y).backward()
        opt.step()
        opt.zero_grad()
        ctl = gnmr_fx.controller(cm)
        hits.append([ctl.names[i] for i in torch.nonzero(ctl.triggered).flatten().tolist()])
    # The faulted unit triggers at the fault step; units downstream of it in
    # forward (whose gradients its backward cannot touch) do not.
    assert "blocks.0.attn.proj" in hits[12]
    downstream = [n for n in ctl.names if n.startswith(("blocks.0.fc", "blocks.0.out", "blocks.1.", "head"))]
    assert len(downstream) == 9 and not set(hits[12]) & set(downstream)
    assert all(h == [] for h in hits[5:12])
    # Budget 1: exactly one of the triggered units moved to the high path.
    high = [ctl.names[i] for i in torch.nonzero(ctl.plan).flatten().tolist()]
    assert len(high) == 1 and high[0] in hits[12]
    inj.check_units(ctl.names)


def test_events_and_clear():
    model = _model()
    inj = FaultInjector(model, [Fault("head", "outlier", steps=(5, 1), channels=(0,)),
                                Fault("blocks.0.fc", "grad_blowup", steps=(3,))])
    assert inj.events() == [(1, "head", "outlier"), (3, "blocks.0.fc", "grad_blowup"), (5, "head", "outlier")]
    assert [f.unit for f in inj.set_step(5)] == ["head"]
    inj.clear()
    x, _ = _batch(0)
    assert torch.equal(model(x), TinyGPT.forward(copy.deepcopy(model), x))
    inj.remove()
    assert not model.head._forward_pre_hooks


@pytest.mark.parametrize("fault,match", [
    (dict(unit="nope", kind="outlier", steps=(1,)), "no module 'nope'"),
    (dict(unit="blocks.0.ln1", kind="outlier", steps=(1,)), "no 2-D weight"),
    (dict(unit="head", kind="outlier", steps=(1,), channels=(99,)), "out of range"),
])
def test_bad_targets_raise(fault, match):
    with pytest.raises(ValueError, match=match):
        FaultInjector(_model(), [Fault(**fault)])


def test_bad_fault_and_compiled_wrapper_raise():
    with pytest.raises(ValueError, match="kind must be one of"):
        Fault("head", "bitflip", steps=(1,))
    with pytest.raises(ValueError, match="steps must be"):
        Fault("head", "outlier", steps=())
    with pytest.raises(ValueError, match="before gnmr_fx.compile"):
        FaultInjector(torch.compile(_model(), backend="eager"), [])
    with pytest.raises(ValueError, match="not GNMR units"):
        FaultInjector(_model(), [Fault("head", "outlier", steps=(1,))]).check_units(["blocks.0.fc"])


def test_module_doctest():
    import doctest

    import gnmr_fx.faults

    assert doctest.testmod(gnmr_fx.faults).failed == 0
