"""The README's headline table in one command: build the engines it compares (or reuse a given directory), compare
them with the PyTorch stages on the same edit, and write the results where the README cites them.

    python -m benchmarks.headline --name headline_h100            # on one GPU: random-full, FP8 AOTInductor engines
    python -m benchmarks.headline --model tiny --device cpu --backend onnxruntime --precision fp32 \\
        --resolution 256x256 --name headline_tiny                 # the same path on a CPU, in about a minute

1. ``fluxtrt build`` of the engines into ``--engines`` (default ``build/headline/<model>-<backend>-<precision>-<WxH>``),
   for the one resolution compared, with ``--jobs auto`` (as many components at once as the memory holds). The
   build skips components that are up to date, so running this command again only compares.
2. ``fluxtrt compare`` of ``--stages`` (stage 0 and stage 4 by default) and those engines, with the prompt reused
   (``--prompt-cache``), into ``benchmarks/results/<name>/``: report.json, report.md and report.png.
3. ``headline.md`` there: the README's table, every figure read from report.json; and ``command.txt``: this command,
   the ``fluxtrt`` commands it ran, and the card.

Two runs of at most 10 minutes each on one H100 80GB: a first build of random-full's five FP8 components takes about
7 minutes (calibration included) and the comparison about as long (stage 4 compiles its blocks and torchao's FP8
linears on a fresh machine first), so when this command has built anything and less than ``--compare-s`` of
``--budget-s`` is left, it stops after the build and says so: the same command again then finds the engines up to date
and compares. Exit status: the build's or the comparison's when one fails, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fluxtrt.bench.results import run_gpu

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# How long the comparison takes, by model, when it cannot be measured beforehand (seconds, on one H100 80GB: model
# load, stage 0's 28-step edits, stage 4's compilation on a fresh machine, the engines' load and per-step error).
COMPARE_S = {"random-full": 420.0}
REFERENCE = "1024x1024"  # the preferred Kontext size of a square reference, which compare's synthetic one is


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=None, help="folder under benchmarks/results/ (default headline_MODEL)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (overrides --name)")
    parser.add_argument("--model", default="random-full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="aotinductor")
    parser.add_argument("--precision", default="fp8")
    parser.add_argument("--resolution", default="1024x1024", help="target WxH; the engines are built for it")
    parser.add_argument("--engines", type=Path, default=None, help="engines directory to build into or reuse")
    parser.add_argument("--no-build", action="store_true", help="compare --engines as it is, without building")
    parser.add_argument("--stages", default="0,4:fbc=off", help="PyTorch stage rows, as fluxtrt compare --stages")
    parser.add_argument("--runs", type=int, default=3, help="timed edits per row (the table shows their median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed edits per row first")
    parser.add_argument("--calibration-edits", type=int, default=None, help="fp8/fp4: as fluxtrt build's")
    parser.add_argument("--budget-s", type=float, default=570.0, help="seconds this command may take in all")
    parser.add_argument("--compare-s", type=float, default=None,
                        help="seconds the comparison needs (default: 420 for random-full, else 0)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS / (args.name or f"headline_{args.model}")
    if args.engines is None:
        slug = "-".join([Path(args.model).name, args.backend, args.precision, args.resolution])
        args.engines = ROOT / "build" / "headline" / slug
    if args.compare_s is None:
        args.compare_s = COMPARE_S.get(args.model, 0.0)
    return args


def resolution_range(target: str) -> tuple[str, str]:
    """The smallest range of sides that holds the target and the reference (compare's synthetic square reference is
    edited at Kontext's preferred square size, 1024x1024): (min, max) as WxH."""
    w, h = (int(v) for v in target.lower().split("x"))
    side = int(REFERENCE.split("x")[0])
    return f"{min(w, side)}x{min(h, side)}", f"{max(w, side)}x{max(h, side)}"


def build_command(args: argparse.Namespace) -> list[str]:
    """``fluxtrt build`` of every component for the sizes compared alone (one at 1024x1024), as many at once as
    ``--jobs auto`` decides."""
    low, high = resolution_range(args.resolution)
    cmd = ["fluxtrt", "build", "--model", args.model, "--backend", args.backend, "--precision", args.precision,
           "--device", args.device, "--jobs", "auto", "--min-resolution", low, "--opt-resolution", args.resolution,
           "--max-resolution", high, "--out", str(args.engines)]  # fmt: skip
    if args.backend == "aotinductor":
        cmd += ["--aoti-weights", "external"]  # the 12B transformer's weights beside its package, not in it
    if args.calibration_edits is not None:
        cmd += ["--calibration-edits", str(args.calibration_edits)]
    return cmd


def compare_command(args: argparse.Namespace) -> list[str]:
    return ["fluxtrt", "compare", "--model", args.model, "--device", args.device, "--stages", args.stages,
            "--engines", str(args.engines), "--resolution", args.resolution, "--runs", str(args.runs), "--warmup",
            str(args.warmup), "--prompt-cache", "--report", str(args.out)]  # fmt: skip


def run(cmd: list[str]) -> tuple[int, float]:
    """Run a ``fluxtrt`` command line in this Python (its output goes to ours). Returns (exit status, seconds)."""
    say(shlex.join(cmd))
    t0 = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT).returncode
    return code, time.perf_counter() - t0


def say(message: str) -> None:
    print(f"headline: {message}", file=sys.stderr, flush=True)


