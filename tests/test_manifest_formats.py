"""The manifest's typed model: older formats read (committed manifests written by the code of each format), one
JSON reader and writer per class, the SM as an integer, unknown record keys kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fluxtrt.backends.aotinductor.options import AotInductorRecord
from fluxtrt.backends.onnxruntime import OnnxRuntimeRecord
from fluxtrt.backends.record import BackendRecord
from fluxtrt.engines.manifest import FORMAT, ComponentEntry, Manifest, settings_hash
from fluxtrt.environment import DeviceEnvironment
from fluxtrt.errors import EngineError
from fluxtrt.specs import Resolution
from fluxtrt.specs.flux import FluxDims

DATA = Path(__file__).parent / "data" / "manifests"
# format -> the committed manifest (a tiny clip build): format 1 written at c4518f2 (the backend's record in
# "options", no "vae"), format 2 by the code before the typed manifest (the SM, where recorded, as a string).
OLDER = {1: DATA / "format1.json", 2: DATA / "format2.json"}


def engines_dir(tmp_path: Path, manifest: Path) -> Path:
    root = tmp_path / manifest.stem
    root.mkdir()
    shutil.copy(manifest, root / "manifest.json")
    return root


@pytest.mark.parametrize("version", sorted(OLDER))
def test_older_format_reads_typed(tmp_path, version):
    raw = json.loads(OLDER[version].read_text())
    assert raw["format"] == version < FORMAT
    m = Manifest.load(engines_dir(tmp_path, OLDER[version]))
    assert (m.backend, m.backend_version, m.precision) == (raw["backend"], raw["backend_version"], raw["precision"])
    assert (m.model.source, m.model.fingerprint, m.model.vae) == ("tiny", "tiny-seed0", None)
    assert m.model.dims == FluxDims(**raw["model"]["dims"]) and m.dims is m.model.dims
    assert m.model.scheduler_config == raw["model"]["scheduler_config"]
    assert m.build_env == DeviceEnvironment(raw["build_env"]["torch"], "cpu")
    assert (m.resolutions.min, m.resolutions.opt, m.resolutions.max) == (
        Resolution(256, 256),
        Resolution(1024, 1024),
        Resolution(1568, 1568),
    )
    assert (m.batch.min, m.batch.opt, m.batch.max) == (1, 1, 1)
    (name, entry), = m.components.items()  # fmt: skip
    raw_entry = raw["components"]["clip"]
    assert name == "clip" and isinstance(entry.record, OnnxRuntimeRecord)
    assert (entry.record.graph_optimization, entry.record.external_data, entry.record.extra) == ("basic", None, {})
    assert entry.engine.path == "clip.onnx" and entry.engine.bytes == raw_entry["engine"]["bytes"]
    assert [f.path for f in entry.onnx] == [f["path"] for f in raw_entry["onnx"]]
    # The settings are read as written: the hash that decides whether the component is up to date is unchanged.
    assert entry.settings_hash == settings_hash(raw_entry["settings"])


@pytest.mark.parametrize("version", sorted(OLDER))
def test_older_format_written_back_as_this_format(tmp_path, version):
    root = engines_dir(tmp_path, OLDER[version])
    first = Manifest.load(root)
    first.save(root)
    written = json.loads((root / "manifest.json").read_text())
    assert written["format"] == FORMAT and "options" not in written["components"]["clip"]
    assert written["components"]["clip"]["record"] == {"graph_optimization": "basic"}
    assert written["model"]["vae"] is None and written["resolutions"]["max"] == "1568x1568"
    assert Manifest.load(root) == first


def test_format_2_directory_is_up_to_date(tmp_path):
    """A directory the previous format's code built counts as up to date after the format change: its committed
    manifest beside the files of the same build. The exported ONNX holds the path of the source it was traced from,
    so the committed file records (size, sha256) are those of this checkout's build, in format 2's shape (no mtime)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fluxtrt.backends.onnxruntime import OnnxRuntimeBackend
    from fluxtrt.config import BuildConfig
    from fluxtrt.engines.build import build_engines

    raw = json.loads(OLDER[2].read_text())
    if raw["backend_version"] != OnnxRuntimeBackend().version():
        pytest.skip(f"the format 2 manifest was built with onnxruntime {raw['backend_version']}")
    out = tmp_path / "engines"
    config = BuildConfig(model="tiny", backend="onnxruntime", precision="fp32", out=out,
                         min_resolution=Resolution(256, 256), components=("clip",))  # fmt: skip
    build_engines(config)
    built = json.loads((out / "manifest.json").read_text())["components"]["clip"]
    if built["settings"] != raw["components"]["clip"]["settings"]:
        pytest.skip("this fluxtrt records other settings for the clip build than the format 2 manifest")
    entry = raw["components"]["clip"]
    for key in ("onnx", "engine_extra"):
        entry[key] = [{k: f[k] for k in ("path", "bytes", "sha256")} for f in built[key]]
    entry["engine"] = {k: built["engine"][k] for k in ("path", "bytes", "sha256")}
    (out / "manifest.json").write_text(json.dumps(raw))
    report = build_engines(config)
    assert [(r.name, r.status) for r in report.results] == [("clip", "up to date")]
    assert json.loads((out / "manifest.json").read_text())["format"] == FORMAT


def test_sm_string_read_as_int_and_unknown_record_keys_kept():
    raw = {"torch": "2.9.0+cu130", "device": "cuda", "gpu": "NVIDIA H100", "sm": "90", "attention": ["fa3"],
           "dims": {"S": [2048, 19208]}, "written_by_a_newer_fluxtrt": {"k": 1}}  # fmt: skip
    record = AotInductorRecord.from_json(raw)
    assert (record.sm, record.attention, record.dims) == (90, ["fa3"], {"S": [2048, 19208]})
    assert record.extra == {"written_by_a_newer_fluxtrt": {"k": 1}}
    assert record.to_json() == {**raw, "sm": 90}
    env = DeviceEnvironment.from_json({k: raw[k] for k in ("torch", "device", "gpu", "sm")})
    assert env.sm == 90 and env.to_json() == {"torch": "2.9.0+cu130", "device": "cuda", "gpu": "NVIDIA H100", "sm": 90}
    # A backend this fluxtrt does not know: every key kept as it is.
    assert BackendRecord.from_json(raw).to_json() == raw


def test_file_entry_optional_fields_round_trip():
    engine = {"path": "clip.onnx", "bytes": 3, "sha256": "ab", "mtime": 1.5}
    raw = {"settings": {"a": 1}, "onnx": [], "engine": engine, "profile": {"x": [[1], [1], [1]]}, "build_s": 0.5,
           "record": {}, "engine_extra": [{"path": "w.bin"}]}  # fmt: skip
    entry = ComponentEntry.from_json(raw)
    assert (entry.engine.mtime, entry.engine_extra[0].bytes, entry.engine_extra[0].sha256) == (1.5, None, None)
    assert entry.to_json() == raw


def test_unreadable_resolution_is_an_engine_error(tmp_path):
    raw = json.loads(OLDER[2].read_text())
    raw["resolutions"]["max"] = "huge"
    root = tmp_path / "engines"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="not a valid fluxtrt manifest"):
        Manifest.load(root)
