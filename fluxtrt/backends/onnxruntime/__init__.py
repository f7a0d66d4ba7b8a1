"""ONNX Runtime: the backend that runs every exported graph in CI, and the reference runner for ONNX parity.

The "engine" is the exported ONNX after ONNX Runtime's basic graph optimisations (constant folding, redundant-node
elimination), saved by ONNX Runtime itself (``build``). Basic optimisations are provider-independent, so one engine
serves the CPU and the CUDA provider; the provider-specific ones run when a session loads it (``runtime``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fluxtrt.backends.base import BuildJob, EngineBackend, LoadJob, NoOptions
from fluxtrt.backends.profile import runner_ranges
from fluxtrt.backends.record import BackendRecord
from fluxtrt.errors import EngineError, InputError

if TYPE_CHECKING:
    from fluxtrt.backends.onnxruntime.runtime import OrtRunner

ENGINE_DATA_SUFFIX = "_data"


@dataclass
class OnnxRuntimeRecord(BackendRecord):
    """The graph optimisations applied, and the engine's external weights file (None: none)."""

    graph_optimization: str | None = None
    external_data: str | None = None


class OnnxRuntimeBackend(EngineBackend[NoOptions]):
    """Engines for ONNX Runtime: the basic-optimised ONNX of each component."""

    name = "onnxruntime"
    extension = ".onnx"
    uses_onnx = True
    precisions = ("fp32", "bf16")
    record_type = OnnxRuntimeRecord

    def check_available(self) -> None:
        from fluxtrt.backends.onnxruntime.runtime import ort

        ort()

    def version(self) -> str:
        from fluxtrt.backends.onnxruntime.runtime import ort

        return ort().__version__

    def build(self, job: BuildJob[NoOptions]) -> OnnxRuntimeRecord:
        if job.precision not in self.precisions:
            raise InputError(f"--precision {job.precision} is not built by onnxruntime, expected one of "
                             f"{', '.join(self.precisions)}")  # fmt: skip
        from fluxtrt.backends.onnxruntime.runtime import session

        external = None
        if job.onnx_path is not None and (job.onnx_path.parent / "model.onnx_data").exists():
            external = job.engine_path.name + ENGINE_DATA_SUFFIX  # written beside the engine, e.g. t5.onnx_data
        # Creating the session writes the optimised model; the session itself is not needed. Optimise on the CPU
        # provider: basic optimisations are provider-independent and the build machine may have no GPU.
        session(job.onnx_path, "cpu", optimized_path=job.engine_path, external_data=external)
        return OnnxRuntimeRecord(graph_optimization="basic", external_data=external)

    def load(self, job: LoadJob[NoOptions]) -> OrtRunner:
        import torch

        from fluxtrt.backends.onnxruntime.runtime import OrtRunner

        if job.device == "cpu" and job.compute_dtype != torch.float32:
            raise EngineError(
                f"{job.spec.name}: ONNX Runtime's CPU provider has no {job.compute_dtype} kernels for these graphs: "
                "build with --precision fp32 for CPU, or run on --device cuda with onnxruntime-gpu"
            )
        ranges = runner_ranges(job.spec, job.profile)
        return OrtRunner(job.spec, job.engine_path, job.compute_dtype, job.device, ranges).load()
