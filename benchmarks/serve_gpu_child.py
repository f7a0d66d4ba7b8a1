"""What ``benchmarks.serve_gpu`` runs in a child process of its own (``--child MODE``), so each starts cold: the load
(``first_edit``, ``load_concurrent``, ``load_pinned``, ``warmup_edit``), a first edit against warm ones, and
``compare``'s edit."""

from __future__ import annotations

import time

DEFAULT_PROMPT = "make the house blue"


def size_of(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


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
    if args.child == "load_pinned":  # the external weights through pinned chunks instead of a memory map
        from fluxtrt.backends.aotinductor import reading

        reading.read_weights = reading.read_weights_pinned
    t0 = time.perf_counter()
    pipeline = load_pipeline(args, concurrent=args.child == "load_concurrent")
    sync(cuda)
    record["load_s"] = time.perf_counter() - t0
    record["runners_load_s"] = {n: dict(getattr(r, "load_seconds", {})) for n, r in pipeline.runners.items()}
    record["pipeline_load_s"] = dict(pipeline.load_seconds)  # engines: the checks, each engine, the tokenizers
    if args.child in ("load_concurrent", "load_pinned"):
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
        # At exactly --size, as the server edits a request's size and compare its resolution.
        result = pipeline.edit(image, prompt, sampler=SamplerConfig(steps=steps) if steps else sampler, seed=0,
                               height=height, width=width, max_area=width * height)  # fmt: skip
        sync(cuda)
        return {"wall_s": time.perf_counter() - t0, "size": str(result.target), "timings_ms": result.timings_ms,
                "step_ms": list(timer.ms)}  # fmt: skip

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
    stage = "0" if args.steps is None else f"0:steps={args.steps}"  # the steps the server's edits take
    config = CompareConfig(model=model, stages=() if args.engines else (stage,),
                           engines=(args.engines,) if args.engines else (), image=args.image, prompt=args.prompt,
                           resolution=Resolution(width, height), runs=args.runs, warmup=1, device=args.device,
                           seed=0)  # fmt: skip
    report = compare(config, contenders=contenders)
    result = report.contenders[0]
    return {"contender": result.name, "status": result.status, "error": result.error, "load_s": result.load_s,
            "first_call_s": result.first_call_s, "totals_ms": result.totals_ms,
            "median_total_ms": result.median_total_ms,
            "steps": result.representative.steps if result.representative else None,
            "median_timings_ms": result.representative.timings_ms if result.representative else None,
            "environment": report.environment}  # fmt: skip


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()
