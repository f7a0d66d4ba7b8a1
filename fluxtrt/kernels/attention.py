"""FP8 attention (stage 2, and the AOTInductor transformer): a diffusers attention processor whose attention runs on
FP8 Q/K/V.

The processor does what diffusers' ``FluxAttnProcessor`` does (projections, fused or not; QK RMS norms; text tokens
first; RoPE) and then quantizes Q, K and V per tensor (e4m3) for an FP8 attention kernel:
FlashAttention 3 when ``flash_attn_interface`` imports, else cuDNN's FP8 SDPA through nvidia-cudnn-frontend. Both
kernels are registered torch custom ops (``fluxtrt.kernels.attention_ops``), so a regionally compiled block keeps one
graph around them. An emulated kernel (dequantize, then SDPA) runs anywhere and is the numerical reference of the
quantization.

Each tensor's scale is its dynamic amax (a reduction over the whole tensor before it can be quantized), or a static
amax known before the call (``AttentionAmax``): then the quantization is one elementwise step after the norms and
RoPE. Q and K have a static amax that holds for every input (``qk_amax_bound``); with it, each of Q and K is
computed from its projection by one op (``fluxtrt.kernels.norm_rope``: a Triton kernel on CUDA). V's static amax,
where there is one, is calibrated (``fluxtrt.engines.calibrate``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from fluxtrt.environment import require_cuda_sm
from fluxtrt.errors import DeviceError, MissingDependencyError, first_line
from fluxtrt.kernels.attention_ops import CudnnFp8Kernel, FlashAttention3Fp8Kernel
from fluxtrt.kernels.attention_scales import (
    AttentionAmax,
    qk_amax_bound,
    quantize_fp8_static_or_dynamic,
    static_descale,
)
from fluxtrt.kernels.fp8 import FP8_MAX, quantize_fp8_dynamic
from fluxtrt.kernels.norm_rope import fusable_norms, rms_eps


def fp8_attention_kernel(device: torch.device | str) -> Any:
    """The FP8 attention kernel for ``device``: FA3 when ``flash_attn_interface`` imports, else cuDNN FP8 SDPA.

    Raises:
        DeviceError: not a CUDA device of compute capability 9.0 or newer.
        MissingDependencyError: neither flash_attn_interface nor nvidia-cudnn-frontend is installed.
    """
    require_cuda_sm(device, "fp8_attention", "use a stage with attention=sdpa (or --aoti-no-fp8-attention)")
    try:
        import flash_attn_interface  # noqa: F401

        return FlashAttention3Fp8Kernel()
    except ImportError:
        pass
    try:
        import cudnn  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "nvidia-cudnn-frontend", "FP8 attention (stage 2)", "pip install 'fluxtrt[cudnn]'"
        ) from None
    return CudnnFp8Kernel()


# The FP8 attention ops and what each needs at run time (module, package, install command): an exported graph
# that calls one runs only where this module is imported and that dependency is present.
OP_REQUIREMENTS = {
    "fluxtrt::cudnn_fp8_sdpa": ("cudnn", "nvidia-cudnn-frontend", "pip install 'fluxtrt[cudnn]'"),
    "fluxtrt::fa3_fp8_sdpa": ("flash_attn_interface", "flash-attn 3", "install FlashAttention 3 (hopper/ build)"),
    "fluxtrt::emulated_fp8_sdpa": ("torch", "torch", "pip install torch"),
}


def require_ops(ops: list[str] | tuple[str, ...], feature: str) -> None:
    """Raise unless every fluxtrt attention op in ``ops`` can run here.

    Raises:
        MissingDependencyError: an op's package does not import.
    """
    for op in ops:
        if op not in OP_REQUIREMENTS:
            continue
        module, package, install = OP_REQUIREMENTS[op]
        try:
            __import__(module)
        except ImportError:
            raise MissingDependencyError(package, f"{feature} ({op})", install) from None


@contextmanager
def fp8_attention(
    transformer: Any,
    kernel: Any,
    static_qk: bool = False,
    fuse_norm_rope: bool = True,
    v_amax: Mapping[str, float] | None = None,
) -> Iterator[None]:
    """Run every attention of a diffusers FLUX transformer through an ``Fp8FluxAttnProcessor(kernel)`` for the
    duration; the processors it had are put back on exit.

    Args:
        static_qk: quantize Q and K with their static bound (``qk_amax_bound``) instead of their dynamic amax.
        fuse_norm_rope: with ``static_qk``, Q's and K's norm, RoPE and quantization each as one op
            (``Fp8FluxAttnProcessor``).
        v_amax: calibrated V amax by attention module name (in ``transformer``); an attention not named keeps
            V's dynamic amax.
    """
    saved = transformer.attn_processors
    device = next(transformer.parameters()).device
    processors, buffers = {}, []
    try:
        for name in saved:
            attn_name = name.removesuffix(".processor")
            attn = transformer.get_submodule(attn_name)
            bound = qk_amax_bound(attn) if static_qk else AttentionAmax()
            amax = AttentionAmax(bound.q, bound.k, (v_amax or {}).get(attn_name))
            processors[name] = Fp8FluxAttnProcessor(kernel, amax, fuse_norm_rope)
            for t, value in vars(amax).items():
                if value is None:
                    continue
                # Made once, on the attention: a compiled graph holds them as constants (not a fill per call).
                attn.register_buffer(f"{DESCALE_BUFFER}{t}", static_descale(value, device), persistent=False)
                buffers.append((attn, f"{DESCALE_BUFFER}{t}"))
        transformer.set_attn_processor(processors)
        yield
    finally:
        transformer.set_attn_processor(saved)
        for attn, buffer in buffers:
            delattr(attn, buffer)


def checked_fp8_attention_kernel(device: torch.device | str) -> Any:
    """``fp8_attention_kernel(device)``, after one check run (``check_kernel``): a kernel that cannot build or run
    for this GPU fails here, before a model depends on it.

    Raises:
        DeviceError: not a CUDA device of compute capability 9.0 or newer, or the kernel failed its check run.
        MissingDependencyError: neither flash_attn_interface nor nvidia-cudnn-frontend is installed.
    """
    kernel = fp8_attention_kernel(device)
    try:
        check_kernel(kernel, device)
    except Exception as exc:
        raise DeviceError(
            f"{kernel.name} failed its check run on this GPU ({type(exc).__name__}: {first_line(exc, '')}); "
            "check the cuDNN / nvidia-cudnn-frontend versions"
        ) from exc
    return kernel


def check_kernel(kernel: Any, device: torch.device | str, seq: int = 512, heads: int = 2, dim: int = 128) -> float:
    """Run ``kernel`` once on random Q/K/V and return its output's cosine similarity to BF16 SDPA (about 0.999).

    A kernel that cannot build or run for this GPU raises here, before a model depends on it.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, seq, heads, dim, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    scale = dim**-0.5
    with torch.inference_mode():
        q8, dq = quantize_fp8_dynamic(q)
        k8, dk = quantize_fp8_dynamic(k)
        v8, dv = quantize_fp8_dynamic(v)
        out = kernel(q8, k8, v8, dq, dk, dv, scale).float()
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        ref = ref.transpose(1, 2).float()
    return F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()


