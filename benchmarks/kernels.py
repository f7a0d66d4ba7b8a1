"""GPU kernels of a profiled step, by category: the table issue-level speed work is justified against.

    python -m benchmarks.kernels benchmarks/results/aoti_fp8_fastaccum_h200.json

Categories (first rule that matches, on the kernel's name):
- ``fp8 gemm`` / ``bf16 gemm``: cuBLASLt (``nvjet_*``, ``*gemm*``), CUTLASS and inductor's GEMM templates
  (``triton_tem_*``); FP8 when both operands are FP8 (cuBLASLt's ``qq`` type letters, ``e4m3``, ``_scaled_mm``).
- ``attention``: cuDNN/flash attention kernels (``sdpa``, ``flash``, ``fmha``) that are not inductor's own kernels,
  FlashAttention 3's CUTLASS kernels (``FlashAttnFwdSm90``) included.
- ``quantize/convert``: inductor kernels that write FP8 (their fused ops include a clamp or amax to the FP8 range, or
  the ``_scaled_mm``/FP8 attention they feed), fused with whatever norm, modulation, RoPE or GELU precedes them, and
  eager FP8 conversion kernels. The FP8 GEMMs' input quantization is here, so the category is what static scales and
  fusion can shrink.
- ``copies``: memcpy/memset and kernels that only move data (clone, cat, permute, slices).
- ``norm and elementwise``: every other inductor kernel and eager elementwise or reduction kernel.
- ``other``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

CATEGORIES = ("fp8 gemm", "bf16 gemm", "attention", "quantize/convert", "norm and elementwise", "copies", "other")
_MOVES = {"clone", "cat", "view", "permute", "t", "transpose", "slice", "split", "unsqueeze", "squeeze", "stack",
          "unbind", "expand", "copy", "select", "index", "constant", "pad"}  # fmt: skip
_FP8_WRITERS = ("clamp", "amax", "scaled_mm", "fp8", "float8")


def _gemm(name: str) -> str | None:
    nvjet = re.match(r"nvjet_sm\d+_([a-z]+)_", name)
    if nvjet:
        return "fp8 gemm" if nvjet.group(1).startswith("qq") else "bf16 gemm"
    if name.startswith("triton_tem") or any(k in name for k in ("gemm", "cutlass", "xmma", "cublas")):
        return "fp8 gemm" if any(k in name for k in ("e4m3", "f8f8", "scaled_mm", "fp8")) else "bf16 gemm"
    return None


def _triton(name: str) -> str:
    ops = re.sub(r"^triton_[a-z]+_fused_?|_\d+$", "", name)
    if any(k in ops for k in _FP8_WRITERS):
        return "quantize/convert"
    words = {w for w in ops.split("_") if w and w != "to"}
    return "copies" if words <= _MOVES else "norm and elementwise"


def kernel_category(name: str) -> str:
    """The category (one of ``CATEGORIES``) of a GPU kernel, from its name."""
    low = name.lower()
    if "flashattn" in low:  # FlashAttention 3's kernels are CUTLASS device kernels: attention, not GEMMs
        return "attention"
    gemm = _gemm(low)
    if gemm:
        return gemm
    if low.startswith("triton_"):
        return _triton(low)
    if any(k in low for k in ("sdpa", "flash", "fmha", "attention")):
        return "attention"
    if any(k in low for k in ("float8", "fp8", "e4m3")):
        return "quantize/convert"
    if any(k in low for k in ("memcpy", "memset", "copy", "cat_array", "catarray")):
        return "copies"
    if any(k in low for k in ("elementwise", "reduce", "norm", "softmax", "gelu")):
        return "norm and elementwise"
    return "other"


def by_category(kernels: list[dict]) -> dict[str, dict]:
    """``{category: {"ms", "launches"}}`` of a list of ``{"name", "ms", "calls"}``, every category present."""
    table = {c: {"ms": 0.0, "launches": 0} for c in CATEGORIES}
    for k in kernels:
        row = table[kernel_category(k["name"])]
        row["ms"] += k["ms"]
        row["launches"] += k["calls"]
    return table


def markdown(columns: dict[str, dict[str, dict]]) -> str:
    """A Markdown table: one row per category, one ``ms (launches)`` column per profiled step."""
    head = "| category | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    rows = []
    for c in (*CATEGORIES, "total"):
        cells = []
        for table in columns.values():
            ms = sum(r["ms"] for r in table.values()) if c == "total" else table[c]["ms"]
            n = sum(r["launches"] for r in table.values()) if c == "total" else table[c]["launches"]
            cells.append(f"{ms:.1f} ms ({n})")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def profiles(records: list[dict]) -> dict[str, dict[str, dict]]:
    """``{row label: category table}`` for every record of a benchmark JSON that carries a full kernel list."""
    out = {}
    for r in records:
        kernels = (r.get("profile") or {}).get("all")
        if kernels:
            out[r.get("stage") or r.get("variant") or r["phase"]] = by_category(kernels)
    return out


def main(paths: list[str]) -> int:
    """Each file's table; a file that cannot be read is one ``error:`` line and the next file still comes."""
    from benchmarks.failures import exception_reason

    failed = 0
    for path in paths:
        try:
            table = markdown(profiles(json.loads(Path(path).read_text())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: {path}: {exception_reason(exc)}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}\n\n{table}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
