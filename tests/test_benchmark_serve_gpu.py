"""benchmarks.serve_gpu on the tiny model on the CPU: every phase leaves a record of the right shape, and
concurrent engine loading edits exactly as loading one engine after the other."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


def test_serve_gpu_records_every_phase(tmp_path):
    from benchmarks.serve_gpu import main

    image = tmp_path / "in.png"
    make_image(256, 256).save(image)
    out = tmp_path / "out"
    code = main(["--model", "tiny", "--image", str(image), "--out", str(out), "--size", "256x256", "--steps", "2",
                 "--device", "cpu", "--runs", "2", "--concurrency", "1,2", "--requests", "2", "--budget-s", "900",
                 "--skip", "load_concurrent,load_pinned,warmup_edit"])  # fmt: skip
    records = json.loads((out / "serve_gpu.json").read_text())
    by_phase = {}
    for record in records:
        by_phase.setdefault(record["phase"], []).append(record)
    assert code == 0, by_phase["done"]
    infer = by_phase["infer"][0]
    assert infer["returncode"] == 0 and 0 < infer["image_written_s"] <= infer["wall_s"]
    assert (out / "infer.png").is_file()
    first = by_phase["first_edit"][0]
    assert len(first["warm"]) == 2
    assert [(len(e["step_ms"]), e["size"]) for e in (first["first"], *first["warm"])] == [(2, "256x256")] * 3
    assert first["first_over_warm"] == pytest.approx(first["first"]["wall_s"] / min(e["wall_s"] for e in first["warm"]))
    compare = by_phase["compare"][0]
    assert compare["status"] == "ok" and len(compare["totals_ms"]) == 2
    assert compare["steps"] == 2  # the steps of the server's edits, not stage 0's default
    assert "torch" in by_phase["environment"][0]
    ready = by_phase["serve_ready"][0]
    assert 0 < ready["health_s"] <= ready["ready_s"]
    single = by_phase["serve_single"][0]
    assert [r["status"] for r in single["requests"]] == [200, 200, 200]
    assert single["edit_over_compare"] == pytest.approx(single["median_edit_ms"] / compare["median_total_ms"])
    levels = {lv["concurrency"]: lv for lv in by_phase["serve_load"]}
    assert set(levels) == {1, 2}
    for level in levels.values():
        assert set(level["statuses"]) <= {"200", "503"} and level["wrong_images"] == 0
        assert sum(level["statuses"].values()) == level["concurrency"] * level["requests_per_client"]
        assert level["p50_s"] <= level["p95_s"]
        assert level["edits_per_minute"] == pytest.approx(60 * level["statuses"].get("200", 0) / level["wall_s"])
        assert level["health_after"] == 200
    assert by_phase["serve_exit"][0]["returncode"] == 0  # SIGTERM: finish what runs, exit 0
    assert by_phase["done"][0]["failed"] == []


def test_concurrent_load_edits_as_serial_load(ort_engines):
    """Both loads edit alike, and each records how long its checks, every engine and the tokenizers took: one after
    the other, those parts fit inside the load's own time."""
    import time

    from fluxtrt.engines.load import load_engine_pipeline

    image = make_image(256, 256)
    results = []
    for concurrent in (False, True):
        t0 = time.perf_counter()
        with load_engine_pipeline(ort_engines, "cpu", concurrent=concurrent) as pipeline:
            wall = time.perf_counter() - t0
            assert set(pipeline.runners) == {"clip", "t5", "vae_encoder", "transformer", "vae_decoder"}
            assert set(pipeline.load_seconds) == {"checks", "tokenizers", *pipeline.runners}
            assert min(pipeline.load_seconds.values()) > 0
            if not concurrent:
                assert sum(pipeline.load_seconds.values()) <= wall
            results.append(pipeline.edit(image, "make it red", seed=3, height=256, width=256,
                                         max_area=256 * 256, auto_resize=False).latents)  # fmt: skip
    assert torch.equal(results[0], results[1])


def test_concurrent_load_names_unreadable_tokenizers(ort_engines, tmp_path):
    import shutil

    from fluxtrt.engines.load import load_engine_pipeline
    from fluxtrt.errors import EngineError

    broken = tmp_path / "engines"
    shutil.copytree(ort_engines, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(EngineError, match="tokenizers beside the engines cannot be read"):
        load_engine_pipeline(broken, "cpu", concurrent=True)
