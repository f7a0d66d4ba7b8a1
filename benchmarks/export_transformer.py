"""Export the full-size FLUX transformer to ONNX and spot-check the exported graph's numerics.

    python benchmarks/export_transformer.py --workdir /tmp/export --out results.json

1. The full 12B transformer (random weights, BF16, on the GPU) through ``export_onnx``: export time, peak host
   memory (ru_maxrss), ONNX and external-data sizes, the checker's verdict.
2. Parity: ONNX Runtime's CPU provider has no BF16 kernels, so the spot-check exports the same architecture at full
   width with 2+2 blocks in FP32 and compares ONNX Runtime with PyTorch at a reduced sequence length. Every op type
   and shape of the full model is in those blocks; depth only repeats them.
Prints one JSON line per phase and rewrites --out after each, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch

from fluxtrt.backends.onnxruntime.runtime import session
from fluxtrt.backends.torch_modules import TransformerModule
from fluxtrt.environment import environment
from fluxtrt.export.onnx import export_onnx
from fluxtrt.models.synthetic import FULL, build_transformer
from fluxtrt.specs import Resolution, component_specs
from fluxtrt.specs.flux import FLUX_KONTEXT_DIMS, component_dims

RECORDS: list[dict] = []
FULL_DIMS = FLUX_KONTEXT_DIMS


def emit(record: dict, out: Path) -> None:
    RECORDS.append(record)
    print(json.dumps(record), flush=True)
    out.write_text(json.dumps(RECORDS, indent=2))


def peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def transformer(num_layers: int, num_single_layers: int, device: str, dtype: torch.dtype) -> TransformerModule:
    config = {**FULL.transformer, "num_layers": num_layers, "num_single_layers": num_single_layers}
    return TransformerModule(build_transformer(config, 0, device, dtype)).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-full", action="store_true", help="only the parity spot-check")
    args = parser.parse_args()
    spec = component_specs(FULL_DIMS)["transformer"]
    emit({"phase": "environment", **environment()}, args.out)

    if not args.skip_full:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        module = transformer(19, 38, device, torch.bfloat16)
        params = sum(p.numel() for p in module.parameters())
        emit({"phase": "full_build", "params": params, "seconds": time.perf_counter() - t0,
              "peak_host_gib": peak_host_gib()}, args.out)  # fmt: skip
        # Sample at 512x528 target + 512x512 reference, batch 2: no dynamic axis is 1 and S stays small.
        feed = spec.sample_feed(
            component_dims("transformer", FULL_DIMS, 2, Resolution(512, 528), Resolution(512, 512)),
            torch.bfloat16, device,
        )  # fmt: skip
        out_dir = args.workdir / "full"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        exported = export_onnx(spec, module, feed, out_dir)
        emit({
            "phase": "full_export", "precision": "bf16", "seconds": exported.seconds, "phases": exported.phases,
            "workdir": str(args.workdir), "feed": {k: list(v.shape) for k, v in feed.items()},
            "onnx_bytes": exported.model.stat().st_size,
            "data_bytes": exported.data.stat().st_size if exported.data else 0,
            "initializer_bytes": exported.initializer_bytes, "peak_host_gib": peak_host_gib(),
            "checker": "passed",
        }, args.out)  # fmt: skip
        del module, feed
        torch.cuda.empty_cache()
        shutil.rmtree(out_dir, ignore_errors=True)

    # Parity spot-check: full width, 2 double + 2 single blocks, FP32, reduced sequence.
    t0 = time.perf_counter()
    module = transformer(2, 2, "cpu", torch.float32)
    dims = component_dims("transformer", FULL_DIMS, 2, Resolution(256, 272), Resolution(256, 256))
    feed = spec.sample_feed(dims, torch.float32)
    small_dir = args.workdir / "parity"
    shutil.rmtree(small_dir, ignore_errors=True)
    small_dir.mkdir(parents=True)
    exported = export_onnx(spec, module, feed, small_dir)
    check_dims = component_dims("transformer", FULL_DIMS, 1, Resolution(384, 256), Resolution(256, 320))
    check = spec.sample_feed(check_dims, torch.float32, seed=1)
    with torch.inference_mode():
        ref = module(*(check[n] for n in spec.input_names))
    sess = session(exported.model, "cpu")
    got = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in check.items()})[0])
    err = (got - ref).abs()
    emit({
        "phase": "parity", "blocks": "2+2 at full width", "precision": "fp32", "export_s": exported.seconds,
        "export_dims": dims, "check_dims": check_dims, "max_abs_err": err.max().item(),
        "max_rel_err": (err.max() / ref.abs().max()).item(), "ref_absmax": ref.abs().max().item(),
        "tolerance_fp32": vars(spec.tolerance["fp32"]), "seconds": time.perf_counter() - t0,
    }, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
