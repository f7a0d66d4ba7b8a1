"""Static FP8 scales of FLUX attention's Q and K (``qk_amax_bound``): a bound no input exceeds, that an input
reaches, and that quantizes about as well as each tensor's own dynamic amax."""

from __future__ import annotations

import math

import pytest
import torch

from fluxtrt.kernels.attention import fp8_attention
from fluxtrt.kernels.attention_ops import EmulatedFp8Kernel
from fluxtrt.kernels.attention_scales import AttentionAmax, qk_amax_bound
from fluxtrt.kernels.fp8 import FP8_MAX
from tests.test_stages import fresh_transformer, transformer_feed


def uneven_norm_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every Q/K RMS norm weights of its own (a fresh model has ones): the bound must follow the largest."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.RMSNorm) and m.weight is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 2.5 + 0.25)


def test_the_bound_is_reached_by_a_one_hot_head_and_exceeded_by_nothing():
    """Through the attention's own RMS norm and diffusers' RoPE: a head whose energy sits in the element of the
    largest norm weight reaches the bound (less the rounding margin); Gaussian and heavy-tailed heads stay under."""
    from diffusers.models.embeddings import apply_rotary_emb

    model = fresh_transformer()
    uneven_norm_weights(model)
    attn = model.transformer_blocks[0].attn
    bound = qk_amax_bound(attn)
    d = attn.head_dim
    # Q's bound covers both streams' norms (their tokens share one tensor): the one with the larger weight reaches it.
    norm = max((attn.norm_q, attn.norm_added_q), key=lambda n: float(n.weight.abs().max()))
    peak = int(norm.weight.abs().argmax())

    gen = torch.Generator().manual_seed(3)
    tokens = 64
    x = torch.randn(1, tokens, attn.heads, d, generator=gen)
    x[:, : tokens // 2] = x[:, : tokens // 2] ** 5  # heavy-tailed heads
    x[0, 0, 0] = 0.0
    x[0, 0, 0, peak] = 7.0  # all of the first head's energy in one element
    angles = torch.rand(tokens, d // 2, generator=gen) * 2 * math.pi
    angles[0] = 0.0  # the one-hot head is not rotated away from its peak
    cos = torch.cos(angles).repeat_interleave(2, dim=-1)
    sin = torch.sin(angles).repeat_interleave(2, dim=-1)
    with torch.no_grad():
        q = apply_rotary_emb(norm(x), (cos, sin), sequence_dim=1)
    largest_q = max(float(attn.norm_q.weight.abs().max()), float(attn.norm_added_q.weight.abs().max()))
    assert bound.q == pytest.approx(math.sqrt(d) * largest_q * (1 + 2**-6))
    assert q.abs().max() <= bound.q
    assert q[0, 0, 0].abs().max() >= 0.98 * bound.q  # the bound is tight
    assert q[0, 1:].abs().max() < 0.9 * bound.q
    assert bound.v is None  # V has no bound: its scale stays dynamic


def test_the_bound_follows_norm_weights_below_one_and_counts_a_missing_weight_as_one():
    model = fresh_transformer()
    uneven_norm_weights(model)
    attn = model.transformer_blocks[0].attn
    with torch.no_grad():
        for norm in (attn.norm_q, attn.norm_added_q, attn.norm_k, attn.norm_added_k):
            norm.weight.mul_(0.1)  # every weight below 1
    largest_k = max(float(attn.norm_k.weight.abs().max()), float(attn.norm_added_k.weight.abs().max()))
    assert largest_k < 1
    assert qk_amax_bound(attn).k == pytest.approx(math.sqrt(attn.head_dim) * largest_k * (1 + 2**-6))
    attn.norm_added_k = torch.nn.RMSNorm(attn.head_dim, elementwise_affine=False)
    assert qk_amax_bound(attn).k == pytest.approx(math.sqrt(attn.head_dim) * (1 + 2**-6))


def test_a_q_or_k_norm_without_a_known_bound_is_refused():
    model = fresh_transformer()
    attn = model.transformer_blocks[0].attn
    attn.norm_k = torch.nn.LayerNorm(attn.head_dim)
    with pytest.raises(TypeError, match="LayerNorm"):
        qk_amax_bound(attn)


def test_static_q_k_scales_quantize_about_as_well_as_dynamic_ones_and_never_saturate(monkeypatch):
    """On the whole model (one double, one single block), each quantized Q and K against the tensor it came from:
    the static bound's rounding error is within 15% of the dynamic amax's (the same 3-bit mantissa, the grid only
    shifted), no e4m3 value reaches the format's largest magnitude, and the model's output stays as close to the
    unquantized model's as with dynamic scales (within 50%: two attention layers of a miniature are a noisy sum)."""
    import fluxtrt.kernels.attention as attention

    quantize = attention.quantize_fp8_static_or_dynamic
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]] = []

    def recorded(x, amax, held=None):
        x8, descale = quantize(x, amax, held)
        calls.append((x.float(), x8.float(), descale, amax))
        return x8, descale

    monkeypatch.setattr(attention, "quantize_fp8_static_or_dynamic", recorded)
    model = fresh_transformer()
    uneven_norm_weights(model, seed=1)
    feed = transformer_feed(model, tokens=96, text=16)
    outputs = {}
    with torch.inference_mode():
        want = model(**feed)[0]
        for static in (False, True):
            # Unfused: the fused op quantizes Q and K without this function (tests/test_norm_rope.py).
            with fp8_attention(model, EmulatedFp8Kernel(), static_qk=static, fuse_norm_rope=False):
                outputs[static] = model(**feed)[0]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # Three tensors (Q, K, V) per attention, two attentions, two runs.
    assert len(calls) == 12
    dynamic_qk = [c for i, c in enumerate(calls[:6]) if i % 3 != 2]
    static_qk = [c for i, c in enumerate(calls[6:]) if i % 3 != 2]
    assert all(c[3] is None for c in dynamic_qk) and all(c[3] is not None for c in static_qk)
    # The first attention quantizes the same Q and K in both runs (later ones see the first one's FP8 rounding).
    torch.testing.assert_close(static_qk[0][0], dynamic_qk[0][0])
    for (x_dyn, x8_dyn, d_dyn, _), (x, x8, d, amax) in zip(dynamic_qk, static_qk, strict=True):
        assert x.abs().max() <= amax and x8.abs().max() < FP8_MAX
        assert rel(x8 * d, x) <= 1.15 * rel(x8_dyn * d_dyn, x_dyn), (rel(x8 * d, x), rel(x8_dyn * d_dyn, x_dyn))
    assert not torch.equal(outputs[True], outputs[False])
    assert rel(outputs[True], want) <= 1.5 * rel(outputs[False], want)


