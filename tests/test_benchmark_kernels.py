"""benchmarks/kernels.py: the kernel categories, checked on kernel names from committed H200 profiles."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.kernels import CATEGORIES, by_category, kernel_category, markdown
from fluxtrt.models.synthetic import FULL

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def profiled_steps() -> dict[str, list[dict]]:
    records = json.loads((RESULTS / "aoti_fp8_static_h200.json").read_text())
    return {r.get("stage") or r["phase"]: r["profile"]["top"] for r in records if r.get("profile")}


def quantized_gemms_per_step() -> int:
    """Linear layers a step of the full transformer runs in FP8 with fused Q/K/V: per double block QKV, added QKV,
    both output projections and two feed-forwards of two linears; per single block QKV, the MLP input and the output
    projection."""
    config = FULL.transformer
    return config["num_layers"] * 8 + config["num_single_layers"] * 3


def test_fp8_gemm_launches_match_the_quantized_linears():
    steps = profiled_steps()
    want = quantized_gemms_per_step()
    assert want == 266
    for name in ("engine", "3:fbc=off"):  # the AOTInductor FP8 engine and torchao's stage 3 (two GEMM kernels)
        assert by_category(steps[name])["fp8 gemm"]["launches"] == want
    assert by_category(steps["1:fbc=off"])["fp8 gemm"]["launches"] == 0  # stage 1 is BF16
    assert by_category(steps["1:fbc=off"])["bf16 gemm"]["launches"] >= want


def test_fp8_attention_and_its_input_quantization_are_told_apart():
    steps = profiled_steps()
    attention = [k for k in steps["engine"] if kernel_category(k["name"]) == "attention"]
    assert [k["calls"] for k in attention] == [FULL.transformer["num_layers"] + FULL.transformer["num_single_layers"]]
    # inductor's kernel that quantizes Q/K/V for cuDNN's FP8 attention names the op it feeds, but writes FP8
    feeders = [k for k in steps["engine"] if "cudnn_fp8_sdpa" in k["name"] and k["name"].startswith("triton")]
    assert feeders and {kernel_category(k["name"]) for k in feeders} == {"quantize/convert"}


def test_categories_conserve_time_and_launches():
    kernels = profiled_steps()["engine"]
    table = by_category(kernels)
    assert set(table) == set(CATEGORIES)
    assert abs(sum(r["ms"] for r in table.values()) - sum(k["ms"] for k in kernels)) < 1e-9
    assert sum(r["launches"] for r in table.values()) == sum(k["calls"] for k in kernels)
    assert markdown({"engine": table}).count("\n") == len(CATEGORIES) + 3  # header, rule, rows, total
    assert kernel_category("Memcpy DtoD (Device -> Device)") == "copies"
    assert kernel_category("triton_poi_fused_cat_clone_permute_view_7") == "copies"
    assert kernel_category("triton_poi_fused_add_gelu_mul_3") == "norm and elementwise"


def test_flash_attention_3_kernels_count_as_attention_not_as_cutlass_gemms():
    """A step profiled with FlashAttention 3's FP8 forward (a CUTLASS device kernel): one attention launch per
    block, and only the FP8 projections as FP8 GEMMs."""
    records = json.loads((RESULTS / "step_limits_h200" / "step_levers_fa3_h200.json").read_text())
    kernels = next(r for r in records if r.get("profile"))["profile"]["all"]
    table = by_category(kernels)
    blocks = FULL.transformer["num_layers"] + FULL.transformer["num_single_layers"]
    assert any("FlashAttnFwdSm90" in k["name"] for k in kernels)
    assert table["attention"]["launches"] == blocks
    assert table["fp8 gemm"]["launches"] == quantized_gemms_per_step()


def test_busy_time_counts_overlapping_kernels_once_and_idle_is_the_rest_of_the_span():
    from benchmarks.records import busy_and_idle

    # 0-2 and 1-3 overlap (busy 0-3), 3-3.5 touches it, 5-6 after a wait of 1.5, 5.2-5.4 inside it.
    got = busy_and_idle([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (3.0, 3.5), (5.2, 5.4)])
    assert got == {"span_ms": 6.0, "busy_ms": 4.5, "idle_ms": 1.5}
    assert busy_and_idle([]) == {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0}
