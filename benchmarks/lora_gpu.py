"""LoRA on an engines directory, timed: applying one, swapping to another and back, the transformer step with and
without it, and the GPU memory with none, one and two.

    python -m benchmarks.lora_gpu --engines DIR --out DIR [--rank 16] [--device cuda] [--iters 10]

Makes two random rank-``--rank`` LoRAs (seeded) on the attention and MLP linears of every block of the engines'
transformer, saved in diffusers' format and read back through fluxtrt's reader (diffusers' FLUX loader), then, in
this one process: loads the engines (``load_engine_pipeline``), times ``apply_to_runner`` for A, the swap to B and
back to A, A and B at once, and the removal (each CUDA-synchronised); times the transformer runner at the engines'
opt size (median of ``--iters`` synchronised calls after ``--warmup``) without and with A; records
``torch.cuda.memory_allocated`` and the peak during each change (and the process RSS, which a CPU run also has);
checks that A changes the output and that B -> A and the removal give back A's and the original output exactly.
Writes DIR/lora_gpu.json (one record per phase, ``benchmarks.records``). Tiny engines on ``--device cpu`` run the
same script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.records import Records

# The linears a FLUX LoRA usually trains (ai-toolkit's default), per block kind.
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
          "ff_context.net.2")  # fmt: skip
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def block_linears(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Of the transformer's linears (module -> [out, in]), those of ``DOUBLE`` / ``SINGLE`` in every block."""
    picked = {}
    for module, shape in shapes.items():
        kind, _, rest = module.partition(".")
        _, _, leaf = rest.partition(".")
        if (kind == "transformer_blocks" and leaf in DOUBLE) or (
            kind == "single_transformer_blocks" and leaf in SINGLE
        ):
            picked[module] = shape
    return picked


def write_lora(path: Path, shapes: dict[str, tuple[int, ...]], rank: int, seed: int) -> Path:
    """A random rank-``rank`` LoRA on ``shapes``' linears in diffusers' format (``transformer.M.lora_A.weight``
    [rank, in], ``lora_B.weight`` [out, rank], bf16): its update has about 1/100 of a unit weight's scale."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out, inp) in sorted(shapes.items()):
        tensors[f"transformer.{module}.lora_A.weight"] = (torch.randn(rank, inp, generator=gen) / inp**0.5).bfloat16()
        up = torch.randn(out, rank, generator=gen) / (100 * rank**0.5)
        tensors[f"transformer.{module}.lora_B.weight"] = up.bfloat16()
    save_file(tensors, str(path))
    return path


def opt_feed(spec: Any, profile: dict, dtype: Any, device: str) -> dict:
    """The spec's sample inputs at the profile's opt shapes."""
    dims = {}
    for t in spec.inputs:
        for axis, symbol in enumerate(t.shape):
            if isinstance(symbol, str):
                dims[symbol] = profile[t.name][1][axis]
    return spec.sample_feed(dims, dtype, device, seed=0)


class Probe:
    """Synchronised wall time and memory of the device the engines run on."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, call) -> tuple[Any, float]:
        """``call()``'s result and its seconds, the device synchronised before and after; the peak memory is reset
        first (``memory``'s ``peak``)."""
        import torch

        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = call()
        self.sync()
        return result, time.perf_counter() - t0

    def memory(self) -> dict:
        """``allocated`` and ``peak`` (since the last ``timed``) GPU bytes where CUDA runs; the process RSS."""
        import torch

        out: dict[str, Any] = {"rss_bytes": rss_bytes()}
        if self.cuda:
            out.update(allocated_bytes=torch.cuda.memory_allocated(), peak_bytes=torch.cuda.max_memory_allocated())
        return out

    def step_ms(self, call, warmup: int, iters: int) -> dict:
        """Median and spread of ``iters`` synchronised calls after ``warmup``."""
        for _ in range(warmup):
            call()
        times = []
        for _ in range(iters):
            times.append(self.timed(call)[1] * 1000)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": iters}


def rss_bytes() -> int:
    """The process's resident set size."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args, records: Records, scratch: Path) -> None:
    import torch

    from fluxtrt.engines.load import load_engine_pipeline
    from fluxtrt.lora.engines import apply_to_runner, engine_runner, weight_shapes
    from fluxtrt.lora.files import read_loras

    probe = Probe(args.device)
    pipeline, load_s = probe.timed(lambda: load_engine_pipeline(args.engines, args.device, first_block_cache=None))
    try:
        runner = pipeline.runners["transformer"]
        shapes = block_linears(weight_shapes(engine_runner(runner).linear_weights()))
        paths = [write_lora(scratch / f"{n}.safetensors", shapes, args.rank, seed) for n, seed in (("a", 1), ("b", 2))]
        (a, b), read_s = probe.timed(lambda: read_loras([str(p) for p in paths]))
        records.emit({"phase": "loras", "engines": str(args.engines), "load_s": load_s, "rank": args.rank,
                      "linears": len(shapes), "lora_bytes": sum(p.stat().st_size for p in paths),
                      "read_both_s": read_s})  # fmt: skip
        feed = opt_feed(runner.spec, runner_profile(args.engines), pipeline.dtype, args.device)
        shape = {k: list(v.shape) for k, v in feed.items()}

        def step():
            return runner.infer(feed)[runner.spec.output_names[0]]

        none_out = step().float().clone()
        records.emit({"phase": "none", "feed": shape, **probe.memory(),
                      "step": probe.step_ms(step, args.warmup, args.iters)})  # fmt: skip
        changes = {}
        for name, loras in (("apply_a", [a]), ("swap_to_b", [b]), ("swap_back_to_a", [a])):
            _, seconds = probe.timed(lambda loras=loras: apply_to_runner(runner, loras))
            changes[name] = {"s": seconds, **probe.memory()}
        a_out = step().float()
        records.emit({"phase": "one", "changes": changes, "step": probe.step_ms(step, args.warmup, args.iters),
                      "rel_change": ((a_out - none_out).norm() / none_out.norm()).item()})  # fmt: skip
        _, seconds = probe.timed(lambda: apply_to_runner(runner, [a, b]))
        records.emit({"phase": "two", "apply_s": seconds, **probe.memory()})
        _, seconds = probe.timed(lambda: apply_to_runner(runner, [a]))
        a_again = torch.equal(step().float(), a_out)
        _, removal_s = probe.timed(lambda: apply_to_runner(runner, []))
        records.emit({"phase": "removed", "remove_s": removal_s, **probe.memory(), "a_after_two_exact": a_again,
                      "original_exact": torch.equal(step().float(), none_out)})  # fmt: skip
    finally:
        pipeline.close()


def runner_profile(engines: Path) -> dict:
    """The transformer engine's profile (input -> [min, opt, max] shapes) from the manifest."""
    from fluxtrt.engines.manifest import Manifest

    return Manifest.load(engines).components["transformer"].profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True, help="An engines directory from fluxtrt build.")
    parser.add_argument("--out", type=Path, required=True, help="Directory for lora_gpu.json.")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    from fluxtrt.engines.manifest import Manifest
    from fluxtrt.environment import environment

    records = Records(args.out / "lora_gpu.json")
    records.emit({"phase": "command", "argv": ["python", "-m", "benchmarks.lora_gpu", *(argv or sys.argv[1:])]})
    manifest = Manifest.load(args.engines)
    records.emit({"phase": "environment", **environment(), "backend": manifest.backend,
                  "precision": manifest.precision})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lora-gpu-") as scratch:
        measure(args, records, Path(scratch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
