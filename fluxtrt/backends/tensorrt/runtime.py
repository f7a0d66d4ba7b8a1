"""Running a serialized TensorRT (or TensorRT-RTX) plan: deserialization through Polygraphy's ``EngineFromBytes``
(``load``), bindings on torch CUDA tensors, and optional CUDA-graph replay through the shared ``CudaGraphs``.

Polygraphy's own ``TrtRunner`` is not used: fluxtrt's runner contract (the spec, the built range, the device, the
lifecycle) and its CUDA-graph capture are one implementation for every backend."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fluxtrt.backends.cuda_graphs import CudaGraphs
from fluxtrt.backends.runner import Runner
from fluxtrt.backends.tensorrt.flavour import TENSORRT, Flavour
from fluxtrt.backends.tensorrt.refit import initializer_tensors, onnx_beside, refit, refit_targets
from fluxtrt.errors import EngineError, InputError, ShapeError
from fluxtrt.specs.component import ComponentSpec


def rebuild(flavour: Flavour) -> str:
    return f"rebuild with fluxtrt build --backend {flavour.backend}"


class TrtRunner(Runner):
    """Runs a TensorRT plan on torch CUDA tensors; ``load`` deserializes it, ``close`` frees engine and context.

    Inputs are bound in place (made contiguous); outputs are torch tensors allocated for each call's shapes and
    returned. With ``cuda_graph``, each input signature's call is captured once and replayed (``CudaGraphs``). A
    ``refittable`` plan (``--refittable``) takes new linear weights (merged LoRAs) through TensorRT's refitter
    (``set_linear_weights``); its original weights are read from the ONNX it was built from.

    Args:
        spec: the component spec.
        path: the plan file.
        compute_dtype: dtype of the spec's ``compute`` tensors.
        device: the CUDA device.
        ranges: symbol -> (min, max) the plan's profile allows.
        cuda_graph: capture and replay CUDA graphs for repeated shapes.
        flavour: which TensorRT built the plan.
        refittable: the plan was built with refittable linear weights.
        onnx_path: the ONNX the plan was built from (default: the engines directory's, beside the plan).
    """

    def __init__(self, spec: ComponentSpec, path: Path, compute_dtype: Any, device: str = "cuda",
                 ranges: Mapping[str, tuple[int, int]] | None = None, cuda_graph: bool = False,
                 flavour: Flavour = TENSORRT, refittable: bool = False,
                 onnx_path: Path | None = None):  # fmt: skip
        super().__init__(spec, compute_dtype, device, ranges)
        self.path = Path(path)
        self.cuda_graph = cuda_graph
        self.flavour = flavour
        self.refittable = refittable
        self.onnx_path = Path(onnx_path) if onnx_path is not None else onnx_beside(self.path, spec.name)
        self.logger = self.runtime = self.engine = self.context = self.graphs = None
        self.dtypes: dict[str, Any] = {}
        self._targets: dict[str, Any] | None = None  # module -> LinearInitializer (refit_targets)
        self._originals: dict[str, Any] | None = None  # module -> the ONNX's weight, [out, in]
        self._replaced: set[str] = set()  # modules whose weights in the loaded engine are not the ONNX's
        self._weights: dict[str, Any] = {}  # module -> the weight set_linear_weights gave (refit at every load)

    def linear_weights(self) -> dict[str, Any]:
        """Module name -> the plan's original weight of each linear, [out, in] as a CPU torch tensor (read from the
        ONNX it was built from, mapped rather than read where the weights are external).

        Raises:
            InputError: the plan was built without ``--refittable``.
            EngineError: its ONNX is missing.
        """
        if not self.refittable:
            raise InputError(f"--lora: {self.path.name} was built without --refittable, so {self.flavour.name} "
                             f"cannot take new weights into it: {rebuild(self.flavour)} --refittable")  # fmt: skip
        if self._originals is None:
            if not self.onnx_path.is_file():
                raise EngineError(
                    f"{self.name}: {self.onnx_path} (the ONNX {self.path.name} was built from, which holds its "
                    f"original weights) is missing: {rebuild(self.flavour)} --refittable"
                )
            targets = refit_targets(self.onnx_path)
            stored = initializer_tensors(self.onnx_path, {t.name for t in targets.values()})
            self._targets = targets
            self._originals = {m: stored[t.name].T if t.transposed else stored[t.name] for m, t in targets.items()}
        return dict(self._originals)

    def set_linear_weights(self, weights: Mapping[str, Any] | None) -> None:
        """Refit the plan with these linears' weights ([out, in] tensors) and every linear replaced before back at
        its original; None: all originals, bit for bit. Kept for the runner's life: a plan loaded again is refit
        with them. A CUDA-graph runner captures its graphs again.

        Raises:
            InputError: the plan is not refittable.
            EngineError: TensorRT refused the weights.
        """
        self.linear_weights()
        weights = dict(weights or {})
        if self.engine is not None:
            self._refit(weights)
        self._weights = weights

    def _refit(self, weights: Mapping[str, Any]) -> None:
        """Refit the loaded engine: ``weights`` and the originals of the linears replaced before."""
        originals = self.linear_weights()
        named = {}
        for module in sorted(set(weights) | self._replaced):
            weight, target = weights.get(module, originals[module]), self._targets[module]
            named[target.name] = (weight.T if target.transposed else weight).to(originals[module].dtype)
        if named:
            refit(self.flavour.lib(), self.engine, self.logger, named, self._initializers, self.name)
        self._replaced = set(weights)
        if self.graphs is not None:
            self.graphs = CudaGraphs(self._execute)

    def _initializers(self, names: set[str]) -> dict[str, Any]:
        """The ONNX's own values of initializers ``names`` (weights the refitter needs besides the linears')."""
        return initializer_tensors(self.onnx_path, names) if names else {}

    def _load(self) -> None:
        from polygraphy.exception import PolygraphyException

        lib, polygraphy = self.flavour.lib(), self.flavour.polygraphy()
        self.logger = lib.Logger(lib.Logger.WARNING)  # one logger for the runtime and the refitter
        self.runtime = lib.Runtime(self.logger)  # the engine must not outlive its runtime
        try:
            self.engine = polygraphy.EngineFromBytes(self.path.read_bytes(), runtime=self.runtime)()
        except PolygraphyException:
            self.runtime = None
            raise EngineError(
                f"{self.name}: {self.flavour.name} cannot deserialize {self.path} (corrupt or truncated): "
                f"{rebuild(self.flavour)}"
            ) from None
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == lib.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if sorted(inputs) != sorted(self.spec.input_names) or sorted(outputs) != sorted(self.spec.output_names):
            raise EngineError(
                f"{self.name}: the engine's inputs/outputs are {inputs}/{outputs}, expected "
                f"{list(self.spec.input_names)}/{list(self.spec.output_names)}: {rebuild(self.flavour)}"
            )
        self.dtypes = {n: torch_dtype(lib, self.engine.get_tensor_dtype(n)) for n in names}
        self.graphs = CudaGraphs(self._execute) if self.cuda_graph else None
        self._replaced = set()  # a plan just deserialized holds the ONNX's weights
        if self._weights:
            self._refit(self._weights)

    def _close(self) -> None:
        self.graphs = self.context = self.engine = self.runtime = None

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        args = [feed[n].to(self.dtypes[n]).contiguous() for n in self.spec.input_names]
        outs = self.graphs(*args) if self.graphs is not None else self._execute(*args)
        return dict(zip(self.spec.output_names, outs, strict=True))

    def _execute(self, *args: Any) -> tuple[Any, ...]:
        """Bind ``args`` (spec input order), allocate the outputs, enqueue on the current stream."""
        import torch

        for n, t in zip(self.spec.input_names, args, strict=True):
            if not self.context.set_input_shape(n, tuple(t.shape)):
                raise ShapeError(f"{self.name}.{n}: TensorRT refused shape {tuple(t.shape)}: {rebuild(self.flavour)}")
            self.context.set_tensor_address(n, t.data_ptr())
        outputs = []
        for n in self.spec.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device=args[0].device)
            self.context.set_tensor_address(n, out.data_ptr())
            outputs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise EngineError(
                f"{self.name}: TensorRT execute_async_v3 failed on shapes {[tuple(a.shape) for a in args]}"
            )
        return tuple(outputs)


def torch_dtype(trt: Any, trt_dtype: Any) -> Any:
    """The torch dtype of a ``trt.DataType``."""
    import torch

    kinds = trt.DataType
    table = {
        kinds.FLOAT: torch.float32,
        kinds.HALF: torch.float16,
        kinds.BF16: torch.bfloat16,
        kinds.INT64: torch.int64,
        kinds.INT32: torch.int32,
        kinds.INT8: torch.int8,
        kinds.BOOL: torch.bool,
    }
    if trt_dtype not in table:
        raise EngineError(f"the engine has an I/O tensor of type {trt_dtype}, which fluxtrt cannot bind: rebuild it")
    return table[trt_dtype]
