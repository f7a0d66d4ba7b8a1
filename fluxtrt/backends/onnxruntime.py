"""ONNX Runtime: the backend that runs every exported graph in CI, and the reference runner for ONNX parity.

The "engine" is the exported ONNX after ONNX Runtime's basic graph optimisations (constant folding, redundant-node
elimination), saved by ONNX Runtime itself. Basic optimisations are provider-independent, so one engine serves the
CPU and the CUDA provider; the provider-specific ones run when a session loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fluxtrt.backends.runner import Runner
from fluxtrt.engines.backend import BuildJob, EngineBackend, LoadJob
from fluxtrt.errors import EngineError, InputError, MissingDependencyError, first_line
from fluxtrt.specs.component import ComponentSpec

ENGINE_DATA_SUFFIX = "_data"


def _ort() -> Any:
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
    ort = _ort()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise EngineError(
            f"--device {device} needs ONNX Runtime's CUDA provider, but this onnxruntime has only "
            f"{ort.get_available_providers()}: pip install onnxruntime-gpu, or use --device cpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OrtRunner(Runner):
    """Runs an ONNX file in an ONNX Runtime session.

    Args:
        spec: the component spec; the session's inputs/outputs must carry its names.
        session: an ``onnxruntime.InferenceSession``.
        compute_dtype: dtype of the spec's ``compute`` tensors (fp32 on the CPU provider).
        device: where inputs arrive and outputs are returned.
    """

    def __init__(self, spec: ComponentSpec, session: Any, compute_dtype: torch.dtype, device: str = "cpu"):
        super().__init__(spec, compute_dtype)
        names = [i.name for i in session.get_inputs()]
        if names != list(spec.input_names):
            raise EngineError(f"{spec.name}: the ONNX inputs are {names}, expected {list(spec.input_names)}")
        self.session = session
        self.device = torch.device(device)

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        if self.device.type == "cpu":
            arrays = {name: np.ascontiguousarray(feed[name].detach().numpy()) for name in self.spec.input_names}
            outs = self.session.run(list(self.spec.output_names), arrays)
            return {name: torch.from_numpy(np.asarray(o)) for name, o in zip(self.spec.output_names, outs, strict=True)}
        # CUDA: bind torch's device buffers directly, let ORT allocate outputs on the device, hand them back via DLPack.
        binding = self.session.io_binding()
        for name in self.spec.input_names:
            value = feed[name].contiguous()
            binding.bind_input(name, "cuda", self.device.index or 0, _element_type(value.dtype), tuple(value.shape),
                               value.data_ptr())  # fmt: skip
        for name in self.spec.output_names:
            binding.bind_output(name, "cuda", self.device.index or 0)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {name: _to_torch(o, self.device) for name, o in zip(self.spec.output_names, outs, strict=True)}


def _to_torch(value: Any, device: torch.device) -> torch.Tensor:
    """An ORT device output as a torch tensor: zero-copy through DLPack where this onnxruntime build has it, else
    through the host (numpy has no bfloat16, so a bf16 output then needs the DLPack path)."""
    if hasattr(value, "to_dlpack"):
        return torch.from_dlpack(value.to_dlpack())
    return torch.from_numpy(value.numpy()).to(device)


def _element_type(dtype: torch.dtype) -> Any:
    """ONNX Runtime's element type for an I/O binding: a numpy type, or the ONNX type number where numpy has none."""
    table = {torch.float32: np.float32, torch.int64: np.int64, torch.float16: np.float16, torch.bfloat16: 16}
    if dtype not in table:  # 16 is onnx.TensorProto.BFLOAT16
        raise EngineError(f"ONNX Runtime I/O binding has no element type for {dtype}: build with --precision fp32")
    return table[dtype]


def session(path: Any, device: str, optimized_path: Any = None, external_data: str | None = None) -> Any:
    """An InferenceSession over ``path``; with ``optimized_path``, ONNX Runtime saves its optimised graph there.

    Raises:
        EngineError: the file is not a loadable ONNX model (corrupt, truncated, missing external data).
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is not None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimized_path)
        if external_data is not None:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name", external_data)
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers(device))
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


class OnnxRuntimeBackend(EngineBackend):
    """Engines for ONNX Runtime: the basic-optimised ONNX of each component."""

    name = "onnxruntime"
    extension = ".onnx"
    uses_onnx = True
    precisions = ("fp32", "bf16")

    def check_available(self) -> None:
        _ort()

    def version(self) -> str:
        return _ort().__version__

    def build(self, job: BuildJob) -> None:
        if job.precision not in self.precisions:
            raise InputError(f"--precision {job.precision} is not built by onnxruntime, expected one of "
                             f"{', '.join(self.precisions)}")  # fmt: skip
        external = None
        if job.onnx_path is not None and (job.onnx_path.parent / "model.onnx_data").exists():
            external = job.engine_path.name + ENGINE_DATA_SUFFIX  # written beside the engine, e.g. t5.onnx_data
        # Creating the session writes the optimised model; the session itself is not needed. Optimise on the CPU
        # provider: basic optimisations are provider-independent and the build machine may have no GPU.
        session(job.onnx_path, "cpu", optimized_path=job.engine_path, external_data=external)
        job.options.update({"graph_optimization": "basic", "external_data": external})

    def load(self, job: LoadJob) -> Runner:
        if job.device == "cpu" and job.compute_dtype != torch.float32:
            raise EngineError(
                f"{job.spec.name}: ONNX Runtime's CPU provider has no {job.compute_dtype} kernels for these graphs: "
                "build with --precision fp32 for CPU, or run on --device cuda with onnxruntime-gpu"
            )
        return OrtRunner(job.spec, session(job.engine_path, job.device), job.compute_dtype, job.device)
