"""The fine-grained recipes are their formats: grid, shared scales, blocks, saturation.

fp8_blockwise (DeepSeek-V3), mxfp8 / mxfp4 (OCP MX v1.0) and nvfp4 are
checked against scales recomputed here independently, block by block.
"""

import math

import pytest
import torch

from gnmr_fx.backends.paths import low_path
from gnmr_fx.backends.recipes import (
    FP8_E4M3_MAX,
    cast_fp4_e2m1,
    fake_quant_fp8_block2d,
    fake_quant_fp8_blockwise,
    fake_quant_mx,
    fake_quant_nvfp4,
    get_recipe,
    sqnr,
    recipe_names,
)

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E4M3 = torch.float8_e4m3fn

# Measured on N(0,1) [64, 256] activations (seed 0); floors ~1 dB below.
# Theory for a full-range tensor: e4m3 ~31 dB, e2m1 ~19 dB; finer blocks add.
SQNR_FLOORS = {"fp8_blockwise": 30.5, "mxfp8": 29.5, "mxfp4": 17.5, "nvfp4": 19.0}


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _on_e4m3_grid(v: torch.Tensor) -> bool:
    return torch.equal(v.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(E4M3).float(), v)


def _on_e2m1_grid(v: torch.Tensor) -> bool:
    return bool(torch.isin(v.abs(), E2M1).all())


def test_registered():
    assert {"fp8_blockwise", "mxfp8", "mxfp4", "nvfp4"} <= set(recipe_names())
    assert get_recipe("fp8_blockwise").quantize_grad is not None
    assert get_recipe("mxfp4").quantize_grad is None


class TestFP4Cast:
    def test_round_to_nearest_even_and_saturate(self):
        x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 5.01, 6.5, 1e9, -0.75, -2.6])
        want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 6.0, 6.0, 6.0, -1.0, -3.0]
        assert cast_fp4_e2m1(x).tolist() == want

    def test_matches_nearest_even_table_lookup(self):
        # Reference: nearest grid point by brute force, ties to the even code.
        x = torch.cat([torch.linspace(-8, 8, 20001), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])])
        a = x.abs().clamp(max=6.0)
        d = (a[:, None] - E2M1).abs()
        idx = torch.arange(8)
        rank = torch.where(d <= d.min(1, keepdim=True).values, (idx % 2) * 8 + idx, torch.full_like(idx, 99))
        assert torch.equal(cast_fp4_e2m1(x), torch.copysign(E2M1[rank.argmin(1)], x))

    def test_grid_points_are_fixed_points(self):
        g = torch.cat([E2M1, -E2M1])
        assert torch.equal(cast_fp4_e2m1(g), g)

    def test_nan_propagates(self):
        assert torch.isnan(cast_fp4_e2m1(torch.tensor([float("nan")]))).all()


