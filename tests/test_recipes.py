"""The emulated recipes are real formats: grid, saturation, scales, SQNR."""

import pytest
import torch

from gnmr_fx.backends.paths import low_path
from gnmr_fx.backends.recipes import (
    FP8_E4M3_MAX,
    Recipe,
    cast_fp8,
    fake_quant_fp8,
    fake_quant_int,
    get_recipe,
    sqnr,
    recipe_names,
    register_recipe,
)

# Measured on N(0,1) activations [64, 256] and N(0, 0.05) weights [128, 256]
# (seed 0); floors sit ~1 dB under the measurement. fp8 e4m3 has 3 mantissa
# bits: theory ~31 dB for a full-range tensor.
SQNR_FLOORS = {  # recipe: (activation, weight, matmul output)
    "fp8_e4m3": (30.5, 30.5, 27.5),
    "fp8_rowwise": (30.5, 30.5, 27.5),
    "int8": (42.0, 42.0, 39.0),
    "int8_tensorwise": (39.0, 42.0, 37.5),
    "int4": (14.0, 42.0, 14.0),
}


@pytest.fixture
def xw():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 256, generator=g), torch.randn(128, 256, generator=g) * 0.05


class TestGrid:
    @pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
    @pytest.mark.parametrize("kdim", [None, -1])
    def test_fp8_values_on_grid(self, dtype, kdim, xw):
        x, _ = xw
        q = fake_quant_fp8(x, dtype=dtype, kdim=kdim)
        fmax = float(torch.finfo(dtype).max)
        amax = x.abs().amax() if kdim is None else x.abs().amax(kdim, keepdim=True)
        scaled = q / (amax / fmax)
        # Every scaled value is within 1e-6 (relative) of an fp8 value. Neighbouring
        # fp8 values are >= 2^-3 apart relatively, so this is grid membership;
        # the tolerance only absorbs the fp32 rounding of q / scale.
        assert torch.allclose(scaled.to(dtype).float(), scaled, rtol=1e-6, atol=0)
        # The largest magnitude maps exactly onto the format's max.
        assert torch.allclose(scaled.abs().amax(), torch.tensor(fmax))

    def test_fp8_saturates_instead_of_nan(self):
        t = torch.tensor([1e6, -1e6, 448.0, 449.0, 500.0])
        out = cast_fp8(t, torch.float8_e4m3fn)
        assert out.tolist() == [FP8_E4M3_MAX, -FP8_E4M3_MAX, 448.0, 448.0, 448.0]
        assert torch.isfinite(cast_fp8(torch.tensor([1e30]), torch.float8_e5m2)).all()

    @pytest.mark.parametrize("bits,kdim", [(8, -1), (8, None), (4, None)])
    def test_int_values_on_grid(self, bits, kdim, xw):
        x, _ = xw
        q = fake_quant_int(x, bits=bits, kdim=kdim)
        qmax = 2 ** (bits - 1) - 1
        amax = x.abs().amax() if kdim is None else x.abs().amax(kdim, keepdim=True)
        codes = q / (amax / qmax)
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.round().abs().max() == qmax
        levels = codes.round().unique()
        assert len(levels) <= 2 * qmax + 1

    def test_int8_per_channel_scales_are_independent(self):
        w = torch.tensor([[1.0, 0.5, -0.25], [100.0, 50.0, -25.0]])
        q = get_recipe("int8").quantize_weight(w, -1)
        # Each row's own amax maps to 127: a huge row does not crush a small one.
        assert torch.allclose(q, w, rtol=1e-2)

    def test_zero_tensor_quantizes_to_zero(self):
        for name in ("fp8_e4m3", "fp8_rowwise", "int8", "int4"):
            q = get_recipe(name).quantize_input(torch.zeros(4, 8), -1)
            assert torch.equal(q, torch.zeros(4, 8)), name


