"""Build a TensorRT-RTX plan of one component from an ONNX-only engines directory, without a GPU, and report it.

    CUDA_VISIBLE_DEVICES= python benchmarks/rtx_full_plan.py --engines DIR --compute-capability 8.9 --out r.json

DIR is what ``fluxtrt build --backend onnx`` wrote (its manifest holds the dims and the profile shapes). This is the
plan step of ``fluxtrt build --backend tensorrt-rtx --onnx-dir DIR/onnx`` without loading the checkpoint, which a
build does for calibration and which a CPU cannot do for the full-size model in minutes. Records the build time, the
process's peak host memory (ru_maxrss: run one target per process), the plan's size and the parsed network's
quantized matrix multiplies against the ONNX's quantized linears. Appends one JSON record to --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from fluxtrt.backends.tensorrt.build import build_plan_file
from fluxtrt.backends.tensorrt.flavour import TENSORRT_RTX
from fluxtrt.backends.tensorrt.plan import TensorRTRtxOptions, build_plan
from fluxtrt.engines.manifest import Manifest
from fluxtrt.specs import component_specs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", type=Path, required=True, help="an ONNX-only engines directory")
    parser.add_argument("--component", default="transformer")
    parser.add_argument("--compute-capability", required=True, help="comma-separated targets, e.g. 8.9 or 8.9,12.0")
    parser.add_argument("--plan", type=Path, required=True, help="where to write the plan")
    parser.add_argument("--out", type=Path, required=True, help="JSON list to append the record to")
    args = parser.parse_args()

    manifest = Manifest.load(args.engines)
    entry = manifest.components[args.component]
    spec = component_specs(manifest.dims)[args.component]
    onnx_path = args.engines / "onnx" / args.component / "model.onnx"
    options = TensorRTRtxOptions(compute_capabilities=tuple(args.compute_capability.split(",")))
    profile = {k: [tuple(s) for s in v] for k, v in entry.profile.items()}
    plan = build_plan(spec, onnx_path, manifest.precision, profile, options, TENSORRT_RTX, None)
    t0 = time.perf_counter()
    record: dict = {"component": args.component, "precision": manifest.precision, "targets": list(plan.targets),
                    "onnx_bytes": sum(p.stat().st_size for p in onnx_path.parent.iterdir()),
                    "tensorrt_rtx": TENSORRT_RTX.lib().__version__}  # fmt: skip
    try:
        details = build_plan_file(TENSORRT_RTX, plan, args.plan)
        record.update(ok=True, plan_bytes=args.plan.stat().st_size, layers=details["layers"],
                      quantized_matmuls=details.get("quantized_matmuls"))  # fmt: skip
    except Exception as exc:  # the failure is the measurement
        record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    record["build_s"] = round(time.perf_counter() - t0, 1)
    record["peak_host_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(record), flush=True)
    records = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps([*records, record], indent=1))


if __name__ == "__main__":
    main()
