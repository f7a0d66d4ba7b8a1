"""How far the BF16 PyTorch transformer is from an FP32 computation of the same weights, step by step, on the inputs
of a real edit: the reference ``fluxtrt compare`` measures engines' per-step error against.

    python benchmarks/reference_steps.py --out results.json [--model random-full] [--size 1024]

One edit of ``fluxtrt infer``'s pipeline (PyTorch, BF16, eager; DPM-Solver++ 2M, 14 steps; the synthetic
reference and prompt of ``fluxtrt compare``) records the transformer's input at every step. Each step's input then
goes through the same transformer in BF16 and in FP32 (weights converted in place, BF16 -> FP32 -> BF16 is exact):
relative L2, cosine and max abs difference per step, with the step's sigma.

Prints one JSON line per phase and rewrites --out after each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import Records, relative_error  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run (--model tiny)")
    args = parser.parse_args()

    import torch

    from fluxtrt.backends.recording import RecordingRunner
    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.backends.torch_runner import torch_runners
    from fluxtrt.bench.compare import synthetic_image
    from fluxtrt.config import SamplerConfig
    from fluxtrt.environment import environment
    from fluxtrt.models import load_components
    from fluxtrt.pipeline.kontext import KontextPipeline
    from fluxtrt.specs import Resolution, component_specs
    from fluxtrt.specs.flux import dims_from_components

    records = Records(args.out)
    records.emit({"phase": "environment", **environment()})
    t0 = time.perf_counter()
    components = load_components(args.model, args.device, "bf16")
    pipeline = KontextPipeline.from_components(components, runners=torch_runners(components))
    recorder = RecordingRunner(pipeline.runners["transformer"])
    pipeline.runners["transformer"] = recorder
    image = synthetic_image(Resolution(args.size, args.size))
    with torch.inference_mode():
        pipeline.edit(image, "make the house blue", sampler=SamplerConfig(), seed=0, height=args.size,
                      width=args.size)  # fmt: skip
    records.emit({"phase": "edit", "seconds": time.perf_counter() - t0, "steps": len(recorder.calls)})

    transformer = components.transformer
    module = TransformerModule(transformer)
    names = [t.name for t in component_specs(dims_from_components(components))["transformer"].inputs]
    bf16 = [out["noise_pred"] for _, out in recorder.calls]
    transformer.to(torch.float32)
    steps = []
    with torch.inference_mode():
        for i, ((feed, _), got) in enumerate(zip(recorder.calls, bf16, strict=True)):
            feed32 = {k: v.float() if v.is_floating_point() else v for k, v in feed.items()}
            want = module(*(feed32[n] for n in names))
            steps.append({"step": i, "timestep": float(feed["timestep"].flatten()[0]), **relative_error(got, want)})
    records.emit({"phase": "bf16_vs_fp32", "steps": steps, "max_rel_l2": max(s["rel_l2"] for s in steps)})


if __name__ == "__main__":
    main()
