"""``compare``: every contender on identical inputs, one at a time, timed per component, with fidelity to stage 0.

Per contender: prepare (load/apply; its seconds reported), ``warmup`` untimed edits (the first one's wall time is the
first-call time, compilation included), then ``runs`` timed edits whose per-component milliseconds come from the
pipeline's ComponentTimer (CUDA events on a GPU). A contender that raises, or whose edit is not finite, is recorded
as failed with its error and the next one runs. Device memory is freed between contenders.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import torch

from fluxtrt.bench.config import CompareConfig
from fluxtrt.bench.contenders import Contender, ModelSession, contenders_from_config, free_device_memory
from fluxtrt.bench.fidelity import fidelity
from fluxtrt.errors import FluxtrtError, first_line
from fluxtrt.specs.flux import Resolution

COMPONENTS = ("clip", "t5", "vae_encoder", "transformer", "vae_decoder", "glue")


@dataclass
class RunRecord:
    """One timed edit of one contender. ``image``/``latents`` stay in memory for fidelity, not in the JSON."""

    run: int
    steps: int
    timings_ms: dict[str, float]
    cache: dict | None = None
    fidelity: dict[str, float] | None = None
    image: Any = None
    latents: Any = None

    @property
    def transformer_ms_per_step(self) -> float:
        return self.timings_ms["transformer"] / self.steps


@dataclass
class ContenderResult:
    """Everything measured for one contender."""

    name: str
    kind: str
    base: str | None
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    what: list[str] = field(default_factory=list)
    sampler: str | None = None
    details: dict = field(default_factory=dict)
    load_s: float | None = None
    prepare_s: float | None = None
    first_call_s: float | None = None
    warmup_s: list[float] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    peak_gpu_mem_gib: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.runs)

    @property
    def totals_ms(self) -> list[float]:
        return [r.timings_ms["total"] for r in self.runs]

    @property
    def median_total_ms(self) -> float | None:
        return statistics.median(self.totals_ms) if self.runs else None

    @property
    def representative(self) -> RunRecord | None:
        """The run with the median total (the lower middle one for an even count): its parts sum to its total."""
        if not self.runs:
            return None
        ordered = sorted(self.runs, key=lambda r: r.timings_ms["total"])
        return ordered[(len(ordered) - 1) // 2]

    @property
    def compile_s(self) -> float | None:
        return self.details.get("compile_s")


@dataclass
class CompareReport:
    """A comparison: configuration, environment, inputs, and one result per contender (in run order)."""

    config: dict
    environment: dict
    inputs: dict
    contenders: list[ContenderResult] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    created_utc: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def failed(self) -> list[ContenderResult]:
        return [c for c in self.contenders if c.status != "ok"]

    def raise_for_failures(self) -> None:
        """Raise FluxtrtError naming the failed contenders, if any (the report is complete either way)."""
        if self.failed:
            where = self.config.get("report_dir") or "the report"
            first = self.failed[0]
            raise FluxtrtError(
                f"{len(self.failed)} of {len(self.contenders)} contenders failed (first: {first.name}: {first.error}); "
                f"the others are measured in {where}: see its 'Failed contenders' section"
            )

    def baseline(self, base: str) -> ContenderResult | None:
        """The first successful stage contender derived from table stage ``base`` (``"0"``, ``"1"``)."""
        return next((c for c in self.contenders if c.kind == "stage" and c.base == base and c.ok), None)

    def speedup(self, result: ContenderResult, base: str) -> float | None:
        ref = self.baseline(base)
        if ref is None or not result.ok:
            return None
        return ref.median_total_ms / result.median_total_ms


def synthetic_image(resolution: Resolution) -> Any:
    """A deterministic smooth RGB test image (gradients and a disc) when no --image is given."""
    import numpy as np
    from PIL import Image

    h, w = resolution.height, resolution.width
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 0.5 + 0.5 * np.sin(x / w * 6.28)
    g = y / max(h - 1, 1)
    b = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 4) ** 2).astype(np.float32)
    return Image.fromarray((np.stack([r, g, b], axis=-1) * 255).astype(np.uint8))


def _error_text(exc: BaseException) -> str:
    text = first_line(exc, "")
    if isinstance(exc, FluxtrtError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def fill_fidelity(report: CompareReport) -> None:
    """Fidelity of every run against the first run of the stage-0 contender (none without one)."""
    ref = report.baseline("0")
    if ref is None:
        return
    ref_run = ref.runs[0]
    for result in report.contenders:
        for run in result.runs:
            if run.fidelity is None and run.image is not None and run.image.size == ref_run.image.size:
                run.fidelity = fidelity(run.image, run.latents, ref_run.image, ref_run.latents)


class _Comparison:
    """The state of one ``compare`` call."""

    def __init__(self, config: CompareConfig, emit: Callable[[dict], None]):
        self.config, self.emit = config, emit
        self.session = ModelSession(config.model, config.device, config.resolved_dtype, seed=0)
        if config.image is not None:
            from fluxtrt.pipeline.image import load_image

            self.image = load_image(config.image)
        else:
            self.image = synthetic_image(config.resolution or Resolution(1024, 1024))
        res = config.resolution
        self.size = (
            {"height": res.height, "width": res.width, "max_area": res.width * res.height} if res is not None else {}
        )

    def edit(self, pipeline: Any, sampler: Any) -> Any:
        c = self.config
        return pipeline.edit(self.image, c.prompt, sampler=sampler, seed=c.seed, guidance=c.guidance, **self.size)

    def run(self, contender: Contender) -> ContenderResult:
        c = self.config
        result = ContenderResult(contender.name, contender.kind, contender.base)
        self.emit({"event": "contender", "contender": contender.name, "kind": contender.kind})
        prepared = None
        try:
            t0 = time.perf_counter()
            prepared = contender.prepare(self.session)
            result.prepare_s = time.perf_counter() - t0
            result.load_s = prepared.load_s
            result.what, result.details = list(prepared.what), prepared.details()
            sampler = prepared.sampler
            result.sampler = f"{sampler.solver}/{sampler.sigmas}/{sampler.num_steps}"
            warm_sampler = replace(sampler, steps=c.warmup_steps) if c.warmup_steps is not None else sampler
            for i in range(c.warmup):
                prepared.begin_edit()
                _sync()
                t0 = time.perf_counter()
                self.edit(prepared.pipeline, warm_sampler)
                _sync()
                result.warmup_s.append(time.perf_counter() - t0)
                prepared.end_edit(None)
                self.emit({"event": "warmup", "contender": contender.name, "i": i, "seconds": result.warmup_s[-1]})
            result.first_call_s = result.warmup_s[0] if result.warmup_s else None
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()
            for i in range(c.runs):
                prepared.begin_edit()
                edit = self.edit(prepared.pipeline, sampler)
                cache = prepared.end_edit(edit)
                record = RunRecord(
                    run=i,
                    steps=edit.calls["transformer"],
                    timings_ms=dict(edit.timings_ms),
                    cache=cache,
                    image=edit.images[0],
                    latents=edit.latents,
                )
                result.runs.append(record)
                self.emit({"event": "run", "contender": contender.name, "run": i, "steps": record.steps,
                           "timings_ms": record.timings_ms, "cache": cache})  # fmt: skip
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                result.peak_gpu_mem_gib = torch.cuda.max_memory_allocated() / 2**30
            result.details = prepared.details()
        except Exception as exc:  # recorded in the report as this contender's failure; the others still run
            result.status, result.error = "failed", _error_text(exc)
            if prepared is not None:
                result.details = prepared.details()
        finally:
            after = prepared.after if prepared is not None else None
            del prepared
            free_device_memory()
        if after is not None and result.status == "ok":
            try:
                result.details["step_error"] = after(self.session)
            except Exception as exc:  # a missing reference must not fail the contender's timings
                result.details["step_error"] = {"error": _error_text(exc)}
            self.emit({"event": "step_error", "contender": contender.name, **result.details["step_error"]})
        return result

    def diffusers_check(self, report: CompareReport) -> None:
        """Harness-overhead check: stage 0's transformer ms/step against diffusers' own pipeline on the same modules."""
        from fluxtrt.bench.diffusers_check import diffusers_transformer_timing

        stage0 = report.baseline("0")
        staged = self.session.staged
        if stage0 is None or staged is None or staged.can_apply(_stage0()) is not None:
            report.checks["diffusers"] = {"status": "skipped", "reason": "no successful stage 0 on the loaded model"}
            return
        steps = stage0.runs[0].steps
        width, height = stage0.runs[0].image.size  # the target stage 0 edited, given to diffusers explicitly
        try:
            staged.apply(_stage0())  # diffusers' default processors, unfused, contiguous VAE
            theirs = diffusers_transformer_timing(
                staged.components, self.image, self.config.prompt, steps, self.config.seed, self.config.guidance,
                height=height, width=width, max_area=width * height,
            )  # fmt: skip
        except Exception as exc:
            report.checks["diffusers"] = {"status": "failed", "error": _error_text(exc)}
            return
        ours = statistics.median(r.transformer_ms_per_step for r in stage0.runs)
        ratio = ours / theirs["transformer_ms_per_step"]
        report.checks["diffusers"] = {
            "status": "ok",
            "stage": stage0.name,
            "steps": steps,
            "stage0_transformer_ms_per_step": ours,
            "diffusers_transformer_ms_per_step": theirs["transformer_ms_per_step"],
            "diffusers_transformer_calls": theirs["calls"],
            "diffusers_wall_s": theirs["wall_s"],
            "ratio": ratio,
            "within_3pct": abs(ratio - 1.0) < 0.03,
        }
        self.emit({"event": "check", "check": "diffusers", **report.checks["diffusers"]})


def _stage0():
    from fluxtrt.stages.config import STAGES

    return STAGES["0"]


def compare(
    config: CompareConfig,
    contenders: Sequence[Contender] | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> CompareReport:
    """Run every contender on the same image, prompt, seed and size; write the report after each one.

    Args:
        config: what to compare and how often.
        contenders: overrides the contenders that ``config.stages`` and ``config.engines`` name (e.g. to add a
            ``CustomContender``).
        on_event: called with a JSON-ready dict as things happen (contender start, warmup, run, check, done).

    Returns:
        The report; ``report.failed`` lists the contenders that failed (each with its error).

    Raises:
        DeviceError: ``--device cuda`` without a CUDA device.
        InputError: an unreadable --image.
    """
    from fluxtrt.environment import environment
    from fluxtrt.infer import check_device

    check_device(config.device)
    emit = on_event or (lambda _event: None)
    contenders = list(contenders) if contenders is not None else contenders_from_config(config.stages, config.engines)
    state = _Comparison(config, emit)
    report = CompareReport(
        config=config.to_dict(),
        environment=environment(),
        inputs={
            "prompt": config.prompt,
            "image": str(config.image) if config.image is not None else "synthetic",
            "image_size": f"{state.image.size[0]}x{state.image.size[1]}",
            "resolution": str(config.resolution) if config.resolution is not None else "reference's preferred",
            "seed": config.seed,
            "guidance": config.guidance,
        },
    )
    emit({"event": "start", "config": report.config, "environment": report.environment})
    try:
        for contender in contenders:
            result = state.run(contender)
            report.contenders.append(result)
            if config.diffusers_check and "diffusers" not in report.checks and result is report.baseline("0"):
                state.diffusers_check(report)
            fill_fidelity(report)
            if result.runs and "target" not in report.inputs:
                report.inputs["target"] = f"{result.runs[0].image.size[0]}x{result.runs[0].image.size[1]}"
            emit({"event": "done", **summary_row(report, result)})
            if config.report_dir is not None:
                from fluxtrt.bench.report import write_report

                write_report(report, config.report_dir)
    finally:
        state.session.release()
    return report


def summary_row(report: CompareReport, result: ContenderResult) -> dict:
    """The per-contender summary that report.json's ``contenders`` list holds."""
    rep = result.representative
    totals = result.totals_ms
    fids = [r.fidelity for r in result.runs if r.fidelity is not None]
    return {
        "contender": result.name,
        "kind": result.kind,
        "stage": result.base,
        "status": result.status,
        "error": result.error,
        "what": result.what,
        "sampler": result.sampler,
        "steps": rep.steps if rep else None,
        "runs": len(result.runs),
        "load_s": result.load_s,
        "prepare_s": result.prepare_s,
        "first_call_s": result.first_call_s,
        "compile_s": result.compile_s,
        "warmup_s": result.warmup_s,
        "median_total_ms": result.median_total_ms,
        "min_total_ms": min(totals) if totals else None,
        "max_total_ms": max(totals) if totals else None,
        "stdev_total_ms": statistics.stdev(totals) if len(totals) > 1 else None,
        "representative_run": rep.run if rep else None,
        "components_ms": {k: rep.timings_ms.get(k) for k in (*COMPONENTS, "total")} if rep else None,
        "transformer_ms_per_step": statistics.median(r.transformer_ms_per_step for r in result.runs)
        if result.runs
        else None,
        "speedup_vs_0": report.speedup(result, "0"),
        "speedup_vs_1": report.speedup(result, "1"),
        "peak_gpu_mem_gib": result.peak_gpu_mem_gib,
        "psnr_db": statistics.median(f["psnr_db"] for f in fids) if fids else None,
        "ssim": statistics.median(f["ssim"] for f in fids) if fids else None,
        "latent_cosine": statistics.median(f["latent_cosine"] for f in fids) if fids else None,
        "details": result.details,
    }