class TestFP8Blockwise:
    def test_activation_tiles_1x128(self):
        x = _randn(4, 300)  # K not a multiple of 128: the last tile is padded
        x[1, 130] = 1000.0  # an outlier confined to tile 1 of row 1
        q = fake_quant_fp8_blockwise(x, -1)
        for r in range(4):
            for c0 in range(0, 300, 128):
                tile, qt = x[r, c0:c0 + 128], q[r, c0:c0 + 128]
                scale = tile.abs().amax() / FP8_E4M3_MAX
                scaled = qt / scale
                assert torch.allclose(scaled.to(E4M3).float(), scaled, rtol=1e-6, atol=0)
                assert math.isclose(float(scaled.abs().amax()), FP8_E4M3_MAX, rel_tol=1e-6)
                # Each tile is quantized on its own: same as quantizing it alone.
                assert torch.equal(fake_quant_fp8_blockwise(tile[None], -1)[0], qt)

    def test_tiles_follow_kdim(self):
        x = _randn(256, 5)
        assert torch.equal(fake_quant_fp8_blockwise(x, 0), fake_quant_fp8_blockwise(x.t(), -1).t())

    def test_weight_blocks_128x128(self):
        w = _randn(200, 384) * 0.05
        w[150, 10] = 1e5  # outlier in block (1, 0) only: pushes its block into e4m3 subnormals
        q = fake_quant_fp8_block2d(w, -1)
        for r0 in range(0, 200, 128):
            for c0 in range(0, 384, 128):
                blk, qb = w[r0:r0 + 128, c0:c0 + 128], q[r0:r0 + 128, c0:c0 + 128]
                scale = blk.abs().amax() / FP8_E4M3_MAX
                scaled = qb / scale
                assert torch.allclose(scaled.to(E4M3).float(), scaled, rtol=1e-6, atol=0)
                assert math.isclose(float(scaled.abs().amax()), FP8_E4M3_MAX, rel_tol=1e-6)
        # Blocks without the outlier keep their resolution: exact re-quantization alone.
        assert torch.equal(fake_quant_fp8_block2d(w[:128, :128], -1), q[:128, :128])
        # The outlier's block is coarser: its small entries lose resolution.
        ref, out = w[128:, :128].clone(), q[128:, :128].clone()
        ref[150 - 128, 10] = out[150 - 128, 10] = 0.0
        assert sqnr(ref, out) < sqnr(w[:128, :128], q[:128, :128]) - 10

    def test_saturation_free_and_zero_safe(self):
        assert torch.equal(fake_quant_fp8_blockwise(torch.zeros(2, 128), -1), torch.zeros(2, 128))
        assert torch.isfinite(fake_quant_fp8_block2d(torch.full((4, 4), 1e30), -1)).all()


class TestMX:
    @pytest.mark.parametrize("elem,emax", [("fp8", 8), ("fp4", 2)])
    def test_each_32_block_shares_one_power_of_two_scale(self, elem, emax):
        x = _randn(8, 96) * torch.logspace(-3, 3, 96)  # blocks of very different ranges
        q = fake_quant_mx(x, -1, elem=elem)
        for r in range(8):
            for c0 in range(0, 96, 32):
                blk, qb = x[r, c0:c0 + 32], q[r, c0:c0 + 32]
                amax = float(blk.abs().amax())
                scale = 2.0 ** (math.floor(math.log2(amax)) - emax)  # OCP MX v1.0, float64 here
                scaled = qb.double() / scale  # exact: scale is a power of two
                if elem == "fp8":
                    assert _on_e4m3_grid(scaled.float())
                    assert float(scaled.abs().amax()) <= FP8_E4M3_MAX
                else:
                    assert _on_e2m1_grid(scaled.float())
                    assert float(scaled.abs().amax()) <= 6.0

    def test_saturation(self):
        # amax 500 -> scale 2^(8-8) = 1 -> 500 does not fit e4m3 and saturates to 448.
        x = torch.tensor([[500.0, 1.0] + [0.0] * 30])
        assert fake_quant_mx(x, -1, elem="fp8")[0, :2].tolist() == [448.0, 1.0]
        # amax 7 -> scale 2^(2-2) = 1 -> 7 saturates to 6 in e2m1.
        x4 = torch.tensor([[7.0, 3.0, 0.2] + [0.0] * 29])
        assert fake_quant_mx(x4, -1, elem="fp4")[0, :3].tolist() == [6.0, 3.0, 0.0]

    def test_blocks_along_kdim_and_padding(self):
        x = _randn(70, 6)  # K = 70 along dim 0: blocks 32, 32, 6 (padded)
        assert torch.equal(fake_quant_mx(x, 0, elem="fp4"), fake_quant_mx(x.t(), -1, elem="fp4").t())
        tail = fake_quant_mx(x[64:].t().contiguous(), -1, elem="fp4")
        assert torch.equal(fake_quant_mx(x, 0, elem="fp4")[64:].t(), tail)

    def test_zero_block(self):
        assert torch.equal(fake_quant_mx(torch.zeros(1, 64), -1, elem="fp8"), torch.zeros(1, 64))

    def test_bad_elem(self):
        with pytest.raises(ValueError, match="elem must be"):
            fake_quant_mx(torch.ones(1, 32), -1, elem="fp6")


