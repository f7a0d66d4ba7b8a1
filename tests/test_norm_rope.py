"""``fluxtrt::norm_rope_fp8``: FLUX attention's Q or K from its projection to e4m3 in one op.

Its Triton kernel is checked bit for bit against diffusers' functions (``norm_rope_fp8_reference``) under Triton's
CPU interpreter, and on a GPU where there is one; the processor's fused path is checked against its unfused one on
the whole miniature, in eager mode and through torch.export.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fluxtrt.kernels.attention import DESCALE_BUFFER, fp8_attention
from fluxtrt.kernels.attention_ops import EmulatedFp8Kernel
from fluxtrt.kernels.norm_rope import norm_rope_fp8_reference
from tests.test_attention_scales import uneven_norm_weights
from tests.test_stages import fresh_transformer, transformer_feed

HAS_TRITON = importlib.util.find_spec("triton") is not None


def streams(seed: int, device: str = "cpu", batch: int = 2, heads: int = 3, text: int = 5, image: int = 37):
    """Q projections of a double block as the processor gets them: slices of fused [B, S, 3 * H * D] outputs
    (token stride 3 * H * D), heavy-tailed so that some values saturate e4m3 and some fall among its subnormals;
    norm weights of each stream; RoPE's cos/sin [S_text + S_image, D] (each angle repeated for its pair)."""
    gen = torch.Generator().manual_seed(seed)
    d = 128
    width = heads * d

    def projection(tokens):
        x = torch.randn(batch, tokens, 3 * width, generator=gen) * 3
        x[:, :, ::7] = x[:, :, ::7] ** 3  # outliers in every head
        return x.to(device, torch.bfloat16)[..., width : 2 * width]

    weights = [(torch.rand(d, generator=gen) * 2.5 + 0.1).to(device, torch.bfloat16) for _ in range(2)]
    angles = torch.rand(text + image, d // 2, generator=gen) * 2 * math.pi
    cos, sin = (f(angles).repeat_interleave(2, dim=-1).to(device) for f in (torch.cos, torch.sin))
    return projection(text), weights[0], projection(image), weights[1], cos, sin


# A scale at which the outliers saturate (|y| * inverse_scale > 448) and small values are e4m3 subnormals.
INVERSE_SCALE = 448.0 / 6.0

INTERPRETED = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from fluxtrt.kernels.norm_rope import norm_rope_fp8_reference
from fluxtrt.kernels.norm_rope_triton import launch_norm_rope_fp8
from tests.test_norm_rope import INVERSE_SCALE, streams

results = {}
for name, eps, block in (("double", 1e-6, 32), ("single", float(torch.finfo(torch.bfloat16).eps), 16)):
    text, w_text, image, w_image, cos, sin = streams(seed=len(name))
    single = (image, w_image, None, None, cos[5:], sin[5:])
    args = (text, w_text, image, w_image, cos, sin) if name == "double" else single
    got = launch_norm_rope_fp8(*args, INVERSE_SCALE, eps, config=(block, 4))
    want = norm_rope_fp8_reference(*args, INVERSE_SCALE, eps)
    results[name] = {
        "shape": list(got.shape), "want_shape": list(want.shape),
        "differ": int((got.view(torch.uint8) != want.view(torch.uint8)).sum()),
        "saturated": int((want.float().abs() == 448).sum()), "subnormal": int((want.float().abs() < 2**-6).sum()),
        "elements": want.numel(),
    }
print(json.dumps(results))
"""


@pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (it comes with PyTorch's CUDA builds, not the CPU one)"
)
def test_triton_kernel_matches_diffusers_bit_for_bit_under_the_interpreter():
    """Both streams of a double block (text first, their own weights, rows not a multiple of the block) and a
    single block's one stream with a norm whose eps is the dtype's: every e4m3 byte equals the reference's,
    saturated and subnormal values included."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results["double"]["shape"] == [2, 42, 3, 128] == results["double"]["want_shape"]
    assert results["single"]["shape"] == [2, 37, 3, 128] == results["single"]["want_shape"]
    for r in results.values():
        assert r["differ"] == 0, results
        assert r["saturated"] > 0 and r["subnormal"] > 0, results  # the edges of the format were exercised


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none here")
def test_triton_kernel_matches_diffusers_on_the_gpu():
    """Compiled for the GPU, the kernel's rsqrt and fp32 contractions may differ from torch's by an ulp, which can
    move the norm's BF16 rounding by one step; RoPE's sum can cancel, so that step can be a large part of a small
    value: at most one e4m3 value in 100,000 differs, and none by more than one e4m3 step of the largest value
    (26 and 31 of 26.7 million at the step's shapes on an H200, benchmarks/results/norm_rope_h200.json)."""
    from fluxtrt.kernels.norm_rope import norm_rope_fp8

    text, w_text, image, w_image, cos, sin = streams(seed=5, device="cuda", heads=24, text=512, image=1024)
    got = norm_rope_fp8(text, w_text, image, w_image, cos, sin, INVERSE_SCALE, 1e-6)
    want = norm_rope_fp8_reference(text, w_text, image, w_image, cos, sin, INVERSE_SCALE, 1e-6)
    differ = got.view(torch.uint8) != want.view(torch.uint8)
    assert differ.float().mean() <= 1e-5
    assert (got.float() - want.float()).abs().max() <= 2**-4 * want.float().abs().max()


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func._schema.name == "fluxtrt::norm_rope_fp8"
        return func(*args, **(kwargs or {}))


def test_fused_path_gives_the_miniature_the_unfused_output_with_one_op_per_q_and_per_k():
    """One double and one single block with their own norm weights, static Q/K scales: the processor's fused path
    (two ops per attention) and diffusers' norm + RoPE + quantization give the same output, exactly."""
    model = fresh_transformer()
    uneven_norm_weights(model, seed=4)
    feed = transformer_feed(model, tokens=48, text=8)
    outputs = {}
    with torch.inference_mode():
        for fused in (False, True):
            with fp8_attention(model, EmulatedFp8Kernel(), static_qk=True, fuse_norm_rope=fused), OpCounter() as ops:
                outputs[fused] = model(**feed)[0]
            assert ops.calls == (4 if fused else 0)
        with fp8_attention(model, EmulatedFp8Kernel(), static_qk=False), OpCounter() as ops:
            model(**feed)
        assert ops.calls == 0  # dynamic Q/K scales: nothing to fuse the quantization with
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=0)


