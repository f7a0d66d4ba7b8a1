"""The tanh GELU in its sigmoid form (``fluxtrt.kernels.gelu``) against torch's own tanh GELU, and the swap of a
FLUX transformer's GELUs; and quantization by the reciprocal scale against quantization by the scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fluxtrt.kernels.fp8 import quantize_fp8, quantize_fp8_by_inverse
from fluxtrt.kernels.gelu import SigmoidFormGelu, sigmoid_form_gelu, sigmoid_form_gelus
from fluxtrt.models import load_components


def test_sigmoid_form_is_torchs_tanh_gelu():
    """fp32: within a few fp32 roundings of ``F.gelu(approximate="tanh")`` over the range activations reach (the two
    forms are the same function); bf16: the one rounding of an fp32 result, so within half a bf16 ulp. Far out on
    the negative side the tanh form gives -0 (1 + tanh(u) rounds to 0) and the sigmoid form the tiny true value."""
    x = torch.linspace(-30, 30, 200_001)
    want = F.gelu(x, approximate="tanh")
    got = sigmoid_form_gelu(x)
    assert ((got - want).abs() <= 1e-6 * (1 + want.abs())).all(), (got - want).abs().max()
    assert (got[x < -9] <= 0).all() and (got[x < -9] > -1e-6).all()
    b = x.bfloat16()
    got_b, want_b = sigmoid_form_gelu(b).float(), F.gelu(b.float(), approximate="tanh")
    assert sigmoid_form_gelu(b).dtype == torch.bfloat16
    assert ((got_b - want_b).abs() <= 2**-8 * want_b.abs() + 1e-6).all()


def test_every_tanh_gelu_of_the_transformer_is_swapped_and_put_back():
    """Counted: one per single block (``act_mlp``) and two per double block (the image and text feed-forwards); the
    model's output is unchanged within fp32 rounding; everything is put back on exit."""
    transformer = load_components("tiny", "cpu", "fp32").transformer
    doubles, singles = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, transformer.single_transformer_blocks[0].proj_mlp.in_features, generator=gen)
    block = transformer.single_transformer_blocks[0]
    ff = transformer.transformer_blocks[0].ff.net[0]
    want_mlp, want_ff = block.act_mlp(block.proj_mlp(x)), ff(x)
    with torch.no_grad(), sigmoid_form_gelus(transformer) as swapped:
        assert swapped == 2 * doubles + singles
        assert isinstance(block.act_mlp, SigmoidFormGelu)
        torch.testing.assert_close(block.act_mlp(block.proj_mlp(x)), want_mlp, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ff(x), want_ff, atol=1e-6, rtol=1e-5)
    assert isinstance(block.act_mlp, torch.nn.GELU) and "gelu" not in vars(ff)


def test_quantizing_by_the_reciprocal_scale_moves_at_most_a_tie_by_one_step():
    """``x * (1 / s)`` and ``x / s`` differ by at most one fp32 rounding, so the e4m3 values agree except where the
    quotient sits on a rounding boundary of e4m3's 3-bit mantissa: then by one step (counted on 10^6 values)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=gen) * 5
    scale = torch.tensor(7.3 / 448)
    a = quantize_fp8(x, scale).float()
    b = quantize_fp8_by_inverse(x, 1.0 / scale).float()
    differ = a != b
    assert differ.float().mean() < 1e-4
    step = torch.maximum(a.abs(), b.abs()) * 2**-3  # one e4m3 step at that magnitude, at most
    assert ((a - b).abs()[differ] <= step[differ] + 2**-9).all()
    assert b.abs().max() == 448  # saturation holds
