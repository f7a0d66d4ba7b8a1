"""``compare``: every contender on identical inputs, one at a time, timed per component, with fidelity to stage 0.

Per contender: prepare (load/apply; its seconds reported), ``warmup`` untimed edits (the first one's wall time is the
first-call time, compilation included), then ``runs`` timed edits whose per-component milliseconds come from the
pipeline's ComponentTimer (CUDA events on a GPU). A contender that raises, or whose edit is not finite, is recorded
as failed with its error and the next one runs. Device memory is freed between contenders.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from fluxtrt.bench.config import CompareConfig
from fluxtrt.bench.contenders import Contender, ModelSession, contenders_from_config
from fluxtrt.bench.fidelity import fidelity
from fluxtrt.bench.results import CompareReport, ContenderResult, RunRecord, summary_row
from fluxtrt.environment import free_device_memory
from fluxtrt.errors import FluxtrtError, first_line
from fluxtrt.pipeline.kontext import DEFAULT_PROMPT_CACHE
from fluxtrt.specs.flux import Resolution
from fluxtrt.timing import HostLoad, sync


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
    """One line for the report: a FluxtrtError's message, an out-of-memory error as the memory it met (never the
    allocator's paragraph), else ``Type: first line``."""
    if isinstance(exc, torch.OutOfMemoryError):
        free, total = torch.cuda.mem_get_info() if torch.cuda.is_available() else (0, 0)
        return (f"out of GPU memory ({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after the failure): run "
                "this contender alone, or on a GPU with more memory")  # fmt: skip
    text = first_line(exc, "")
    if isinstance(exc, FluxtrtError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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

    def __init__(self, config: CompareConfig, emit: Callable[[dict], None], world: Any = None, loras: Any = ()):
        self.config, self.emit = config, emit
        self.session = ModelSession(config.model, config.resolved_device, config.resolved_dtype, seed=0, world=world,
                                    tiny_vae=config.vae or "tiny", loras=loras)  # fmt: skip
        if config.image is not None:
            from fluxtrt.pipeline.image import load_image

            self.image, notices = load_image(config.image)
            for notice in notices:
                emit({"event": "notice", "text": notice})
        else:
            self.image = synthetic_image(config.resolution or Resolution(1024, 1024))
        res = config.resolution
        self.size = (
            {"height": res.height, "width": res.width, "max_area": res.width * res.height} if res is not None else {}
        )

    def edit(self, pipeline: Any, sampler: Any) -> Any:
        c = self.config
        return pipeline.edit(self.image, c.prompt, sampler=sampler, seed=c.seed, guidance=c.guidance, **self.size)

    def check_split(self) -> None:
        """With --gpus: refuse, before any contender runs, an edit whose tokens do not split over the processes
        (the model is loaded for its sizes, as the first contender would load it)."""
        from fluxtrt.pipeline.kontext import DEFAULT_MAX_AREA, KontextPipeline
        from fluxtrt.pipeline.sizes import check_sequence

        pipeline = KontextPipeline.from_components(self.session.staged_for(_stage0()).components)
        s = self.size
        max_area = s.get("max_area", DEFAULT_MAX_AREA)
        geometry = pipeline.geometry(self.image.size, s.get("height"), s.get("width"), max_area)
        check_sequence(pipeline.dims, *geometry, self.session.world.size)

    def run(self, contender: Contender) -> ContenderResult:
        c = self.config
        result = ContenderResult(contender.name, contender.kind, contender.base)
        self.emit({"event": "contender", "contender": contender.name, "kind": contender.kind})
        prepared = None
        cuda = torch.cuda.is_available() and torch.device(self.session.device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            prepared = contender.prepare(self.session)
            result.prepare_s = time.perf_counter() - t0
            result.load_s = prepared.load_s
            prepared.pipeline.prompt_cache = DEFAULT_PROMPT_CACHE if c.prompt_cache else 0
            result.what, result.details = list(prepared.what), prepared.details()
            sampler = prepared.sampler
            result.sampler = f"{sampler.solver}/{sampler.sigmas}/{sampler.num_steps}"
            warm_sampler = replace(sampler, steps=c.warmup_steps) if c.warmup_steps is not None else sampler
            for i in range(c.warmup):
                prepared.begin_edit()
                sync()
                t0 = time.perf_counter()
                self.edit(prepared.pipeline, warm_sampler)
                sync()
                result.warmup_s.append(time.perf_counter() - t0)
                prepared.end_edit(None)
                self.emit({"event": "warmup", "contender": contender.name, "i": i, "seconds": result.warmup_s[-1]})
            result.first_call_s = result.warmup_s[0] if result.warmup_s else None
            if cuda:  # loading, compiling and warming up: what a process that starts with this contender must fit
                result.prepare_peak_gpu_mem_gib = torch.cuda.max_memory_allocated() / 2**30
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()
            for i in range(c.runs):
                if self.session.world is not None:
                    self.session.world.barrier()
                result.runs.append(self._timed_edit(contender, prepared, sampler, i))
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                result.peak_gpu_mem_gib = torch.cuda.max_memory_allocated() / 2**30
                result.peak_gpu_reserved_gib = torch.cuda.max_memory_reserved() / 2**30
            result.details = prepared.details()
        except Exception as exc:  # recorded in the report as this contender's failure; the others still run
            result.status, result.error = "failed", _error_text(exc)
            if prepared is not None:
                result.details = prepared.details()
        finally:
            after = prepared.after if prepared is not None else None
            if prepared is not None:
                prepared.close()
            del prepared
            free_device_memory()
        if after is not None and result.status == "ok":
            try:
                result.details["step_error"] = after(self.session)
            except Exception as exc:  # a missing reference must not fail the contender's timings
                result.details["step_error"] = {"error": _error_text(exc)}
            self.emit({"event": "step_error", "contender": contender.name, **result.details["step_error"]})
        return result

    def _timed_edit(self, contender: Contender, prepared: Any, sampler: Any, i: int) -> RunRecord:
        """Timed edit ``i`` of a prepared contender, with the CPU load other processes put on the machine meanwhile."""
        prepared.begin_edit()
        with HostLoad() as load:
            edit = self.edit(prepared.pipeline, sampler)
        cache = prepared.end_edit(edit)
        record = RunRecord(run=i, steps=edit.calls["transformer"], timings_ms=dict(edit.timings_ms), cache=cache,
                           image=edit.images[0], latents=edit.latents, foreign_cores=load.foreign_cores)  # fmt: skip
        self.emit({"event": "run", "contender": contender.name, "run": i, "steps": record.steps,
                   "timings_ms": record.timings_ms, "cache": cache, "foreign_cores": record.foreign_cores})  # fmt: skip
        return record

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
        ours = stage0.representative.transformer_ms_per_step  # of its median run, as every table shows it
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

    With ``config.gpus`` > 1 this runs in each of the processes ``fluxtrt.parallel.launch`` started, every stage's
    transformer split over them; rank 0 alone emits events and writes the report.

    Raises:
        DeviceError: ``--device cuda`` without a CUDA device.
        InputError: an unreadable --image, a LoRA that cannot be read, or an edit whose sequence does not split over
            ``config.gpus``.
    """
    from fluxtrt.environment import check_device, environment
    from fluxtrt.lora.files import read_loras

    loras = read_loras(config.loras)  # a bad LoRA fails the comparison before anything is loaded
    check_device(config.resolved_device)
    world = None
    if config.gpus > 1:
        from fluxtrt.parallel.context import init_world

        world = init_world(config.gpus, config.resolved_device)
    emit = on_event if on_event is not None and (world is None or world.main) else (lambda _event: None)
    contenders = (
        list(contenders)
        if contenders is not None
        else contenders_from_config(config.stages, config.engines, config.engines_fbc_threshold)
    )
    state = _Comparison(config, emit, world, loras)
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
        if world is not None:
            state.check_split()
        for contender in contenders:
            result = state.run(contender)
            report.contenders.append(result)
            if config.diffusers_check and "diffusers" not in report.checks and result is report.baseline("0"):
                state.diffusers_check(report)
            fill_fidelity(report)
            if result.runs and "target" not in report.inputs:
                report.inputs["target"] = f"{result.runs[0].image.size[0]}x{result.runs[0].image.size[1]}"
            emit({"event": "done", **summary_row(report, result)})
            if config.report_dir is not None and (world is None or world.main):
                from fluxtrt.bench.report import write_report

                write_report(report, config.report_dir)
    finally:
        state.session.release()
        if world is not None:
            world.close()
    return report
