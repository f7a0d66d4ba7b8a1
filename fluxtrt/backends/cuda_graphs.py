"""CUDA-graph replay of a runner's call, one graph per input signature: the one implementation every backend uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class CudaGraphs:
    """Replays a CUDA graph of ``call(*args)`` per input signature (shapes and dtypes), capturing it on first use.

    Inputs are copied into the graph's buffers and outputs cloned out, so callers may keep them.

    Args:
        call: a callable on CUDA tensors that enqueues its work on the current stream and allocates nothing outside
            torch's allocator (an AOTInductor package loaded with ``run_single_threaded=True``; a TensorRT
            execution context bound to torch-allocated buffers).
    """

    def __init__(self, call: Callable[..., Any]):
        self.call = call
        self.graphs: dict[tuple, tuple[Any, list[Any], tuple[Any, ...]]] = {}

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, inputs, outputs = self.graphs[key]
        for buffer, arg in zip(inputs, args, strict=True):
            buffer.copy_(arg)
        graph.replay()
        return tuple(o.clone() for o in outputs)

    def clear(self) -> None:
        """Drop every captured graph and its buffers."""
        self.graphs = {}

    def _capture(self, args: tuple[Any, ...]) -> tuple[Any, list[Any], tuple[Any, ...]]:
        import torch

        inputs = [a.clone() for a in args]
        # One run outside the capture: lazy initialisation (cuBLAS handles, kernel loading, TensorRT's work after a
        # shape change) cannot be captured.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.call(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.call(*inputs)
        outputs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return graph, inputs, outputs