class TestSQNR:
    @pytest.mark.parametrize("name", sorted(SQNR_FLOORS))
    def test_sqnr_floors(self, name, xw):
        x, w = xw
        r = get_recipe(name)
        a_floor, w_floor, o_floor = SQNR_FLOORS[name]
        qa, qw = r.quantize_input(x, -1), r.quantize_weight(w, -1)
        assert (s := sqnr(x, qa)) >= a_floor, f"{s} dB is too low"
        assert (s := sqnr(w, qw)) >= w_floor, f"{s} dB is too low"
        assert (s := sqnr(x @ w.t(), qa @ qw.t())) >= o_floor, f"{s} dB is too low"


    def test_per_tensor_int8_pays_for_an_outlier_feature(self, xw):
        # What the outlier regime of the evidence benchmark tests: one feature 60x larger sets
        # the one per-tensor scale, so every other activation loses ~20 dB; per-token scales
        # (int8) lose less (the outlier sits in every token, so they lose too).
        x, _ = xw
        x = x.clone()
        x[:, 3] *= 60.0
        tensorwise = sqnr(x, get_recipe("int8_tensorwise").quantize_input(x, -1))
        per_token = sqnr(x, get_recipe("int8").quantize_input(x, -1))
        assert 18.0 <= tensorwise <= 22.0 and per_token >= 28.0, (tensorwise, per_token)
        others = torch.ones_like(x, dtype=torch.bool)
        others[:, 3] = False
        q = get_recipe("int8_tensorwise").quantize_input(x, -1)
        assert sqnr(x[others], q[others]) < 10.0  # the non-outlier features are the ones hurt


class TestLowPath:
    def test_low_path_forward_is_quantized_matmul(self, xw):
        x, w = xw
        r = get_recipe("int8")
        y = low_path("linear", x, w, None, recipe="int8", a_index=0, b_index=1, b_kdim=-1, b_is_weight=True)
        expected = torch.nn.functional.linear(r.quantize_input(x, -1), r.quantize_weight(w, -1))
        assert torch.equal(y, expected)

    def test_gradient_quantized_in_backward(self, xw):
        x, w = xw
        x = x.clone().requires_grad_()
        y = low_path("linear", x, w, None, recipe="fp8_e4m3", a_index=0, b_index=1, b_kdim=-1, b_is_weight=True)
        gy = torch.randn_like(y)
        y.backward(gy)
        r = get_recipe("fp8_e4m3")
        # Straight-through: dL/dx = q(dL/dy) @ q(W), with q(dL/dy) e5m2.
        expected = r.quantize_grad(gy, -1) @ r.quantize_weight(w, -1)
        assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(x.grad, gy @ r.quantize_weight(w, -1), rtol=1e-5, atol=1e-6)


class TestRegistry:
    def test_builtins(self):
        assert {"fp8_e4m3", "fp8_rowwise", "int8", "int4"} <= set(recipe_names())

    def test_duplicate_registration_is_an_error(self):
        with pytest.raises(ValueError, match="already registered"):
            register_recipe(Recipe("int8", "dup", lambda t, k: t, lambda t, k: t))

    def test_user_recipe_runs_in_a_compiled_model(self):
        import gnmr_fx

        calls = []

        def halve(t, kdim):
            calls.append(kdim)
            return t * 0.5

        register_recipe(Recipe("test_halve", "scales by 1/2", halve, halve), overwrite=True)
        lin = torch.nn.Linear(4, 4, bias=False)
        model = gnmr_fx.compile(lin, gnmr_fx.GNMRConfig(recipe="test_halve"), backend="eager")
        x = torch.randn(2, 4)
        assert torch.allclose(model(x), x @ lin.weight.t() * 0.25)
        assert calls == [-1, -1]


