"""Writers of a comparison: report.json (the data), report.md (the table) and report.png (the chart).

report.json, schema ``fluxtrt-compare/1``::

    schema        "fluxtrt-compare/1"
    created_utc   ISO 8601 time of the comparison's start
    config        the CompareConfig (paths and sizes as strings)
    environment   fluxtrt.environment.environment(): GPU, driver, CUDA, cuDNN, torch, diffusers, TensorRT, commit
    inputs        prompt, image, image_size, resolution, target, seed, guidance
    reference     the stage-0 contender fidelity is measured against (null without one)
    checks        {"diffusers": {...}} when the harness-overhead check ran
    chart         renderer of report.png: "matplotlib" or "pillow"
    contenders    one summary per contender, in run order (see ``fluxtrt.bench.results.summary_row``): the times of
                  its median run (``representative_run``; ``median_total_ms`` is that run's total, for an even count
                  the lower middle one), speed-ups per edit (``speedup_vs_0``) and per transformer step
                  (``speedup_per_step_vs_0``)
    rows          one per contender and timed run (a contender that failed before its first run: one row, run null)

Each row has exactly ``ROW_KEYS``:

    contender (str), kind ("stage" | "engines" | "custom"), stage (str | null: the table stage it derives from),
    status ("ok" | "failed"), error (str | null), run (int | null, 0-based), steps (int | null: transformer calls),
    sampler (str | null: solver/sigmas/steps), timings_ms ({clip, t5, vae_encoder, transformer, vae_decoder, glue,
    total}: float ms | null; total = the other six summed, glue being everything between components),
    transformer_ms_per_step (float | null), cache_computed, cache_skipped (int | null: first-block-cache steps),
    cache_computed_ms, cache_skipped_ms (float | null: mean ms of a computed / skipped step), psnr_db, ssim,
    latent_cosine (float | null: against the reference's first run; PSNR capped at 100 dB for identical images),
    peak_gpu_mem_gib (float | null: peak allocated during the contender's timed runs, weights included),
    foreign_cores (float | null: CPU cores other processes kept busy during the run; see ``HOST_LOAD_LIMIT``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fluxtrt.bench.chart import write_chart
from fluxtrt.bench.results import COMPONENTS, CompareReport, ContenderResult, run_gpu, summary_row
from fluxtrt.io import atomic_write

SCHEMA = "fluxtrt-compare/1"
ROW_KEYS = (
    "contender",
    "kind",
    "stage",
    "status",
    "error",
    "run",
    "steps",
    "sampler",
    "timings_ms",
    "transformer_ms_per_step",
    "cache_computed",
    "cache_skipped",
    "cache_computed_ms",
    "cache_skipped_ms",
    "psnr_db",
    "ssim",
    "latent_cosine",
    "peak_gpu_mem_gib",
    "foreign_cores",
)
TIMING_HEADER = (
    "| stage | what is on | steps | CLIP ms | T5 ms | VAE enc ms | transformer ms (per step) | VAE dec ms | glue ms "
    "| total ms (min-max) | vs stage 0: edit, step | vs stage 1: edit, step |"
)
FILES = ("report.json", "report.md", "report.png")
# Other processes keeping more CPU cores than this busy during a timed CPU edit make its timing incomparable.
HOST_LOAD_LIMIT = 0.2


def rows(report: CompareReport) -> list[dict[str, Any]]:
    """One JSON row per contender and timed run (``ROW_KEYS``)."""
    out = []
    for c in report.contenders:
        common = {"contender": c.name, "kind": c.kind, "stage": c.base, "status": c.status, "error": c.error}
        if not c.runs:
            out.append({**dict.fromkeys(ROW_KEYS), **common, "sampler": c.sampler, "peak_gpu_mem_gib": None})
            continue
        for r in c.runs:
            cache, fid = r.cache or {}, r.fidelity or {}
            out.append(
                {
                    **common,
                    "run": r.run,
                    "steps": r.steps,
                    "sampler": c.sampler,
                    "timings_ms": {k: float(r.timings_ms[k]) for k in (*COMPONENTS, "total")},
                    "transformer_ms_per_step": r.transformer_ms_per_step,
                    "cache_computed": cache.get("computed"),
                    "cache_skipped": cache.get("skipped"),
                    "cache_computed_ms": cache.get("mean_computed_ms"),
                    "cache_skipped_ms": cache.get("mean_skipped_ms"),
                    "psnr_db": fid.get("psnr_db"),
                    "ssim": fid.get("ssim"),
                    "latent_cosine": fid.get("latent_cosine"),
                    "peak_gpu_mem_gib": c.peak_gpu_mem_gib,
                    "foreign_cores": r.foreign_cores,
                }
            )
    return out


def json_safe(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def report_json(report: CompareReport, chart: str) -> dict[str, Any]:
    ref = report.baseline("0")
    return json_safe(
        {
            "schema": SCHEMA,
            "created_utc": report.created_utc,
            "config": report.config,
            "environment": report.environment,
            "inputs": report.inputs,
            "reference": ref.name if ref is not None else None,
            "checks": report.checks,
            "chart": chart,
            "contenders": [summary_row(report, c) for c in report.contenders],
            "rows": rows(report),
        }
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def timing_row(report: CompareReport, c: ContenderResult) -> str:
    rep = c.representative
    if rep is None:
        return f"| {c.name} | **failed** ({c.kind}) | - | - | - | - | - | - | - | - | - | - |"
    t = rep.timings_ms
    totals = c.totals_ms
    what = ", ".join(c.what) + (" (failed, see below)" if c.status != "ok" else "")
    return (
        f"| {c.name} | {what} | {rep.steps} ({c.sampler}) | {_ms(t['clip'])} | {_ms(t['t5'])} | "
        f"{_ms(t['vae_encoder'])} | {_ms(t['transformer'])} ({rep.transformer_ms_per_step:.1f}) | "
        f"{_ms(t['vae_decoder'])} | {_ms(t['glue'])} | {_ms(t['total'])} ({_ms(min(totals))}-{_ms(max(totals))}) | "
        f"{_speedups(report, c, '0')} | {_speedups(report, c, '1')} |"
    )


def _speedups(report: CompareReport, c: ContenderResult, base: str) -> str:
    """Per edit, then per transformer step: "2.10x, 1.05x"."""
    edit, step = report.speedup(c, base), report.speedup_per_step(c, base)
    return "-" if edit is None else f"{_x(edit)}, {_x(step)}"


def report_markdown(report: CompareReport) -> str:
    env = report.environment
    cfg = report.config
    inp = report.inputs
    device = report.gpu or f"CPU ({env.get('cpu')})"
    lines = [
        f"# fluxtrt compare: {cfg['model']} on {device}",
        "",
        f'{inp.get("target", "?")} edit of a {inp["image_size"]} {inp["image"]} reference, prompt "{inp["prompt"]}", '
        f"seed {inp['seed']}, {cfg['dtype']}; {cfg['runs']} timed runs per contender after {cfg['warmup']} warmup "
        f"edit(s) of {cfg['warmup_steps'] or 'all'} steps. Each row is its median run (for an even count of runs, the "
        "lower of the two middle ones), as on stdout, in report.json and on the chart: its components sum to its "
        "total, shown with the min-max over runs. Speed-ups are against the first stage-0 and stage-1 rows, per edit "
        "(median totals, whatever the step counts) and per step (transformer ms per step)."
        + (
            " Prompt embeddings are reused after each contender's first edit (--prompt-cache): the timed edits run "
            "neither CLIP nor T5."
            if cfg.get("prompt_cache")
            else ""
        )
        + _lora_note(cfg),
        "",
        TIMING_HEADER,
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(timing_row(report, c) for c in report.contenders),
        "",
        "| stage | attention kernel | linears | compile | first call s | compile s | peak GPU GiB | PSNR dB | SSIM "
        "| latent cos | first-block cache: computed/skipped steps, ms per computed/skipped step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_details_row(report, c) for c in report.contenders]
    lines += [
        "",
        "Fidelity is against the first run of the first stage-0 row, on the decoded 8-bit image and the final latents.",
    ]
    lines += _cache_notes(report)
    lines += _vae_and_memory_notes(report)
    lines += _host_load_warning(report)
    lines += _step_error_section(report)
    notes = [(c.name, u) for c in report.contenders for u in c.details.get("unavailable", [])]
    if notes:
        lines += ["", "## Not available here (the stage ran without it)", ""]
        lines += [f"- {name}: {u}" for name, u in notes]
    failed = report.failed
    if failed:
        lines += ["", "## Failed contenders", ""]
        lines += [f"- {c.name} ({c.kind}): {c.error}" for c in failed]
    check = report.checks.get("diffusers")
    if check:
        lines += ["", "## Harness overhead: stage 0 against diffusers' FluxKontextPipeline", ""]
        if check.get("status") == "ok":
            lines.append(
                f"Transformer per step over {check['steps']} steps: fluxtrt stage 0 "
                f"{check['stage0_transformer_ms_per_step']:.1f} ms, diffusers "
                f"{check['diffusers_transformer_ms_per_step']:.1f} ms, ratio {check['ratio']:.4f} "
                f"({'within' if check['within_3pct'] else 'NOT within'} 3%)."
            )
        else:
            lines.append(f"{check.get('status')}: {check.get('error') or check.get('reason')}")
    lines += ["", "## Environment", "", "```", json.dumps(env, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


def _lora_note(cfg: dict) -> str:
    """The sentence naming the LoRAs every row edits with (--lora), or nothing."""
    loras = cfg.get("loras") or []
    if not loras:
        return ""
    named = ", ".join(f"{Path(lora['file']).name} at scale {lora['scale']:g}" for lora in loras)
    return (f" Every row edits with the LoRA {named}: fused into the stages' PyTorch model, merged into the engines' "
            "transformer weights.")  # fmt: skip


def _details_row(report: CompareReport, c: ContenderResult) -> str:
    s = summary_row(report, c)
    d = c.details or {}
    rep = c.representative
    cache = rep.cache if rep is not None else None
    cache_text = (
        f"{cache['computed']}/{cache['skipped']}, {_ms(cache['mean_computed_ms'])}/{_ms(cache['mean_skipped_ms'])}"
        if cache
        else "off"
    )
    return (
        f"| {c.name} | {d.get('attention', '-')} | {d.get('quant', '-')} | {d.get('compile', '-')} | "
        f"{_num(c.first_call_s, '.1f')} | {_num(c.compile_s, '.1f')} | {_num(c.peak_gpu_mem_gib, '.1f')} | "
        f"{_num(s['psnr_db'], '.2f')} | {_num(s['ssim'], '.4f')} | {_num(s['latent_cosine'], '.4f')} | "
        f"{cache_text} |"
    )


def _cache_notes(report: CompareReport) -> list[str]:
    lines: list[str] = []
    if any(c.details.get("first_block_cache") is not None for c in report.contenders):
        lines += [
            "",
            "First-block cache: how many steps are skipped depends on the real weights (with random weights the skip "
            "rate means nothing). With C ms per computed and S ms per skipped step, an edit of N steps of which K skip "
            "costs (N - K) C + K S ms in the transformer: use the two costs above to predict the gain on a checkpoint.",
        ]
        forced = [c.name for c in report.contenders if c.details.get("first_block_cache") == math.inf]
        if forced:
            lines.append(
                f"Rows {', '.join(forced)} use threshold inf: every step after the first reuses the cache. They "
                "measure what a skipped step costs; they are not usable edits, and their speed-ups are not a result."
            )
    return lines


SLIM_VAE = "slim VAE (AutoencoderTiny)"


def _vae_and_memory_notes(report: CompareReport) -> list[str]:
    """What the slim-VAE rows' fidelity means, and every row's GPU memory when a low-VRAM row is among them."""
    lines: list[str] = []
    cfg = report.config
    slim = [c.name for c in report.contenders if SLIM_VAE in c.details.get("features", [])]
    if slim:
        lines += ["", f"Rows {', '.join(slim)} encode and decode with the slim autoencoder (AutoencoderTiny, TAEF1's "
                  "architecture) instead of the FLUX VAE; their fidelity is against stage 0's FLUX VAE."]  # fmt: skip
        random = [
            what
            for what, synthetic in (
                ("the model", cfg["model"] in ("tiny", "random-full")),
                ("the slim autoencoder", cfg.get("vae") in (None, "tiny")),
            )
            if synthetic
        ]
        if random:  # fmt: skip
            lines.append(
                f"**The weights of {' and '.join(random)} are random here, so that fidelity is meaningless:** only the "
                "timings count. Measure it with a real checkpoint and --vae DIR (a download of madebyollin/taef1)."
            )
    low = [c for c in report.contenders if c.details.get("low_vram")]
    if low and report.gpu:
        lines += ["", "GPU memory, GiB (torch.cuda max_memory_allocated / max_memory_reserved): timed edits; "
                  "allocated from loading through the warmup edits:", ""]  # fmt: skip
        lines += [f"- {c.name}: {_num(c.peak_gpu_mem_gib, '.2f')} / {_num(c.peak_gpu_reserved_gib, '.2f')}; "
                  f"{_num(c.prepare_peak_gpu_mem_gib, '.2f')}" for c in report.contenders]  # fmt: skip
    return lines


def _step_error_section(report: CompareReport) -> list[str]:
    lines: list[str] = []
    errors = [(c.name, c.details["step_error"]) for c in report.contenders if c.details.get("step_error")]
    if errors:
        lines += [
            "",
            "## Engines: per-step transformer error against PyTorch",
            "",
            "Every step's engine output against the PyTorch transformer of the same weights, computed in FP32 "
            "where the GPU had room (else at the engines' precision, which in BF16 carries its own error: "
            "diffusers rounds timestep and guidance to BF16), on the engine's own inputs of that step (relative L2 "
            "over the step's noise prediction).",
            "",
        ]
        for name, e in errors:
            if "error" in e:
                lines.append(f"- {name}: not measured ({e['error']})")
            else:
                worst = max(range(len(e["rel_l2"])), key=e["rel_l2"].__getitem__)
                lines.append(
                    f"- {name} ({e['precision']}, against PyTorch {e.get('reference', 'at that precision')}): "
                    f"{e['steps']} steps, relative L2 max {e['max_rel_l2']:.2e} (step "
                    f"{worst}), max abs {max(e['max_abs']):.2e}"
                )
    return lines


def _host_load_warning(report: CompareReport) -> list[str]:
    """A warning when other processes used the CPU during timed edits of a CPU comparison."""
    if report.gpu:
        return []
    loaded = [(c.name, r.foreign_cores) for c in report.contenders for r in c.runs
              if r.foreign_cores is not None and r.foreign_cores > HOST_LOAD_LIMIT]  # fmt: skip
    if not loaded:
        return []
    worst = max(load for _, load in loaded)
    names = ", ".join(dict.fromkeys(name for name, _ in loaded))
    return ["", f"**Warning:** other processes kept up to {worst:.1f} CPU cores busy during timed edits of {names}: "
            "those timings are not comparable with the others; rerun on a quiet machine."]  # fmt: skip


def write_report(report: CompareReport, directory: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``directory`` (atomically, each replacing the last)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in FILES}
    bars = [(c.name, rep.timings_ms, rep.steps) for c in report.contenders if (rep := c.representative) is not None]
    title = chart_title(report.config, report.environment, report.inputs)
    chart: list[str] = []
    atomic_write(paths["report.png"], lambda tmp: chart.append(write_chart(bars, tmp, title)))
    data = report_json(report, chart[0])
    atomic_write(paths["report.json"], lambda tmp: tmp.write_text(json.dumps(data, indent=1, allow_nan=False)))
    atomic_write(paths["report.md"], lambda tmp: tmp.write_text(report_markdown(report)))
    return paths


def chart_title(config: dict, environment: dict, inputs: dict) -> str:
    machine = run_gpu(config, environment) or "CPU"
    return f"fluxtrt compare: {config['model']} on {machine}, {inputs.get('target', '')} edit"


def redraw_chart(data: dict, path: Path, renderer: str | None = None) -> str:
    """Draw report.png again from a report.json's ``data`` (the same bars: each contender's median run), e.g. with
    another renderer (``"pillow"``); returns the renderer used."""
    bars = [(c["contender"], c["components_ms"], c.get("steps")) for c in data["contenders"] if c.get("components_ms")]
    title = chart_title(data["config"], data["environment"], data["inputs"])
    return write_chart(bars, path, title, renderer)
