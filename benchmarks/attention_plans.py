"""cuDNN's FP8 attention at the FLUX step's shape: every execution plan cuDNN offers, in two memory layouts, timed
one after another on one GPU, next to BF16 SDPA on the same inputs.

    python benchmarks/attention_plans.py --out results.json [--seq 8704] [--heads 24] [--head-dim 128]

The engine runs ``fluxtrt::cudnn_fp8_sdpa`` on [B, S, H, D] tensors (cuDNN reads them as a strided [B, H, S, D]
view) with the first plan of cuDNN's heuristics (mode A). This times each plan heuristics modes A and B list, for
that layout and for contiguous [B, H, S, D], as mean milliseconds of 20 calls after 3 (CUDA events), with its
TFLOP/s (4 S^2 D H per call) and the cosine similarity of its output to BF16 SDPA's; plus the kernels of one call
of the engine's plan (launches besides the attention kernel cost the step time too).

Prints one JSON line per phase and rewrites --out after each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import Records, add_attention_shape_arguments, kernel_profile, step_ms  # noqa: E402


def fp8_graph(cudnn, dim: list[int], stride: list[int], scale: float, modes: list):
    """An FP8 SDPA graph (the engine's, ``fluxtrt.kernels.attention_ops._CudnnFp8Plan``) with every plan of ``modes``
    built; returns (graph, tensors by name)."""
    fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32)
    t = {n: g.tensor(name=n, dim=dim, stride=stride, data_type=fp8) for n in ("q", "k", "v")}
    names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
    sc = {n: g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32) for n in names}
    o, _, amax_s, amax_o = g.sdpa_fp8(q=t["q"], k=t["k"], v=t["v"], **sc, is_inference=True, attn_scale=scale,
                                      use_causal_mask=False, name="plans")  # fmt: skip
    o.set_output(True).set_dim(dim).set_stride(stride).set_data_type(fp8)
    for x in (amax_s, amax_o):
        x.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans(modes)
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    return g, {**t, **sc, "o": o, "amax_s": amax_s, "amax_o": amax_o}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    add_attention_shape_arguments(parser)
    args = parser.parse_args()

    import cudnn
    import torch
    import torch.nn.functional as F

    from fluxtrt.environment import environment
    from fluxtrt.kernels.attention_ops import CudnnFp8Kernel
    from fluxtrt.kernels.fp8 import quantize_fp8_dynamic

    records = Records(args.out)
    records.emit({"phase": "environment", **environment(), "cudnn_frontend": cudnn.__version__})
    b, s, h, d = 1, args.seq, args.heads, args.head_dim
    flop = 4 * s * s * d * h * b
    scale = d**-0.5
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    with torch.inference_mode():
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        ref = ref.transpose(1, 2).float()
        bf16_ms = step_ms(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                 v.transpose(1, 2), scale=scale), iters=20)  # fmt: skip
        records.emit({"phase": "bf16_sdpa", "ms": bf16_ms, "tflops": flop / bf16_ms / 1e9})
        (q8, dq), (k8, dk), (v8, dv) = (quantize_fp8_dynamic(x) for x in (q, k, v))

        engine = CudnnFp8Kernel()
        out = engine(q8, k8, v8, dq, dk, dv, scale)
        ms = step_ms(lambda: engine(q8, k8, v8, dq, dk, dv, scale), iters=20)
        cos = F.cosine_similarity(out.flatten().float(), ref.flatten(), dim=0).item()
        profile = kernel_profile(lambda: torch.ops.fluxtrt.cudnn_fp8_sdpa(q8, k8, v8, dq, dk, dv, scale))
        records.emit({"phase": "engine_op", "ms": ms, "tflops": flop / ms / 1e9, "cosine_vs_bf16": cos,
                      "kernels_of_one_call": profile["all"]})  # fmt: skip

    layouts = {
        "bshd": ([b, h, s, d], [s * h * d, d, h * d, 1]),  # the engine's: [B, S, H, D] memory
        "bhsd": ([b, h, s, d], [h * s * d, s * d, d, 1]),
    }
    scales = {n: torch.full((1, 1, 1, 1), x, device="cuda") for n, x in (("descale_s", 1 / 256), ("scale_s", 256.0))}
    for layout, (dim, stride) in layouts.items():
        for mode_name in ("A", "B"):
            mode = getattr(cudnn.heur_mode, mode_name, None)
            if mode is None:
                continue
            try:
                g, t = fp8_graph(cudnn, dim, stride, scale, [mode])
            except Exception as exc:
                records.emit({"phase": "plans", "layout": layout, "mode": mode_name,
                              "error": f"{type(exc).__name__}: {str(exc)[:400]}"})  # fmt: skip
                continue
            inputs = {"q": q8, "k": k8, "v": v8}
            if layout == "bhsd":
                inputs = {n: x.transpose(1, 2).contiguous() for n, x in inputs.items()}
            o = torch.empty_like(inputs["q"])
            amax = torch.zeros(2, 1, 1, 1, 1, device="cuda")
            pack = {t["q"]: inputs["q"], t["k"]: inputs["k"], t["v"]: inputs["v"], t["o"]: o,
                    t["amax_s"]: amax[0], t["amax_o"]: amax[1], t["descale_q"]: dq, t["descale_k"]: dk,
                    t["descale_v"]: dv, t["descale_s"]: scales["descale_s"], t["scale_s"]: scales["scale_s"],
                    t["scale_o"]: 1.0 / dv}  # fmt: skip
            handle = cudnn.create_handle()
            cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
            plans = []
            for i in range(g.get_execution_plan_count()):
                name = g.get_plan_name_at_index(i)
                try:
                    ws = torch.empty(max(1, g.get_workspace_size_plan_at_index(i)), device="cuda", dtype=torch.uint8)

                    def call(g=g, pack=pack, ws=ws, i=i, handle=handle):
                        g.execute_plan_at_index(pack, ws, index=i, handle=handle)

                    call()
                    torch.cuda.synchronize()
                    got = o if layout == "bshd" else o.transpose(1, 2)
                    cos = F.cosine_similarity((got.float() * dv).flatten(), ref.flatten(), dim=0).item()
                    plan_ms = step_ms(call, iters=20)
                    plans.append({"index": i, "name": name, "ms": plan_ms, "tflops": flop / plan_ms / 1e9,
                                  "cosine_vs_bf16": cos})  # fmt: skip
                except Exception as exc:
                    plans.append({"index": i, "name": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            records.emit({"phase": "plans", "layout": layout, "mode": mode_name, "plans": plans})


if __name__ == "__main__":
    main()
