"""Edits per process, timed: what `fluxtrt infer --engines` costs from process start, what the first edit of a
process pays against a warm one, `fluxtrt serve` from start to /ready, one request's server-side time against
`fluxtrt compare`'s engine edit time, and latency and throughput under load.

    PYTHONUNBUFFERED=1 python -m benchmarks.serve_gpu --engines ENGINES --out DIR \
        [--image examples/input.png] [--size 1024x1024] [--steps N] [--concurrency 1,4,16] [--budget-s 480]

Every measurement runs in a process of its own, one after the other, so each starts cold and has the GPU to itself:

1. ``infer``: ``fluxtrt infer --engines`` as a user runs it, from process start to the written image.
2. ``first_edit``: in a fresh process, the load (each engine's phases), then three edits of distinct prompts: the
   first against the warm ones per component and per transformer step (what the first call pays).
3. ``load_concurrent`` and ``warmup_edit``: the load with the engines and tokenizers loaded concurrently, and a
   one-step warm-up edit before the first one (whether either pays, for ``infer``).
4. ``compare``: ``fluxtrt.bench.compare`` on the engines alone (no per-step check against PyTorch), its median edit.
5. ``serve``: ``fluxtrt serve`` from start to /health and /ready, single requests (server-side time against
   compare's), then ``benchmarks.serve_load`` at each concurrency, each level bounded in time.

Prints one JSON line per record as it goes; DIR/serve_gpu.json holds them all (rewritten after each), with the
environment. ``--model tiny --size 256x256 --steps 2`` (or tiny engines) runs the same script on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.records import Records

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT / "examples" / "input.png"
DEFAULT_PROMPT = "make the house blue"


def source_args(args) -> list[str]:
    """The CLI options naming what is run (engines or a model)."""
    return ["--engines", str(args.engines)] if args.engines else ["--model", args.model]


def common_args(args) -> list[str]:
    out = ["--device", args.device]
    return out + (["--steps", str(args.steps)] if args.steps else [])


def size_of(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def child_env() -> dict:
    # The repository first, then whatever PYTHONPATH already holds (wheels installed beside the system's packages).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", "PYTHONPATH": path}


# -- 1. fluxtrt infer as a user runs it ------------------------------------------------------------------------


def measure_infer(args, out_dir: Path) -> dict:
    width, height = size_of(args.size)
    image_out = out_dir / "infer.png"
    image_out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fluxtrt", "infer", *source_args(args), "--image", str(args.image), "--prompt",
           args.prompt, "--height", str(height), "--width", str(width), "--out", str(image_out),
           *common_args(args)]  # fmt: skip
    t0, wall0 = time.perf_counter(), time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT)
    wall = time.perf_counter() - t0
    record = {"phase": "infer", "command": " ".join(["fluxtrt", *cmd[3:]]), "returncode": proc.returncode,
              "wall_s": wall}  # fmt: skip
    if image_out.exists():
        record["image_written_s"] = image_out.stat().st_mtime - wall0
    load = re.search(r"model load ([\d.]+) s", proc.stdout)
    record["load_s"] = float(load.group(1)) if load else None
    record["components_ms"] = {m.group(1): float(m.group(3)) for m in re.finditer(
        r"^\W*(\w+)\W+(\d*)\W+([\d.]+)\W", proc.stdout, re.MULTILINE)}  # fmt: skip
    if proc.returncode != 0:
        record["tail"] = (proc.stdout + proc.stderr)[-2000:]
    return record


# -- children: a fresh process each ----------------------------------------------------------------------------


def run_child(args, mode: str) -> dict:
    """``mode`` in a fresh process of this script; its last stdout line is its JSON record."""
    cmd = [sys.executable, "-m", "benchmarks.serve_gpu", "--child", mode, *source_args(args), "--image",
           str(args.image), "--prompt", args.prompt, "--size", args.size, "--device", args.device,
           "--runs", str(args.runs)] + (["--steps", str(args.steps)] if args.steps else [])  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT)
    process_s = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"phase": mode, "returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-2000:]}
    return {**json.loads(lines[-1]), "process_s": process_s}


def child(args) -> dict:
    t0 = time.perf_counter()
    import torch

    from fluxtrt.config import SamplerConfig

    imports_s = time.perf_counter() - t0
    cuda = args.device.startswith("cuda")
    if cuda:
        t0 = time.perf_counter()
        torch.zeros(1, device=args.device).add_(1)
        torch.cuda.synchronize()
        cuda_s = time.perf_counter() - t0
    record: dict = {"phase": args.child, "imports_s": imports_s, "cuda_init_s": cuda_s if cuda else None}
    if args.child == "compare":
        return {**record, **compare_edit(args)}
    t0 = time.perf_counter()
    pipeline = load_pipeline(args, concurrent=args.child == "load_concurrent")
    sync(cuda)
    record["load_s"] = time.perf_counter() - t0
    record["runners_load_s"] = {n: dict(getattr(r, "load_seconds", {})) for n, r in pipeline.runners.items()}
    if args.child == "load_concurrent":
        return record
    from PIL import Image

    pipeline.prompt_cache = 0  # every edit encodes its prompt, as a process's first edit does
    timer = step_timer(pipeline.runners["transformer"], cuda)
    pipeline.runners["transformer"] = timer
    image = Image.open(args.image).convert("RGB")
    width, height = size_of(args.size)
    sampler = SamplerConfig(steps=args.steps)

    def edit(prompt: str, steps: int | None = None) -> dict:
        timer.clear()
        t0 = time.perf_counter()
        result = pipeline.edit(image, prompt, sampler=SamplerConfig(steps=steps) if steps else sampler, seed=0,
                               height=height, width=width)  # fmt: skip
        sync(cuda)
        return {"wall_s": time.perf_counter() - t0, "timings_ms": result.timings_ms, "step_ms": list(timer.ms)}

    if args.child == "warmup_edit":  # a one-step warm-up, then the edit: does it cost less than a cold edit?
        record["warmup"] = edit(DEFAULT_PROMPT + " (warm-up)", steps=1)
        record["edit"] = edit(args.prompt)
        return record
    edits = [edit(f"{args.prompt} #{i}") for i in range(1 + max(2, args.runs - 1))]
    first, warm = edits[0], edits[1:]
    record.update(first=first, warm=warm)
    best = min(warm, key=lambda e: e["wall_s"])
    record["first_over_warm"] = first["wall_s"] / best["wall_s"]
    record["first_pays_ms"] = {k: first["timings_ms"][k] - best["timings_ms"].get(k, 0.0)
                               for k in first["timings_ms"]}  # fmt: skip
    if cuda:
        record["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return record


def step_timer(inner, cuda: bool):
    """``inner`` behind a runner that keeps each call's milliseconds (synchronised, on a GPU)."""
    from fluxtrt.backends.runner import DelegatingRunner

    class StepTimer(DelegatingRunner):
        def __init__(self):
            super().__init__(inner)
            self.ms: list[float] = []

        def clear(self) -> None:
            self.ms = []

        def _infer(self, feed):
            sync(cuda)
            t0 = time.perf_counter()
            out = self.inner.infer(feed)
            sync(cuda)
            self.ms.append((time.perf_counter() - t0) * 1000)
            return out

    return StepTimer()


