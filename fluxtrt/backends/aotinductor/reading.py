"""Reading an AOTInductor package's external weights (a safetensors file) onto its device.

``read_weights`` is safetensors' ``load_file``, which copies each tensor from a memory map of the file: pageable
memory, faulted in page by page (3.5 s for the 12 GB FP8 transformer on an H100). ``read_weights_pinned`` reads the
file in large sequential chunks into two pinned host buffers instead, each chunk copied to the device on a stream of
its own while the next one is read. Its tensors are meant to be ``load_file``'s bit for bit (the chunked reading is
tested against it on the CPU; the GPU tier's test of the CUDA copies has not run yet), each an allocation of its own
as ``load_file`` makes them, so kernels see the alignment they were compiled for. Whether it loads faster is not
yet measured (``benchmarks.serve_gpu``'s ``load_pinned``); until it is, runners read through ``read_weights``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

# safetensors' dtype names -> torch dtype attribute names
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
          "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
          "BOOL": "bool"}  # fmt: skip
CHUNK_BYTES = 64 << 20


def read_weights(path: Path, device: Any) -> dict[str, Any]:
    """Every tensor of the safetensors file ``path`` on ``device``, through safetensors' own ``load_file``."""
    return _load_file(path, device)


def _load_file(path: Path, device: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def read_weights_pinned(path: Path, device: Any) -> dict[str, Any]:
    """Every tensor of the safetensors file ``path``, on ``device`` (a ``torch.device``): through pinned chunks on
    CUDA, ``load_file`` elsewhere.

    Raises:
        ValueError: a file whose header does not parse or names a dtype this reader does not know.
        OSError: the file cannot be read, or ends before its header says.
    """
    import torch

    if torch.device(device).type != "cuda":
        return _load_file(path, device)  # not read_weights: serve_gpu's load_pinned puts this function in its place
    start, entries = header(Path(path))
    with torch.cuda.device(device):
        return _read_cuda(Path(path), torch.device(device), start, entries)


def header(path: Path) -> tuple[int, dict[str, dict]]:
    """The byte offset of a safetensors file's data, and its entries (name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (size,) = struct.unpack("<Q", prefix)
        try:
            entries = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} has no readable safetensors header ({exc})") from None
    entries.pop("__metadata__", None)
    for name, entry in entries.items():
        if entry.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry.get('dtype')}, which this reader does not know")
    return 8 + size, entries


def read_chunked(path: Path, targets: dict[str, Any], entries: dict[str, dict], start: int, buffers: list[Any],
                 copy: Callable[[Any, Any], None], reuse: Callable[[int], None] = lambda slot: None,
                 filled: Callable[[int], None] = lambda slot: None) -> None:  # fmt: skip
    """Fill each tensor of ``targets`` (flat uint8 views, by name) with its bytes of the file whose data starts at
    byte ``start``: chunk after chunk is read into ``buffers`` (uint8 host tensors of one size) in turn, and
    ``copy(destination, source)`` moves each piece of a chunk to its tensor. ``reuse(slot)`` is called before
    buffer ``slot`` is read into (wait for its earlier copies), ``filled(slot)`` once its copies are queued."""
    pieces = sorted((entries[n]["data_offsets"][0], entries[n]["data_offsets"][1], n) for n in targets)
    end = max((stop for _, stop, _ in pieces), default=0)
    chunk = buffers[0].numel()
    first = 0  # the first piece that may still overlap the chunk being read
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        for index, offset in enumerate(range(0, end, chunk)):
            slot = index % len(buffers)
            wanted = min(chunk, end - offset)
            reuse(slot)
            _read_exactly(f, memoryview(buffers[slot].numpy())[:wanted], path, start + offset)
            while first < len(pieces) and pieces[first][1] <= offset:
                first += 1
            for begin, stop, name in pieces[first:]:
                if begin >= offset + wanted:
                    break
                a, b = max(begin, offset), min(stop, offset + wanted)
                if b > a:
                    copy(targets[name][a - begin : b - begin], buffers[slot][a - offset : b - offset])
            filled(slot)


def _read_exactly(f: Any, view: memoryview, path: Path, at: int) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"{path} ends at byte {at + got}, before the last tensor its header names")
        got += n


def _read_cuda(path: Path, device: Any, start: int, entries: dict[str, dict]) -> dict[str, Any]:
    import torch

    tensors = {n: torch.empty(e["shape"], dtype=getattr(torch, DTYPES[e["dtype"]]), device=device)
               for n, e in entries.items()}  # fmt: skip
    flat = {n: t.reshape(-1).view(torch.uint8) for n, t in tensors.items() if t.numel()}
    buffers = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    stream = torch.cuda.Stream(device)
    # The new tensors' memory may have been freed by work still queued on this thread's stream (the allocator
    # orders reuse on that stream only): the copies start after it.
    stream.wait_stream(torch.cuda.current_stream(device))
    copied = [torch.cuda.Event() for _ in buffers]  # an event not yet recorded waits for nothing

    def copy(destination: Any, source: Any) -> None:
        with torch.cuda.stream(stream):
            destination.copy_(source, non_blocking=True)

    read_chunked(path, flat, entries, start, buffers, copy, reuse=lambda slot: copied[slot].synchronize(),
                 filled=lambda slot: copied[slot].record(stream))  # fmt: skip
    stream.synchronize()
    return tensors
