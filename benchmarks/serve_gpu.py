"""Edits per process, timed: what `fluxtrt infer --engines` costs from process start, what the first edit of a
process pays against a warm one, `fluxtrt serve` from start to /ready, one request's server-side time against
`fluxtrt compare`'s engine edit time, and latency and throughput under load.

    PYTHONUNBUFFERED=1 python -m benchmarks.serve_gpu --engines ENGINES --out DIR \
        [--image examples/input.png] [--size 1024x1024] [--steps N] [--concurrency 1,4,16] [--budget-s 480]

Every measurement runs in a process of its own, one after the other, so each starts cold and has the GPU to itself:

1. ``infer``: ``fluxtrt infer --engines`` as a user runs it, from process start to the written image.
2. ``first_edit``: in a fresh process, the load (each engine's phases), then three edits of distinct prompts: the
   first against the warm ones per component and per transformer step (what the first call pays).
3. ``load_concurrent``, ``load_pinned`` and ``warmup_edit``: the load with the engines and tokenizers loaded at once
   from threads, the load with the external weights read through pinned chunks
   (``fluxtrt.backends.aotinductor.reading.read_weights_pinned``) instead of safetensors' memory map, and a one-step
   warm-up edit before the first one (what each choice would be worth to ``infer``'s load).
4. ``compare``: ``fluxtrt.bench.compare`` on the engines alone (no per-step check against PyTorch), its median edit.
5. ``serve``: ``fluxtrt serve`` from start to /health and /ready, single requests (server-side time against
   compare's), then ``benchmarks.serve_load`` at each concurrency, each level bounded in time.

Prints one JSON line per record as it goes; DIR/serve_gpu.json holds them all (rewritten after each), with the
environment. A phase that fails is one record with a one-line reason (the child's output or the traceback in a log in
DIR, the server's in DIR/serve.log) and the phases after it still run; the requests, without a ready server, are
skipped with the reason. ``--model tiny --size 256x256 --steps 2`` (or tiny engines) runs the same script on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.failures import Child, Logs, child_env, one_line, output_reason, run_logged
from benchmarks.records import Records
from benchmarks.serve_gpu_child import DEFAULT_PROMPT, child, size_of

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT / "examples" / "input.png"


def source_args(args) -> list[str]:
    """The CLI options naming what is run (engines or a model)."""
    return ["--engines", str(args.engines)] if args.engines else ["--model", args.model]


def common_args(args) -> list[str]:
    out = ["--device", args.device]
    return out + (["--steps", str(args.steps)] if args.steps else [])


# -- 1. fluxtrt infer as a user runs it ------------------------------------------------------------------------


def measure_infer(args, out_dir: Path, logs: Logs) -> dict:
    width, height = size_of(args.size)
    image_out = out_dir / "infer.png"
    image_out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fluxtrt", "infer", *source_args(args), "--image", str(args.image), "--prompt",
           args.prompt, "--height", str(height), "--width", str(width), "--out", str(image_out),
           *common_args(args)]  # fmt: skip
    wall0 = time.time()
    proc = run_logged(cmd, logs, "infer", env=child_env(), cwd=ROOT)
    record = {"phase": "infer", "command": " ".join(["fluxtrt", *cmd[3:]]), "returncode": proc.returncode,
              "wall_s": proc.wall_s}  # fmt: skip
    if image_out.exists():
        record["image_written_s"] = image_out.stat().st_mtime - wall0
    load = re.search(r"model load ([\d.]+) s", proc.stdout)
    record["load_s"] = float(load.group(1)) if load else None
    record["components_ms"] = {m.group(1): float(m.group(3)) for m in re.finditer(
        r"^\W*(\w+)\W+(\d*)\W+([\d.]+)\W", proc.stdout, re.MULTILINE)}  # fmt: skip
    return record if proc.ok else {**record, **failure(proc)}


def failure(proc: Child) -> dict:
    """The fields of a record whose child process failed: one line, and the log holding its output."""
    return {"status": "failed", "reason": proc.reason, "log": proc.log}


# -- children: a fresh process each ----------------------------------------------------------------------------


def run_child(args, mode: str, logs: Logs) -> dict:
    """``mode`` in a fresh process of this script; its last stdout line is its JSON record."""
    cmd = [sys.executable, "-m", "benchmarks.serve_gpu", "--child", mode, *source_args(args), "--image",
           str(args.image), "--prompt", args.prompt, "--size", args.size, "--device", args.device,
           "--runs", str(args.runs)] + (["--steps", str(args.steps)] if args.steps else [])  # fmt: skip
    proc = run_logged(cmd, logs, mode, env=child_env(), cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not proc.ok:
        return {"phase": mode, "returncode": proc.returncode, **failure(proc)}
    if not lines:
        log = logs.write(mode, proc.stdout + proc.stderr)
        return {"phase": mode, "status": "failed", "reason": "the child process printed no record", "log": log}
    record = {**json.loads(lines[-1]), "process_s": proc.wall_s}
    if record.get("error"):  # compare's contender failed: its error is one line already
        record["reason"] = record["error"]
    return record


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

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fluxtrt", "serve", *source_args(args), "--port", str(port), "--warmup-size",
           args.size, *common_args(args)]  # fmt: skip
    log_path = Path(args.out) / "serve.log"  # beside serve_gpu.json: records name it "serve.log"
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
            else:
                why = "not ready by the deadline" if proc.poll() is None else None
                record.update(status="failed", reason=why or output_reason(log_path.read_text(), proc.poll()),
                              log=log_path.name)  # fmt: skip
            records.emit(record)
            if not ready:
                for name in ("serve_single", "serve_load"):
                    records.skip(name, "the server did not become ready")
                return
            serve_requests(args, records, client, url, compare_ms, deadline)
    finally:
        proc.terminate()
        try:
            record = {"phase": "serve_exit", "returncode": proc.wait(60)}
        except subprocess.TimeoutExpired:
            proc.kill()
            record = {"phase": "serve_exit", "returncode": proc.wait(), "killed": True}
        log.close()
        record["log"] = log_path.name
        if record["returncode"] not in (0, None) and not record.get("killed"):
            record.update(status="failed", reason=output_reason(log_path.read_text(), record["returncode"]))
        records.emit(record)


def serve_requests(args, records: Records, client, url: str, compare_ms: float | None, deadline: float) -> None:
    """Single requests, then ``benchmarks.serve_load`` at each concurrency, each level bounded in time."""
    from benchmarks.serve_load import load_test

    median = None
    with records.phase("serve_single"):
        singles = single_requests(client, url, args)
        edit_ms = sorted(s["timings_ms"]["edit"] for s in singles if "timings_ms" in s)
        median = edit_ms[(len(edit_ms) - 1) // 2] if edit_ms else None
        record = {"phase": "serve_single", "requests": singles, "median_edit_ms": median,
                  "compare_median_total_ms": compare_ms,
                  "edit_over_compare": median / compare_ms if median and compare_ms else None}  # fmt: skip
        if not edit_ms:
            record.update(status="failed", reason=next(s["reason"] for s in singles if "reason" in s))
        records.emit(record)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    edit_s = (median or 1000.0) / 1000
    image = args.image.read_bytes()
    for c in levels:
        left = deadline - time.perf_counter() - 15
        if left < edit_s * c:
            records.skip("serve_load", f"{left:.0f} s left", concurrency=c)
            continue
        with records.phase("serve_load", concurrency=c):
            # Each client sends its edits one after the other: bound the level to its share of the time left.
            share = left / (len(levels) - levels.index(c))
            per_client = max(1, min(args.requests, int(share / (edit_s * c))))
            result = asyncio.run(load_test(url, image, args.prompt, args.size, args.steps, [c], per_client))
            records.emit({"phase": "serve_load", **result["levels"][0], "requests_per_client": per_client,
                          "health_after": result["health_after"]})  # fmt: skip


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
            item["reason"] = error_message(answer)
        out.append(item)
    return out


def error_message(answer) -> str:
    """One line of a failed answer: its error's message (OpenAI's error shape), else the status and body."""
    try:
        message = answer.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {answer.status_code}: {answer.text}"
    return one_line(str(message))


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
        with records.phase("infer"):
            records.emit(measure_infer(args, args.out, records.logs))
    environment = None
    for mode in ("first_edit", "load_concurrent", "load_pinned", "warmup_edit", "compare"):
        if mode in skip:
            continue
        if time.perf_counter() > deadline - 60:
            records.skip(mode, f"less than 60 s of --budget-s {args.budget_s:.0f} left")
            continue
        with records.phase(mode):
            record = run_child(args, mode, records.logs)
            environment = record.pop("environment", None) or environment
            records.emit(record)
    if environment is None:
        from fluxtrt.environment import environment as probe

        environment = probe()
    records.emit({"phase": "environment", **environment})
    compare_ms = next((r.get("median_total_ms") for r in records.items if r["phase"] == "compare"), None)
    if "serve" not in skip:
        with records.phase("serve"):
            measure_serve(args, records, compare_ms, deadline)
    return records.done()


if __name__ == "__main__":
    sys.exit(main())