def load_pipeline(args, concurrent: bool = False):
    if args.engines:
        from fluxtrt.engines.load import load_engine_pipeline

        return load_engine_pipeline(args.engines, args.device, concurrent=concurrent)
    from fluxtrt.models import load_components
    from fluxtrt.pipeline.kontext import KontextPipeline

    dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return KontextPipeline.from_components(load_components(args.model, args.device, dtype, seed=0))


def compare_edit(args) -> dict:
    """``fluxtrt compare`` of the engines (or stage 0 of the model) on the same inputs as the server's requests."""
    from dataclasses import replace

    from fluxtrt.bench.compare import compare
    from fluxtrt.bench.config import CompareConfig
    from fluxtrt.bench.contenders import EngineContender
    from fluxtrt.config import SamplerConfig
    from fluxtrt.specs.flux import Resolution

    class TimedEngines(EngineContender):
        """The engines without the per-step check against PyTorch (it loads the model: time this run has not)."""

        def prepare(self, session):
            return replace(super().prepare(session), after=None)

    width, height = size_of(args.size)
    model = args.model
    contenders = None
    if args.engines:
        from fluxtrt.engines.manifest import Manifest

        model = Manifest.load(args.engines).model.source
        contenders = [TimedEngines(args.engines, sampler=SamplerConfig(steps=args.steps))]
    config = CompareConfig(model=model, stages=() if args.engines else ("0",),
                           engines=(args.engines,) if args.engines else (), image=args.image, prompt=args.prompt,
                           resolution=Resolution(width, height), runs=args.runs, warmup=1, device=args.device,
                           seed=0)  # fmt: skip
    report = compare(config, contenders=contenders)
    result = report.contenders[0]
    return {"contender": result.name, "status": result.status, "error": result.error, "load_s": result.load_s,
            "first_call_s": result.first_call_s, "totals_ms": result.totals_ms,
            "median_total_ms": result.median_total_ms,
            "median_timings_ms": result.representative.timings_ms if result.representative else None,
            "environment": report.environment}  # fmt: skip


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


# -- 5. fluxtrt serve --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_status(client, url: str, proc, deadline: float, log: Path) -> float | None:
    """When ``url`` answered 200 (None: the process died, logged a failed load, or the deadline passed)."""
    while time.perf_counter() < deadline and proc.poll() is None and "error: loading failed" not in log.read_text():
        try:
            if client.get(url, timeout=5).status_code == 200:
                return time.perf_counter()
        except Exception:  # noqa: BLE001 (not listening yet)
            pass
        time.sleep(0.1)
    return None


