"""AOTInductor: ``torch.export`` + ``aoti_compile_and_package`` per component, an ahead-of-time engine without TensorRT.

Build (``build``): the component's module is exported with one ``torch.export.Dim`` per spec symbol (``B``, ``S``,
``H``...), its range taken from the build profile, then compiled by inductor into a ``.pt2`` package (a shared
library plus metadata). Load (``runtime``): ``aoti_load_package`` in any process with the same torch; no compiler
and no checkpoint needed.

Options (``AotInductorOptions``, in ``options``, each field declared with its flag):

- ``weights``: ``packaged`` (default; the weights are compiled into the package, one file, right for small models
  and the text encoders) or ``external`` (a code-only package, inductor's
  ``aot_inductor.package_constants_in_so=False``, with the constants it uses in ``<engine stem>.safetensors``,
  handed to the package on load with ``load_constants(..., user_managed=True)``: what makes the full-size
  transformer fit the disk and load, and what lets a LoRA replace the transformer's linear weights without a
  rebuild; an FP8 linear's is quantized again with new per-channel scales: ``weights``).
- ``cuda_graph`` (CUDA builds only): the transformer's runner replays one CUDA graph per input shape. (Every CUDA
  package is loaded with ``run_single_threaded``, which leaves out the locking a capture cannot contain and the
  host's wait for the previous call: ``runtime.single_threaded``.)
- ``fp8_attention`` (the transformer; default: on for an fp8 build on CUDA where a kernel is available): attention
  runs on per-tensor FP8 Q/K/V through fluxtrt's registered ops (``fluxtrt.kernels.attention``). When the default
  cannot have its kernel, the build keeps BF16 SDPA and records why; asked for explicitly, it is an error.

One package per component with dynamic dimensions over the whole profile, not one per resolution bucket: the matrix
multiplies are cuBLAS calls that pick their kernel per call, and a bucket would store the weights again
(docs/DESIGN.md gives the measured difference). A build whose range is one resolution gets a static package.

Precisions: fp32 and bf16 (the module's own dtype), and fp8: the transformer's calibrated linears become
``StaticFp8Linear`` (``torch._scaled_mm``) for the export, with the same static scales as the FP8 Q/DQ ONNX; every
other component is bf16. The transformer is exported with fused Q/K/V projections (one GEMM, and at fp8 one
activation quantization, instead of three on the same input).

The package is compiled for one device type, one torch build and (on CUDA) one GPU architecture; the build records
them and ``load`` refuses an engine built for anything else. The compiled code has no shape checks of its own; the
runner refuses symbol values outside the built range before calling it.
"""

from __future__ import annotations

from pathlib import Path

from fluxtrt.backends.aotinductor.options import AotInductorOptions, AotInductorRecord
from fluxtrt.backends.base import BuildJob, EngineBackend, LoadJob
from fluxtrt.backends.compat import incompatibility
from fluxtrt.backends.profile import runner_ranges
from fluxtrt.backends.record import as_record
from fluxtrt.backends.runner import Runner
from fluxtrt.environment import device_environment
from fluxtrt.errors import BuildError, EngineError, MissingDependencyError
from fluxtrt.specs.flux import TRANSFORMERS

REBUILD = "rebuild with fluxtrt build --backend aotinductor"
PRECISIONS = ("fp32", "bf16", "fp8")
COMPAT_KEYS = ("torch", "device", "gpu", "sm")


class AotInductorBackend(EngineBackend[AotInductorOptions]):
    """torch.export + AOTInductor packages (``.pt2``); see the module docstring for options and files."""

    name = "aotinductor"
    extension = ".pt2"
    uses_onnx = False
    # inductor's codegen and g++ take 7-18 s a tiny component on a 2-core CPU: its fp8 build took 72.0 s one
    # component after another in the build process against 50.7 s with --jobs 2.
    compiles_small_components = True
    precisions = PRECISIONS
    record_type = AotInductorRecord
    options_type = AotInductorOptions

    def check_available(self) -> None:
        """Raise unless torch has AOTInductor's package loader (what loading a package needs; asked of torch's C
        module, so that a CUDA load never imports inductor).

        Raises:
            MissingDependencyError: this torch has no ``torch._C._aoti.AOTIModelPackageLoader``.
        """
        import torch

        from fluxtrt.backends.aotinductor.runtime import package_loader

        if package_loader() is None:
            feature = f"the aotinductor backend (torch {torch.__version__} has no AOTInductor package loader)"
            raise MissingDependencyError("torch", feature, "pip install torch")

    def check_buildable(self) -> None:
        """``check_available``, and a C++ compiler runs (inductor compiles the package with one).

        Raises:
            MissingDependencyError: this torch has no ``torch._inductor``.
            BuildError: no C++ compiler found.
        """
        self.check_available()
        from torch._inductor import config as inductor_config
        from torch._inductor import cpp_builder
        from torch._inductor import exc as inductor_exc

        try:
            cpp_builder.get_cpp_compiler()
        except inductor_exc.InvalidCxxCompiler:
            searched = [c for c in inductor_config.cpp.cxx if c] if isinstance(inductor_config.cpp.cxx, tuple) else []
            raise BuildError(
                f"the aotinductor backend needs a C++ compiler but none of {searched or 'g++'} runs: install one "
                "(apt-get install g++) or set CXX to one"
            ) from None

    def version(self) -> str:
        """The torch version: an AOTInductor package runs only under the torch that built it."""
        import torch

        return torch.__version__

    def build(self, job: BuildJob[AotInductorOptions]) -> AotInductorRecord:
        """Export ``job.module`` over the profile's ranges and compile it to ``job.engine_path`` (see
        ``fluxtrt.backends.aotinductor.build.build_package``)."""
        from fluxtrt.backends.aotinductor.build import build_package

        return build_package(job)

    def load(self, job: LoadJob[AotInductorOptions]) -> Runner:
        """Load the package (and its external weights) as a loaded ``AotInductorRunner``.

        Raises:
            EngineError: the record holds no build environment, or another torch, device, GPU or SM; the external
                weights file is missing or does not fit the package; the package does not load.
            DeviceError: CUDA asked for on a machine without it.
            MissingDependencyError: the package calls an FP8 attention op whose kernel package is missing.
        """
        from fluxtrt.backends.aotinductor.runtime import AotInductorRunner
        from fluxtrt.kernels.attention import require_ops

        spec, path = job.spec, Path(job.engine_path)
        record = as_record(AotInductorRecord, job.record)
        if record.torch is None:
            raise EngineError(f"{spec.name}: {path.name} records no torch version in the manifest: {REBUILD}")
        problem = incompatibility(record.to_json(), device_environment(job.device).to_json(), COMPAT_KEYS)
        if problem:
            raise EngineError(f"{spec.name}: {path.name} {problem}: {REBUILD}")
        require_ops(record.attention or [], f"the {spec.name} engine {path.name}")
        runner = AotInductorRunner(
            spec,
            path,
            job.compute_dtype,
            job.device,
            runner_ranges(spec, job.profile),
            external_weights=job.options.weights == "external",
            cuda_graph=job.options.cuda_graph and spec.name in TRANSFORMERS and job.device.startswith("cuda"),
        )
        return runner.load()
