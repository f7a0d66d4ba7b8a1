"""AOTInductor: ``torch.export`` + ``aoti_compile_and_package`` per component, an ahead-of-time engine without TensorRT.

Build: the component's module is exported with one ``torch.export.Dim`` per spec symbol (``B``, ``S``, ``H``...), its
range taken from the build profile, then compiled by inductor into a ``.pt2`` package (a shared library plus
metadata). Load: ``aoti_load_package`` in any process with the same torch; no compiler and no checkpoint needed.

Weights (``options["weights"]``):

- ``"packaged"`` (default): the weights are compiled into the package's shared library. One file; right for small
  models and the text encoders.
- ``"external"``: the package holds code only (inductor's ``aot_inductor.package_constants_in_so=False``) and the
  weights the compiled graph uses go to ``<engine stem>.safetensors`` beside the engine (``external_weights_path``).
  Loading reads them and hands them to the package with ``load_constants(..., check_full_update=True,
  user_managed=True)``. At full size this is what makes the transformer loadable: a packaged BF16 transformer is a
  22 GB package that inductor's cache and the extraction on load copy again (docs/GPU.md).

The package is compiled for one device type, one torch build and (on CUDA) one GPU architecture; ``build`` records
them in ``job.options`` and ``load`` refuses an engine built for anything else. The compiled code has no shape
checks of its own, so the runner refuses symbol values outside the built range before calling it.

Shapes: one package per component with dynamic dimensions over the whole profile, not one per resolution bucket.
Inductor's kernels take the sizes as arguments and the matrix multiplies are cuBLAS calls that pick their kernel
per call, so a bucketed package buys little speed: a 1024x1024-only FP8 transformer ran 3% faster than the dynamic
one on an H200 (205.5 against 212.6 ms per step), and the full-size transformer's weights would be stored once per
bucket (``weights=external`` shares nothing between packages). A build whose range is one resolution gets the
static package.

Precisions: fp32 and bf16 (the module's own dtype), and fp8: the transformer's calibrated linears (``job.amax``,
the same static scales as the FP8 Q/DQ ONNX) become ``StaticFp8Linear`` (``torch._scaled_mm``) for the export, so
the package holds FP8 weights and runs FP8 GEMMs; every other component is built in bf16.

The transformer is exported with fused Q/K/V projections (diffusers' ``fuse_projections``; ``options["fused_qkv"]``
counts the attention modules): one GEMM, and at fp8 one activation quantization, instead of three on the same input.
The fused linear takes the calibrated amax of its three parts, which are one number since they read one input.

CUDA graphs (``options["cuda_graph"]``, CUDA builds only): the transformer's runner captures one CUDA graph per
input shape on its first call at that shape and replays it after (the package is loaded with
``run_single_threaded``, which leaves out the locking and events a capture cannot contain). Inputs are copied into
the graph's buffers and outputs copied out, so callers may keep them.

FP8 attention (``options["fp8_attention"]``, the transformer only; on by default for an fp8 build on CUDA): every
attention runs through stage 2's ``Fp8FluxAttnProcessor`` (per-tensor FP8 Q/K/V) and its kernel, FlashAttention 3
or cuDNN's FP8 SDPA. The kernels are fluxtrt's registered ops (``fluxtrt::cudnn_fp8_sdpa``...), which the package
calls through torch's dispatcher, so it runs in a process where ``fluxtrt.stages.attention`` is imported (loading
through this backend does that) and the kernel's package is installed (checked on load). When the default cannot
have its kernel (no Hopper GPU, no nvidia-cudnn-frontend) the build keeps BF16 SDPA and records why as
``options["fp8_attention_unavailable"]``; asked for explicitly, it is an error.

The attention kernel the export chose (flash, memory-efficient, cuDNN or math SDPA, chosen for the device and dtype
at export time and fixed in the package; or one of fluxtrt's FP8 ops) is recorded as ``options["attention"]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch._inductor

from fluxtrt.backends.runner import Runner
from fluxtrt.backends.torch_modules import fused_qkv
from fluxtrt.engines.backend import BuildJob, EngineBackend, LoadJob
from fluxtrt.errors import (
    BuildError,
    DeviceError,
    EngineError,
    InputError,
    MissingDependencyError,
    ShapeError,
    first_line,
)
from fluxtrt.specs.component import ComponentSpec
from fluxtrt.stages.attention import checked_fp8_attention_kernel, fp8_attention, require_ops

REBUILD = "rebuild with fluxtrt build --backend aotinductor"
WEIGHTS = ("packaged", "external")
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
# The component whose runner may replay CUDA graphs: the one called every step.
GRAPHED = "transformer"
# Components exported with fused Q/K/V projections (the module is unfused again after the export).
FUSE_QKV = ("transformer",)
# Components whose attention may run in FP8 (FLUX attention processors).
FP8_ATTENTION = ("transformer",)


def load_package(path: Path, device_index: int = -1, run_single_threaded: bool = False) -> Any:
    """``torch._inductor.aoti_load_package`` with the C++ runtime's symbols global first.

    A package's wrapper library is compiled by the machine's g++ and parses its device string with ``std::regex``.
    When libstdc++ reached the process only as a dependency of torch's own libraries (not in the global symbol
    scope), that code binds to a second, uninitialised copy of the locale facets and the load segfaults (seen with
    torch 2.11 + g++ 13 on CPU and CUDA alike; ``LD_PRELOAD=libstdc++.so.6`` also cures it). Loading libstdc++ with
    RTLD_GLOBAL first puts the one the process already uses ahead of any other.
    """
    import ctypes
    import ctypes.util
    import os

    name = ctypes.util.find_library("stdc++")
    if name:
        ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
    return torch._inductor.aoti_load_package(str(path), run_single_threaded=run_single_threaded,
                                             device_index=device_index)  # fmt: skip


def external_weights_path(engine_path: Path) -> Path:
    """Where ``options["weights"] = "external"`` keeps an engine's weights: ``<stem>.safetensors`` beside it."""
    return Path(engine_path).with_suffix(".safetensors")


