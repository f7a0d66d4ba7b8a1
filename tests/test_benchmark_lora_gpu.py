"""benchmarks.lora_gpu on the tiny ONNX Runtime engines on the CPU: every phase leaves its numbers, the LoRA made
covers every block, and swapping back and removing it give the outputs back exactly."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("peft")


def test_lora_gpu_records_every_phase(ort_engines, tmp_path):
    from benchmarks.lora_gpu import DOUBLE, SINGLE, main
    from fluxtrt.models import load_components

    out = tmp_path / "out"
    assert main(["--engines", str(ort_engines), "--out", str(out), "--device", "cpu", "--rank", "4", "--warmup", "1",
                 "--iters", "2"]) == 0  # fmt: skip
    records = {r["phase"]: r for r in json.loads((out / "lora_gpu.json").read_text())}
    assert {"command", "environment", "loras", "none", "one", "two", "removed"} <= set(records)
    assert "torch" in records["environment"] and records["environment"]["backend"] == "onnxruntime"
    tiny = load_components("tiny", "cpu", "fp32")
    blocks = len(tiny.transformer.transformer_blocks), len(tiny.transformer.single_transformer_blocks)
    assert records["loras"]["linears"] == blocks[0] * len(DOUBLE) + blocks[1] * len(SINGLE)

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    steps = [records["none"]["step"], records["one"]["step"]]
    assert all(number(s["median_ms"]) and s["min_ms"] <= s["median_ms"] <= s["max_ms"] for s in steps)
    changes = records["one"]["changes"]
    assert set(changes) == {"apply_a", "swap_to_b", "swap_back_to_a"}
    assert all(number(c["s"]) and number(c["rss_bytes"]) for c in changes.values())
    assert number(records["two"]["apply_s"]) and number(records["removed"]["remove_s"])
    assert records["one"]["rel_change"] > 1e-3  # the LoRA changes the output
    assert records["removed"]["a_after_two_exact"] and records["removed"]["original_exact"]
