"""The ONNX export's optimizer: onnxscript's passes less the quadratic pattern rule, same graph as ``optimize_ir``."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fluxtrt.specs import Resolution

pytest.importorskip("onnx")
onnxscript = pytest.importorskip("onnxscript")


def unoptimized(tiny, name: str):
    """The component translated to ONNX exactly as ``export_onnx`` does, before any optimization."""
    from fluxtrt.backends.torch_modules import component_module
    from fluxtrt.export.onnx import OPSET, _fused_kernel_decompositions
    from fluxtrt.specs import component_specs
    from fluxtrt.specs.flux import component_dims, dims_from_components

    dims = dims_from_components(tiny)
    spec = component_specs(dims)[name]
    feed = spec.sample_feed(component_dims(name, dims, 2, Resolution(144, 160), Resolution(128, 128)), torch.float32)
    dynamic = {t.name: {i: torch.export.Dim.DYNAMIC for i, d in enumerate(t.shape) if isinstance(d, str)} or None
               for t in spec.inputs}  # fmt: skip
    with torch.no_grad():
        exported = torch.export.export(component_module(name, tiny), tuple(feed[n] for n in spec.input_names),
                                       dynamic_shapes=dynamic, strict=False)  # fmt: skip
        exported = exported.run_decompositions(_fused_kernel_decompositions())
        return torch.onnx.export(exported, input_names=list(spec.input_names), output_names=list(spec.output_names),
                                 opset_version=OPSET, dynamo=True, optimize=False, verbose=False).model  # fmt: skip


def structure(model) -> tuple[Counter, int]:
    return Counter(node.op_type for node in model.graph), len(model.graph.initializers)


def test_optimized_graph_matches_onnxscripts_optimizer(tiny):
    import onnx_ir as ir

    from fluxtrt.export.onnx import _optimize

    ours = unoptimized(tiny, "transformer")
    reference = ir.from_proto(ir.to_proto(ours))  # a second, independent copy of the same graph
    before = structure(ours)
    _optimize(ours)
    onnxscript.optimizer.optimize_ir(reference)
    ops, initializers = structure(ours)
    assert (ops, initializers) == structure(reference)
    assert sum(ops.values()) < sum(before[0].values())  # it did fold and rewrite something
    # TensorRT's parser rejects the exporter's sequence ops; folding with shape inference turns them into Split.
    assert before[0]["SplitToSequence"] > 0
    assert ops["SplitToSequence"] == ops["SequenceAt"] == 0
