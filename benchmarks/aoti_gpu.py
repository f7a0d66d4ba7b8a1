"""AOTInductor transformer engine on the GPU: build time, load time and step time, next to the torch.compile stage
of the same precision in the same run.

    python -m benchmarks.aoti_gpu --precision bf16|fp8 --workdir /tmp/aoti --out results.json [--size 1024]
                                  [--model random-full] [--calibration-edits 1]

1. ``fluxtrt build --backend aotinductor --components transformer --aoti-weights external`` (a subprocess, the
   command a user runs; fp8 calibrates first), over the default resolution range 512..1568 (S dynamic): wall time,
   the manifest's build time, file sizes, options (attention kernel, FP8 linears).
2. A fresh process: the engine's load time, then the step time at a size x size edit of a size x size reference
   (batch 1; mean of 10 calls after 3, CUDA events), then the same with CUDA-graph replay (one capture) and the
   largest difference between the two outputs. With --profile, each step's kernels by category and how long the
   GPU waited between them (of the plain step and of the replayed one).
3. In that process, after freeing the engine: the model loaded in PyTorch, its eager output on the same inputs
   (the engine's fidelity), and the torch.compile stage of the same precision with the first-block cache off
   (bf16: stage 1, regional compile + fused QKV; fp8: stage 3, + FP8 attention + torchao FP8 linears): first call
   (compile) and step time. With --fp32-reference, every output's error against the FP32 result of the same
   weights, which says which of two differing BF16 results is nearer the exact one (where the GPU has room for
   the FP32 weights: checked before converting; else that record is skipped, naming the memory needed and free).

A phase that fails is one record with a one-line reason (its output or traceback in a log beside --out), and the
phases after it run; a failed build skips the measure.

An fp8 build on CUDA runs its attention in FP8 by default (the engine's ``--aoti-fp8-attention``), as stage 3
does; ``--fp8-attention off`` builds it with BF16 SDPA.

Prints one JSON line per phase and rewrites --out after each.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

from benchmarks.records import (
    Records,
    build_then_measure,
    kernel_profile,
    relative_error,
    run_build,
    step_ms,
)

# The torch.compile stages timed next to the engine (first-block cache off: the engine has none). fp8 also times
# stage 1, before quantizing: the model is quantized in place.
STAGES = {"bf16": ("1:fbc=off",), "fp8": ("1:fbc=off", "3:fbc=off")}


def build(args, records: Records) -> None:
    out = args.workdir / args.precision
    size = f"{args.size}x{args.size}"
    cmd = [sys.executable, "-m", "fluxtrt", "build", "--model", args.model, "--backend", "aotinductor",
           "--precision", args.precision, "--device", args.device, "--components", "transformer",
           *(["--min-resolution", size, "--opt-resolution", size, "--max-resolution", size] if args.static else []),
           "--aoti-weights", "external", "--out", str(out), "--force",
           "--calibration-edits", str(args.calibration_edits)]  # fmt: skip
    if args.cuda_graph:
        cmd.append("--aoti-cuda-graph")
    if args.fp8_attention != "default":
        cmd.append("--aoti-fp8-attention" if args.fp8_attention == "on" else "--aoti-no-fp8-attention")
    manifest, wall, log = run_build(cmd, records, out)
    entry = manifest["components"]["transformer"]
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    records.emit({
        "phase": "build", "ok": True, "command": "fluxtrt " + " ".join(cmd[3:]), "wall_s": wall,
        "build_s": entry["build_s"], "files": sizes, "settings": entry["settings"].get("options"),
        "record": entry.get("record", entry.get("options")),
        "resolutions": manifest["resolutions"],
        "log": log,
    })  # fmt: skip


def fp32_output(transformer, feed):
    """The transformer's output on ``feed`` computed in FP32 from the same (BF16) weights, where the device has room
    for the FP32 weights and one call (checked before converting): (the output, "fp32"), else (None, why not: the
    memory needed and free).

    The weights are converted in place and back: BF16 -> FP32 -> BF16 is exact, and no second copy is held.
    """
    import torch

    from fluxtrt.backends.torch_modules import TransformerModule
    from fluxtrt.bench.step_error import as_fp32_where_it_fits

    dtype = next(transformer.parameters()).dtype
    tokens = feed["hidden_states"].shape[1] + feed["encoder_hidden_states"].shape[1]
    computed = as_fp32_where_it_fits(transformer, tokens)
    if computed != "fp32":  # e.g. "bf16 (fp32 needs 24.1 GiB more, 9.8 GiB free on the GPU)"
        return None, computed.partition(" (")[2].rstrip(")")
    try:
        with torch.inference_mode():
            feed32 = {k: v.float() if v.is_floating_point() else v for k, v in feed.items()}
            return TransformerModule(transformer)(**feed32), computed
    finally:
        transformer.to(dtype)


def error_or_none(got, want) -> dict | None:
    """``relative_error`` where both outputs exist (None where the phase that makes one failed)."""
    return None if got is None or want is None else relative_error(got, want)


def measure(args, records: Records) -> None:
    import torch

    from fluxtrt.backends.base import LoadJob, get_backend
    from fluxtrt.config import COMPUTE_DTYPE
    from fluxtrt.engines.manifest import Manifest
    from fluxtrt.models import load_components
    from fluxtrt.models.loading import torch_dtype
    from fluxtrt.specs import Resolution, component_specs
    from fluxtrt.specs.flux import component_dims
    from fluxtrt.stages import stage_config
    from fluxtrt.stages.apply import StagedModel

    out = args.workdir / args.precision
    manifest = Manifest.load(out)
    spec = component_specs(manifest.dims)["transformer"]
    dtype = torch_dtype(COMPUTE_DTYPE[args.precision])
    res = Resolution(args.size, args.size)
    device = args.device
    feed = spec.sample_feed(component_dims("transformer", manifest.dims, 1, res, res), dtype, device, seed=0)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def free():
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    entry = manifest.components["transformer"]
    backend = get_backend("aotinductor")

    def load(cuda_graph: bool):
        options = backend.options({**entry.settings.get("options", {}), "cuda_graph": cuda_graph})
        job = LoadJob(spec, out / entry.engine.path, device, dtype, entry.profile, options, entry.record)
        sync()
        t0 = time.perf_counter()
        runner = backend.load(job)
        sync()
        return runner, time.perf_counter() - t0

    def timed(runner):
        """(first output, first call's seconds, mean step ms after it) of ``runner`` on ``feed``."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            first = runner.infer(feed)["noise_pred"]
            sync()
            seconds = time.perf_counter() - t0
            return first, seconds, step_ms(lambda: runner.infer(feed), device=device)

    def profiled(runner) -> dict:
        if not (args.profile and device == "cuda"):
            return {}
        with torch.inference_mode():
            return {"profile": kernel_profile(lambda: runner.infer(feed))}

    engine_out = ms = None
    with records.phase("engine"):
        runner, load_s = load(cuda_graph=False)
        engine_out, first_call_s, ms = timed(runner)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        # Where the load went: the package's code, its weights to the GPU, handing them over; the rest is the checks
        # before (manifest record, torch and GPU, the attention op's module) and first imports.
        phases = dict(getattr(runner, "load_seconds", {}))
        phases["rest"] = load_s - sum(phases.values())
        records.emit({"phase": "engine", "load_s": load_s, "load_phases": phases, "first_call_s": first_call_s,
                      "step_ms": ms, "peak_gpu_gib": peak, **profiled(runner)})  # fmt: skip
    runner = None
    free()

    with records.phase("engine_cuda_graph"):  # the plain engine's figures stand whatever happens here
        graphed, _ = load(cuda_graph=True)
        graph_out, capture_s, graph_ms = timed(graphed)
        with torch.inference_mode():
            again = graphed.infer(feed)["noise_pred"]
        records.emit({"phase": "engine_cuda_graph", "capture_s": capture_s, "step_ms": graph_ms,
                      "vs_plain": error_or_none(graph_out, engine_out),
                      "replay_equals_first": bool(torch.equal(again, graph_out)), **profiled(graphed)})  # fmt: skip
    graphed = graph_out = again = None
    free()

    components = eager_out = reference = None
    with records.phase("torch_load") as torch_load:
        t0 = time.perf_counter()
        components = load_components(args.model, device, "bf16")
        records.emit({"phase": "torch_load", "seconds": time.perf_counter() - t0})
    if torch_load.failed:
        for name in ("engine_vs_eager_bf16", *(["fp32_reference"] if args.fp32_reference else []), "torch_stage"):
            records.skip(name, torch_load.blocks())
        return
    from fluxtrt.backends.torch_runner import torch_runners

    with records.phase("engine_vs_eager_bf16"):
        with torch.inference_mode():
            eager_out = torch_runners(components)["transformer"].infer(feed)["noise_pred"]
        if engine_out is None:  # the eager output stands, for the stages below
            records.skip("engine_vs_eager_bf16", "engine failed")
        else:
            records.emit({"phase": "engine_vs_eager_bf16", **relative_error(engine_out, eager_out)})
    if args.fp32_reference:
        with records.phase("fp32_reference"):
            reference, why = fp32_output(components.transformer, feed)
            free()
            if reference is None:
                records.skip("fp32_reference", why)
            else:
                records.emit({"phase": "fp32_reference", "engine": error_or_none(engine_out, reference),
                              "eager_bf16": error_or_none(eager_out, reference)})  # fmt: skip

    staged = StagedModel(components)
    for name in STAGES[args.precision]:
        with records.phase("torch_stage", stage=name):
            applied = staged.apply(stage_config(name))
            stage_out, first, stage_ms = timed(applied.runners["transformer"])
            records.emit({
                "phase": "torch_stage", "stage": name, "features": applied.report.features,
                "unavailable": applied.report.unavailable, "attention": applied.report.attention,
                "quant": applied.report.quant, "first_call_s": first, "step_ms": stage_ms,
                "vs_eager_bf16": error_or_none(stage_out, eager_out),
                "engine_speedup": stage_ms / ms if ms else None,
                **({"vs_fp32": relative_error(stage_out, reference)} if reference is not None else {}),
                **profiled(applied.runners["transformer"]),
            })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", choices=("bf16", "fp8"), required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run (with --model tiny)")
    parser.add_argument("--calibration-edits", type=int, default=1)
    parser.add_argument("--cuda-graph", action="store_true", help="build with --aoti-cuda-graph")
    parser.add_argument("--fp8-attention", choices=("default", "on", "off"), default="default",
                        help="build with --aoti-fp8-attention (on) or --aoti-no-fp8-attention (off)")  # fmt: skip
    parser.add_argument("--static", action="store_true",
                        help="build for --size alone (min = opt = max): every shape static")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="record the top GPU kernels of an engine/stage step")
    parser.add_argument("--fp32-reference", action="store_true",
                        help="also compute the output in FP32 from the same weights and measure every output's "
                        "error against it (needs about 2x the BF16 model's GPU memory)")  # fmt: skip
    parser.add_argument("--phase", choices=("all", "build", "measure"), default="all")
    args = parser.parse_args(argv)
    return build_then_measure(args, Records(args.out), build, measure, "benchmarks.aoti_gpu", argv)


if __name__ == "__main__":
    sys.exit(main())
