"""benchmarks/failures.py and Records.phase: a benchmark phase that fails for real (a fluxtrt command that exits with
its error, a Python process or block that raises a long multi-line message) is one record with a one-line reason, the
full output in a log beside the JSON, and the phases after it still run (or are skipped, saying why)."""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from benchmarks.failures import FLUXTRT_REASON_CHARS, REASON_CHARS, output_reason, run_logged
from benchmarks.records import Records, build_then_measure, run_build

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

# A CUDA error as PyTorch raises it: a first sentence, a long tail, and more lines after it.
CUDA_ERROR = ("CUDA error: an illegal memory access was encountered. " + "Kernel state follows: " + "0x7f " * 100
              + "\nCUDA kernel errors might be asynchronously reported at some other API call."
              "\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1")  # fmt: skip
OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.23 GiB is "
       "free. Including non-PyTorch memory, this process has 77.94 GiB memory in use. Of the allocated memory 76.10 "
       "GiB is allocated by PyTorch, and 1.20 GiB is reserved by PyTorch but unallocated. If reserved but "
       "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
       "fragmentation.")  # fmt: skip


def records_of(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def assert_one_line(reason: str, limit: int = REASON_CHARS) -> None:
    assert "\n" not in reason and 0 < len(reason) <= limit


def test_a_fluxtrt_error_is_the_reason_and_the_next_phase_runs(tmp_path):
    records = Records(tmp_path / "run.json")
    missing = tmp_path / "no-engines"
    with records.phase("inspect"):
        cmd = [sys.executable, "-m", "fluxtrt", "inspect", str(missing)]
        run_logged(cmd, records.logs, "inspect", env=ENV, cwd=ROOT).check()
    with records.phase("next"):
        records.emit({"phase": "next", "value": 1})

    failed, after = records_of(tmp_path / "run.json")
    assert failed["phase"] == "inspect" and failed["status"] == "failed" and failed["returncode"] == 1
    assert_one_line(failed["reason"], FLUXTRT_REASON_CHARS)  # fluxtrt's own line, whole: it ends in the fix
    assert str(missing) in failed["reason"]
    log = (tmp_path / failed["log"]).read_text()  # the log is named relative to the JSON's folder
    assert f"error: {failed['reason']}\n" in log  # the line fluxtrt printed, without its "error: "
    assert (after["phase"], after["value"]) == ("next", 1)


def test_a_child_traceback_is_its_exception_line_cut_at_a_sentence(tmp_path):
    records = Records(tmp_path / "run.json")
    with records.phase("measure"):
        code = f"import sys; print('step 1 ok'); raise RuntimeError({CUDA_ERROR!r})"
        run_logged([sys.executable, "-c", code], records.logs, "measure").check()
    with records.phase("measure"):  # the same phase again: a second log, the first kept
        run_logged([sys.executable, "-c", "import sys; sys.exit(3)"], records.logs, "measure").check()
    records.emit({"phase": "summary"})

    first, second, summary = records_of(tmp_path / "run.json")
    assert first["reason"] == "RuntimeError: CUDA error: an illegal memory access was encountered."
    log = (tmp_path / first["log"]).read_text()
    assert "Traceback (most recent call last):" in log and "step 1 ok" in log
    assert "CUDA_LAUNCH_BLOCKING=1" in log and "0x7f " * 100 in log
    assert second["reason"] == "exit 3" and second["log"] != first["log"]
    assert (tmp_path / second["log"]).is_file()
    assert summary["phase"] == "summary"
    assert "CUDA_LAUNCH_BLOCKING" not in (tmp_path / "run.json").read_text()


def test_an_exception_in_the_block_is_one_line_and_its_traceback_is_logged(tmp_path, capsys):
    records = Records(tmp_path / "run.json")

    def allocate():
        raise torch.OutOfMemoryError(OOM)

    with records.phase("torch_stage", stage="3:fbc=off") as stage:
        allocate()
    with records.phase("torch_stage", stage="4"):
        raise ValueError(CUDA_ERROR)
    with records.phase("summary"):
        records.emit({"phase": "summary", "ok": True})

    oom, long, summary = records_of(tmp_path / "run.json")
    assert stage.failed and oom["stage"] == "3:fbc=off" and oom["status"] == "failed"
    # Whole sentences while they fit: what was asked and what was free, not the allocator's advice.
    assert oom["reason"] == ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
                             "total capacity of 79.19 GiB of which 1.23 GiB is free.")  # fmt: skip
    log = (tmp_path / oom["log"]).read_text()
    assert "in allocate" in log and "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in log
    assert long["reason"] == "ValueError: CUDA error: an illegal memory access was encountered."
    assert "CUDA_LAUNCH_BLOCKING=1" in (tmp_path / long["log"]).read_text()
    assert summary == {**summary, "phase": "summary", "ok": True}
    assert records.failed == ["torch_stage", "torch_stage"]
    out = capsys.readouterr().out  # stdout: one JSON line per record, no traceback
    assert len(out.splitlines()) == 3 and "Traceback" not in out and "PYTORCH_CUDA_ALLOC_CONF" not in out