class TestNVFP4:
    def test_block_scales_are_e4m3_and_values_e2m1(self):
        x = _randn(4, 64) * torch.logspace(-2, 2, 64)
        q = fake_quant_nvfp4(x, -1)
        ts = float(x.abs().amax()) / (6.0 * FP8_E4M3_MAX)
        for r in range(4):
            for c0 in range(0, 64, 16):
                blk, qb = x[r, c0:c0 + 16], q[r, c0:c0 + 16]
                bs = torch.tensor(float(blk.abs().amax()) / 6.0 / ts).to(E4M3).float()
                assert _on_e4m3_grid(bs[None])
                elems = qb / (bs * ts)
                snapped = cast_fp4_e2m1(elems)
                assert torch.allclose(snapped, elems, rtol=1e-5, atol=1e-6), (r, c0)
                assert float(elems.abs().amax()) <= 6.0 + 1e-5

    def test_tensor_amax_block_is_exact(self):
        # The block holding the tensor amax gets block scale 448 exactly, so
        # its largest element (6 * 448 * ts = amax) comes back up to the fp32
        # rounding of ts.
        x = _randn(2, 32)
        i = x.abs().argmax()
        assert math.isclose(float(fake_quant_nvfp4(x, -1).flatten()[i]), float(x.flatten()[i]), rel_tol=1e-6)

    def test_underflowing_block_is_zero(self):
        x = torch.cat([torch.full((16,), 1000.0), torch.full((16,), 1e-9)])[None]
        q = fake_quant_nvfp4(x, -1)
        assert torch.equal(q[0, 16:], torch.zeros(16))
        assert torch.allclose(q[0, :16], x[0, :16], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(SQNR_FLOORS))
def test_sqnr_and_low_path(name):
    r = get_recipe(name)
    x = _randn(64, 256)
    db = sqnr(x, r.quantize_input(x, -1))
    assert db >= SQNR_FLOORS[name], f"{name}: {db:.2f} dB is too low"
    # A linear with K=100 (not a multiple of any block) and an attention-style
    # matmul run on the low path with finite gradients.
    a = _randn(3, 7, 100, seed=1).requires_grad_()
    w = (_randn(20, 100, seed=2) * 0.1).requires_grad_()
    y = low_path("linear", a, w, None, recipe=name, a_index=0, b_index=1, b_kdim=-1, b_is_weight=True)
    ref = torch.nn.functional.linear(a, w)
    assert sqnr(ref, y) >= SQNR_FLOORS[name] - 6.0
    y.square().sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(w.grad).all()
    k = _randn(3, 9, 100, seed=3)
    z = low_path("matmul", a.detach(), k.transpose(-2, -1), recipe=name, a_index=0, b_index=1,
                 b_kdim=-2, b_is_weight=False)
    assert z.shape == (3, 7, 9)
    assert sqnr(a.detach() @ k.transpose(-2, -1), z) >= SQNR_FLOORS[name] - 6.0


def test_fp8_blockwise_gradient_on_tiles():
    # The output gradient is rounded on 1x128 e4m3 tiles (DeepSeek-V3 keeps e4m3 for gradients).
    a = _randn(4, 128).requires_grad_()
    w = _randn(256, 128) * 0.1
    g = _randn(4, 256, seed=5)
    y = low_path("linear", a, w, None, recipe="fp8_blockwise", a_index=0, b_index=1, b_kdim=-1,
                 b_is_weight=True)
    y.backward(g)
    gq = fake_quant_fp8_blockwise(g, -1)
    wq = fake_quant_fp8_block2d(w, -1)
    assert torch.allclose(a.grad, gq @ wq, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.grad, g @ wq, rtol=1e-5, atol=1e-6)