def measure_serve(args, records: Records, compare_ms: float | None, deadline: float) -> None:
    import httpx

    from benchmarks.serve_load import load_test

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fluxtrt", "serve", *source_args(args), "--port", str(port), "--warmup-size",
           args.size, *common_args(args)]  # fmt: skip
    log_path = Path(args.out) / "serve.log"
    log = log_path.open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
    try:
        with httpx.Client() as client:
            health = wait_status(client, f"{url}/health", proc, deadline, log_path)
            ready = wait_status(client, f"{url}/ready", proc, deadline, log_path)
            since = lambda t: t - t0 if t else None  # noqa: E731
            record = {"phase": "serve_ready", "command": " ".join(["fluxtrt", *cmd[3:]]), "health_s": since(health),
                      "ready_s": since(ready)}  # fmt: skip
            if ready:
                record["ready"] = client.get(f"{url}/ready").json()
            records.emit(record)
            if not ready:
                return
            singles = single_requests(client, url, args)
            edit_ms = sorted(s["timings_ms"]["edit"] for s in singles if "timings_ms" in s)
            median = edit_ms[(len(edit_ms) - 1) // 2] if edit_ms else None
            records.emit({"phase": "serve_single", "requests": singles, "median_edit_ms": median,
                          "compare_median_total_ms": compare_ms,
                          "edit_over_compare": median / compare_ms if median and compare_ms else None})  # fmt: skip
            levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
            edit_s = (median or 1000.0) / 1000
            image = args.image.read_bytes()
            for c in levels:
                left = deadline - time.perf_counter() - 15
                if left < edit_s * c:
                    records.emit({"phase": "serve_load", "concurrency": c, "skipped": f"{left:.0f} s left"})
                    continue
                # Each client sends its edits one after the other: bound the level to its share of the time left.
                share = left / (len(levels) - levels.index(c))
                per_client = max(1, min(args.requests, int(share / (edit_s * c))))
                result = asyncio.run(load_test(url, image, args.prompt, args.size, args.steps, [c], per_client))
                records.emit({"phase": "serve_load", **result["levels"][0], "requests_per_client": per_client,
                              "health_after": result["health_after"]})  # fmt: skip
    finally:
        proc.terminate()
        try:
            record = {"phase": "serve_exit", "returncode": proc.wait(60)}
        except subprocess.TimeoutExpired:
            proc.kill()
            record = {"phase": "serve_exit", "returncode": proc.wait(), "killed": True}
        log.close()
        record["log"] = [line for line in log_path.read_text().splitlines() if '"GET /' not in line][-20:]
        records.emit(record)


def single_requests(client, url: str, args, count: int = 3) -> list[dict]:
    """One request at a time, each with a prompt of its own (the encoders run, as in compare's edits)."""
    out = []
    form = {"size": args.size, "response_format": "b64_json", "seed": "0"}
    if args.steps:
        form["steps"] = str(args.steps)
    for i in range(count):
        t0 = time.perf_counter()
        answer = client.post(f"{url}/v1/images/edits", data={**form, "prompt": f"{args.prompt} #{i}"},
                             files={"image": ("in.png", args.image.read_bytes())}, timeout=600)  # fmt: skip
        item = {"status": answer.status_code, "client_s": time.perf_counter() - t0}
        if answer.status_code == 200:
            item["timings_ms"] = answer.json()["timings_ms"]
        else:
            item["body"] = answer.text[:500]
        out.append(item)
    return out


# -- the driver ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--engines", type=Path, help="An engines directory from fluxtrt build.")
    what.add_argument("--model", help="A model instead (tiny on a CPU, for a smoke run).")
    parser.add_argument("--out", type=Path, help="Directory for serve_gpu.json (required but for --child).")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT of every edit.")
    parser.add_argument("--steps", type=int, default=None, help="Steps per edit (default: fluxtrt's).")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=3, help="Timed edits of compare and warm edits of first_edit.")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=4, help="Most edits per client per load level.")
    parser.add_argument("--budget-s", type=float, default=480.0, help="Wall-clock bound of the whole run.")
    parser.add_argument("--skip", default="", help="Comma-separated phases to leave out (e.g. warmup_edit).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args), default=str), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required")
    deadline = time.perf_counter() + args.budget_s
    records = Records(args.out / "serve_gpu.json")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    records.emit({"phase": "command", "argv": ["python", "-m", "benchmarks.serve_gpu", *(argv or sys.argv[1:])]})
    if "infer" not in skip:
        records.emit(measure_infer(args, args.out))
    environment = None
    for mode in ("first_edit", "load_concurrent", "warmup_edit", "compare"):
        if mode in skip or time.perf_counter() > deadline - 60:
            continue
        record = run_child(args, mode)
        environment = record.pop("environment", None) or environment
        records.emit(record)
    if environment is None:
        from fluxtrt.environment import environment as probe

        environment = probe()
    records.emit({"phase": "environment", **environment})
    compare_ms = next((r.get("median_total_ms") for r in records.items if r["phase"] == "compare"), None)
    if "serve" not in skip:
        measure_serve(args, records, compare_ms, deadline)
    failed = [r["phase"] for r in records.items if r.get("returncode") not in (None, 0) or r.get("error")]
    records.emit({"phase": "done", "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