def test_the_fused_op_survives_torch_export_as_one_node_per_q_and_per_k():
    model = fresh_transformer()
    uneven_norm_weights(model, seed=6)
    feed = transformer_feed(model, tokens=32, text=8)
    kwargs = {k: v for k, v in feed.items() if k != "return_dict"}
    with fp8_attention(model, EmulatedFp8Kernel(), static_qk=True), torch.no_grad():
        ep = torch.export.export(model, (), kwargs={**kwargs, "return_dict": False}, strict=False)
        want = model(**feed)[0]
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "norm_rope_fp8" in str(n.target)]
    assert len(nodes) == 4
    # Q's and K's descales are the attentions' buffers (constants of the graph, no fill per call), gone after.
    descales = [name for name in ep.constants if name.rsplit(".", 1)[-1].startswith(DESCALE_BUFFER)]
    assert len(descales) == 4
    assert not [n for n, _ in model.named_buffers() if DESCALE_BUFFER in n]
    assert not [n for n in ep.graph.nodes if n.op == "call_function" and "full" in str(n.target)]
    with torch.no_grad():
        got = ep.module()(**kwargs, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_launcher_refuses_shapes_the_kernel_cannot_take():
    """The launcher's checks: a head size the kernel cannot load at once, and cos/sin of the wrong length."""
    pytest.importorskip(
        "triton", reason="triton is not installed (it comes with PyTorch's CUDA builds, not the CPU one)"
    )
    from fluxtrt.kernels.norm_rope_triton import launch_norm_rope_fp8

    x = torch.zeros(1, 4, 2 * 48, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head size 48 is not a power of two"):
        launch_norm_rope_fp8(x, torch.ones(48), None, None, torch.zeros(4, 48), torch.zeros(4, 48), 1.0, 1e-6)
    x = torch.zeros(1, 4, 2 * 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"cos/sin are \(5, 64\), expected \(4, 64\)"):
        launch_norm_rope_fp8(x, torch.ones(64), None, None, torch.zeros(5, 64), torch.zeros(5, 64), 1.0, 1e-6)
