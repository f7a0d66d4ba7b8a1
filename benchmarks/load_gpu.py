"""Loading an engines directory, timed: what ``fluxtrt infer`` waits for before its first step.

    python -m benchmarks.load_gpu ENGINES_DIR --out results.json [--device cuda] [--trace-libraries]

In a fresh process: the imports (torch, inductor), the CUDA context, then ``load_engine_pipeline`` of the whole
directory, with each AOTInductor runner's load phases (``package``, ``weights``, ``constants``). With
``--trace-libraries`` the measurement runs in a child process under ``LD_DEBUG=files`` and the record also lists,
with the second each happened at, every shared library the dynamic loader initialised during the engines' load
(where a minute of a first package load goes, when it goes to loading libraries). A failed load is one record with a
one-line reason, its output or traceback in a log beside --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.failures import Logs, PhaseFailed, output_reason
from benchmarks.records import Records

_MARK = "fluxtrt-load-phase"
_LD_DEBUG = re.compile(r"^\s*\d+:")  # the dynamic loader's lines start with the process id


def measure(engines: Path, device: str) -> dict:
    t0 = time.perf_counter()
    import torch
    import torch._inductor  # noqa: F401

    from fluxtrt.engines.load import load_engine_pipeline

    imports = time.perf_counter() - t0
    t0 = time.perf_counter()
    if device == "cuda":
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    cuda = time.perf_counter() - t0
    print(_MARK, "load-start", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    pipeline = load_engine_pipeline(engines, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    load = time.perf_counter() - t0
    print(_MARK, "load-end", file=sys.stderr, flush=True)
    runners = {name: dict(getattr(r, "load_seconds", {})) for name, r in pipeline.runners.items()}
    return {"imports_s": imports, "cuda_init_s": cuda, "load_s": load, "runners": runners}


def traced(args, logs: Logs) -> dict:
    """Run ``measure`` in a child under LD_DEBUG=files; time-stamp the libraries it initialises while loading."""
    env = {**os.environ, "LD_DEBUG": "files"}
    cmd = [sys.executable, "-m", "benchmarks.load_gpu", str(args.engines), "--device", args.device, "--child"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    start, loading, libraries, kept = time.perf_counter(), False, [], []

    def read():
        nonlocal loading
        for line in proc.stderr:
            if _MARK in line:
                loading = "load-start" in line
            elif loading and "calling init:" in line:
                libraries.append([round(time.perf_counter() - start, 2), line.split("calling init:")[-1].strip()])
            elif not _LD_DEBUG.match(line):
                kept.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    out = proc.stdout.read()  # not communicate(): it would read stderr too, beside the thread that reads it
    proc.wait()
    reader.join()
    if proc.returncode != 0:  # LD_DEBUG's lines are not kept: the log holds the rest of the output
        log = logs.write("load", f"# exit {proc.returncode}\n# stdout\n{out}\n# stderr\n" + "".join(kept))
        raise PhaseFailed(output_reason(out + "\n" + "".join(kept), proc.returncode), log,
                          returncode=proc.returncode)  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "libraries_initialised_during_load": libraries}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("engines", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--trace-libraries", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.engines, args.device)), flush=True)
        return 0
    if args.out is None:
        parser.error("--out is required")
    records = Records(args.out)
    with records.phase("load", engines=str(args.engines)):
        result = traced(args, records.logs) if args.trace_libraries else measure(args.engines, args.device)
        records.emit({"phase": "load", "engines": str(args.engines), **result})
    return records.done()


if __name__ == "__main__":
    sys.exit(main())
