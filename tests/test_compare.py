"""`fluxtrt compare` on the tiny model: the report's files and schema, failed contenders reported while the others
run, timings that add up, fidelity metrics with known values, the benchmark matrix, and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fluxtrt.backends.runner import Runner
from fluxtrt.errors import FluxtrtError, InputError
from fluxtrt.specs.flux import Resolution

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("clip", "t5", "vae_encoder", "transformer", "vae_decoder", "glue")


class NanTransformer(Runner):
    """A transformer runner whose every prediction is NaN."""

    def _infer(self, feed):
        return {"noise_pred": torch.full_like(feed["hidden_states"], float("nan"))}


def nan_runners(components):
    from fluxtrt.backends.torch_runner import torch_runners

    spec = torch_runners(components)["transformer"].spec
    return {"transformer": NanTransformer(spec, components.transformer.dtype)}


def broken_runners(components):
    raise RuntimeError("boom")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One comparison: stage 0, a NaN contender, a failing one, then stage 4 at 3 steps (no compile: CPU time)."""
    from fluxtrt.bench.compare import compare
    from fluxtrt.bench.config import CompareConfig
    from fluxtrt.bench.contenders import CustomContender, StageContender

    out = tmp_path_factory.mktemp("report")
    config = CompareConfig(
        model="tiny",
        stages=("0:steps=2", "4:compile=off:steps=3"),
        device="cpu",
        report_dir=out,
        resolution=Resolution(64, 64),
        runs=2,
        warmup=1,
        warmup_steps=1,
        diffusers_check=True,
    )
    contenders = [
        StageContender("0:steps=2"),
        CustomContender("nan", nan_runners, what="NaN transformer"),
        CustomContender("broken", broken_runners, what="raises"),
        StageContender("4:compile=off:steps=3"),
    ]
    events = []
    report = compare(config, contenders=contenders, on_event=events.append)
    return report, out, events


def test_report_files_exist_with_schema(compared):
    from fluxtrt.bench.report import ROW_KEYS, SCHEMA

    report, out, _ = compared
    data = json.loads((out / "report.json").read_text())
    assert data["schema"] == SCHEMA
    assert set(data) >= {"created_utc", "config", "environment", "inputs", "reference", "checks", "contenders", "rows"}
    assert data["environment"]["torch"] == torch.__version__
    assert data["reference"] == "0:steps=2"
    check = data["checks"]["diffusers"]  # harness overhead against diffusers' own pipeline (timing: GPU only)
    assert check["status"] == "ok" and check["steps"] == check["diffusers_transformer_calls"] == 2
    assert check["ratio"] > 0 and isinstance(check["within_3pct"], bool)
    assert [c["contender"] for c in data["contenders"]] == ["0:steps=2", "nan", "broken", "4:compile=off:steps=3"]
    rows = data["rows"]
    assert len(rows) == 2 + 1 + 1 + 2  # two runs each for the stages, one row for each failed contender
    for row in rows:
        assert tuple(row) == ROW_KEYS
        assert isinstance(row["contender"], str) and row["status"] in ("ok", "failed")
        assert row["kind"] in ("stage", "custom")
        if row["status"] == "ok":
            assert isinstance(row["run"], int) and isinstance(row["steps"], int) and row["steps"] in (2, 3)
            assert set(row["timings_ms"]) == {*PARTS, "total"}
            assert all(isinstance(v, float) for v in row["timings_ms"].values())
            for key in ("transformer_ms_per_step", "psnr_db", "ssim", "latent_cosine"):
                assert isinstance(row[key], float), key
            assert row["error"] is None
        else:
            assert row["run"] is None and row["timings_ms"] is None and isinstance(row["error"], str)
    cached = [r for r in rows if r["contender"].startswith("4")]
    assert all(r["cache_computed"] + r["cache_skipped"] == 3 for r in cached)
    assert all(isinstance(r["cache_computed_ms"], float) for r in cached)

    md = (out / "report.md").read_text().splitlines()
    from fluxtrt.bench.report import TIMING_HEADER

    start = md.index(TIMING_HEADER)
    table = []
    for line in md[start + 2 :]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert len(table) == 4
    assert [line.split("|")[1].strip() for line in table] == [c["contender"] for c in data["contenders"]]

    with Image.open(out / "report.png") as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
        img.verify()