def test_a_failed_build_is_one_line_and_the_measure_that_needs_it_is_skipped(tmp_path):
    out = tmp_path / "aoti.json"
    args = Namespace(precision="fp32", phase="all", out=out)
    message = "the transformer does not fit: 80.0 GiB needed, 20.5 GiB free"
    fail = f"import sys; print('exporting'); print('error: {message}', file=sys.stderr); sys.exit(1)"

    def build(args, records):
        run_build([sys.executable, "-c", fail], records, tmp_path)

    def measure(args, records):
        raise AssertionError("the measure needs the build")

    code = build_then_measure(args, Records(out), build, measure, "benchmarks.aoti_gpu", argv=[])
    items = records_of(out)
    assert code == 1
    assert [(r["phase"], r.get("status")) for r in items] == [
        ("environment", None), ("build", "failed"), ("measure", "skipped"), ("done", None)]  # fmt: skip
    build_record, skipped, done = items[1:]
    assert build_record["reason"] == message and build_record["returncode"] == 1
    assert "exporting" in (tmp_path / build_record["log"]).read_text()
    assert skipped["reason"] == "build failed"
    assert done["failed"] == ["build"]


def test_a_script_records_a_failed_load_and_skips_what_needs_it(tmp_path):
    from benchmarks.random_full_edit import main

    out = tmp_path / "edit.json"
    missing = tmp_path / "no-model"
    assert main(["--out", str(out), "--model", str(missing), "--device", "cpu"]) == 1
    items = records_of(out)
    assert [(r["phase"], r.get("status")) for r in items] == [
        ("environment", None), ("load", "failed"), ("warmup", "skipped"), ("fluxtrt_edit", "skipped"),
        ("diffusers_edit", "skipped"), ("done", None)]  # fmt: skip
    load = items[1]
    assert_one_line(load["reason"], FLUXTRT_REASON_CHARS)
    assert str(missing) in load["reason"]  # fluxtrt's message: the value seen, what was expected
    assert "Traceback" in (tmp_path / load["log"]).read_text()
    assert all(r["reason"] == "load failed" for r in items[2:5])


@pytest.mark.parametrize(
    ("output", "returncode", "reason"),
    [
        # fluxtrt's own line wins over a traceback printed before it
        ("Traceback (most recent call last):\n  File 'x'\nKeyError: 'a'\nerror: the build failed: retry\n", 1,
         "the build failed: retry"),
        # a torchrun worker's lines, prefixed with its rank; the exception that ends with ':' keeps its next line
        ("[rank0]: Traceback (most recent call last):\n[rank0]:   File 'x', line 1\n"
         "[rank0]: torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised:\n"
         "[rank0]: RuntimeError: Triton Error [CUDA]: out of resource\n", 1,
         "torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised: RuntimeError: Triton Error [CUDA]: "
         "out of resource"),
        # a fluxtrt error raised in a benchmark's own child process: its message, as the CLI would print it
        ("Traceback (most recent call last):\n  File 'x'\nfluxtrt.errors.EngineError: --engines 'e' is not a "
         "directory: build it\n", 1, "--engines 'e' is not a directory: build it"),
        ("Segmentation fault\n", -11, "killed by signal 11"),
        ("", 2, "exit 2"),
    ],
)  # fmt: skip
def test_output_reason(output, returncode, reason):
    assert output_reason(output, returncode) == reason
