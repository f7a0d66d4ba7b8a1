"""``--backend onnx``: the exported ONNX of each component (Q/DQ-quantized at fp8/fp4, with the calibration), the
manifest and the profile shapes, and no engine: what a user carries to a machine with TensorRT 10, where
``fluxtrt build --backend tensorrt --onnx-dir DIR/onnx`` (or the ``trtexec`` commands ``fluxtrt inspect DIR`` prints)
builds the engines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fluxtrt.backends.base import BuildJob, EngineBackend, LoadJob, NoOptions
from fluxtrt.backends.record import BackendRecord
from fluxtrt.backends.runner import Runner
from fluxtrt.backends.tensorrt.plan import PRECISIONS, component_precision, trtexec_command
from fluxtrt.errors import EngineError, MissingDependencyError


@dataclass
class OnnxRecord(BackendRecord):
    """What the component's ONNX computes in, and the ``trtexec`` command that builds its engine."""

    compute: str | None = None
    trtexec: str | None = None


class OnnxOnlyBackend(EngineBackend[NoOptions]):
    """Writes no engine; each component's record holds the ``trtexec`` command that builds it."""

    name = "onnx"
    extension = ".onnx"
    uses_onnx = True
    writes_engine = False
    precisions = PRECISIONS
    record_type = OnnxRecord

    def check_available(self) -> None:
        try:
            import onnx  # noqa: F401
        except ImportError:
            feature = "the onnx backend (ONNX export)"
            raise MissingDependencyError("onnx", feature, "pip install 'fluxtrt[onnx]'") from None

    def version(self) -> str:
        import onnx

        return onnx.__version__

    def build(self, job: BuildJob[NoOptions]) -> OnnxRecord:
        onnx_path = Path("onnx") / job.spec.name / Path(job.onnx_path).name  # where the build moves it
        compute = component_precision(job.spec.name, job.precision)
        return OnnxRecord(compute=compute, trtexec=trtexec_command(job.spec.name, onnx_path, job.profile, compute))

    def load(self, job: LoadJob[NoOptions]) -> Runner:
        root = Path(job.engine_path).parents[2]
        raise EngineError(
            f"{root} holds ONNX only (fluxtrt build --backend onnx), no engines to run: build them with `fluxtrt "
            f"build --backend tensorrt --onnx-dir {root}/onnx --model MODEL --out DIR` on a GPU with TensorRT 10, or "
            f"with the trtexec commands `fluxtrt inspect {root}` prints"
        )