def test_failed_contenders_are_reported_and_the_others_still_run(compared):
    report, out, events = compared
    by_name = {c.name: c for c in report.contenders}
    assert by_name["nan"].status == "failed" and "non-finite" in by_name["nan"].error
    assert by_name["broken"].status == "failed" and by_name["broken"].error == "RuntimeError: boom"
    assert by_name["0:steps=2"].ok and by_name["4:compile=off:steps=3"].ok
    assert len(by_name["4:compile=off:steps=3"].runs) == 2
    assert [e["contender"] for e in events if e["event"] == "done" and e["status"] == "failed"] == ["nan", "broken"]
    md = (out / "report.md").read_text()
    assert "## Failed contenders" in md and "RuntimeError: boom" in md
    with pytest.raises(FluxtrtError, match="2 of 4 contenders failed"):
        report.raise_for_failures()


def test_timings_are_positive_and_add_up(compared):
    report, _, _ = compared
    for c in report.contenders:
        for run in c.runs:
            t = run.timings_ms
            assert all(t[k] > 0 for k in (*PARTS[:-1], "total")), t
            assert t["total"] == pytest.approx(sum(t[k] for k in PARTS), rel=1e-9, abs=1e-9)
        if c.ok:
            assert c.warmup_s and c.first_call_s == c.warmup_s[0] > 0
            rep = c.representative
            assert rep.timings_ms["total"] == sorted(c.totals_ms)[0]  # lower middle of two runs


def test_fidelity_and_speedups(compared):
    from fluxtrt.bench.fidelity import PSNR_CAP_DB

    report, _, _ = compared
    stage0, stage4 = report.contenders[0], report.contenders[3]
    first = stage0.runs[0].fidelity
    assert first["psnr_db"] == PSNR_CAP_DB
    assert first["ssim"] == pytest.approx(1.0) and first["latent_cosine"] == pytest.approx(1.0)
    other = stage4.runs[0].fidelity  # 3 DPM-Solver++ steps against 2 Euler steps: a different trajectory
    assert other["psnr_db"] < PSNR_CAP_DB and other["ssim"] < 1.0 and other["latent_cosine"] < 1.0
    assert report.speedup(stage0, "0") == 1.0
    assert report.speedup(stage4, "0") == pytest.approx(stage0.median_total_ms / stage4.median_total_ms)
    assert report.speedup(stage4, "1") is None  # no stage-1 row
    details = stage4.details
    assert any("unavailable on cpu" in u for u in details["unavailable"])


