"""The two FP8 paths of the transformer on the GPU: torchao's dynamic per-row FP8 (stage 3's linears) against BF16,
both compiled regionally, and the static calibrated FP8 scheme of the engines (fake-quant oracle) against torchao.

    python benchmarks/fp8_paths.py --out results.json [--size 1024] [--model random-full] [--calibration-edits 2]

1. The model in BF16 on the GPU; calibration (``fluxtrt.engines.calibrate``: edits at size x size, all steps) of the
   static input scales.
2. On one transformer input (a size x size edit of a size x size reference, batch 1): the eager BF16 output, the
   fake-quant static-FP8 output (``fake_quantize``, fp32 math: the oracle of the FP8 Q/DQ ONNX) and the static FP8
   on real FP8 GEMMs (``StaticFp8Linear``, eager: what the AOTInductor fp8 engine compiles).
3. Regional torch.compile of the blocks with fused QKV and SDPA attention (stage ``1:fbc=off``): first call and
   step time (mean of 10 after 3, CUDA events); then torchao FP8 on the same linears (``1:fbc=off:quant=fp8``): the
   same. Only the linears differ between the two.
4. Differences: each output against eager BF16, and static FP8 against torchao.

Prints one JSON line per phase and rewrites --out after each.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import Records, relative_error, step_ms  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--calibration-edits", type=int, default=2)
    parser.add_argument("--calibration-steps", type=int, default=8)
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run (--model tiny; no FP8 kernels)")
    args = parser.parse_args()

    import torch

    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.engines.calibrate import calibrate
    from fluxtrt.environment import environment
    from fluxtrt.kernels.fp8_linear import static_fp8_linears
    from fluxtrt.models import load_components
    from fluxtrt.models.loading import model_fingerprint
    from fluxtrt.quant.fakequant import fake_quantize
    from fluxtrt.specs import Resolution, component_specs
    from fluxtrt.specs.flux import component_dims, dims_from_components
    from fluxtrt.stages import stage_config
    from fluxtrt.stages.apply import StagedModel

    records = Records(args.out)
    records.emit({"phase": "environment", **environment()})
    t0 = time.perf_counter()
    components = load_components(args.model, args.device, "bf16")
    records.emit({"phase": "load", "seconds": time.perf_counter() - t0})

    t0 = time.perf_counter()
    calibration = calibrate(components, fingerprint=model_fingerprint(args.model), precision="fp8",
                            edits=args.calibration_edits, steps=args.calibration_steps, width=args.size,
                            height=args.size)  # fmt: skip
    amax = calibration.amax
    records.emit({"phase": "calibration", "seconds": time.perf_counter() - t0, "linears": len(amax),
                  "edits": args.calibration_edits, "steps": args.calibration_steps,
                  "amax_min": min(amax.values()), "amax_max": max(amax.values())})  # fmt: skip

    dims = dims_from_components(components)
    spec = component_specs(dims)["transformer"]
    res = Resolution(args.size, args.size)
    feed = spec.sample_feed(component_dims("transformer", dims, 1, res, res), torch.bfloat16, args.device, seed=0)
    transformer = components.transformer
    outputs = {}
    with torch.inference_mode():
        outputs["bf16_eager"] = TransformerModule(transformer)(**feed).float()
        with static_fp8_linears(transformer, amax):
            outputs["static_fp8_scaled_mm"] = TransformerModule(transformer)(**feed).float()
    # The oracle: a copy whose quantized linears keep FP8 weights (half the BF16 bytes) and compute in fp32.
    oracle = fake_quantize(copy.deepcopy(transformer), amax, "fp8")
    with torch.inference_mode():
        outputs["static_fp8_fake_quant"] = TransformerModule(oracle)(**feed).float()
    del oracle
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    records.emit({"phase": "static_fp8", "scaled_mm_vs_fake_quant": relative_error(
        outputs["static_fp8_scaled_mm"], outputs["static_fp8_fake_quant"])})  # fmt: skip

    staged = StagedModel(components)
    times = {}
    for name, spec_text in (("bf16_compiled", "1:fbc=off"), ("torchao_fp8_compiled", "1:fbc=off:quant=fp8")):
        applied = staged.apply(stage_config(spec_text), strict=args.device == "cuda")
        runner = applied.runners["transformer"]
        t0 = time.perf_counter()
        with torch.inference_mode():
            outputs[name] = runner.infer(feed)["noise_pred"].float()
        if args.device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        with torch.inference_mode():
            times[name] = step_ms(lambda runner=runner: runner.infer(feed))
        records.emit({"phase": name, "stage": spec_text, "features": applied.report.features,
                      "quant": applied.report.quant, "first_call_s": first, "step_ms": times[name]})  # fmt: skip

    ref = outputs["bf16_eager"]
    records.emit({
        "phase": "summary",
        "torchao_fp8_speedup_vs_bf16": times["bf16_compiled"] / times["torchao_fp8_compiled"],
        "vs_bf16_eager": {k: relative_error(v, ref) for k, v in outputs.items() if k != "bf16_eager"},
        "static_fp8_fake_quant_vs_torchao_fp8": relative_error(
            outputs["static_fp8_fake_quant"], outputs["torchao_fp8_compiled"]),
        "static_fp8_scaled_mm_vs_torchao_fp8": relative_error(
            outputs["static_fp8_scaled_mm"], outputs["torchao_fp8_compiled"]),
    })  # fmt: skip


if __name__ == "__main__":
    main()