# Elements that share the scale of x[1, 37] in a [4, 256] tensor (K last), per
# quantizer (input, weight, grad; None: the recipe keeps gradients as they
# are). An inf or NaN there must make exactly these elements non-finite.
NONFINITE_EXTENT = {
    "fp8_e4m3": (1024, 1024, 1024),  # one scale per tensor
    "fp8_rowwise": (256, 256, 256),  # one scale per row
    "int8": (256, 256, None),  # per token / per channel
    "int8_rowwise": (256, 256, 256),  # + int8 gradients, one scale per row
    "int8_tensorwise": (1024, 256, None),  # int8 per tensor, int8 per channel weights
    "int4": (1024, 256, None),  # int4 per tensor, int8 per channel weights
    "fp8_blockwise": (128, 512, 128),  # 1x128 tiles; a 128x128 block spans all 4 rows
    "mxfp8": (32, 32, 32),  # 32-element MX blocks
    "mxfp4": (32, 32, None),
    "nvfp4": (16, 16, None),  # 16-element blocks
    "mxfp4_sr": (32, 32, 32),  # + stochastically rounded fp4 gradients, same blocks
    "nvfp4_sr": (16, 16, 16),
}
BAD = {"+inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
# The library's own recipes: read at collection, before any test registers one.
LIBRARY_RECIPES = set(recipe_names())


class TestNonFinite:
    """An inf / NaN input never comes out of a recipe finite ("silently wrong")."""

    def test_every_registered_recipe_is_listed(self):
        missing = sorted(LIBRARY_RECIPES - set(NONFINITE_EXTENT))
        assert missing == [], f"add {missing} to NONFINITE_EXTENT (and make them keep inf / NaN non-finite)"
        assert len(LIBRARY_RECIPES) == 12

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("bad", sorted(BAD))
    @pytest.mark.parametrize("name", sorted(NONFINITE_EXTENT))
    def test_bad_element_poisons_its_scale_group_only(self, name, bad, dtype):
        r = get_recipe(name)
        clean = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
        clean[1, 37] = 0.0
        x = clean.clone()
        x[1, 37] = BAD[bad]
        roles = ("input", "weight", "grad")
        quantizers = (r.quantize_input, r.quantize_weight, r.quantize_grad)
        for role, q, extent in zip(roles, quantizers, NONFINITE_EXTENT[name]):
            assert (q is None) == (extent is None), (name, role)
            if q is None:
                continue
            # The same random draws for both (stochastic rounding).
            torch.manual_seed(0)
            out = q(x, -1)
            torch.manual_seed(0)
            ref = q(clean, -1)
            nonfinite = ~torch.isfinite(out)
            assert out.dtype == dtype and bool(nonfinite[1, 37]), (name, role, out[1, 37])
            assert int(nonfinite.sum()) == extent, (name, role, int(nonfinite.sum()))
            # Everything else is exactly what it is without the bad element:
            # other rows / blocks keep their own scales.
            assert torch.equal(out[~nonfinite], ref[~nonfinite]), (name, role)
            assert torch.isfinite(ref).all()

    @pytest.mark.parametrize("bad", sorted(BAD))
    @pytest.mark.parametrize("name", sorted(NONFINITE_EXTENT))
    def test_compiled_low_path_output_is_not_finite(self, name, bad):
        import gnmr_fx

        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 8)
        model = gnmr_fx.compile(lin, gnmr_fx.GNMRConfig(recipe=name, policy="always_low"), backend="eager")
        clean = torch.randn(4, 64)
        clean[1, 5] = 0.0
        x = clean.clone()
        x[1, 5] = BAD[bad]
        with torch.no_grad():
            out, ref = model(x), model(clean)
        assert gnmr_fx.controller(model).plan.tolist() == [False]  # the unit ran its low path
        # gnmr_fx.compile compiles lin's forward in place, so the plain fp32 reference is F.linear.
        fp32 = torch.nn.functional.linear(clean, lin.weight, lin.bias).detach()
        assert torch.isfinite(ref).all() and not torch.equal(ref, fp32)  # quantized
        bad_rows = (~torch.isfinite(out)).all(dim=1)
        # A per-tensor activation scale takes every row with it; a per-row or
        # per-block one only the row that holds the bad element.
        per_tensor = NONFINITE_EXTENT[name][0] == 4 * 256
        assert bad_rows.tolist() == ([True] * 4 if per_tensor else [False, True, False, False])
        assert torch.equal(out[~bad_rows], ref[~bad_rows])

    @pytest.mark.parametrize("bad", sorted(BAD))
    @pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_rowwise"])
    def test_real_kernels_agree(self, name, bad):
        # emulate=False runs torch._scaled_mm (CPU: oneDNN) with the same dynamic scales.
        import gnmr_fx

        lin = torch.nn.Linear(32, 16)
        model = gnmr_fx.compile(lin, gnmr_fx.GNMRConfig(recipe=name, policy="always_low", emulate=False),
                                backend="eager")
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
        x[1, 5] = BAD[bad]
        with torch.no_grad():
            bad_rows = (~torch.isfinite(model(x))).all(dim=1)
        scaling = "tensorwise" if name == "fp8_e4m3" else "rowwise"
        assert [s.extra["kernel"] for s in gnmr_fx.runtime(model).records[0].sites] == [f"{name}:{scaling}"]
        assert bad_rows.nonzero().flatten().tolist() == (list(range(16)) if name == "fp8_e4m3" else [1])
