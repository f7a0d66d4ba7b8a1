"""One edit with the transformer split over N GPUs (``--gpus N``: diffusers' Ulysses context parallelism), against
the same edit on one GPU: time, scaling and fidelity, in one invocation.

    python -m benchmarks.multi_gpu [--out DIR] [--gpus 1,2,4] [--stages SPEC,...] [--runs 2] [--budget-s 420]

Default: random-full in BF16, a 1024x1024 edit of a 1024x1024 reference (8192 image + 512 text tokens), 14 steps of
DPM-Solver++ 2M, and two stage rows: stage 4 as ``--gpus`` runs it (regional compile, fused QKV, torchao FP8
linears, compiled channels-last VAE decode; first-block cache and FP8 attention off, as they do not split), then the
same in BF16 (``quant=off``). N runs over 1, 2 and 4 where the host has 4 GPUs. Every (row, N) is one launch of this
script under torchrun through ``fluxtrt.parallel.launch`` (the launcher of ``fluxtrt infer --gpus``): load, split,
apply the stage, ``--warmup`` edits of ``--warmup-steps`` steps (compilation happens there), ``--runs`` timed edits.
The N = 1 launch runs in one process without a process group.

Rank 0 of each launch prints a JSON line per phase as it happens ("load", "warmup", "run"); after each launch this
process prints the row ("result"): per-edit and per-step transformer ms (medians, CUDA events), scaling efficiency
(step ms at N = 1 / (N x step ms at N)), peak allocated and reserved memory of every GPU, and fidelity against N = 1
of the same row (cosine of the final latents, PSNR and SSIM of the decoded images). Everything goes to
OUT/multi_gpu.json (rewritten after every line), the images and latents to OUT/<row>/n<N>/. A launch that would
start after --budget-s is skipped (and says so), so the run ends in time; rows run in the order given. A launch that
fails is one record with a one-line reason (the failed rank's traceback in OUT/<row>/n<N>/rank<R>.log), and the next
launch runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

from benchmarks.failures import PhaseFailed, exception_reason
from benchmarks.records import Records

DEFAULT_STAGES = "4:fbc=off:attention=sdpa,4:fbc=off:attention=sdpa:quant=off"
PROMPT = "make the house blue"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/multi_gpu")))
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run with --model tiny (gloo processes)")
    parser.add_argument("--size", type=int, default=1024, help="side of the square reference and target")
    parser.add_argument("--gpus", default=None, help="process counts, e.g. 1,2 (default: 1, 2 and 4 where present)")
    parser.add_argument("--stages", default=DEFAULT_STAGES, help="stage rows, comma-separated stage specs")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no launch after this many seconds")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the launch directory, in a worker
    return parser.parse_args(argv)


# --- worker: one (row, N) under torchrun ---------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    """One rank of a launch. A failure leaves its traceback in the launch directory (``rank<R>.log``) and one line
    for the parent (``fluxtrt.parallel.launch`` raises it), not a traceback on the terminal."""
    from fluxtrt.parallel.launch import record_worker_error

    try:
        run_worker(args)
    except Exception as exc:  # noqa: BLE001 (every failure becomes one line for the parent's record)
        rank = os.environ.get("RANK", "0")
        (Path(args.worker) / f"rank{rank}.log").write_text(traceback.format_exc())
        reason = exception_reason(exc)
        if not record_worker_error(reason):
            print(f"error: {reason}", file=sys.stderr, flush=True)
        return 1
    return 0


def run_worker(args: argparse.Namespace) -> None:
    import torch

    from fluxtrt.bench.compare import synthetic_image
    from fluxtrt.specs import Resolution

    directory, size = Path(args.worker), int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    say = (lambda record: print(json.dumps({"n": size, "stage": args.stages, **record}), flush=True)) if rank == 0 \
        else (lambda record: None)  # fmt: skip
    world, pipeline, applied, load_s = prepare(args, size)
    image = synthetic_image(Resolution(args.size, args.size))
    say({"phase": "load", "load_s": round(load_s, 1), "features": applied.report.features,
         "unavailable": applied.report.unavailable, "attention": applied.report.attention})  # fmt: skip
    runs = []
    for i in range(args.warmup + args.runs):
        timed = i >= args.warmup
        steps = args.steps if timed else args.warmup_steps
        if world is not None:
            world.barrier()  # no rank starts a timed edit while another still compiles
        sync(args.device)
        t0 = time.perf_counter()
        edit = edit_once(pipeline, image, args, steps)
        sync(args.device)
        wall = time.perf_counter() - t0
        if not timed:
            applied.end_edit()
            say({"phase": "warmup", "i": i, "steps": steps, "wall_s": round(wall, 2)})
            continue
        step = edit.timings_ms["transformer"] / edit.calls["transformer"]
        applied.end_edit(edit.timings_ms, edit.calls)  # the compile time: first call minus a steady one
        runs.append({"edit_ms": edit.timings_ms["total"], "step_ms": step, "wall_s": wall, "ms": edit.timings_ms})
        say({"phase": "run", "i": i - args.warmup, "edit_ms": round(edit.timings_ms["total"], 1),
             "step_ms": round(step, 2), "wall_s": round(wall, 2)})  # fmt: skip
    mine = {"rank": rank, "runs": runs, "load_s": load_s, "compile_s": applied.report.compile_s,
            "first_call_ms": applied.report.first_call_ms}  # fmt: skip
    if args.device == "cuda":
        mine["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        mine["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if rank == 0:
        torch.save(edit.latents, directory / "latents.pt")
        edit.images[0].save(directory / "edit.png")
        mine["features"], mine["unavailable"] = applied.report.features, applied.report.unavailable
    (directory / f"rank{rank}.json").write_text(json.dumps(mine))
    if world is not None:
        world.close()


def prepare(args: argparse.Namespace, size: int):
    """Load, split over the world (N > 1), apply the stage: (world, pipeline, applied stage, load seconds)."""
    from fluxtrt.models import load_components
    from fluxtrt.parallel.context import enable_context_parallel, init_world
    from fluxtrt.pipeline.kontext import KontextPipeline
    from fluxtrt.pipeline.sizes import check_sequence
    from fluxtrt.specs import Resolution
    from fluxtrt.stages import stage_config
    from fluxtrt.stages.apply import StagedModel

    world = init_world(size, args.device) if size > 1 else None
    t0 = time.perf_counter()
    components = load_components(args.model, args.device, "bf16" if args.device == "cuda" else "fp32", seed=0)
    load_s = time.perf_counter() - t0
    if world is not None:
        enable_context_parallel(components.transformer, world)
    applied = StagedModel(components).apply(stage_config(args.stages), strict=args.device == "cuda")
    if world is not None:
        from fluxtrt.parallel.context import attach_processors

        attach_processors(components.transformer)
        res = Resolution(args.size, args.size)
        check_sequence(KontextPipeline.from_components(components).dims, res, res, world.size)
    return world, KontextPipeline.from_components(components, runners=applied.runners), applied, load_s


def edit_once(pipeline, image, args: argparse.Namespace, steps: int):
    from dataclasses import replace

    from fluxtrt.stages import stage_config

    sampler = replace(stage_config(args.stages).sampler, steps=steps)
    side = args.size
    return pipeline.edit(image, PROMPT, sampler=sampler, seed=0, height=side, width=side, max_area=side * side)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# --- parent: one launch per (row, N), then the row's figures -------------------------------------------------------


def gpu_counts(args: argparse.Namespace) -> list[int]:
    if args.gpus:
        return [int(n) for n in args.gpus.split(",")]
    import torch

    have = torch.cuda.device_count() if args.device == "cuda" else 2
    return [n for n in (1, 2, 4) if n <= have]


def worker_args(args: argparse.Namespace, stage: str, directory: Path) -> list[str]:
    return ["--model", args.model, "--device", args.device, "--size", str(args.size), "--stages", stage,
            "--steps", str(args.steps), "--runs", str(args.runs), "--warmup", str(args.warmup),
            "--warmup-steps", str(args.warmup_steps), "--worker", str(directory)]  # fmt: skip


def result(stage: str, n: int, directory: Path, base: dict | None) -> dict:
    """The row's figures for N processes from the ranks' files (and N = 1's, for scaling and fidelity)."""
    import torch
    from PIL import Image

    from fluxtrt.bench.fidelity import fidelity

    ranks = [json.loads((directory / f"rank{r}.json").read_text()) for r in range(n)]
    runs = ranks[0]["runs"]
    out = {
        "phase": "result", "stage": stage, "n": n,
        "edit_ms": statistics.median(r["edit_ms"] for r in runs),
        "step_ms": statistics.median(r["step_ms"] for r in runs),
        "step_ms_spread": [min(r["step_ms"] for r in runs), max(r["step_ms"] for r in runs)],
        "load_s": ranks[0]["load_s"], "compile_s": ranks[0]["compile_s"], "first_call_ms": ranks[0]["first_call_ms"],
        "peak_allocated_gib": [r.get("peak_allocated_gib") for r in ranks],
        "peak_reserved_gib": [r.get("peak_reserved_gib") for r in ranks],
        "features": ranks[0]["features"], "unavailable": ranks[0]["unavailable"],
    }  # fmt: skip
    if base is not None:
        out["speedup_step"] = base["step_ms"] / out["step_ms"]
        out["scaling_efficiency"] = out["speedup_step"] / n
        out["speedup_edit"] = base["edit_ms"] / out["edit_ms"]
        with Image.open(directory / "edit.png") as a, Image.open(base["dir"] / "edit.png") as b:
            latents = torch.load(directory / "latents.pt"), torch.load(base["dir"] / "latents.pt")
            out["fidelity_vs_1"] = fidelity(a.convert("RGB"), latents[0], b.convert("RGB"), latents[1])
    return out


def parent(args: argparse.Namespace) -> int:
    from fluxtrt.environment import environment
    from fluxtrt.errors import FluxtrtError
    from fluxtrt.parallel.launch import launch

    records = Records(args.out / "multi_gpu.json")
    counts = gpu_counts(args)
    records.emit({"phase": "environment", "gpus": counts, "command": " ".join(sys.argv), **environment()})
    t0, longest = time.perf_counter(), 0.0
    for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
        base = None
        for n in counts:
            elapsed = time.perf_counter() - t0
            if elapsed + longest > args.budget_s:
                why = f"{elapsed:.0f} s spent, the longest launch took {longest:.0f} s, --budget-s {args.budget_s:.0f}"
                records.skip("result", why, stage=stage, n=n)
                continue
            directory = args.out / stage.replace(":", "_").replace("=", "-") / f"n{n}"
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("rank*.log"):
                stale.unlink()
            started = time.perf_counter()
            with records.phase("result", stage=stage, n=n):
                try:
                    # torchrun's --module: each worker runs `python -m benchmarks.multi_gpu` from this directory, as
                    # this process does (run as a file, benchmarks/ would shadow packages such as `kernels`)
                    launch(n, [__spec__.name, *worker_args(args, stage, directory)], script="--module")
                except FluxtrtError as exc:  # one line; the failed rank's traceback is in its log
                    logs = sorted(directory.glob("rank*.log"))
                    log = str(logs[0].relative_to(args.out)) if logs else None
                    raise PhaseFailed(exception_reason(exc), log) from None
                finally:
                    longest = max(longest, time.perf_counter() - started)
                row = result(stage, n, directory, base)
                records.emit({**row, "launch_s": round(time.perf_counter() - started, 1)})
                if n == 1:
                    base = {**row, "dir": directory}
    return records.done()


if __name__ == "__main__":
    arguments = parse()
    sys.exit(worker(arguments) if arguments.worker else parent(arguments))
