"""Running an ONNX file in an ONNX Runtime session: the session, its providers, and the runner."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fluxtrt.backends.runner import Runner
from fluxtrt.errors import EngineError, MissingDependencyError, first_line
from fluxtrt.specs.component import ComponentSpec


def ort() -> Any:
    """The onnxruntime module (MissingDependencyError naming the install command if absent)."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", "the onnxruntime backend", "pip install 'fluxtrt[onnx]'") from None
    return onnxruntime


def providers(device: str) -> list[str]:
    """Execution providers for ``device``, best first.

    Raises:
        EngineError: CUDA asked for but onnxruntime-gpu is not installed.
    """
    onnxruntime = ort()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise EngineError(
            f"--device {device} needs ONNX Runtime's CUDA provider, but this onnxruntime has only "
            f"{onnxruntime.get_available_providers()}: pip install onnxruntime-gpu, or use --device cpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session(path: Any, device: str, optimized_path: Any = None, external_data: str | None = None,
            initializers: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """An InferenceSession over ``path``; with ``optimized_path``, ONNX Runtime saves its optimised graph there;
    ``initializers`` (name -> OrtValue, kept alive by the caller) replace the file's initializers of those names.

    Raises:
        EngineError: the file is not a loadable ONNX model (corrupt, truncated, missing external data).
    """
    import torch

    onnxruntime = ort()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # As many CPU threads as PyTorch computes with in this process (torch.set_num_threads, OMP_NUM_THREADS): one
    # setting governs both runtimes of an edit, where ONNX Runtime's default takes every core whatever was asked.
    options.intra_op_num_threads = torch.get_num_threads()
    if optimized_path is not None:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized_path)
        if external_data is not None:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", external_data)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers(device))
    except EngineError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for every load failure
        first = first_line(exc)
        if "NOT_IMPLEMENTED" in first:
            raise EngineError(
                f"ONNX Runtime's {providers(device)[0]} has no kernel for a node of {path} ({first[:300]}): build "
                "with --precision fp32 for the CPU provider, or run on --device cuda with onnxruntime-gpu"
            ) from None
        raise EngineError(
            f"ONNX Runtime cannot load {path} ({first[:300]}): the file is corrupt or incomplete; rebuild it with "
            "`fluxtrt build ... --force`"
        ) from None


class OrtRunner(Runner):
    """Runs an ONNX file in an ONNX Runtime session (created by ``load``, dropped by ``close``).

    Args:
        spec: the component spec; the session's inputs/outputs must carry its names.
        path: the ONNX file.
        compute_dtype: dtype of the spec's ``compute`` tensors (fp32 on the CPU provider).
        device: where inputs arrive and outputs are returned.
        ranges: symbol -> (min, max) the engine was built for.
    """

    def __init__(self, spec: ComponentSpec, path: Path, compute_dtype: Any, device: str = "cpu",
                 ranges: Mapping[str, tuple[int, int]] | None = None):  # fmt: skip
        super().__init__(spec, compute_dtype, device, ranges)
        self.path = Path(path)
        self.session: Any = None
        self._overrides: dict[str, Any] = {}  # initializer name -> OrtValue replacing it (merged LoRA weights)
        self._linears: dict[str, Any] | None = None

    def linear_weights(self) -> dict[str, Any]:
        """Module name -> the file's weight of each linear, [out, in] as a torch tensor (the originals)."""
        import torch

        from fluxtrt.backends.onnx_weights import linear_initializers, read_initializers

        if self._linears is None:
            where = linear_initializers(self.path)
            arrays = read_initializers(self.path, {w.name for w in where.values()})
            self._linears = {m: (w, torch.from_numpy(np.array(arrays[w.name].T if w.transposed else arrays[w.name])))
                             for m, w in where.items()}  # fmt: skip
        return {m: weight for m, (_, weight) in self._linears.items()}

    def set_linear_weights(self, weights: Mapping[str, Any] | None) -> None:
        """Recreate the session with these linears' weights ([out, in] tensors) in place of the file's; None: the
        file's own weights again."""
        overrides: dict[str, Any] = {}
        if weights:
            onnxruntime = ort()
            self.linear_weights()
            for module, weight in weights.items():
                where, base = self._linears[module]
                array = weight.detach().cpu().to(base.dtype).numpy()
                array = np.ascontiguousarray(array.T if where.transposed else array)
                overrides[where.name] = onnxruntime.OrtValue.ortvalue_from_numpy(array)
        self._overrides = overrides
        if self.is_loaded:
            self.session = session(self.path, self.device.split(":")[0], initializers=overrides)

    def _load(self) -> None:
        sess = session(self.path, self.device.split(":")[0], initializers=self._overrides)
        names = [i.name for i in sess.get_inputs()]
        if names != list(self.spec.input_names):
            raise EngineError(f"{self.name}: the ONNX inputs are {names}, expected {list(self.spec.input_names)}")
        self.session = sess

    def _close(self) -> None:
        self.session = None

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        if self.device == "cpu":
            arrays = {name: np.ascontiguousarray(feed[name].detach().numpy()) for name in self.spec.input_names}
            outs = self.session.run(list(self.spec.output_names), arrays)
            return {name: torch.from_numpy(np.asarray(o)) for name, o in zip(self.spec.output_names, outs, strict=True)}
        # CUDA: bind torch's device buffers directly, let ORT allocate outputs on the device, hand them back via DLPack.
        index = torch.device(self.device).index or 0
        binding = self.session.io_binding()
        for name in self.spec.input_names:
            value = feed[name].contiguous()
            binding.bind_input(name, "cuda", index, _element_type(value.dtype), tuple(value.shape), value.data_ptr())
        for name in self.spec.output_names:
            binding.bind_output(name, "cuda", index)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {name: _to_torch(o, self.device) for name, o in zip(self.spec.output_names, outs, strict=True)}


def _to_torch(value: Any, device: str) -> Any:
    """An ORT device output as a torch tensor: zero-copy through DLPack where this onnxruntime build has it, else
    through the host (numpy has no bfloat16, so a bf16 output then needs the DLPack path)."""
    import torch

    if hasattr(value, "to_dlpack"):
        return torch.from_dlpack(value.to_dlpack())
    return torch.from_numpy(value.numpy()).to(device)


def _element_type(dtype: Any) -> Any:
    """ONNX Runtime's element type for an I/O binding: a numpy type, or the ONNX type number where numpy has none."""
    import torch

    table = {torch.float32: np.float32, torch.int64: np.int64, torch.float16: np.float16, torch.bfloat16: 16}
    if dtype not in table:  # 16 is onnx.TensorProto.BFLOAT16
        raise EngineError(f"ONNX Runtime I/O binding has no element type for {dtype}: build with --precision fp32")
    return table[dtype]