def test_fp8_attention_gives_each_attention_its_own_bound_and_restores_the_processors():
    model = fresh_transformer()
    uneven_norm_weights(model, seed=2)
    before = {k: type(v) for k, v in model.attn_processors.items()}
    with fp8_attention(model, EmulatedFp8Kernel(), static_qk=True):
        processors = model.attn_processors
        amax = {name: p.amax for name, p in processors.items()}
        for name, value in amax.items():
            attn = model.get_submodule(name.removesuffix(".processor"))
            assert value == qk_amax_bound(attn)
        assert len(set(amax.values())) == len(amax)  # uneven weights: a bound per attention
    assert {k: type(v) for k, v in model.attn_processors.items()} == before
    with fp8_attention(model, EmulatedFp8Kernel()):
        assert all(p.amax == AttentionAmax() for p in model.attn_processors.values())


def test_a_calibrated_v_amax_replaces_the_pass_over_v_and_keeps_the_output():
    """``fp8_attention(v_amax=...)`` with each attention's V amax as a dynamic run saw it (the best a calibration
    can do): the output stays within 1% of the dynamic run's (the same e4m3 grid but for the scale's last fp32
    bit), the exported graph computes no amax at all (Q and K have their bound, V its amax), and V's descale is
    the attention's constant."""
    from fluxtrt.kernels.attention import DESCALE_BUFFER

    class Recording(EmulatedFp8Kernel):
        def __init__(self):
            self.v_amax: list[float] = []

        def __call__(self, q8, k8, v8, dq, dk, dv, scale):
            self.v_amax.append(float(dv) * FP8_MAX)
            return super().__call__(q8, k8, v8, dq, dk, dv, scale)

    model = fresh_transformer()
    uneven_norm_weights(model, seed=7)
    feed = transformer_feed(model, tokens=32, text=8)
    kwargs = {k: v for k, v in feed.items() if k != "return_dict"}
    recording = Recording()
    with torch.no_grad():
        with fp8_attention(model, recording, static_qk=True):
            dynamic = model(**feed)[0]
        names = [n.removesuffix(".processor") for n in model.attn_processors]  # in call order
        v_amax = dict(zip(names, recording.v_amax, strict=True))
        with fp8_attention(model, EmulatedFp8Kernel(), static_qk=True, v_amax=v_amax):
            static = model(**feed)[0]
            ep = torch.export.export(model, (), kwargs={**kwargs, "return_dict": False}, strict=False)
            for name, value in v_amax.items():
                held = getattr(model.get_submodule(name), f"{DESCALE_BUFFER}v")
                assert float(held) == pytest.approx(value / FP8_MAX, rel=1e-6)
    assert ((static - dynamic).norm() / dynamic.norm()).item() < 0.01
    amax_nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "amax" in str(n.target)]
    assert amax_nodes == []
    with fp8_attention(model, EmulatedFp8Kernel(), static_qk=True), torch.no_grad():
        ep = torch.export.export(model, (), kwargs={**kwargs, "return_dict": False}, strict=False)
    assert len([n for n in ep.graph.nodes if n.op == "call_function" and "amax" in str(n.target)]) == 2  # V's


def _cudnn_fp8_available() -> str | None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        return "needs a CUDA GPU of compute capability 9.0 or newer; none here"
    try:
        import cudnn  # noqa: F401
    except ImportError:
        return "needs nvidia-cudnn-frontend; not installed here"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_cudnn_fp8_available() is not None, reason=str(_cudnn_fp8_available()))
def test_cudnn_fp8_attention_follows_the_emulated_kernel():
    """cuDNN's FP8 SDPA (its S and O amax left virtual) against the dequantize + fp32 SDPA reference on the same
    e4m3 Q/K/V and descales, at a FLUX-like head count and size. cuDNN also quantizes the softmax probabilities and
    the output to e4m3 (3 mantissa bits), so the bound is a few percent; wrong scales or layouts miss it by far."""
    from fluxtrt.kernels.attention_ops import CudnnFp8Kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 1536, 24, 128)
    q, k, v = (torch.randn(shape, device="cuda", generator=gen) * s for s in (3.0, 2.0, 0.5))
    descales = [x.abs().amax().reshape(1, 1, 1, 1) / FP8_MAX for x in (q, k, v)]
    q8, k8, v8 = ((x / d).to(torch.float8_e4m3fn) for x, d in zip((q, k, v), descales, strict=True))
    scale = 1 / math.sqrt(shape[-1])
    want = EmulatedFp8Kernel()(q8, k8, v8, *descales, scale)
    got = CudnnFp8Kernel()(q8, k8, v8, *descales, scale).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.05, rel
    again = CudnnFp8Kernel()(q8, k8, v8, *descales, scale).float()  # the cached plan, a second call
    assert torch.equal(again, got)
