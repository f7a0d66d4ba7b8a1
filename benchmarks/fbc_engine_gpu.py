"""The first-block cache on AOTInductor engines on the GPU: what a computed and a skipped step cost, and the split
engine's step without the cache against the monolithic engine's.

    python -m benchmarks.fbc_engine_gpu --precision fp8|bf16 --workdir /tmp/fbc --out $OUT/fbc_engine.json
                                        [--size 1024] [--model random-full] [--monolithic]

1. ``fluxtrt build --backend aotinductor --components transformer --first-block-cache --aoti-weights external`` (a
   subprocess, the command a user runs; fp8 calibrates first): the two parts over the default range 512..1568.
   ``--monolithic`` builds the one-engine transformer in the same run too (about twice the build time: a bf16 run
   fits in ~9 minutes, an fp8 one does not); without it, the monolithic figure is the committed one of the same GPU
   and precision (benchmarks/results/aoti_<precision>_<h100|h200>.json), named as such in the output.
2. A fresh process loads the parts and, for a size x size edit of a size x size reference (batch 1, one feed; mean
   of 10 calls after 3, CUDA events): each part alone; the split runner with the cache off (every step computed:
   the split's price against the monolithic engine); with threshold 0 (computed steps, the skip decision included);
   with threshold inf (every call after the first skips: the cost of a skipped step). With ``--monolithic``, the
   monolithic engine's step on the same feed and its output against the split's.

Random weights skip nothing at a real threshold (their residual changes say nothing about a real checkpoint); what
carries over is the two costs. Time per edit = n_computed * t_computed + n_skipped * t_skipped + the rest of the edit
(text encoders, VAE, glue: `fluxtrt compare`). Prints one JSON line per phase and rewrites --out after each; a phase
that fails is one record with a one-line reason (its output or traceback in a log beside --out) and the phases that
do not need it still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from benchmarks.records import Records, build_then_measure, relative_error, run_build, step_ms

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("transformer_first", "transformer_rest")
STEPS = 14  # fluxtrt's default edit (DPM-Solver++ 2M)


def build(args, records: Records) -> None:
    cmd = [sys.executable, "-m", "fluxtrt", "build", "--model", args.model, "--backend", "aotinductor",
           "--precision", args.precision, "--device", args.device, "--first-block-cache",
           "--components", ",".join(("transformer", *PARTS) if args.monolithic else ("transformer",)),
           "--aoti-weights", "external", "--out", str(args.workdir), "--force",
           "--calibration-edits", str(args.calibration_edits)]  # fmt: skip
    if args.monolithic:  # --first-block-cache would turn "transformer" into the parts: name all three instead
        cmd.remove("--first-block-cache")
    manifest, wall, log = run_build(cmd, records, args.workdir)
    records.emit({
        "phase": "build", "ok": True, "command": "fluxtrt " + " ".join(cmd[3:]), "wall_s": wall, "log": log,
        "build_s": {n: e["build_s"] for n, e in manifest["components"].items()},
        "files": {p.name: p.stat().st_size for p in args.workdir.iterdir() if p.is_file()},
        "record": {n: e.get("record") for n, e in manifest["components"].items()},
    })  # fmt: skip


def committed_monolithic(precision: str, gpu: str) -> dict:
    """The monolithic engine's step from the committed aoti_gpu.py result of this GPU class and precision."""
    name = f"aoti_{precision}_{'h100' if 'H100' in gpu else 'h200'}.json"
    path = ROOT / "benchmarks" / "results" / name
    if not path.is_file():
        return {"source": str(path), "error": "missing"}
    items = json.loads(path.read_text())
    engine = next((i for i in items if i.get("phase") == "engine"), {})
    env = next((i for i in items if i.get("phase") == "environment"), {})
    return {"source": f"benchmarks/results/{name} (committed, not this run)", "step_ms": engine.get("step_ms"),
            "gpu": env.get("gpu"), "fluxtrt_commit": env.get("fluxtrt_commit")}  # fmt: skip


