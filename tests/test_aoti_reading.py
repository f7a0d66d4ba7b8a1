"""The pinned reader of external weights (``fluxtrt.backends.aotinductor.reading``) against safetensors' own
``load_file``: the chunked reading that its CUDA loads go through, run here with host buffers of sizes that split
tensors every way (the GPU tier checks the CUDA copies)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxtrt.backends.aotinductor.reading import header, read_chunked, read_weights_pinned


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(37, 5, generator=g).to(torch.bfloat16),
        "fp32": torch.randn(3, generator=g),
        "fp8": torch.randn(100, 7, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "int64": torch.arange(9, dtype=torch.int64),
        "bool": torch.rand(13, generator=g) > 0.5,
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])  # one byte, splits inside tensors, several tensors, whole file
def test_chunked_reading_gives_safetensors_tensors_bit_for_bit(tmp_path, chunk):
    path = tmp_path / "w.safetensors"
    save_file(tensors(), str(path))
    start, entries = header(path)
    out = {n: torch.full(e["shape"], 0, dtype=tensors()[n].dtype) for n, e in entries.items()}
    flat = {n: bits(t) for n, t in out.items() if t.numel()}
    slots: list[int] = []
    read_chunked(path, flat, entries, start, [torch.empty(chunk, dtype=torch.uint8) for _ in range(2)],
                 lambda dst, src: dst.copy_(src), reuse=slots.append)  # fmt: skip
    want = load_file(str(path))
    assert out.keys() == want.keys()
    for name, t in want.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape and torch.equal(bits(out[name]), bits(t))
    data = max(e["data_offsets"][1] for e in entries.values())
    assert slots == [i % 2 for i in range(-(-data // chunk))]  # each chunk once, the two buffers in turn


def test_a_truncated_file_is_an_oserror_naming_where_it_ends(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tensors(), str(path))
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - 10])
    start, entries = header(path)
    flat = {n: bits(torch.empty(e["shape"], dtype=tensors()[n].dtype)) for n, e in entries.items() if n != "empty"}
    with pytest.raises(OSError, match=f"ends at byte {size - 10}"):
        read_chunked(path, flat, entries, start, [torch.empty(16, dtype=torch.uint8)] * 2, lambda d, s: d.copy_(s))


def test_a_file_that_is_no_safetensors_is_a_valueerror(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes((64).to_bytes(8, "little") + b"\xff" * 64)
    with pytest.raises(ValueError, match="no readable safetensors header"):
        header(path)
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        read_weights_pinned(path, torch.device("cuda"))  # refused before any CUDA call


def test_on_the_cpu_it_is_load_file_also_in_place_of_read_weights(tmp_path, monkeypatch):
    """``benchmarks.serve_gpu``'s ``load_pinned`` puts it in place of ``read_weights``; on the CPU it reads as
    ``load_file`` does (and does not call itself through that name)."""
    from fluxtrt.backends.aotinductor import reading

    monkeypatch.setattr(reading, "read_weights", reading.read_weights_pinned)
    path = tmp_path / "w.safetensors"
    save_file(tensors(), str(path))
    got, want = reading.read_weights(path, torch.device("cpu")), load_file(str(path))
    assert all(torch.equal(bits(got[n]), bits(want[n])) for n in want)
