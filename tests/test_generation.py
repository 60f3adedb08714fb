"""gnmr_fx.generate: Hugging Face generate runs the plan's numerics."""

import doctest
import types

import pytest
import torch

import gnmr_fx
from gnmr_fx import GNMRConfig
from gnmr_fx.backends.recipes import sqnr as quantization_sqnr

transformers = pytest.importorskip("transformers")

VOCAB = 128
NEW = 12


def _llama():
    # Grouped-query attention, sdpa (the default): the units are the linears.
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=64, intermediate_size=128, vocab_size=VOCAB,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
GREEDY = dict(max_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(IDS))


def _compiled(recipe, policy="always_low"):
    return gnmr_fx.compile(_llama(), GNMRConfig(recipe=recipe, policy=policy), backend="eager", inplace=True)


def _greedy_with_forward(model, ids, steps):
    """Greedy decoding by hand: the compiled forward on the whole sequence, argmax, append."""
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids


class TestGenerate:
    def test_exact_equals_compiled_forward_and_differs_from_fp32(self):
        fp32 = _llama().generate(IDS, **GREEDY)
        model = _compiled("int4")
        out = gnmr_fx.generate(model, IDS, exact=True, **GREEDY)
        assert out.shape == (2, 5 + NEW)
        # int4 activations on every unit change the tokens...
        assert not torch.equal(out, fp32)
        # ...exactly as the compiled forward decodes them.
        assert torch.equal(out, _greedy_with_forward(model, IDS, NEW))

    def test_always_high_generates_like_fp32(self):
        fp32 = _llama().generate(IDS, **GREEDY)
        out = gnmr_fx.generate(_compiled("int4", policy="always_high"), IDS, **GREEDY)
        assert torch.equal(out, fp32)

    @pytest.mark.parametrize("recipe,floor,ceiling", [("int8", 100.0, float("inf")), ("int4", 0.0, 60.0)])
    def test_cached_decoding_rounds_like_the_full_forward_for_per_token_recipes(self, recipe, floor, ceiling):
        # Teacher-forced: the logits of each cached decoding step against the
        # full-sequence forward on the same tokens. Per-token int8 rounds each
        # token alike (float-rounding apart); per-tensor int4 activations take
        # their scale from the new token alone, so the cached steps differ.
        model = _compiled(recipe)
        out = gnmr_fx.generate(model, IDS, output_logits=True, return_dict_in_generate=True, **GREEDY)
        cached = torch.stack(out.logits, 1)  # [batch, NEW, vocab]
        with torch.no_grad():
            full = model(input_ids=out.sequences).logits[:, IDS.shape[1] - 1:-1]
        sqnr = quantization_sqnr(full, cached)
        assert floor <= sqnr <= ceiling, sqnr

    def test_transformers_auto_compile_is_disabled(self):
        # On a GPU with a static cache transformers compiles the decoding
        # step itself; that trace inlines the model's original forward, so
        # model.generate decodes without GNMR (fp32 tokens). Forced on CPU here.
        cc = transformers.CompileConfig(backend="eager")
        cc._compile_all_devices = True
        static = dict(cache_implementation="static", **GREEDY)
        fp32 = _llama().generate(IDS, **static)
        model = _compiled("int4")
        gnmr = model.generate(IDS, **static)  # no auto-compile on CPU: the GNMR graphs
        assert not torch.equal(gnmr, fp32)
        model.generation_config.compile_config = cc
        bypassed = model.generate(IDS, **static)
        # transformers runs the prefill uncompiled (through GNMR), then the
        # compiled decoding steps, which bypass it: the first new token is GNMR's.
        first = IDS.shape[1] + 1
        assert torch.equal(bypassed[:, :first], gnmr[:, :first]) and not torch.equal(bypassed, gnmr)
        assert torch.equal(gnmr_fx.generate(model, IDS, **static), gnmr)
        with pytest.raises(ValueError, match="would trace the model's original forward"):
            gnmr_fx.generate(model, IDS, compile_config=cc, **static)

    def test_not_gnmr_compiled_forward_raises(self):
        model = _llama()
        with pytest.raises(ValueError, match="no GNMR runtime"):
            gnmr_fx.generate(model, IDS, **GREEDY)
        # A forward replaced after compiling (accelerate's mixed-precision
        # wrapper does this) would run as written.
        gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend="eager", inplace=True)
        model.forward = types.MethodType(type(model).forward, model)
        with pytest.raises(ValueError, match="forward is not GNMR-compiled"):
            gnmr_fx.generate(model, IDS, **GREEDY)
        with pytest.raises(TypeError, match="Hugging Face generate"):
            gnmr_fx.generate(torch.nn.Linear(2, 2), IDS)

    def test_wrapper_compile_generates_through_the_graphs(self):
        # gnmr_fx.compile without inplace returns torch.compile's wrapper; the
        # model's forward is compiled in place all the same.
        model = _llama()
        wrapper = gnmr_fx.compile(model, GNMRConfig(recipe="int4", policy="always_low"), backend="eager")
        out = gnmr_fx.generate(wrapper, IDS, exact=True, **GREEDY)
        assert torch.equal(out, _greedy_with_forward(wrapper, IDS, NEW))
        assert torch.equal(out, gnmr_fx.generate(_compiled("int4"), IDS, exact=True, **GREEDY))


def test_generation_doctests():
    import gnmr_fx.tools.generate

    assert doctest.testmod(gnmr_fx.tools.generate, optionflags=doctest.ELLIPSIS).failed == 0