def engine_files(directory: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file an engines directory holds beside its manifest, its lock and the tokenizers
    (which every build writes again): what changes only when a component is built."""
    if not directory.is_dir():
        return {}
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file()
        and p.name not in ("manifest.json", ".lock")
        and not p.relative_to(directory).parts[0].startswith("tokenizer")
    }


# --- the table ------------------------------------------------------------------------------------------------------


def card(report: dict) -> str:
    """The machine of a report (report.json): the GPU it ran on and its memory, or the CPU (a ``--device cpu`` run
    on a machine with a GPU included)."""
    environment = report["environment"]
    gpu = run_gpu(report["config"], environment)
    if gpu:
        memory = environment.get("gpu_memory_gib")
        return gpu + (f" ({memory} GiB)" if memory else "")
    return f"CPU ({environment.get('cpu') or 'unknown'})"


def headline_rows(report: dict) -> list[dict]:
    """One row per contender of ``report`` (report.json): its steps, median edit ms, transformer ms per step, and
    speed-ups of median edits against the first stage-0 row and the last stage row."""
    ok = [c for c in report["contenders"] if c.get("status") == "ok" and c.get("median_total_ms")]
    stage0 = next((c for c in ok if c.get("stage") == "0"), None)
    stages = [c for c in ok if c.get("kind") == "stage"]
    last = stages[-1] if stages and stages[-1] is not stage0 else None
    rows = []
    for c in report["contenders"]:
        row = {"contender": c["contender"], "status": c.get("status"), "error": c.get("error")}
        if c in ok:
            ms = c["median_total_ms"]
            row.update(
                steps=c.get("steps"),
                sampler=c.get("sampler"),
                edit_ms=ms,
                step_ms=c.get("transformer_ms_per_step"),
                vs_stage0=stage0["median_total_ms"] / ms if stage0 else None,
                vs_last=last["median_total_ms"] / ms if last else None,
            )
        rows.append(row)
    return rows


def headline_markdown(report: dict, source: str, command: str) -> str:
    """The README's headline table from ``report`` (report.json), with the card, the inputs and where it comes from."""
    config, inputs = report["config"], report["inputs"]
    stages = [c for c in report["contenders"] if c.get("kind") == "stage"]
    last = stages[-1]["contender"] if len(stages) > 1 else None
    lines = [
        f"{card(report)}, `--model {config['model']}`, a {inputs.get('target')} edit of a "
        f"{inputs.get('image')} {inputs.get('image_size')} reference, prompt reused; median of {config['runs']} "
        f"timed edits after {config['warmup']} warmup edit(s); fluxtrt {report['environment'].get('fluxtrt_commit')}."
        f" Source: `{source}`, written by `{command}`.",
        "",
        "| row | sampler | steps | edit ms | transformer ms per step | vs stage 0 |"
        + (f" vs {last} |" if last else ""),
        "|---|---|---|---|---|---|" + ("---|" if last else ""),
    ]
    for row in headline_rows(report):
        if "edit_ms" not in row:
            failed = f"| {row['contender']} | failed: {row['error'] or row['status']} | | | | |"
            lines.append(failed + (" |" if last else ""))
            continue
        cells = [row["contender"], row["sampler"] or "-", str(row["steps"]), f"{row['edit_ms']:.0f}",
                 "-" if row["step_ms"] is None else f"{row['step_ms']:.1f}", speedup(row["vs_stage0"])]  # fmt: skip
        if last:
            cells.append(speedup(row["vs_last"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def write_outputs(args: argparse.Namespace, argv: list[str], ran: list[list[str]], build_note: str) -> None:
    """headline.md and command.txt beside the comparison's report."""
    report = json.loads((args.out / "report.json").read_text())
    command = shlex.join(["python", "-m", "benchmarks.headline", *argv])
    try:
        source = str(args.out.resolve().relative_to(ROOT)) + "/"
    except ValueError:
        source = str(args.out) + "/"
    (args.out / "headline.md").write_text(headline_markdown(report, source, command))
    env = report["environment"]
    lines = [
        f"# {card(report)}, driver {env.get('driver')}, torch {env.get('torch')}, fluxtrt {env.get('fluxtrt_commit')}, "
        f"{report.get('created_utc')}",
        command,
        "# which ran, from the repository root:",
        *(f"python -m {shlex.join(cmd)}" for cmd in ran),
        f"# build: {build_note}",
    ]
    (args.out / "command.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    t0 = time.perf_counter()
    ran: list[list[str]] = []
    build_note = "none (--no-build)"
    if not args.no_build:
        before = engine_files(args.engines)
        cmd = build_command(args)
        code, seconds = run(cmd)
        ran.append(cmd)
        if code != 0:
            say(f"the build failed (exit {code}); nothing compared")
            return code
        built = engine_files(args.engines) != before
        build_note = f"built in {seconds:.0f} s" if built else f"up to date ({seconds:.0f} s to check)"
        left = args.budget_s - (time.perf_counter() - t0)
        if built and left < args.compare_s:
            say(f"engines built in {seconds:.0f} s; the comparison needs about {args.compare_s:.0f} s and "
                f"{max(left, 0):.0f} s of --budget-s {args.budget_s:.0f} are left: run the same command again to "
                "compare (the build will find everything up to date)")  # fmt: skip
            return 0
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = compare_command(args)
    code, _ = run(cmd)
    ran.append(cmd)
    if not (args.out / "report.json").is_file():
        say(f"the comparison wrote no report (exit {code})")
        return code or 1
    write_outputs(args, argv, ran, build_note)
    for name in ("headline.md", "report.md", "report.json", "report.png", "command.txt"):
        print(args.out / name)
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
