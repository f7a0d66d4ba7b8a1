"""Refittable TensorRT plans of the transformer: which weights are refittable, and refitting them.

TensorRT's ONNX parser names each weight after its ONNX initializer, and those names are what ``INetworkDefinition
.mark_weights_refittable`` and ``Refitter.set_named_weights`` take. A linear's weight is the initializer that
``fluxtrt.backends.onnx_weights.linear_initializers`` finds behind its bias (``transformer.<module>.bias``):
the module's own ``<module>.weight`` in a ``Gemm`` ([out, in]), or a generated name such as ``val_284`` holding the
transposed weight ([in, out]) of a ``MatMul``. A ``--refittable`` build marks exactly those initializers and sets
``BuilderFlag.REFIT_INDIVIDUAL``, so every other weight keeps TensorRT's constant folding.

FP8/NVFP4 transformers are not refit: their linears are ``DequantizeLinear(<module>.weight_fp8, weight_scale)``, an
FP8 (FP4) initializer with per-channel scales calibrated for the original weight, and a LoRA's merged weight would
need new scales and a new quantization, which fluxtrt does not do; ``--refittable`` with those precisions is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fluxtrt.backends.onnx_weights import LinearInitializer, linear_initializers
from fluxtrt.errors import BuildError, EngineError

# The documented layout of an engines directory: <dir>/onnx/<component>/model.onnx beside <dir>/<component>.plan.
ONNX_NAME = "model.onnx"

# ONNX TensorProto element types fluxtrt's exports give the linears' weights -> (torch dtype, numpy dtype of the bytes).
ONNX_DTYPES = {1: ("float32", "float32"), 10: ("float16", "float16"), 16: ("bfloat16", "uint16")}


def onnx_beside(engine_path: Path, component: str) -> Path:
    """The ONNX a plan of an engines directory was built from."""
    return Path(engine_path).parent / "onnx" / component / ONNX_NAME


def refit_targets(onnx_path: Path) -> dict[str, LinearInitializer]:
    """Module name (as in diffusers' transformer: ``transformer_blocks.0.attn.to_q``) -> the initializer holding its
    weight, for every linear of the exported transformer whose weight is an initializer."""
    return linear_initializers(Path(onnx_path))


def mark_refittable(network: Any, onnx_path: Path, component: str) -> int:
    """Mark every linear's weight initializer of ``onnx_path`` refittable in TensorRT's parsed ``network``.

    Returns:
        How many were marked.

    Raises:
        BuildError: the ONNX has no linear weights to mark, or TensorRT's network does not hold one of them.
    """
    targets = refit_targets(onnx_path)
    refused = sorted(m for m, where in targets.items() if not network.mark_weights_refittable(where.name))
    if not targets or refused:
        what = f"{len(refused)} of its {len(targets)} linears' weights ({', '.join(refused[:3])})" if refused else (
            "no linear weights")  # fmt: skip
        raise BuildError(
            f"{component}: --refittable found {what} among the refittable weights of TensorRT's network for "
            f"{onnx_path}: build without --refittable, or from fluxtrt's own export (no --onnx-dir)"
        )
    return len(targets)


def initializer_tensors(onnx_path: Path, names: set[str]) -> dict[str, Any]:
    """The named initializers of ``onnx_path`` as CPU torch tensors in their own dtype; external data is mapped
    (copy on write), so a tensor is read from disk only where it is used."""
    import numpy as np
    import onnx
    import torch
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for init in model.graph.initializer:
        if init.name not in names:
            continue
        if init.data_type not in ONNX_DTYPES:
            raise EngineError(
                f"{onnx_path}: initializer {init.name} has ONNX type {init.data_type}, which fluxtrt does not refit "
                "(float32, float16 and bfloat16 only): rebuild without --refittable"
            )
        torch_dtype, raw_dtype = ONNX_DTYPES[init.data_type]
        shape = tuple(init.dims)
        count = int(np.prod(shape, dtype=np.int64))
        if uses_external_data(init):
            where = {e.key: e.value for e in init.external_data}
            array = np.memmap(Path(onnx_path).parent / where["location"], dtype=raw_dtype, mode="c",
                              offset=int(where.get("offset", 0)), shape=(count,))  # fmt: skip
        elif init.raw_data:
            array = np.frombuffer(bytearray(init.raw_data), dtype=raw_dtype, count=count)
        else:
            from onnx import numpy_helper

            array = np.ascontiguousarray(numpy_helper.to_array(init)).reshape(-1).view(raw_dtype)
        out[init.name] = torch.from_numpy(array).view(getattr(torch, torch_dtype)).reshape(shape)
    return out


def refit(lib: Any, engine: Any, logger: Any, named: Mapping[str, Any], originals: Any, what: str) -> None:
    """Set the refittable weights ``named`` (initializer name -> tensor, as stored in the ONNX) in ``engine`` and
    refit it; weights TensorRT asks for besides them (combined in the plan) come from ``originals(names)``.

    Raises:
        EngineError: TensorRT refused a weight (its name, dtype or size), or the refit failed (the engine's weights
            are then undefined: load the engines again).
    """
    import torch

    refitter = lib.Refitter(engine, logger)
    device = torch.device("cuda", torch.cuda.current_device())
    alive: list[Any] = []  # the device copies must outlive refit_cuda_engine

    def put(name: str, tensor: Any) -> None:
        t = tensor.to(device).contiguous()
        alive.append(t)
        weights = lib.Weights(_trt_dtype(lib, t.dtype), t.data_ptr(), t.numel())
        if not refitter.set_named_weights(name, weights, lib.TensorLocation.DEVICE):
            proto = refitter.get_weights_prototype(name)
            raise EngineError(
                f"{what}: TensorRT refused weights {name} ({t.dtype}, {t.numel()} values; the plan has "
                f"{proto.dtype}, {proto.size}): rebuild the engines with --refittable from this directory's ONNX"
            )

    for name, tensor in named.items():
        put(name, tensor)
    missing = [n for n in refitter.get_missing_weights() if n not in named]
    for name, tensor in originals(set(missing)).items():
        put(name, tensor)
    torch.cuda.current_stream().synchronize()  # no work of the engine may be pending during the refit
    if not refitter.refit_cuda_engine():
        missing = refitter.get_missing_weights()[:3]
        raise EngineError(f"{what}: TensorRT's refit failed (weights still missing: {missing}); the engine's weights "
                          "are now undefined: load the engines again")  # fmt: skip


def _trt_dtype(lib: Any, dtype: Any) -> Any:
    import torch

    table = {torch.float32: lib.DataType.FLOAT, torch.float16: lib.DataType.HALF, torch.bfloat16: lib.DataType.BF16}
    return table[dtype]
