"""Builds that fit the machine: ``--jobs auto`` from each component's footprint and the memory free, a worker's
error as one line, and a rerun of an up-to-date directory that loads no model and hashes no file whose size and
mtime are those recorded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fluxtrt.backends.onnxruntime import OnnxRuntimeBackend
from fluxtrt.engines.build import build_engines
from fluxtrt.engines.fit import BUILD_FOOTPRINT_FACTOR, GIB, Budget, component_footprints, decide_jobs
from fluxtrt.engines.manifest import Manifest
from fluxtrt.errors import BuildError, DeviceError
from fluxtrt.models import load_components
from fluxtrt.specs import COMPONENTS
from tests.conftest import ort_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# random-full's footprints in bf16 with the factor 2: the transformer, T5, CLIP, and the VAE twice.
FULL = {"transformer": 47.6 * GIB, "t5": 18.5 * GIB, "clip": 0.34 * GIB, "vae_encoder": 0.33 * GIB,
        "vae_decoder": 0.33 * GIB}  # fmt: skip


def loaded(said: list[tuple[str, str]]) -> list[str]:
    """The model loads the build told of."""
    return [m for c, m in said if m.startswith("loading ")]


def test_auto_builds_as_many_as_fit_whichever_run_together():
    everything = sum(FULL.values())
    decision = decide_jobs("auto", FULL, {"GPU": round(everything) + 1, "host": 200 * GIB})
    assert (decision.jobs, decision.workers) == (5, True)
    assert decision.line.startswith("building 5 components at once: ")
    assert "GiB free on GPU" in decision.line and "largest footprint 47.6 GiB" in decision.line
    # Transformer and T5 together need 66.1 GiB: with 60 free only one component at a time is sure to fit.
    assert decide_jobs("auto", FULL, {"GPU": 60 * GIB, "host": 200 * GIB}).jobs == 1
    # The host counts as well as the GPU.
    assert decide_jobs("auto", FULL, {"GPU": 80 * GIB, "host": 66.5 * GIB}).jobs == 3
    with pytest.raises(DeviceError, match=r"needs about 47.6 GiB .* but 40.0 GiB is free on GPU: .*--jobs 1"):
        decide_jobs("auto", FULL, {"GPU": 40 * GIB, "host": 200 * GIB})


def test_auto_builds_small_components_in_this_process():
    decision = decide_jobs("auto", {"clip": 2**20, "t5": 2**21}, {"host": 8 * GIB})
    assert (decision.jobs, decision.workers) == (1, False)


def test_auto_compiles_small_components_side_by_side_one_a_core_as_memory_allows():
    small = {"clip": 2**20, "t5": 2**21, "vae_encoder": 2**22}
    decision = decide_jobs("auto", small, {"host": 8 * GIB}, cores=2, compiles=True)
    assert (decision.jobs, decision.workers) == (2, True)
    assert decision.line.startswith("building 2 components at once (small, compiled side by side on 2 cores): ")
    assert decide_jobs("auto", small, {"host": 8 * GIB}, cores=16, compiles=True).jobs == 3  # no more than there are
    assert decide_jobs("auto", small, {"host": 2**22 + 2**21 + 1}, cores=16, compiles=True).jobs == 2  # memory
    for cores, compiles, names in ((1, True, small), (2, False, small), (2, True, {"clip": 2**20})):
        decision = decide_jobs("auto", names, {"host": 8 * GIB}, cores=cores, compiles=compiles)
        assert (decision.jobs, decision.workers) == (1, False), (cores, compiles, names)


def test_jobs_n_that_cannot_fit_is_refused_naming_the_memory():
    with pytest.raises(DeviceError) as refused:
        decide_jobs(3, FULL, {"GPU": 60 * GIB, "host": 200 * GIB})
    line = str(refused.value)
    assert "\n" not in line and "--jobs 3 needs about 66.4 GiB" in line and "60.0 GiB is free on GPU" in line
    assert decide_jobs(2, FULL, {"GPU": 70 * GIB}).jobs == 2


def test_a_component_starts_only_when_it_fits_beside_those_running():
    budget = Budget(FULL, {"GPU": 60 * GIB})
    assert budget.fits("transformer")
    budget.start("transformer")
    assert budget.fits("clip") and not budget.fits("t5")
    budget.end("transformer")
    assert budget.fits("t5")


def test_footprints_are_the_parts_weights_times_the_factor():
    config = ort_config(Path("unused"))
    tiny = load_components("tiny")
    footprints = component_footprints(config, list(COMPONENTS))
    params = {"clip": tiny.text_encoder, "t5": tiny.text_encoder_2, "vae_encoder": tiny.vae,
              "vae_decoder": tiny.vae, "transformer": tiny.transformer}  # fmt: skip
    for name, module in params.items():  # fp32: 4 bytes a parameter
        assert footprints[name] == round(sum(p.numel() for p in module.parameters()) * 4 * BUILD_FOOTPRINT_FACTOR)


class ExhaustedBackend(OnnxRuntimeBackend):
    """ONNX Runtime that fails as a GPU out of memory does: a torch error with a long message of several lines."""

    def build(self, job):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nOf the allocated memory ...")


def test_a_worker_error_of_another_library_comes_back_as_one_line(tmp_path):
    with pytest.raises(BuildError) as failed:
        build_engines(ort_config(tmp_path / "e", components=("clip",), jobs=2), backend=ExhaustedBackend())
    assert str(failed.value) == (
        "clip: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. (try a lower --jobs, or --jobs 1)"
    )
    assert failed.value.__cause__ is None and failed.value.__suppress_context__  # no worker traceback


def test_a_rerun_when_up_to_date_loads_no_model_and_hashes_nothing(ort_engines, tmp_path):
    out = tmp_path / "e"
    shutil.copytree(ort_engines, out)  # copy2: sizes and mtimes as recorded
    said: list[tuple[str, str]] = []
    report = build_engines(ort_config(out), lambda c, m: said.append((c, m)))
    assert [r.status for r in report.results] == ["up to date"] * len(COMPONENTS)
    assert loaded(said) == []
    # clip's engine with other bytes of the same size and the recorded mtime: not read, so still up to date.
    engine = out / Manifest.load(out).components["clip"].engine.path
    stat = engine.stat()
    original = engine.read_bytes()
    engine.write_bytes(bytes(b ^ 0xFF for b in original))
    os.utime(engine, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    report = build_engines(ort_config(out), lambda c, m: said.append((c, m)))
    assert [r.status for r in report.results] == ["up to date"] * len(COMPONENTS)
    # A new mtime: hashed, found changed and rebuilt (the model loaded for it, once).
    os.utime(engine, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    said.clear()
    report = build_engines(ort_config(out), lambda c, m: said.append((c, m)))
    assert {r.name: r.status for r in report.results}["clip"] == "built"
    assert [r.status for r in report.results].count("built") == 1
    assert len(loaded(said)) == 1 and engine.read_bytes() == original


def test_a_manifest_without_mtimes_is_hashed_and_then_records_them(ort_engines, tmp_path):
    import json

    out = tmp_path / "e"
    shutil.copytree(ort_engines, out)
    raw = json.loads((out / "manifest.json").read_text())
    for entry in raw["components"].values():
        for record in [*entry["onnx"], entry["engine"], *entry["engine_extra"]]:
            record.pop("mtime")
    (out / "manifest.json").write_text(json.dumps(raw))
    engine = out / raw["components"]["t5"]["engine"]["path"]
    stat = engine.stat()
    engine.write_bytes(bytes(b ^ 0xFF for b in engine.read_bytes()))
    os.utime(engine, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime, but none recorded: hashed
    report = build_engines(ort_config(out))
    assert {r.name: r.status for r in report.results} == {c: "built" if c == "t5" else "up to date" for c in COMPONENTS}
    manifest = Manifest.load(out)
    assert all(e.engine.mtime == (out / e.engine.path).stat().st_mtime for e in manifest.components.values())


def test_the_build_process_keeps_only_the_transformer_it_builds_and_counts_it_as_free_for_that_build(monkeypatch):
    """What ``--jobs`` leaves in the build process when it builds the transformer itself: that module, the same
    object, and nothing else of the model (the others are freed, not only unreferenced by the build); the memory it
    holds counts as free for the decision, since the transformer's footprint already includes it."""
    import gc
    import weakref
    from types import SimpleNamespace

    from fluxtrt.engines.fit import free_memory
    from fluxtrt.engines.jobs import _release_model

    model = load_components("tiny", "cpu", "fp32")
    transformer, others = model.transformer, [weakref.ref(model.text_encoder_2), weakref.ref(model.vae)]
    build = SimpleNamespace(components=model)
    del model
    held = _release_model(build, ("transformer",))
    gc.collect()
    assert build.components.transformer is transformer
    assert [build.components.text_encoder, build.components.text_encoder_2, build.components.vae] == [None] * 3
    assert [ref() for ref in others] == [None, None]
    assert held == 4 * sum(t.numel() for t in (*transformer.parameters(), *transformer.buffers())) > 0
    monkeypatch.setattr("fluxtrt.environment.available_memory", {"cuda:0": 10, "cpu": 5}.get)
    assert free_memory("cuda:0", 3) == {"GPU": 13, "host": 5}
    assert free_memory("cpu", 3) == {"host": 8}
    assert _release_model(build) == 0 and build.components is None
