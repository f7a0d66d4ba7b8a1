"""Levers on the FP8 transformer step, compared in one process: the engine's module (fused Q/K/V, static FP8 linears,
FP8 attention) under regional torch.compile, one variant after another, with a kernel-category profile and the
error against an FP32 computation of the same weights for each.

    python benchmarks/step_levers.py --out results.json [--model random-full] [--size 1024]
                                     [--variants dynamic,static_qk,...]

Regional compilation compiles the two block classes once each (seconds), where an AOTInductor build compiles the
whole graph (minutes): the variants' differences carry over to the engine, their absolute step times are within a
few percent of it (the engine also fuses across block boundaries). Variants:

- ``dynamic``: Q, K and V quantized with their dynamic amax (the engine before static Q/K scales).
- ``static_qk``: Q and K with their norm bound (``qk_amax_bound``), V dynamic (the engine's default).
- ``static_qkv``: also V with a static amax: the largest V amax one eager call on the same inputs reached, so an
  upper bound of what a calibrated V scale buys (calibrated on other edits it could only be less exact).
- any of these with ``+cdt``: inductor's coordinate-descent tuning of its kernels' launch configurations.
- any of these with ``+split``: each single block's output projection as two FP8 GEMMs, one over the attention
  output and one over the MLP's, summed, instead of one GEMM over their concatenation (no concatenated copy).
- any of these with ``+divide``: every static quantization divides by its scale, as fluxtrt did before it
  multiplied by the reciprocal held ready (a buffer per linear, a constant for Q and K). Its results file
  step_levers2_h200.json was measured before that change, when the multiply was the variant ``+recip``.
- any of these with ``+unfused``: Q's and K's RMS norm, RoPE and static quantization by diffusers' functions and
  inductor's kernels, as fluxtrt did before ``fluxtrt::norm_rope_fp8`` (one Triton kernel each) computed them.
- any of these with ``+autotune``: inductor's max-autotune of the FP8 GEMMs (cuBLASLt against its Triton templates,
  per shape, the pointwise kernel after a GEMM fused into a Triton template's epilogue where that benchmarks faster).
- any of these with ``+tma``: as ``+autotune``, with inductor's persistent TMA templates too; those take no bias, so
  every FP8 linear adds its bias after the GEMM (for inductor to fuse into the epilogue).
- any of these with ``+sgelu``: the tanh GELU of the MLPs computed as ``x * sigmoid(2u)``
  (``fluxtrt.kernels.gelu``, what the AOTInductor engine compiles), the same function as ``0.5 x (1 + tanh(u))``.

Calibration: the linears' input amax from one eager call on the timed inputs (hooks), as above an upper bound of
what calibration on other edits gives.

Prints one JSON line per phase and rewrites --out after each.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.aoti_gpu import fp32_output  # noqa: E402
from benchmarks.gemm_epilogue import inductor_configs  # noqa: E402
from benchmarks.kernels import by_category  # noqa: E402
from benchmarks.records import Records, kernel_profile, relative_error, step_ms  # noqa: E402
from fluxtrt.kernels.fp8 import FP8_MAX  # noqa: E402

VARIANTS = (
    "dynamic",
    "static_qk",
    "static_qkv",
    "static_qk+cdt",
    "static_qk+split",
    "static_qk+divide",
    "static_qk+sgelu",
    "static_qk+divide+sgelu",
    "static_qk+sgelu+unfused",
)


def split_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                  joint_attention_kwargs=None):  # fmt: skip
    """diffusers' FluxSingleTransformerBlock.forward with ``proj_out(cat([attn, mlp]))`` computed as
    ``proj_out_attn(attn) + proj_out_mlp(mlp)``."""
    import torch

    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))  # fmt: skip
    projected = self.proj_out_attn(attn_output) + self.proj_out_mlp(mlp_hidden_states)
    hidden_states = residual + gate.unsqueeze(1) * projected
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


@contextlib.contextmanager
def split_proj_out(transformer, amax):
    """Every single block computes its output projection as two static FP8 linears (``split_forward``)."""
    import types

    from torch import nn

    from fluxtrt.kernels.fp8_linear import StaticFp8Linear

    blocks = list(transformer.single_transformer_blocks)
    for i, block in enumerate(blocks):
        linear = block.proj_out
        width = block.attn.inner_dim if hasattr(block.attn, "inner_dim") else block.attn.heads * block.attn.head_dim
        parts = []
        for cols, bias in ((slice(0, width), linear.bias), (slice(width, None), None)):
            part = nn.Linear(1, 1, bias=bias is not None)
            part.weight = nn.Parameter(linear.weight.detach()[:, cols].contiguous(), requires_grad=False)
            part.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
            parts.append(StaticFp8Linear(part, amax[f"transformer.single_transformer_blocks.{i}.proj_out"]))
        block.proj_out_attn, block.proj_out_mlp = parts
        block.forward = types.MethodType(split_forward, block)
    try:
        yield
    finally:
        for block in blocks:
            del block.proj_out_attn, block.proj_out_mlp, block.forward


def bias_after_forward(self, x):
    """``StaticFp8Linear.forward`` with the bias added after the GEMM instead of in its epilogue."""
    y = self.matmul(x.reshape(-1, x.shape[-1]), None)
    if self.bias is not None:
        y = y + self.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@contextlib.contextmanager
def bias_after_gemm(module):
    """Every ``StaticFp8Linear`` of ``module`` adds its bias after the GEMM."""
    from fluxtrt.kernels.fp8_linear import StaticFp8Linear

    linears = [m for m in module.modules() if isinstance(m, StaticFp8Linear)]
    for m in linears:
        m.forward = bias_after_forward.__get__(m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def divide_quantize_input(self, rows):
    """``StaticFp8Linear.quantize_input`` as it was before the reciprocal scale: ``rows / input_scale``."""
    from fluxtrt.kernels.fp8 import quantize_fp8

    return quantize_fp8(rows, self.input_scale)


def divide_static_or_dynamic(x, amax, held=None):
    """``quantize_fp8_static_or_dynamic`` as it was before the reciprocal scale: a division by ``amax / 448``, the
    descale made per call (``held``, the attention's descale buffer, unused)."""
    import torch

    from fluxtrt.kernels.fp8 import FP8_MAX, quantize_fp8, quantize_fp8_dynamic

    if amax is None:
        return quantize_fp8_dynamic(x)
    scale = amax / FP8_MAX
    return quantize_fp8(x, scale), torch.full((1, 1, 1, 1), scale, dtype=torch.float32, device=x.device)


@contextlib.contextmanager
def dividing_scales(module):
    """Every ``StaticFp8Linear`` of ``module`` and the static Q/K quantization divide by the scale."""
    import fluxtrt.kernels.attention as attention
    from fluxtrt.kernels.fp8_linear import StaticFp8Linear

    linears = [m for m in module.modules() if isinstance(m, StaticFp8Linear)]
    for m in linears:
        m.quantize_input = divide_quantize_input.__get__(m)
    saved = attention.quantize_fp8_static_or_dynamic
    attention.quantize_fp8_static_or_dynamic = divide_static_or_dynamic
    try:
        yield
    finally:
        attention.quantize_fp8_static_or_dynamic = saved
        for m in linears:
            del m.quantize_input


class RecordingKernel:
    """An FP8 attention kernel that records, per call, the amax of Q, K and V it was given (dynamic scales: the
    e4m3 amax is FP8_MAX, so amax = FP8_MAX * descale)."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, q8, k8, v8, dq, dk, dv, scale):
        self.seen.append(tuple(FP8_MAX * float(d) for d in (dq, dk, dv)))
        return self.inner(q8, k8, v8, dq, dk, dv, scale)


def calibrate(transformer, module, feed, kernel) -> tuple[dict[str, float], dict[str, tuple[float, float, float]]]:
    """(linear input amax by name, (Q, K, V) amax by attention processor name) from one eager call on ``feed``."""
    import torch

    from fluxtrt.engines.calibrate import recorded_input_amax
    from fluxtrt.kernels.attention import Fp8FluxAttnProcessor

    saved = transformer.attn_processors
    recorders = {name: RecordingKernel(kernel) for name in saved}
    transformer.set_attn_processor({name: Fp8FluxAttnProcessor(rec) for name, rec in recorders.items()})
    try:
        with recorded_input_amax(transformer) as amax, torch.inference_mode():
            module(**feed)
    finally:
        transformer.set_attn_processor(saved)
    return {f"transformer.{k}": v for k, v in amax.items()}, {n: r.seen[0] for n, r in recorders.items()}


@contextlib.contextmanager
def prepared(transformer, module, kernel, amax, qkv_amax, variant):
    """The engine's module for ``variant``, regionally compiled, for the duration; undone (and dynamo reset) after."""
    import torch

    from fluxtrt.backends.torch_modules import fused_qkv
    from fluxtrt.kernels.attention import Fp8FluxAttnProcessor
    from fluxtrt.kernels.attention_scales import AttentionAmax, qk_amax_bound
    from fluxtrt.kernels.fp8_linear import amax_for_fused_qkv, static_fp8_linears
    from fluxtrt.kernels.gelu import sigmoid_form_gelus
    from fluxtrt.stages.apply import _raise_recompile_limits

    scales = variant.split("+")[0]
    saved = transformer.attn_processors
    processors, bounds = {}, {}
    for name in saved:
        attn = transformer.get_submodule(name.removesuffix(".processor"))
        bound = qk_amax_bound(attn)
        bounds[name] = (bound.q, bound.k)
        static = {
            "dynamic": None,
            "static_qk": bound,
            "static_qkv": AttentionAmax(bound.q, bound.k, qkv_amax[name][2]),
        }[scales]
        # +divide measures the division in every static quantization, Q's and K's too: outside the fused op.
        fuse = "+unfused" not in variant and "+divide" not in variant
        processors[name] = Fp8FluxAttnProcessor(kernel, static, fuse_norm_rope=fuse)
    with contextlib.ExitStack() as stack:
        if "+split" in variant:
            stack.enter_context(split_proj_out(transformer, amax))
        stack.enter_context(fused_qkv(transformer))
        stack.enter_context(static_fp8_linears(module, amax_for_fused_qkv(module, amax)))
        if "+divide" in variant:
            stack.enter_context(dividing_scales(module))
        if "+sgelu" in variant:
            stack.enter_context(sigmoid_form_gelus(transformer))
        transformer.set_attn_processor(processors)
        stack.callback(transformer.set_attn_processor, saved)
        if "+tma" in variant:
            stack.enter_context(bias_after_gemm(module))
            stack.enter_context(torch._inductor.config.patch(inductor_configs("autotune_tma")))
        elif "+autotune" in variant:
            stack.enter_context(torch._inductor.config.patch(inductor_configs("autotune")))
        if "+cdt" in variant:
            stack.enter_context(torch._inductor.config.patch(coordinate_descent_tuning=True))
        _raise_recompile_limits()
        transformer.compile_repeated_blocks(fullgraph=True)
        try:
            yield bounds
        finally:
            for m in transformer.modules():
                if getattr(m, "_compiled_call_impl", None) is not None:
                    m._compiled_call_impl = None
            torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run (--model tiny, emulated FP8)")
    args = parser.parse_args()
    cuda = args.device == "cuda"

    import torch

    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.environment import environment
    from fluxtrt.kernels.attention import checked_fp8_attention_kernel
    from fluxtrt.kernels.attention_ops import EmulatedFp8Kernel
    from fluxtrt.models import load_components
    from fluxtrt.specs import Resolution, component_specs
    from fluxtrt.specs.flux import component_dims, dims_from_components

    records = Records(args.out)
    records.emit({"phase": "environment", **environment()})
    t0 = time.perf_counter()
    components = load_components(args.model, args.device, "bf16")
    transformer = components.transformer
    dims = dims_from_components(components)
    res = Resolution(args.size, args.size)
    spec = component_specs(dims)["transformer"]
    feed = spec.sample_feed(component_dims("transformer", dims, 1, res, res), torch.bfloat16, args.device, seed=0)
    module = TransformerModule(transformer).eval()
    kernel = checked_fp8_attention_kernel("cuda") if cuda else EmulatedFp8Kernel()
    amax, qkv_amax = calibrate(transformer, module, feed, kernel)
    reference = fp32_output(transformer, feed)
    records.emit({"phase": "setup", "seconds": time.perf_counter() - t0, "attention": kernel.name,
                  "fp8_linears": len(amax)})  # fmt: skip

    for variant in args.variants.split(","):
        try:
            with prepared(transformer, module, kernel, amax, qkv_amax, variant) as bounds:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = module(**feed)
                    if cuda:
                        torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    ms = step_ms(lambda: module(**feed))
                    profile = kernel_profile(lambda: module(**feed)) if cuda else {"all": []}
                reached = {n: v[:2] for n, v in qkv_amax.items()}
                ratio = [b / r for n in bounds for b, r in zip(bounds[n], reached[n], strict=True)]
                records.emit({
                    "phase": "variant", "variant": variant, "first_call_s": first, "step_ms": ms,
                    "vs_fp32": relative_error(out, reference),
                    "categories": {k: round(v["ms"], 2) for k, v in by_category(profile["all"]).items()},
                    "qk_bound_over_reached": [min(ratio), max(ratio)], "profile": profile,
                })  # fmt: skip
        except Exception as exc:  # the other variants' figures stand; say what failed
            records.emit({"phase": "variant", "variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:800]}"})
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
