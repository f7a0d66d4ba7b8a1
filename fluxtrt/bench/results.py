"""The data of a comparison: one record per timed edit, one result per contender, the report that holds them, and
the per-contender summary that the JSON, the Markdown and the console share."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fluxtrt.errors import FluxtrtError
from fluxtrt.specs.flux import COMPONENTS as MODEL_COMPONENTS

# What an edit's time is split into: the five components and the glue between them.
COMPONENTS = (*MODEL_COMPONENTS, "glue")


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
    foreign_cores: float | None = None  # CPU cores other processes kept busy during the edit (timing.HostLoad)

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
    peak_gpu_mem_gib: float | None = None  # allocated, during the timed edits, weights included
    peak_gpu_reserved_gib: float | None = None  # reserved by the caching allocator, same span
    prepare_peak_gpu_mem_gib: float | None = None  # allocated, from loading through the warmup edits

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.runs)

    @property
    def totals_ms(self) -> list[float]:
        return [r.timings_ms["total"] for r in self.runs]

    @property
    def representative(self) -> RunRecord | None:
        """The median run, the one row that stdout, report.md, report.json and the chart all show: the run with the
        median total, for an even count the lower of the two middle ones (``statistics.median_low``), so that its
        components sum to the total shown and the speed-ups are of totals that were measured."""
        if not self.runs:
            return None
        ordered = sorted(self.runs, key=lambda r: r.timings_ms["total"])
        return ordered[(len(ordered) - 1) // 2]

    @property
    def median_total_ms(self) -> float | None:
        """The median run's total (see ``representative``)."""
        rep = self.representative
        return rep.timings_ms["total"] if rep is not None else None

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
    def gpu(self) -> str | None:
        """The GPU the comparison ran on; None on the CPU (``run_gpu``)."""
        return run_gpu(self.config, self.environment)

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
        """Per edit: the baseline's median total over ``result``'s (step counts may differ)."""
        ref = self.baseline(base)
        if ref is None or not result.ok:
            return None
        return ref.median_total_ms / result.median_total_ms

    def speedup_per_step(self, result: ContenderResult, base: str) -> float | None:
        """Per step: the baseline's transformer ms per step over ``result``'s, each of its median run; apart from the
        step counts, which the per-edit speed-up includes (a 14-step row against a 28-step stage 0)."""
        ref = self.baseline(base)
        if ref is None or not result.ok:
            return None
        return ref.representative.transformer_ms_per_step / result.representative.transformer_ms_per_step


def run_gpu(config: dict, environment: dict) -> str | None:
    """The GPU a comparison ran on, from its report's ``config`` and ``environment``: None for a run on the CPU, also
    on a machine with a GPU (whose environment names it)."""
    if str(config.get("device", "cuda")).startswith("cpu"):
        return None
    return environment.get("gpu")


def summary_row(report: CompareReport, result: ContenderResult) -> dict:
    """The per-contender summary that report.json's ``contenders`` list holds, and stdout and report.md show: its
    times are those of the median run (``representative_run``); min, max and stdev are over all runs; fidelity is
    the median over runs."""
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
        "transformer_ms_per_step": rep.transformer_ms_per_step if rep else None,
        "speedup_vs_0": report.speedup(result, "0"),
        "speedup_vs_1": report.speedup(result, "1"),
        "speedup_per_step_vs_0": report.speedup_per_step(result, "0"),
        "speedup_per_step_vs_1": report.speedup_per_step(result, "1"),
        "peak_gpu_mem_gib": result.peak_gpu_mem_gib,
        "peak_gpu_reserved_gib": result.peak_gpu_reserved_gib,
        "prepare_peak_gpu_mem_gib": result.prepare_peak_gpu_mem_gib,
        "psnr_db": statistics.median(f["psnr_db"] for f in fids) if fids else None,
        "ssim": statistics.median(f["ssim"] for f in fids) if fids else None,
        "latent_cosine": statistics.median(f["latent_cosine"] for f in fids) if fids else None,
        "details": result.details,
    }
