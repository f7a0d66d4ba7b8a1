"""TensorRT 10 and TensorRT-RTX: ONNX -> strongly typed network -> one optimisation profile -> serialized plan
(``.plan``), and its runner. One implementation, the differences held by ``flavour``.

Modules: ``flavour`` (what differs between the two), ``plan`` (a build decided without TensorRT), ``network`` (the
quantization check on the parsed network), ``build`` (the build through Polygraphy), ``runtime`` (the runner). A plan
runs only under the TensorRT release that built it and on the GPUs it was built for: ``build`` records both and
``load`` refuses an engine whose record differs, before deserializing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fluxtrt.backends.base import BuildJob, EngineBackend, LoadJob
from fluxtrt.backends.compat import incompatibility
from fluxtrt.backends.profile import runner_ranges
from fluxtrt.backends.record import BackendRecord, as_record
from fluxtrt.backends.tensorrt.flavour import TENSORRT, TENSORRT_RTX, Flavour, rtx_plan_version
from fluxtrt.backends.tensorrt.plan import (
    PRECISIONS,
    QUANTIZED,
    TensorRTOptions,
    TensorRTRtxOptions,
    build_plan,
    check_targets,
    component_precision,
)
from fluxtrt.backends.tensorrt.runtime import TrtRunner, rebuild
from fluxtrt.environment import MIN_SM, GpuInfo, gpu_info, require_sm
from fluxtrt.errors import BuildError, DeviceError, EngineError, InputError

COMPAT_KEYS = ("tensorrt", "sm", "gpu")


# The options of either flavour: the shared build and load read opt_level and cuda_graph of both.
TrtOptions = TensorRTOptions | TensorRTRtxOptions


@dataclass
class TensorRTRecord(BackendRecord):
    """What a plan runs under and how it was built: the release that built it (``tensorrt`` or ``tensorrt_rtx``,
    per flavour), the GPU it was built on (TensorRT 10; TensorRT-RTX where one was present), the compute
    capabilities it targets (TensorRT-RTX), the build plan, the network's layer count, quantized, its quantized
    matrix multiplies, and whether its linear weights can be refit (``--refittable``; None in older manifests: no)
    with how many weights were marked refittable."""

    tensorrt: str | None = None
    tensorrt_rtx: str | None = None
    gpu: str | None = None
    sm: int | None = None
    targets: tuple[int, ...] | None = None
    plan: dict[str, Any] | None = None
    layers: int | None = None
    quantized_matmuls: dict[str, int] | None = None
    refittable: bool | None = None
    refit_weights: int | None = None

    def version(self, flavour: Flavour) -> str | None:
        """The release of ``flavour`` that built the plan (None: not recorded)."""
        return getattr(self, flavour.record_key)


class TensorRTBackend(EngineBackend[TrtOptions]):
    """TensorRT 10 plans (``.plan``) from the exported ONNX, built on the GPU they run on."""

    name = "tensorrt"
    extension = ".plan"
    uses_onnx = True
    runs_on = "cuda"
    precisions = PRECISIONS
    options_type = TensorRTOptions
    record_type = TensorRTRecord
    flavour: ClassVar[Flavour] = TENSORRT

    def check_build(self, precision: str, options: TrtOptions) -> None:
        """``--refittable`` takes a bf16 or fp32 transformer (FP8/FP4 weights are not refit)."""
        check_refittable(precision, options)

    def check_available(self) -> None:
        """Raise MissingDependencyError (how to install it) when the TensorRT module does not import."""
        self.flavour.lib()

    def version(self) -> str:
        return self.flavour.lib().__version__

    def build(self, job: BuildJob[TrtOptions]) -> TensorRTRecord:
        """Plan the build, apply it, write ``job.engine_path``; the record holds the plan and where it runs.

        Raises:
            InputError, BuildError: see ``build_plan``; the parser's errors; lost quantized linears; a failed build.
            DeviceError: no CUDA GPU, or one too old for the precision (TensorRT 10); a target too old for it
                (TensorRT-RTX).
        """
        from fluxtrt.backends.tensorrt.build import build_plan_file

        if job.onnx_path is None:
            raise BuildError(f"{job.spec.name}: the {self.name} backend builds from ONNX but the job has none")
        gpu = self._build_gpu(job)
        plan = build_plan(job.spec, job.onnx_path, job.precision, job.profile, job.options, self.flavour,
                          gpu.sm if gpu else None)  # fmt: skip
        try:
            details = build_plan_file(self.flavour, plan, Path(job.engine_path), job.say)
        except BaseException:
            Path(job.engine_path).unlink(missing_ok=True)
            raise
        return TensorRTRecord(**{self.flavour.record_key: self.version()}, gpu=gpu.name if gpu else None,
                              sm=gpu.sm if gpu else None, targets=plan.targets, plan=plan.record(),
                              layers=details["layers"], quantized_matmuls=details.get("quantized_matmuls"),
                              refittable=plan.refittable, refit_weights=details.get("refit_weights"))  # fmt: skip

    def _build_gpu(self, job: BuildJob[TrtOptions]) -> GpuInfo | None:
        """TensorRT 10 builds on the GPU it targets: that GPU, checked against the precision."""
        gpu = gpu_info(job.device)
        compute = component_precision(job.spec.name, job.precision)
        if compute in MIN_SM:
            fix = "build --precision bf16 here, or build on a newer GPU"
            require_sm(gpu.sm, compute, fix, f"--precision {compute}")
        return gpu

    def load(self, job: LoadJob[TrtOptions]) -> TrtRunner:
        """Deserialize the plan as a loaded ``TrtRunner`` (``options.cuda_graph`` turns CUDA graphs on).

        Raises:
            EngineError: no recorded version, another release, GPU or SM, or a plan that does not load.
            DeviceError: no CUDA GPU.
        """
        spec, path = job.spec, Path(job.engine_path)
        import torch

        if not job.device.startswith("cuda") or not torch.cuda.is_available():
            raise DeviceError(
                f"{spec.name}: {path.name} is a {self.flavour.name} engine, which runs on a CUDA GPU, but this run is "
                f"on {job.device if job.device.startswith('cuda') else 'the CPU'} (torch {torch.__version__}): run "
                "with --device cuda on a machine with a supported GPU"
            )
        self._check_loadable(job)
        ranges = runner_ranges(spec, job.profile)
        runner = TrtRunner(spec, path, job.compute_dtype, job.device, ranges, job.options.cuda_graph, self.flavour,
                           refittable=bool(as_record(TensorRTRecord, job.record).refittable))  # fmt: skip
        return runner.load()

    def _check_loadable(self, job: LoadJob[TrtOptions]) -> None:
        key, path, record = self.flavour.record_key, Path(job.engine_path), as_record(TensorRTRecord, job.record)
        if record.version(self.flavour) is None:
            raise EngineError(f"{job.spec.name}: {path.name} records no {self.flavour.name} version in the manifest: "
                              f"{rebuild(self.flavour)}")  # fmt: skip
        gpu = gpu_info(job.device)
        problem = incompatibility(record.to_json(), {key: self.version(), "gpu": gpu.name, "sm": gpu.sm}, COMPAT_KEYS)
        if problem:
            raise EngineError(f"{job.spec.name}: {path.name} {problem}: {rebuild(self.flavour)}")


class TensorRTRtxBackend(TensorRTBackend):
    """TensorRT-RTX plans for chosen compute capabilities, built with or without a GPU; they run on Ampere, Ada and
    RTX Blackwell GPUs (8.0, 8.6, 8.9, 12.0, 12.1), not on Hopper."""

    name = "tensorrt-rtx"
    options_type = TensorRTRtxOptions
    flavour = TENSORRT_RTX

    def check_build(self, precision: str, options: TrtOptions) -> None:
        """Every given target must run the precision (FP8 from 8.9, NVFP4 from 12.0); ``--refittable`` as for
        TensorRT 10, and with a CUDA GPU present."""
        super().check_build(precision, options)
        if options.refittable:
            check_refit_builder()
        if isinstance(options, TensorRTRtxOptions) and options.compute_capabilities:
            check_targets(component_precision("transformer", precision), options.targets(precision, None))

    def _build_gpu(self, job: BuildJob[TrtOptions]) -> GpuInfo | None:
        """No GPU needed; the one present (if any) is the default target where TensorRT-RTX supports it."""
        import torch

        if not torch.cuda.is_available():
            return None
        return gpu_info(job.device if job.device.startswith("cuda") else "cuda")

    def _check_loadable(self, job: LoadJob[TrtOptions]) -> None:
        """The release (recorded, then in the plan's header), then the GPU against the plan's targets: all before
        anything large is read."""
        key, path, record = self.flavour.record_key, Path(job.engine_path), as_record(TensorRTRecord, job.record)
        problem = incompatibility(record.to_json(), {key: self.version()}, (key,))
        if problem:
            raise EngineError(f"{job.spec.name}: {path.name} {problem}: {rebuild(self.flavour)}")
        with open(path, "rb") as f:
            written = rtx_plan_version(f.read(64))
        if written != self.version():
            raise EngineError(f"{job.spec.name}: {path.name} is not a TensorRT-RTX {self.version()} plan (its header "
                              f"says {written or 'no TensorRT-RTX plan'}): {rebuild(self.flavour)}")  # fmt: skip
        check_runs_here(gpu_info(job.device).sm, record.targets or (), path.name)


def check_runs_here(sm: int, targets: tuple[int, ...], what: str) -> None:
    """Raise DeviceError unless a GPU of compute capability ``sm`` runs a TensorRT-RTX plan built for ``targets``.

    Raises:
        DeviceError: naming the GPU's compute capability and the supported (or built-for) list.
    """

    def cc(value: int) -> str:
        return f"{value // 10}.{value % 10}"

    supported = TENSORRT_RTX.runs_on
    if sm not in supported:
        raise DeviceError(
            f"{what}: this GPU has compute capability {cc(sm)}, which TensorRT-RTX does not run (it runs "
            f"{', '.join(map(cc, supported))}): use --backend tensorrt (TensorRT 10) or aotinductor on this GPU"
        )
    if targets and sm not in targets:
        raise DeviceError(
            f"{what}: this GPU has compute capability {cc(sm)} but the plan was built for "
            f"{', '.join(map(cc, targets))}: rebuild with --compute-capability {cc(sm)}"
        )


def check_refittable(precision: str, options: TrtOptions) -> None:
    """Raise InputError for ``--refittable`` with an FP8/FP4 precision: the quantized transformer's linears are
    FP8 (FP4) initializers with scales calibrated for the original weights, which fluxtrt does not refit."""
    if options.refittable and precision in QUANTIZED:
        raise InputError(
            f"--refittable with --precision {precision}: the transformer's linears are {precision.upper()} weights "
            "with calibrated scales, which fluxtrt does not refit with LoRAs: build --precision bf16 --refittable, "
            "or leave --refittable off"
        )


def check_refit_builder() -> None:
    """Raise DeviceError where TensorRT-RTX cannot build a refittable plan: without a CUDA GPU and driver its
    compiler fails on refittable weights (TensorRT-RTX 1.7 stops in Myelin with "CUDA driver version is
    insufficient"), though it builds plain plans there."""
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(
            "--refittable: TensorRT-RTX builds refittable plans only with a CUDA GPU and driver present, and this "
            "machine has none: build with --refittable on a machine with an NVIDIA GPU, or leave --refittable off"
        )
