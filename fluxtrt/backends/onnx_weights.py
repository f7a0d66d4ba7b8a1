"""Which initializers of an exported ONNX transformer hold which linear's weight, so that a runner can replace them
(merged LoRA weights) by recreating its session with those initializers overridden.

torch's exporter writes ``nn.Linear(x)`` as ``Add(MatMul(x, W^T), <module>.bias)`` (or a ``Gemm``): the bias keeps
the module's name, the transposed weight gets a generated one; the bias names the weight's module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LinearInitializer:
    """Where a linear's weight lives in the graph: the initializer's name and whether it is stored as [in, out]."""

    name: str
    transposed: bool


def linear_initializers(path: Path, prefix: str = "transformer.") -> dict[str, LinearInitializer]:
    """Module name (without ``prefix``) -> its weight's initializer, for every linear of the graph with a bias."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    found: dict[str, LinearInitializer] = {}
    for node in graph.node:
        if node.op_type == "Gemm" and len(node.input) == 3 and node.input[1] in inits:
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            _add(found, node.input[2], LinearInitializer(node.input[1], not trans_b), prefix)
        elif node.op_type == "Add" and len(node.input) == 2:
            for value, bias in (node.input, node.input[::-1]):
                matmul = producer.get(value)
                if bias in inits and matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in inits:
                    _add(found, bias, LinearInitializer(matmul.input[1], True), prefix)
    return found


def _add(found: dict, bias: str, where: LinearInitializer, prefix: str) -> None:
    if bias.endswith(".bias"):
        found[bias.removesuffix(".bias").removeprefix(prefix)] = where


def read_initializers(path: Path, names: set[str]) -> dict[str, Any]:
    """The named initializers of ``path`` as numpy arrays (external data read beside the file)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for init in model.graph.initializer:
        if init.name in names:
            if onnx.external_data_helper.uses_external_data(init):
                onnx.external_data_helper.load_external_data_for_tensor(init, str(Path(path).parent))
            out[init.name] = numpy_helper.to_array(init)
    return out
