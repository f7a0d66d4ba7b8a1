"""`fluxtrt infer --edits FILE.jsonl`: one load for every line; a good line's output is the edit `infer` makes; each
failing line (bad JSON, missing image, unwritable out) is one line on stderr and the run goes on; a summary table;
a non-zero exit when a line failed."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from fluxtrt.config import SamplerConfig
from tests.conftest import make_image, run_cli


def test_edits_file_runs_every_line_and_reports_the_failures(tmp_path, tiny_pipeline):
    make_image(96, 64).save(tmp_path / "in.png")
    (tmp_path / "blocker").write_text("a file where a folder is needed")
    lines = [
        json.dumps({"image": "in.png", "prompt": "make it red", "out": "out/a.png", "steps": 1, "seed": 3}),
        "{not json",
        json.dumps({"image": "missing.png", "prompt": "x", "out": "out/b.png"}),
        json.dumps({"image": "in.png", "prompt": "x", "out": "blocker/c.png", "steps": 1}),
    ]
    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(lines) + "\n")
    result = run_cli("infer", "--model", "tiny", "--device", "cpu", "--edits", str(edits))
    assert result.exit_code == 1
    failures = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert [f.split()[2].rstrip(":") for f in failures] == ["2", "3", "4"], result.stderr
    assert "missing.png" in failures[1] and "blocker" in failures[2]
    assert result.stderr.strip().splitlines()[-1].startswith("error: 3 of 4 edits failed (lines 2, 3, 4)")
    assert "1 of 4 edits written" in result.stdout
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["blocker", "edits.jsonl", "in.png", "out/a.png"]  # nothing half-written
    alone = tiny_pipeline.edit(Image.open(tmp_path / "in.png").convert("RGB"), "make it red",
                               sampler=SamplerConfig(steps=1), seed=3).images[0]  # fmt: skip
    out = np.asarray(Image.open(tmp_path / "out/a.png"), dtype=np.int16)
    assert out.shape == np.asarray(alone).shape
    assert np.abs(out - np.asarray(alone, dtype=np.int16)).max() <= 2


def test_edits_refuses_single_edit_options(tmp_path):
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"image": "in.png", "prompt": "x", "out": "a.png"}) + "\n")
    result = run_cli("infer", "--model", "tiny", "--edits", str(edits), "--prompt", "y")
    assert result.exit_code == 1
    assert "--edits" in result.stderr and "--prompt" in result.stderr
    missing = run_cli("infer", "--model", "tiny", "--prompt", "y", "--out", str(tmp_path / "o.png"))
    assert missing.exit_code != 0 and "--image" in missing.stderr