# Prefix of the buffers ``fp8_attention`` gives an attention for its static Q, K and V descales.
DESCALE_BUFFER = "fp8_descale_"


def _held(attn: Any, name: str) -> torch.Tensor | None:
    """The static descale ``fp8_attention`` made ``attn`` hold for ``name`` (``q``, ``k``, ``v``; a compiled graph's
    constant, no fill per call), or None."""
    return getattr(attn, f"{DESCALE_BUFFER}{name}", None)


def _joined_value(attn: Any, value: torch.Tensor, e_value: torch.Tensor | None) -> torch.Tensor:
    """V as [B, S, H, D_head], the text stream's tokens first where there is one."""
    value = value.unflatten(-1, (-1, attn.head_dim))
    if e_value is None:
        return value
    return torch.cat([e_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)


class Fp8FluxAttnProcessor:
    """A FLUX attention processor (for ``set_attn_processor``) whose attention runs on per-tensor FP8 Q/K/V.

    Args:
        kernel: an FP8 attention kernel, ``kernel(q8, k8, v8, dq, dk, dv, scale) -> [B, S, H, D]``.
        amax: static amax of Q, K and V where known (``AttentionAmax``); None: all three dynamic.
        fuse_norm_rope: with static Q and K amax, compute each of Q and K from its projection in one
            ``fluxtrt::norm_rope_fp8`` call (one Triton kernel on CUDA) instead of diffusers' norm and RoPE and a
            quantization after (the same e4m3 values); False: always the latter.
    """

    def __init__(self, kernel: Any, amax: AttentionAmax | None = None, fuse_norm_rope: bool = True):
        self.kernel = kernel
        self.amax = amax or AttentionAmax()
        # Q's and K's norm, RoPE and quantization as one op (``fluxtrt::norm_rope_fp8``) where both scales are static.
        self.fused_norm_rope = fuse_norm_rope and self.amax.q is not None and self.amax.k is not None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,  # [B, S_img, D]
        encoder_hidden_states: torch.Tensor | None = None,  # [B, S_txt, D] (double blocks only)
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        if attention_mask is not None:
            raise ValueError("FP8 FLUX attention takes no attention mask (FLUX.1-Kontext uses none)")
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            if joint:
                e_query, e_key, e_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            if joint:
                e_query = attn.add_q_proj(encoder_hidden_states)
                e_key = attn.add_k_proj(encoder_hidden_states)
                e_value = attn.add_v_proj(encoder_hidden_states)

        text = (e_query, e_key, e_value) if joint else (None, None, None)
        fused = self.fused_norm_rope and image_rotary_emb is not None and fusable_norms(attn)
        quantize = self._fused_qkv if fused else self._qkv
        q8, k8, v8, dq, dk, dv = quantize(attn, query, key, value, *text, image_rotary_emb)
        out = self.kernel(q8, k8, v8, dq, dk, dv, attn.head_dim**-0.5)  # [B, S, H, D_head]
        out = out.flatten(2, 3).to(hidden_states.dtype)  # [B, S, H * D_head]

        if encoder_hidden_states is None:
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        text = attn.to_add_out(text.contiguous())
        return image, text

    def _qkv(self, attn, query, key, value, e_query, e_key, e_value, image_rotary_emb):
        """Q, K, V as e4m3 with their descales, by diffusers' norm and RoPE functions and a quantization after."""
        from diffusers.models.embeddings import apply_rotary_emb

        # [B, S, H, D_head]
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = _joined_value(attn, value, e_value)
        if e_query is not None:
            e_query = attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim)))
            e_key = attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim)))
            query = torch.cat([e_query, query], dim=1)  # text tokens first: [B, S_txt + S_img, H, D_head]
            key = torch.cat([e_key, key], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        q8, dq = quantize_fp8_static_or_dynamic(query, self.amax.q, _held(attn, "q"))
        k8, dk = quantize_fp8_static_or_dynamic(key, self.amax.k, _held(attn, "k"))
        v8, dv = quantize_fp8_static_or_dynamic(value, self.amax.v, _held(attn, "v"))
        return q8, k8, v8, dq, dk, dv

    def _fused_qkv(self, attn, query, key, value, e_query, e_key, e_value, image_rotary_emb):
        """``_qkv`` with Q's and K's norm, RoPE and static quantization each one ``fluxtrt::norm_rope_fp8`` call."""
        cos, sin = image_rotary_emb
        quantized = []
        for name, x, e_x, norm, e_norm, amax in (
            ("q", query, e_query, attn.norm_q, attn.norm_added_q if e_query is not None else None, self.amax.q),
            ("k", key, e_key, attn.norm_k, attn.norm_added_k if e_key is not None else None, self.amax.k),
        ):
            eps = rms_eps(norm, x.dtype)
            if e_x is None:
                x8 = torch.ops.fluxtrt.norm_rope_fp8(x, norm.weight, None, None, cos, sin, FP8_MAX / amax, eps)
            else:  # text tokens first, each stream with its own norm
                x8 = torch.ops.fluxtrt.norm_rope_fp8(e_x, e_norm.weight, x, norm.weight, cos, sin, FP8_MAX / amax, eps)
            descale = _held(attn, name)
            quantized.append((x8, descale if descale is not None else static_descale(amax, x.device)))
        v8, dv = quantize_fp8_static_or_dynamic(_joined_value(attn, value, e_value), self.amax.v, _held(attn, "v"))
        (q8, dq), (k8, dk) = quantized
        return q8, k8, v8, dq, dk, dv
