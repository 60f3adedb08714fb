"""Variable sequence lengths compile one dynamic graph, not one graph per length.

discover_units reads unit shapes as size hints: ``int()`` on a symbolic size
would install a guard that specializes the graph to it, so every new length
(decoding steps, batches padded to their longest) recompiled until Dynamo's
recompile limit raised.
"""

import pytest
import torch

import gnmr_fx
from gnmr_fx import GNMRConfig
from gnmr_fx.models import GPTConfig, TinyGPT

LENGTHS = range(4, 16)  # 12 lengths: more than recompile_limit (8)


@pytest.mark.parametrize("backend,low_graph", [("eager", None), ("aot_eager", None), ("aot_eager", True)])
def test_training_on_many_lengths_compiles_a_dynamic_graph(backend, low_graph):
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    m = gnmr_fx.compile(model, GNMRConfig(recipe="int8", low_graph=low_graph), backend=backend, optimizer=opt,
                        inplace=True)
    for t in LENGTHS:
        idx = torch.randint(0, 256, (2, t), generator=torch.Generator().manual_seed(t))
        m(idx, torch.roll(idx, -1, 1)).backward()
        opt.step()
        opt.zero_grad()
    rt = gnmr_fx.runtime(m)
    # The first length, then one graph with a dynamic length (automatic dynamic shapes).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert len(rt.records) == 2
    assert rt.controller.step == len(LENGTHS)
    assert rt.unit_names == [f"blocks.0.{u}" for u in ("attn.qkv", "attn.matmul", "attn.matmul_1",
                                                       "attn.proj", "fc", "out")] + ["head"]
    assert int(rt.controller.n_obs.min()) >= 1
    # Within warm-up every step is all-low: with low_graph=True each ran the
    # graph's all-low copy, the dynamic graph's included.
    assert rt.config.warmup_steps >= len(LENGTHS) and not bool(rt.controller.plan.any())
    assert [r.low_copy for r in rt.records] == [bool(low_graph)] * 2
    assert rt.low_graph_calls == (len(LENGTHS) if low_graph else 0)