def symbol_ranges(spec: ComponentSpec, profile: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every spec symbol, read off the profile's shapes.

    Args:
        spec: the component spec.
        profile: per input name, the (min, opt, max) shapes (tuples or the manifest's lists).

    Returns:
        symbol -> (min, opt, max), e.g. ``{"B": (1, 1, 2), "S": (8, 32, 128)}``.

    Raises:
        BuildError: an input without a profile, a rank that differs from the spec, or one symbol with two ranges.
    """
    ranges: dict[str, tuple[int, int, int]] = {}
    where: dict[str, str] = {}
    for t in spec.inputs:
        if t.name not in profile:
            raise BuildError(f"{spec.name}: the profile has no shapes for input {t.name} (it has {sorted(profile)})")
        shapes = [tuple(s) for s in profile[t.name]]
        if len(shapes) != 3 or any(len(s) != len(t.shape) for s in shapes):
            raise BuildError(
                f"{spec.name}.{t.name}: profile shapes {shapes} are not three shapes of rank {len(t.shape)} {t.shape}"
            )
        for axis, sym in enumerate(t.shape):
            if isinstance(sym, int):
                continue
            lo, opt, hi = (int(s[axis]) for s in shapes)
            if not lo <= opt <= hi:
                raise BuildError(f"{spec.name}.{t.name}: profile {sym} is min {lo}, opt {opt}, max {hi}, not ordered")
            if sym in ranges and ranges[sym] != (lo, opt, hi):
                raise BuildError(
                    f"{spec.name}: profile gives {sym} the range {ranges[sym]} on {where[sym]} but {(lo, opt, hi)} "
                    f"on {t.name}: the inputs must agree"
                )
            ranges[sym], where[sym] = (lo, opt, hi), t.name
    return ranges


def environment(device: str) -> dict[str, str]:
    """What an AOTInductor package is tied to: the torch build, the device type and, on CUDA, the GPU and its SM.

    Raises:
        DeviceError: a CUDA device asked for on a machine without one.
    """
    dev = torch.device(device)
    env = {"torch": torch.__version__, "device": dev.type}
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device is '{device}' but this torch ({torch.__version__}) sees no CUDA GPU: use cpu")
        props = torch.cuda.get_device_properties(dev.index if dev.index is not None else torch.cuda.current_device())
        env.update(gpu=props.name, sm=f"{props.major}{props.minor}")
    return env


def incompatibility(recorded: Mapping[str, Any], current: Mapping[str, str]) -> str | None:
    """Why an engine built in ``recorded`` cannot run in ``current`` (both from ``environment``), or None.

    Returns:
        e.g. "was built with torch 2.11.0+cu130 but this is torch 2.13.0+cpu".
    """
    for key, what in (("torch", "torch"), ("device", "device"), ("gpu", "GPU"), ("sm", "SM")):
        if key not in current and key not in recorded:
            continue
        have, now = recorded.get(key), current.get(key)
        if have != now:
            return f"was built with {what} {have} but this is {what} {now}"
    return None


@contextlib.contextmanager
def _inductor_cache(directory: Path) -> Iterator[None]:
    """Point inductor's (and triton's) caches at ``directory`` for the duration, restoring them after."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    directory.mkdir(parents=True, exist_ok=True)
    with temporary_cache_dir(str(directory)):
        yield


def _violations(exc: BaseException) -> str:
    """The constraint lines of a torch.export dynamic-shape error, on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    # "- Not all values of B ... satisfy the generated guard ..." and the suggested "B = Dim('B', max=63)".
    picked = [ln.lstrip("- ") for ln in lines if ln.startswith("- ") or " = Dim(" in ln]
    return ("; ".join(picked) or next((ln for ln in lines if ln), ""))[:600]


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc, '')[:300]}"


def attention_kernels(module: Any, args: tuple[torch.Tensor, ...]) -> list[str]:
    """The attention kernels ``module(*args)`` dispatches to (e.g. ``aten::_scaled_dot_product_flash_attention``).

    ``scaled_dot_product_attention`` picks its fused kernel by device, dtype and shape when it runs; inductor makes
    the same choice when it compiles the exported graph for those inputs, so one eager call names the kernel the
    package runs.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if "attention" in name or name.endswith("_sdpa"):
                seen.add(name)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Spy():
        module(*args)
    return sorted(seen)


class CudaGraphs:
    """Replays a CUDA graph of ``model(*args)`` per input signature (shapes and dtypes), capturing it on first use.

    Args:
        model: a callable on CUDA tensors that allocates nothing outside the current stream's allocator (an
            AOTInductor package loaded with ``run_single_threaded=True``).
    """

    def __init__(self, model: Any):
        self.model = model
        self.graphs: dict[tuple, tuple[Any, list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, inputs, outputs = self.graphs[key]
        for buffer, arg in zip(inputs, args, strict=True):
            buffer.copy_(arg)
        graph.replay()
        return tuple(o.clone() for o in outputs)

    def _capture(self, args: tuple[torch.Tensor, ...]) -> tuple[Any, list[torch.Tensor], tuple[torch.Tensor, ...]]:
        inputs = [a.clone() for a in args]
        # One run outside the capture: lazy initialisation (cuBLAS handles, kernel loading) cannot be captured.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(*inputs)
        outputs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return graph, inputs, outputs


class AotInductorRunner(Runner):
    """Runs a loaded AOTInductor package.

    Args:
        spec: the component spec.
        model: the object ``torch._inductor.aoti_load_package`` returned.
        compute_dtype: dtype of the spec's ``compute`` tensors (the build precision).
        device: where inputs must live and outputs are returned.
        ranges: symbol -> (min, max) the package was compiled for.
        constants: external weights handed to the package as user-managed memory; kept alive here.
        cuda_graph: replay CUDA graphs (``CudaGraphs``) instead of calling the package directly.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        model: Any,
        compute_dtype: torch.dtype,
        device: str,
        ranges: Mapping[str, tuple[int, int]],
        constants: Mapping[str, torch.Tensor] | None = None,
        cuda_graph: bool = False,
    ):
        super().__init__(spec, compute_dtype)
        self.model = model
        self.call = CudaGraphs(model) if cuda_graph else model
        self.device = torch.device(device)
        self.ranges = dict(ranges)
        self._constants = constants
        # symbol -> (input, axis) of its first appearance, for range checks and messages.
        self._axes: dict[str, tuple[str, int]] = {}
        for t in spec.inputs:
            for axis, sym in enumerate(t.shape):
                if isinstance(sym, str):
                    self._axes.setdefault(sym, (t.name, axis))

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        for sym, (lo, hi) in self.ranges.items():
            name, axis = self._axes[sym]
            value = feed[name].shape[axis]
            if not lo <= value <= hi:
                raise ShapeError(
                    f"{self.name}.{name} has {sym}={value} on axis {axis} but the engine was built for {sym} in "
                    f"[{lo}, {hi}]: rebuild with a resolution/batch range that covers it"
                )
        for name in self.spec.input_names:
            if feed[name].device.type != self.device.type:
                raise ShapeError(
                    f"{self.name}.{name} is on {feed[name].device}, expected {self.device} (where the engine runs)"
                )
        # The compiled code assumes the dense strides it was exported with.
        args = [feed[n].contiguous() for n in self.spec.input_names]
        try:
            out = self.call(*args)
        except RuntimeError as exc:
            # The compiled code raises when a runtime shape assert (shape_guards "runtime_asserts") fails.
            shapes = {n: tuple(a.shape) for n, a in zip(self.spec.input_names, args, strict=True)}
            raise EngineError(
                f"{self.name}: the AOTInductor engine failed on input shapes {shapes} ({_first_line(exc)}): {REBUILD} "
                "for a range that fits the model"
            ) from exc
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return dict(zip(self.spec.output_names, outs, strict=True))


class AotInductorBackend(EngineBackend):
    """torch.export + AOTInductor packages (``.pt2``); see the module docstring for options and files."""

    name = "aotinductor"
    extension = ".pt2"
    uses_onnx = False
    precisions = ("fp32", "bf16", "fp8")

    def check_available(self) -> None:
        """Raise unless torch has inductor (what loading a package needs).

        Raises:
            MissingDependencyError: this torch has no ``torch._inductor``.
        """
        try:
            from torch._inductor import package  # noqa: F401
        except ImportError:
            feature = f"the aotinductor backend (torch {torch.__version__} has no torch._inductor)"
            raise MissingDependencyError("torch", feature, "pip install torch") from None

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
        return torch.__version__

    def build(self, job: BuildJob) -> None:
        """Export ``job.module`` over the profile's ranges and compile it to ``job.engine_path``.

        Writes ``job.engine_path`` and, with ``options["weights"] = "external"``, ``external_weights_path`` of it;
        inductor's scratch and cache go to ``job.workdir/inductor-cache``. Records into ``job.options``: torch,
        device (+ gpu, sm on CUDA), weights, ``shape_guards`` (how export kept them), ``dims`` (symbol -> [min,
        max] of the dynamic ones), ``attention`` (the SDPA kernels), ``fused_qkv`` (transformer) and, for fp8,
        ``fp8_linears`` (how many).

        Args:
            job: the component, its module in the compute dtype on ``job.device``, the profile, ``amax`` for an
                fp8 transformer, and options (``weights``: ``packaged``|``external``; ``cuda_graph``: bool;
                ``inductor_configs``: extra inductor settings).

        Raises:
            InputError: a precision this backend does not build, fp8 without calibrated scales, CUDA graphs on a
                CPU build, or an unknown option value.
            DeviceError: CUDA asked for on a machine without it.
            BuildError: the profile does not fit the spec, torch.export rejects the dynamic ranges, or inductor
                fails to compile.
        """
        spec = job.spec
        if job.precision not in COMPUTE_DTYPES:
            raise InputError(
                f"--precision is '{job.precision}' but the aotinductor backend builds {', '.join(self.precisions)}: "
                "pick one of those, or --backend tensorrt for fp4"
            )
        weights = job.options.get("weights", "packaged")
        if weights not in WEIGHTS:
            raise InputError(f"aotinductor option weights is '{weights}', expected one of {', '.join(WEIGHTS)}")
        if job.options.get("cuda_graph") and torch.device(job.device).type != "cuda":
            raise InputError(
                f"--aoti-cuda-graph is set but the engines are built for device '{job.device}': CUDA graphs need "
                "--device cuda (or leave --aoti-cuda-graph out)"
            )
        extra_configs = dict(job.options.get("inductor_configs", {}))
        env = environment(job.device)
        ranges = symbol_ranges(spec, job.profile)

        if job.precision == "fp8" and spec.name == "transformer" and job.amax is None:
            raise InputError(
                f"{spec.name}: --precision fp8 needs calibrated input scales for the transformer's linears and the "
                "build passed none: build through `fluxtrt build` (it calibrates) or pass --calibration FILE"
            )
        with contextlib.ExitStack() as changes, torch.inference_mode(False):
            if spec.name in FUSE_QKV:
                job.options["fused_qkv"] = changes.enter_context(fused_qkv(job.module))
            if job.precision == "fp8" and job.amax is not None:
                from fluxtrt.quant.scaled_mm import amax_for_fused_qkv, static_fp8_linears

                amax = amax_for_fused_qkv(job.module, job.amax)
                changes.enter_context(static_fp8_linears(job.module, amax))
                job.options["fp8_linears"] = len(amax)
            if spec.name in FP8_ATTENTION:
                kernel = self._fp8_attention_kernel(job)
                if kernel is not None:
                    changes.enter_context(fp8_attention(job.module.transformer, kernel))
            ep, guards, attention = self._export(job, ranges)
        configs = {**extra_configs, "aot_inductor.package_constants_in_so": weights == "packaged"}
        written = [Path(job.engine_path)] + ([external_weights_path(job.engine_path)] if weights == "external" else [])
        try:
            try:
                with _inductor_cache(Path(job.workdir) / "inductor-cache"), open(job.engine_path, "wb") as f:
                    # A file object, not a path: inductor insists on a ".pt2" name, the caller may stage another.
                    torch._inductor.aoti_compile_and_package(ep, package_path=f, inductor_configs=configs)
            except Exception as exc:
                raise BuildError(
                    f"{spec.name}: AOTInductor failed to compile the exported graph ({_first_line(exc)}): rerun with "
                    "--verbose for the traceback"
                ) from exc
            if weights == "external":
                self._save_weights(job, ep)
        except BaseException:
            # Leave no half-written engine or weights file behind.
            for path in written:
                path.unlink(missing_ok=True)
            raise
        job.options.update(
            env,
            weights=weights,
            shape_guards=guards,
            dims={sym: [lo, hi] for sym, (lo, _, hi) in ranges.items() if lo != hi},
        )
        if attention:
            job.options["attention"] = attention
        if extra_configs:
            job.options["inductor_configs"] = extra_configs

    @staticmethod
    def _fp8_attention_kernel(job: BuildJob) -> Any:
        """The FP8 attention kernel for ``job`` (recorded as ``options["fp8_attention"]``), or None for SDPA.

        Raises:
            DeviceError, MissingDependencyError: FP8 attention was asked for and cannot run here.
        """
        asked = job.options.get("fp8_attention")
        wanted = asked if asked is not None else job.precision == "fp8" and torch.device(job.device).type == "cuda"
        job.options["fp8_attention"] = False
        if not wanted:
            return None
        try:
            kernel = checked_fp8_attention_kernel(job.device)
        except (DeviceError, MissingDependencyError) as exc:
            if asked:
                raise
            job.options["fp8_attention_unavailable"] = str(exc)
            return None
        job.options["fp8_attention"] = True
        return kernel

    def _export(self, job: BuildJob, ranges: Mapping[str, tuple[int, int, int]]) -> tuple[Any, str, list[str]]:
        """``torch.export`` with a ``Dim`` per symbol whose min and max differ; sample inputs at the opt shapes.

        A dimension traced at size 1 would be specialised to 1 (torch's 0/1 specialisation), so a dynamic symbol
        whose opt is 1 is traced at 2.

        Returns:
            The exported program, how shape guards were kept: ``"guards"`` (checked over the whole range at
            export) or ``"runtime_asserts"`` (see below), and the attention kernels the sample inputs run.
        """
        from torch._dynamo.exc import UserError

        spec = job.spec
        dims = {sym: torch.export.Dim(sym, min=lo, max=hi) for sym, (lo, _, hi) in ranges.items() if lo != hi}
        sample = {sym: (min(2, hi) if opt == 1 and sym in dims else opt) for sym, (_, opt, hi) in ranges.items()}
        feed = spec.sample_feed(sample, COMPUTE_DTYPES[job.precision], job.device)
        dynamic_shapes = {
            t.name: {axis: dims[s] for axis, s in enumerate(t.shape) if isinstance(s, str) and s in dims} or None
            for t in spec.inputs
        }
        first_violation = None
        # The orchestrator may build under inference_mode; export needs ordinary tensors.
        with torch.inference_mode(False), torch.no_grad():
            args = tuple(feed[n].clone() for n in spec.input_names)
            # Export proves every shape guard over the whole Dim range. Some guards hold on the range but are beyond
            # its solver: the VAE encoder's reshapes add Mod(1, 16*(W//8)) != 0. The fallback keeps such guards as
            # runtime asserts in the graph, which the compiled code checks on every call (a guard that fails for
            # real raises then instead of computing garbage). It is not the default because it also drops the
            # equalities between inputs (the transformer's five B axes become five symbols).
            for mode in ("guards", "runtime_asserts"):
                try:
                    ep = torch.export.export(
                        job.module,
                        args,
                        dynamic_shapes=dynamic_shapes,
                        strict=False,
                        prefer_deferred_runtime_asserts_over_guards=mode == "runtime_asserts",
                    )
                    return ep, mode, attention_kernels(job.module, args)
                except UserError as exc:
                    first_violation = first_violation or exc
                except Exception as exc:
                    raise BuildError(
                        f"{spec.name}: torch.export failed ({_first_line(exc)}): rerun with --verbose for the traceback"
                    ) from exc
        want = {s: [lo, hi] for s, (lo, _, hi) in ranges.items() if s in dims}
        raise BuildError(
            f"{spec.name}: torch.export cannot keep the profile's dynamic ranges {want} "
            f"({_violations(first_violation)}): build with a resolution/batch range inside what the model allows"
        ) from first_violation

    def _save_weights(self, job: BuildJob, ep: Any) -> None:
        """Write the constants the compiled graph uses to ``external_weights_path(job.engine_path)``."""
        from safetensors.torch import save_file

        # Only the package knows which constants survived inductor's dead-code elimination (a VAE decoder's
        # exported program still carries the encoder's weights); a code-only package loads in milliseconds.
        names = load_package(job.engine_path).get_constant_fqns()
        available = {**ep.state_dict, **ep.constants}
        missing = [n for n in names if n not in available]
        if missing:
            raise BuildError(
                f"{job.spec.name}: the compiled package wants constants {missing[:3]} that the exported program does "
                "not hold: build with weights=packaged"
            )
        tensors, seen = {}, set()
        for n in sorted(names):
            t = available[n].detach()
            # safetensors refuses tensors that share memory (tied weights); give repeats their own copy.
            key = (t.untyped_storage().data_ptr(), t.device.type)
            tensors[n] = (t.clone() if key in seen else t).contiguous().cpu()
            seen.add(key)
        save_file(tensors, str(external_weights_path(job.engine_path)), metadata={"format": "pt"})

    def load(self, job: LoadJob) -> AotInductorRunner:
        """Load the package (and its external weights) as a runner.

        Args:
            job: the engine file, device, compute dtype and manifest entry (``options`` as ``build`` recorded them,
                ``profile``).

        Returns:
            An ``AotInductorRunner``.

        Raises:
            EngineError: the entry records no build environment, or another torch, device, GPU or SM; the external
                weights file is missing or does not fit the package; the package does not load.
            DeviceError: CUDA asked for on a machine without it.
        """
        spec, path = job.spec, Path(job.engine_path)
        options = job.entry.get("options") or {}
        if "torch" not in options:
            raise EngineError(f"{spec.name}: {path.name} records no torch version in the manifest: {REBUILD}")
        problem = incompatibility(options, environment(job.device))
        if problem:
            raise EngineError(f"{spec.name}: {path.name} {problem}: {REBUILD}")
        ranges = {sym: (lo, hi) for sym, (lo, _, hi) in symbol_ranges(spec, job.entry["profile"]).items()}
        device = torch.device(job.device)
        index = device.index if device.index is not None else -1
        cuda_graph = bool(options.get("cuda_graph")) and spec.name == GRAPHED and device.type == "cuda"
        # A package that calls fluxtrt's FP8 attention ops needs their kernels' packages (the ops are registered by
        # this module's import of fluxtrt.stages.attention).
        require_ops(options.get("attention") or [], f"the {spec.name} engine {path.name}")
        try:
            model = load_package(path, index, run_single_threaded=cuda_graph)
        except Exception as exc:
            raise EngineError(f"{spec.name}: {path} does not load ({_first_line(exc)}): {REBUILD}") from exc
        constants = None
        if options.get("weights", "packaged") == "external":
            constants = self._load_weights(spec, path, model, device)
        return AotInductorRunner(spec, model, job.compute_dtype, job.device, ranges, constants, cuda_graph)

    @staticmethod
    def _load_weights(spec: ComponentSpec, path: Path, model: Any, device: torch.device) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        weights_path = external_weights_path(path)
        if not weights_path.is_file():
            raise EngineError(
                f"{spec.name}: {path.name} keeps its weights in {weights_path}, which is missing: {REBUILD}"
            )
        constants = load_file(str(weights_path), device=str(device))
        try:
            # user_managed: the package uses these tensors' memory as is (no second copy); the runner keeps them.
            model.load_constants(constants, check_full_update=True, user_managed=True)
        except Exception as exc:
            raise EngineError(
                f"{spec.name}: {weights_path.name} does not fit {path.name} ({_first_line(exc)}): {REBUILD}"
            ) from exc
        return constants
