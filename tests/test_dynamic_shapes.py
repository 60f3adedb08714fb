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


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_training_on_many_lengths_compiles_a_dynamic_graph(backend):
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    m = gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend=backend, optimizer=opt, inplace=True)
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
