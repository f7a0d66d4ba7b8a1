"""TensorRT: ONNX -> strongly typed network -> one optimisation profile -> serialized plan (``.plan``), and its runner.

Modules: ``plan`` decides a build without TensorRT, ``build`` applies it with TensorRT's API, ``runtime`` runs the
plan. A plan runs only under the TensorRT version and on the GPU architecture that built it; ``build`` records both
and ``load`` refuses an engine whose record differs (``fluxtrt.backends.compat.incompatibility``).
"""

from __future__ import annotations

from pathlib import Path

from fluxtrt.backends.base import BuildJob, EngineBackend, LoadJob, Record
from fluxtrt.backends.compat import incompatibility
from fluxtrt.backends.profile import runner_ranges
from fluxtrt.backends.tensorrt.plan import PRECISIONS, TensorRTOptions, build_plan
from fluxtrt.backends.tensorrt.runtime import REBUILD, TrtRunner, trt
from fluxtrt.environment import MIN_SM, gpu_info, require_sm
from fluxtrt.errors import BuildError, EngineError

COMPAT_KEYS = ("tensorrt", "sm", "gpu")


class TensorRTBackend(EngineBackend):
    """TensorRT plans (``.plan``) from the exported ONNX; see the module docstring."""

    name = "tensorrt"
    extension = ".plan"
    uses_onnx = True
    precisions = PRECISIONS
    options_type = TensorRTOptions

    def check_available(self) -> None:
        """Raise MissingDependencyError (how to install TensorRT, or the Docker image) when it does not import."""
        trt()

    def version(self) -> str:
        return trt().__version__

    def build(self, job: BuildJob) -> Record:
        """Plan the build, apply it with TensorRT, write ``job.engine_path``; the record holds the plan and the GPU.

        Raises:
            InputError, BuildError: see ``build_plan``; the parser's errors; a failed or out-of-memory build.
            DeviceError: no CUDA GPU, or one too old for the precision.
        """
        from fluxtrt.backends.tensorrt.build import build_plan_file

        if job.onnx_path is None:
            raise BuildError(f"{job.spec.name}: the tensorrt backend builds from ONNX but the job has none")
        plan = build_plan(job.spec, job.onnx_path, job.precision, job.profile, job.options)
        lib = trt()
        env = gpu_info(job.device)
        if plan.compute in MIN_SM:
            require_sm(env["sm"], plan.compute, "build --precision bf16 here, or build on a newer GPU",
                       f"--precision {plan.compute}")  # fmt: skip
        try:
            details = build_plan_file(lib, plan, Path(job.engine_path))
        except BaseException:
            Path(job.engine_path).unlink(missing_ok=True)
            raise
        return {"tensorrt": lib.__version__, **env, "plan": plan.record(), **details}

    def load(self, job: LoadJob) -> TrtRunner:
        """Deserialize the plan as a loaded ``TrtRunner`` (``options.cuda_graph`` turns CUDA graphs on).

        Raises:
            EngineError: no recorded TensorRT version, another TensorRT, GPU or SM, or a plan that does not load.
            DeviceError: no CUDA GPU.
        """
        spec, path = job.spec, Path(job.engine_path)
        if "tensorrt" not in job.record:
            raise EngineError(f"{spec.name}: {path.name} records no TensorRT version in the manifest: {REBUILD}")
        problem = incompatibility(job.record, {"tensorrt": trt().__version__, **gpu_info(job.device)}, COMPAT_KEYS)
        if problem:
            raise EngineError(f"{spec.name}: {path.name} {problem}: {REBUILD}")
        ranges = runner_ranges(spec, job.profile)
        return TrtRunner(spec, path, job.compute_dtype, job.device, ranges, job.options.cuda_graph).load()