def measure(args, records: Records) -> None:
    import torch

    from fluxtrt.backends.base import LoadJob, get_backend
    from fluxtrt.config import COMPUTE_DTYPE
    from fluxtrt.engines.manifest import Manifest
    from fluxtrt.environment import device_environment
    from fluxtrt.models.loading import torch_dtype
    from fluxtrt.pipeline.first_block_cache import SplitTransformerRunner
    from fluxtrt.specs import Resolution, component_specs
    from fluxtrt.specs.flux import component_dims

    manifest = Manifest.load(args.workdir)
    specs = component_specs(manifest.dims)
    dtype = torch_dtype(COMPUTE_DTYPE[args.precision])
    res = Resolution(args.size, args.size)
    feed = specs["transformer"].sample_feed(component_dims("transformer", manifest.dims, 1, res, res), dtype,
                                            args.device, seed=0)  # fmt: skip
    backend = get_backend("aotinductor")

    def load(name: str):
        entry = manifest.components[name]
        job = LoadJob(specs[name], args.workdir / entry.engine.path, args.device, dtype, entry.profile,
                      backend.options(entry.settings.get("options", {})), entry.record)  # fmt: skip
        t0 = time.perf_counter()
        runner = backend.load(job)
        return runner, time.perf_counter() - t0

    with records.phase("load") as loaded:
        first, first_load = load(PARTS[0])
        rest, rest_load = load(PARTS[1])
        records.emit({"phase": "load", "load_s": {PARTS[0]: first_load, PARTS[1]: rest_load}})
    split: dict[str, float] = {}
    split_out = None
    if loaded.failed:
        for name in ("parts", "split"):
            records.skip(name, loaded.blocks())
    else:
        with torch.inference_mode(), records.phase("parts"):
            d = specs[PARTS[0]].outputs[0].shape[-1]
            one = first.infer({**feed, "rest_residual": torch.zeros(1, feed["hidden_states"].shape[1], d,
                                                                       dtype=dtype, device=args.device)})  # fmt: skip
            handed = {n: one[n] if n in one else feed[n] for n in specs[PARTS[1]].input_names}
            parts_ms = {
                PARTS[0]: step_ms(lambda: first.infer({**feed, "rest_residual": one["hidden"]}), device=args.device),
                PARTS[1]: step_ms(lambda: rest.infer(handed), device=args.device),
            }
            records.emit({"phase": "parts", "step_ms": parts_ms})
        for label, threshold in (("off", None), ("threshold_0", 0.0), ("threshold_inf", math.inf)):
            with torch.inference_mode(), records.phase("split", cache=label):
                runner = SplitTransformerRunner(specs["transformer"], first, rest, threshold)
                # The same timestep every call: one edit, no reset.
                split[label] = step_ms(lambda r=runner: r.infer(feed), device=args.device)
                stats = runner.stats()
                records.emit({"phase": "split", "cache": label, "step_ms": split[label], "computed": stats.computed,
                              "skipped": stats.skipped, "mean_computed_ms": stats.mean_computed_ms,
                              "mean_skipped_ms": stats.mean_skipped_ms})  # fmt: skip
        with torch.inference_mode(), records.phase("split_output"):
            split_out = SplitTransformerRunner(specs["transformer"], first, rest, None).infer(feed)["noise_pred"]
    mono = None
    if args.monolithic:
        with records.phase("monolithic", source="this run"):
            mono = monolithic(load, feed, split_out)
    if mono is None:
        mono = committed_monolithic(args.precision, device_environment(args.device).gpu or "")
    records.emit({"phase": "monolithic", **mono})
    missing = [k for k in ("threshold_0", "threshold_inf") if k not in split]
    if missing:
        records.skip("summary", f"split {', '.join(missing)} did not run")
        return
    t_c, t_s = split["threshold_0"], split["threshold_inf"]
    off = split.get("off")
    records.emit({
        "phase": "summary", "t_computed_ms": t_c, "t_skipped_ms": t_s, "split_no_cache_ms": off,
        "monolithic_ms": mono.get("step_ms"),
        "split_overhead_ms": off - mono["step_ms"] if off and mono.get("step_ms") else None,
        "transformer_ms_per_14_step_edit": {f"{k}_skipped": (STEPS - k) * t_c + k * t_s for k in (0, 2, 4, 6, 8)},
        "formula": "time per edit = n_computed * t_computed + n_skipped * t_skipped + rest (text encoders, VAE, "
                   "glue); random weights skip nothing at a real threshold, so n_skipped comes from a real checkpoint",
    })  # fmt: skip


def monolithic(load, feed, split_out) -> dict:
    """The monolithic engine built in this run: its step on the same feed, and the split's output against it (None
    where the split did not run)."""
    import torch

    runner, load_s = load("transformer")
    with torch.inference_mode():
        ms = step_ms(lambda: runner.infer(feed), device=feed["hidden_states"].device.type)
        out = runner.infer(feed)["noise_pred"]
    error = None if split_out is None else relative_error(split_out, out)
    return {"source": "this run", "load_s": load_s, "step_ms": ms, "split_vs_monolithic": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", choices=("bf16", "fp8", "fp32"), required=True, help="fp32: CPU smoke runs")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/out")) / "fbc_engine.json")
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run (with --model tiny)")
    parser.add_argument("--calibration-edits", type=int, default=1)
    parser.add_argument("--monolithic", action="store_true", help="also build the one-engine transformer and time it")
    parser.add_argument("--phase", choices=("all", "build", "measure"), default="all")
    args = parser.parse_args(argv)
    return build_then_measure(args, Records(args.out), build, measure, "benchmarks.fbc_engine_gpu", argv)


if __name__ == "__main__":
    sys.exit(main())
