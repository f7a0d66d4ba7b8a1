"""The FP8 attention kernels, each a registered torch custom op on e4m3 [B, S, H, D] Q/K/V with fp32 descales:
cuDNN's FP8 SDPA through nvidia-cudnn-frontend, FlashAttention 3's FP8 forward, and an emulated kernel (dequantize,
then fp32 SDPA) that runs anywhere and is the numerical reference. ``fluxtrt.kernels.attention`` picks one and runs
FLUX attention through it."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

# cuDNN quantizes the softmax probabilities P (<= 1) to FP8 before P @ V; 256 keeps small P representable.
_SOFTMAX_SCALE = 256.0

# Every kernel's op: e4m3 [B, S, H, D] Q/K/V, fp32 [1, 1, 1, 1] descales and the softmax scale -> [B, S, H, D].
_FP8_SDPA_SCHEMA = (
    "(Tensor q8, Tensor k8, Tensor v8, Tensor descale_q, Tensor descale_k, Tensor descale_v, float scale) -> Tensor"
)


def _fp8_sdpa_op(name: str, out_dtype: torch.dtype):
    """Register the decorated function as ``fluxtrt::<name>`` with the FP8 SDPA schema, and its fake (the output's
    shape is Q's, its dtype ``out_dtype``)."""

    def register(fn):
        op = torch.library.custom_op(f"fluxtrt::{name}", fn, mutates_args=(), schema=_FP8_SDPA_SCHEMA)
        op.register_fake(lambda q8, *_: torch.empty(q8.shape, dtype=out_dtype, device=q8.device))
        return op

    return register


@_fp8_sdpa_op("emulated_fp8_sdpa", torch.float32)
def emulated_fp8_sdpa(q8, k8, v8, descale_q, descale_k, descale_v, scale):
    """Dequantized e4m3 [B, S, H, D] Q/K/V through fp32 SDPA -> fp32 [B, S, H, D]."""
    q, k, v = (x.float() * d for x, d in ((q8, descale_q), (k8, descale_k), (v8, descale_v)))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


class EmulatedFp8Kernel:
    """Dequantize FP8 Q/K/V and run fp32 SDPA: the reference the real kernels are checked against (any device).

    A registered op like the real kernels, so an exported or compiled graph keeps it as one call, as it keeps them.
    """

    name = "emulated fp8 (dequantize + fp32 SDPA)"

    def __call__(self, q8, k8, v8, dq, dk, dv, scale: float) -> torch.Tensor:
        return torch.ops.fluxtrt.emulated_fp8_sdpa(q8, k8, v8, dq, dk, dv, scale)  # [B, S, H, D] fp32


# --- cuDNN frontend FP8 SDPA -------------------------------------------------------------------------------------


class _CudnnFp8Plan:
    """One built cuDNN FP8 SDPA graph for a [B, S, H, D] shape: e4m3 Q/K/V in, e4m3 O out (scaled by 1 / descale_v).

    cuDNN 9 offers BF16 output of FP8 attention only on Blackwell, so O stays e4m3 and is dequantized by the caller,
    inside the compiled graph where it fuses with what follows.
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device, scale: float):
        import cudnn

        self.cudnn, self.device, self.shape = cudnn, device, shape
        b, s, h, d = shape
        dim, stride = [b, h, s, d], [s * h * d, d, h * d, 1]  # a [B, H, S, D] view of [B, S, H, D] memory
        self.handle = cudnn.create_handle()
        self.descale_s = torch.full((1, 1, 1, 1), 1.0 / _SOFTMAX_SCALE, device=device)
        self.scale_s = torch.full((1, 1, 1, 1), _SOFTMAX_SCALE, device=device)

        fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32)
        self.q, self.k, self.v = (g.tensor(name=n, dim=dim, stride=stride, data_type=fp8) for n in ("q", "k", "v"))
        names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
        self.sc = {n: g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32) for n in names}
        # The amax of S and O stay virtual: nothing reads them, and as outputs each cost a memset per call.
        self.o, *_ = g.sdpa_fp8(
            q=self.q, k=self.k, v=self.v, **self.sc, is_inference=True, attn_scale=scale, use_causal_mask=False,
            name="fluxtrt_fp8_sdpa",
        )  # fmt: skip
        self.o.set_output(True).set_dim(dim).set_stride(stride).set_data_type(fp8)
        g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        self.graph = g
        self.workspace = torch.empty(g.get_workspace_size(), device=device, dtype=torch.uint8)

    def __call__(self, q8, k8, v8, dq, dk, dv) -> torch.Tensor:
        out = torch.empty(self.shape, device=self.device, dtype=torch.float8_e4m3fn)
        pack = {
            self.q: q8, self.k: k8, self.v: v8, self.o: out,
            self.sc["descale_q"]: dq, self.sc["descale_k"]: dk, self.sc["descale_v"]: dv,
            self.sc["descale_s"]: self.descale_s, self.sc["scale_s"]: self.scale_s,
            self.sc["scale_o"]: torch.reciprocal(dv),  # |O| <= max|V|: V's scale fits O (one kernel, not two)
        }  # fmt: skip
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream(self.device).cuda_stream)
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return out


_PLANS: dict[tuple, _CudnnFp8Plan] = {}
_PLANS_LOCK = threading.Lock()


def _cudnn_plan(q8: torch.Tensor, scale: float) -> _CudnnFp8Plan:
    key = (tuple(q8.shape), q8.device, float(scale))
    with _PLANS_LOCK:
        if key not in _PLANS:
            _PLANS[key] = _CudnnFp8Plan(tuple(q8.shape), q8.device, float(scale))
        return _PLANS[key]


@_fp8_sdpa_op("cudnn_fp8_sdpa", torch.float8_e4m3fn)
def cudnn_fp8_sdpa(q8, k8, v8, descale_q, descale_k, descale_v, scale):
    """cuDNN FP8 SDPA on e4m3 [B, S, H, D] Q/K/V with fp32 [1, 1, 1, 1] descales -> e4m3 [B, S, H, D] O / descale_v."""
    q8, k8, v8 = (x.contiguous() for x in (q8, k8, v8))
    return _cudnn_plan(q8, scale)(q8, k8, v8, descale_q, descale_k, descale_v)


class CudnnFp8Kernel:
    """cuDNN's FP8 SDPA through nvidia-cudnn-frontend's graph API; its e4m3 output is dequantized here (in the
    compiled graph, fused with the projection's input)."""

    name = "cudnn-frontend sdpa_fp8 (e4m3 Q/K/V/O, per-tensor scales)"

    def __call__(self, q8, k8, v8, dq, dk, dv, scale: float) -> torch.Tensor:
        return torch.ops.fluxtrt.cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv, scale).float() * dv  # [B, S, H, D] fp32


# --- FlashAttention 3 FP8 ----------------------------------------------------------------------------------------


@_fp8_sdpa_op("fa3_fp8_sdpa", torch.bfloat16)
def fa3_fp8_sdpa(q8, k8, v8, descale_q, descale_k, descale_v, scale):
    """FlashAttention 3's FP8 forward on e4m3 [B, S, H, D] Q/K/V -> BF16 [B, S, H, D]."""
    import flash_attn_interface

    b, h = q8.shape[0], k8.shape[2]
    dq, dk, dv = (d.reshape(1, 1).expand(b, h).contiguous() for d in (descale_q, descale_k, descale_v))  # [B, H_k]
    out = flash_attn_interface.flash_attn_func(
        q8, k8, v8, softmax_scale=scale, causal=False, q_descale=dq, k_descale=dk, v_descale=dv
    )
    out = out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the softmax LSE
    return out.to(torch.bfloat16)


class FlashAttention3Fp8Kernel:
    """FlashAttention 3 (Hopper), FP8 path, from the ``flash_attn_interface`` module."""

    name = "flash-attn-3 fp8 (flash_attn_interface)"

    def __call__(self, q8, k8, v8, dq, dk, dv, scale: float) -> torch.Tensor:
        return torch.ops.fluxtrt.fa3_fp8_sdpa(q8, k8, v8, dq, dk, dv, scale)