def test_psnr_ssim_known_values():
    from fluxtrt.bench.fidelity import PSNR_CAP_DB, latent_cosine, psnr, ssim

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 40, generator=gen, dtype=torch.float64)
    assert psnr(a, a) == PSNR_CAP_DB and ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    b = (a + 0.1).clamp(0, 1)
    noisy = (a + 0.2 * torch.randn(a.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    assert ssim(a, noisy) < ssim(a, b) < 1.0
    assert psnr(a, torch.zeros_like(a) + a.mean()) < psnr(a, b)
    # Uniform error e: MSE = e^2, PSNR = -20 log10 e.
    assert psnr(torch.full((3, 8, 8), 0.5), torch.full((3, 8, 8), 0.6)) == pytest.approx(20.0)
    # Constant images (no variance): SSIM is the luminance term (2 mu_a mu_b + c1) / (mu_a^2 + mu_b^2 + c1).
    c1 = 0.01**2
    want = (2 * 0.3 * 0.6 + c1) / (0.3**2 + 0.6**2 + c1)
    assert ssim(torch.full((3, 16, 16), 0.3), torch.full((3, 16, 16), 0.6)) == pytest.approx(want)
    assert latent_cosine(torch.ones(4), -torch.ones(4)) == pytest.approx(-1.0)


def test_benchmark_matrix_is_a_valid_comparison(tmp_path):
    from fluxtrt.bench.matrix import load_matrix

    config = load_matrix(ROOT / "benchmarks" / "matrix.toml", report_dir=tmp_path)
    assert config.model == "random-full" and config.device == "cuda" and config.resolution == Resolution(1024, 1024)
    assert config.runs >= 3 and config.diffusers_check
    for stage in ("0", "1", "2", "3", "4", "4f", "4k"):
        assert stage in config.stages
        if stage != "0":
            assert f"{stage}:fbc=off" in config.stages
    quick = load_matrix(ROOT / "benchmarks" / "matrix.toml", overrides={"runs": 1, "stages": ["0"]})
    assert quick.runs == 1 and quick.stages == ("0",)
    bad = tmp_path / "bad.toml"
    bad.write_text('[compare]\nmodel = "tiny"\nrunz = 3\n')
    with pytest.raises(InputError, match="unknown keys runz"):
        load_matrix(bad)
    bad.write_text('[compare]\nmodel = "tiny"\nstages = ["0", "9"]\n')
    with pytest.raises(InputError, match="stage '9'"):
        load_matrix(bad)


def test_compare_config_validates_early(tmp_path):
    from fluxtrt.bench.config import CompareConfig

    for kwargs in ({"runs": 0}, {"warmup": -1}, {"stages": ("0", "0")}, {"stages": ()}, {"device": "tpu"}):
        with pytest.raises(InputError):
            CompareConfig(model="tiny", **kwargs)
    with pytest.raises(InputError, match="not a directory"):
        CompareConfig(model="tiny", engines=(tmp_path / "missing",))


def test_bench_and_stages_import_light():
    from tests.test_imports import HEAVY, imported_modules

    names = imported_modules("import fluxtrt.bench, fluxtrt.bench.config, fluxtrt.bench.matrix, fluxtrt.stages")
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


def test_cli_compare_writes_report_and_fails_on_a_failed_contender(tmp_path):
    """A stage and an engines directory that cannot load: the report is written, and the exit code says failure."""
    from fluxtrt.cli import main

    empty = tmp_path / "engines_empty_with_a_name_longer_than_a_table_column_would_keep_on_an_80_column_screen"
    empty.mkdir()
    out = tmp_path / "report"
    args = ["compare", "--model", "tiny", "--device", "cpu", "--stages", "0:steps=1", "--engines", str(empty)]
    args += ["--runs", "1", "--warmup", "0", "--resolution", "64x64", "--report", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"1 of 2 contenders failed (first: engines:{empty.name}" in errors[0]
    # The table and the report's paths are results (stdout), whole when piped; progress is on stderr.
    assert f"engines:{empty.name}" in result.stdout and "…" not in result.stdout
    assert f"wrote {out / 'report.md'}, report.json and report.png" in result.stdout
    assert "run 1:" in result.stderr and "run 1:" not in result.stdout
    data = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in data["contenders"]] == ["ok", "failed"]
    assert data["contenders"][1]["kind"] == "engines"

    bad = CliRunner().invoke(main, ["compare", "--model", "tiny", "--stages", "0,9", "--report", str(out)])
    assert bad.exit_code == 1 and "stage '9'" in bad.stderr


def test_host_load_counts_other_processes_not_this_one():
    """timing.HostLoad over a window where this process and a child each keep a core busy: the child is foreign load,
    this process's own work is not. The bounds hold whatever else the host runs meanwhile: the foreign load is at
    least the child's measured use, and at most the cores left once this process's measured use is taken out."""
    import subprocess
    import sys
    import time

    from fluxtrt.timing import HostLoad

    def cpu_s(pid: str) -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 6: pass"])
    try:
        time.sleep(0.5)  # the child's start-up
        child0, own0, t0 = cpu_s(str(busy.pid)), cpu_s("self"), time.perf_counter()
        with HostLoad() as load:
            while time.perf_counter() - t0 < 2.0:
                pass
        wall = time.perf_counter() - t0
        child, own = (cpu_s(str(busy.pid)) - child0) / wall, (cpu_s("self") - own0) / wall
    finally:
        busy.kill()
        busy.wait()
    tick = 0.15  # the jiffy counters' resolution over a 2 s window, both ends
    assert load.foreign_cores is not None and child > 0.1 and own > 0.1, (child, own)
    assert load.foreign_cores >= child - tick, (load.foreign_cores, child)
    assert load.foreign_cores <= os.cpu_count() - own + tick, (load.foreign_cores, own)


def test_report_warns_of_timings_taken_under_load(tiny):
    from fluxtrt.bench.report import report_markdown
    from fluxtrt.bench.results import CompareReport, ContenderResult, RunRecord

    timings = {k: 1.0 for k in ("clip", "t5", "vae_encoder", "transformer", "vae_decoder", "glue", "total")}
    quiet = ContenderResult("0", "stage", "0", runs=[RunRecord(0, 2, timings, foreign_cores=0.05)])
    loaded = ContenderResult("engines:e", "engines", None, runs=[RunRecord(0, 2, timings, foreign_cores=0.97)])
    report = CompareReport(config={"model": "tiny", "dtype": "fp32", "runs": 1, "warmup": 2, "warmup_steps": 2},
                           environment={"cpu": "x86_64"},
                           inputs={"image_size": "64x64", "image": "synthetic", "prompt": "p", "seed": 0})  # fmt: skip
    report.contenders = [quiet]
    assert "Warning" not in report_markdown(report)
    report.contenders = [quiet, loaded]
    text = report_markdown(report)
    assert "other processes kept up to 1.0 CPU cores busy during timed edits of engines:e" in text


def test_cli_compare_prompt_cache_skips_the_text_encoders_after_the_first_edit(tmp_path):
    from fluxtrt.cli import main

    out = tmp_path / "report"
    args = ["compare", "--model", "tiny", "--device", "cpu", "--stages", "0:steps=1", "--runs", "2", "--warmup", "0"]
    result = CliRunner().invoke(main, [*args, "--resolution", "64x64", "--prompt-cache", "--report", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert data["config"]["prompt_cache"] is True
    first, second = (row["timings_ms"] for row in data["rows"])
    assert first["clip"] > 0 and first["t5"] > 0  # the first edit encodes the prompt
    assert second["clip"] == second["t5"] == 0.0  # the second reuses it
    assert "--prompt-cache" in (out / "report.md").read_text()


def test_the_step_error_reference_is_fp32_or_says_why_not():
    """``as_fp32_where_it_fits``: a BF16 transformer becomes exactly its FP32 upcast where its device has room for
    the FP32 weights (2 more bytes a parameter) and one call's activations; with a byte less it is left untouched
    in BF16 and the reference names the memory needed and free, before anything could run out of memory."""
    from fluxtrt.bench.step_error import ACTIVATION_BYTES_PER_TOKEN_WIDTH, as_fp32_where_it_fits
    from fluxtrt.models import load_components

    transformer = load_components("tiny", "cpu", "bf16").transformer
    weights = {n: w.clone() for n, w in transformer.state_dict().items()}
    tokens, width = 512, 2 * 16  # the tiny transformer: 2 heads of 16
    needed = 2 * sum(p.numel() for p in transformer.parameters()) + tokens * width * ACTIVATION_BYTES_PER_TOKEN_WIDTH
    got = as_fp32_where_it_fits(transformer, tokens, free=needed - 1)
    assert got == f"bf16 (fp32 needs {needed / 2**30:.1f} GiB more, {(needed - 1) / 2**30:.1f} GiB free on the GPU)"
    for n, w in transformer.state_dict().items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, weights[n]), n
    assert as_fp32_where_it_fits(transformer, tokens, free=needed) == "fp32"
    for n, w in transformer.state_dict().items():
        assert w.dtype == torch.float32 and torch.equal(w, weights[n].float()), n


def test_an_out_of_memory_failure_is_one_short_line_in_the_report():
    """A contender that runs out of GPU memory is recorded with the memory it met, not the allocator's paragraph."""
    from fluxtrt.bench.compare import _error_text

    allocator = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is "
        "free. Of the allocated memory 75.1 GiB is allocated by PyTorch, and 1.2 GiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF="
        "expandable_segments:True to avoid fragmentation."
    )
    text = _error_text(torch.OutOfMemoryError(allocator))
    assert text.startswith("out of GPU memory (") and "\n" not in text and len(text) < 160
    assert "Tried to allocate" not in text and "PYTORCH_CUDA_ALLOC_CONF" not in text
