"""The slim VAE and the 24 GB mode on one GPU (DESIGN 12), as JSON lines.

    PYTHONUNBUFFERED=1 python -m benchmarks.slim_vae_lowvram_gpu [--out DIR] [--parts edit,vae] [--runs 2]

1. ``edit``: ``fluxtrt compare`` of stage ``4:lowvram=on`` (run first, as a process that starts with it would),
   stage ``4`` and stage ``4:vae=tiny`` on random-full at 1024x1024 (14 steps): per-edit time and per-component
   milliseconds, peak GPU memory allocated and reserved during the timed edits, and allocated from loading through
   the warmup edit (``prepare_peak_gpu_mem_gib``). The 24 GB mode's goal: at most 20 GiB. The report goes to
   DIR/compare/ (report.md, report.json, report.png).
2. ``vae``: the slim autoencoder (AutoencoderTiny, TAEF1's architecture) against the FLUX VAE, encode of a
   1024x1024 image and decode of its [1, 16, 128, 128] latent, bf16, eager and torch.compile'd (decode on
   channels-last as stage 1 does): ms per call (CUDA events, 3 warmup + 10 timed calls), compile seconds, and the
   peak memory of one eager call above the weights.

Every record is printed as one JSON line as it happens and DIR/slim_vae_lowvram.json is rewritten with all of them,
so a run cut short keeps what it measured; a part, autoencoder or call that fails is one record with a one-line reason
(its traceback in a log beside the JSON) and the rest still runs. DIR defaults to $OUT, else ./bench_out. Weights are
random: fidelity of the slim-VAE row against stage 0 is not measured here and would be meaningless.
(``--model tiny --device cpu --resolution 64`` runs the same script on a CPU in about a minute, as a smoke test.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.records import Records, step_ms

STAGES = ("4:lowvram=on", "4", "4:vae=tiny")


def run_edits(args: argparse.Namespace, records: Records, out: Path) -> None:
    """Part 1: the compare of the low-VRAM, stage-4 and slim-VAE rows on the same inputs."""
    from fluxtrt.bench.compare import compare
    from fluxtrt.bench.config import CompareConfig
    from fluxtrt.bench.report import json_safe
    from fluxtrt.bench.results import summary_row
    from fluxtrt.specs import Resolution

    config = CompareConfig(
        model=args.model, stages=STAGES, report_dir=out / "compare",
        resolution=Resolution(args.resolution, args.resolution), runs=args.runs, warmup=1, warmup_steps=2,
        device=args.device,
    )  # fmt: skip

    def on_event(event: dict) -> None:
        if event.get("event") != "start":  # the environment is recorded once, below
            records.emit(json_safe({"part": "edit", **event}))

    report = compare(config, on_event=on_event)
    for c in report.contenders:
        row = summary_row(report, c)
        keep = ("contender", "status", "error", "median_total_ms", "min_total_ms", "max_total_ms", "components_ms",
                "transformer_ms_per_step", "peak_gpu_mem_gib", "peak_gpu_reserved_gib", "prepare_peak_gpu_mem_gib",
                "load_s", "first_call_s")  # fmt: skip
        records.emit(json_safe({"part": "edit", "summary": {k: row.get(k) for k in keep}, "what": c.what}))
    low, stage4 = report.contenders[0], report.contenders[1]
    if low.ok and stage4.ok:
        records.emit({
            "part": "edit", "result": "low-VRAM against stage 4",
            "time_ratio": low.median_total_ms / stage4.median_total_ms,
            "peak_allocated_gib": [low.peak_gpu_mem_gib, stage4.peak_gpu_mem_gib],
            "peak_reserved_gib": [low.peak_gpu_reserved_gib, stage4.peak_gpu_reserved_gib],
            "load_peak_allocated_gib": [low.prepare_peak_gpu_mem_gib, stage4.prepare_peak_gpu_mem_gib],
            "within_20_gib": None if low.peak_gpu_mem_gib is None
            else max(low.peak_gpu_mem_gib, low.prepare_peak_gpu_mem_gib or 0) <= 20,
        })  # fmt: skip


def time_vae(name: str, vae, image, latent, records: Records) -> None:
    """Eager and compiled encode and decode of one autoencoder."""
    import torch

    from fluxtrt.backends.torch_modules import VaeDecoderModule, VaeEncoderModule
    from fluxtrt.stages.apply import ChannelsLastDecoder

    weights = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    params = sum(p.numel() for p in vae.parameters())
    modules = {"encode": (VaeEncoderModule(vae), image), "decode": (VaeDecoderModule(vae), latent)}
    with torch.inference_mode():
        for what, (module, x) in modules.items():
            with records.phase("vae", key="part", vae=name, op=what, mode="eager"):
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                ms = step_ms(lambda m=module, x=x: m(x), device=x.device.type)
                peak = (torch.cuda.max_memory_allocated() - weights) / 2**30 if torch.cuda.is_available() else None
                records.emit({"part": "vae", "vae": name, "op": what, "mode": "eager", "ms": ms, "params": params,
                              "peak_above_weights_gib": peak})  # fmt: skip
        for what, (module, x) in modules.items():
            with records.phase("vae", key="part", vae=name, op=what, mode="compiled"):
                if what == "decode":
                    for m in (vae.decoder, getattr(vae, "post_quant_conv", None)):
                        if m is not None:
                            m.to(memory_format=torch.channels_last)
                    module = ChannelsLastDecoder(vae)
                compiled = torch.compile(module)
                t0 = time.perf_counter()
                compiled(x)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                ms = step_ms(lambda m=compiled, x=x: m(x), device=x.device.type)
                records.emit({"part": "vae", "vae": name, "op": what, "mode": "compiled", "ms": ms,
                              "first_call_s": compile_s})  # fmt: skip


def run_vaes(args: argparse.Namespace, records: Records) -> None:
    """Part 2: the slim autoencoder against the FLUX VAE, one at a time on the device."""
    import torch

    from fluxtrt.models.synthetic import FULL, TINY, build_vae
    from fluxtrt.models.tiny_vae import load_tiny_vae
    from fluxtrt.timing import sync

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    side = args.resolution
    image = (torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(args.device, dtype)
    latent = torch.randn(1, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(1)).to(args.device, dtype)
    configs = FULL if args.model == "random-full" else TINY
    for name in ("flux", "tiny"):
        vae = None
        with records.phase("vae", key="part", vae=name):
            if name == "flux":
                vae = build_vae(configs, 0, args.device, dtype).eval().requires_grad_(False)
            else:
                vae = load_tiny_vae("tiny", args.device, dtype)
            time_vae(name, vae, image, latent, records)
        del vae
        sync()
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    parser.add_argument("--parts", default="edit,vae", help="edit, vae or both (comma-separated), in that order")
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=1024, help="side of the square edit and VAE image")
    parser.add_argument("--runs", type=int, default=2, help="timed edits per contender")
    args = parser.parse_args()
    from fluxtrt.environment import environment

    args.out.mkdir(parents=True, exist_ok=True)
    records = Records(args.out / "slim_vae_lowvram.json")
    records.emit({"event": "start", "argv": sys.argv, "environment": environment(),
                  "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")})  # fmt: skip
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if "edit" in parts:
        with records.phase("edit", key="part"):
            run_edits(args, records, args.out)
    if "vae" in parts:
        with records.phase("vae", key="part"):
            run_vaes(args, records)
    failed = records.failed
    records.emit({"event": "done", "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
