"""Running an AOTInductor package: loading it (and its external weights) and calling it as a runner."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fluxtrt.backends.aotinductor import reading
from fluxtrt.backends.aotinductor.weights import LinearWeights, PackedLinear, merged_constants, packed_linears
from fluxtrt.backends.cuda_graphs import CudaGraphs
from fluxtrt.backends.runner import Runner
from fluxtrt.errors import EngineError, first_line
from fluxtrt.specs.component import ComponentSpec

REBUILD = "rebuild with fluxtrt build --backend aotinductor"
# Inductor picks the host's vector ISA (for a package's compile flags, and to compare with a package's at load) from
# the ISAs the CPU's flags report, each confirmed by compiling and loading a probe program with g++ once per process
# and inductor cache: 6 s on a 2-core CPU machine, 56 s on an H200 machine (benchmarks/results/README.md), in every
# build worker (each compiles into a cache of its own) and every process loading a CPU package. This setting takes
# the CPU's flags as they are, as torch's own fbcode builds do: a compiler that cannot build for an ISA the CPU has
# fails the compile instead, with its error. (On a CPU with AMX tiles, torch still compiles its AMX probe once.)
TRUSTED_HOST_ISA = {"cpp.vec_isa_ok": True}


def load_package(path: Path, device_index: int = -1, run_single_threaded: bool = False,
                 probe_host_isa: bool = True) -> Any:  # fmt: skip
    """The package's model, loaded by torch's package loader with the C++ runtime's symbols global first.

    A package's wrapper library is compiled by the machine's g++ and parses its device string with ``std::regex``.
    When libstdc++ reached the process only as a dependency of torch's own libraries (not in the global symbol
    scope), that code binds to a second, uninitialised copy of the locale facets and the load segfaults (seen with
    torch 2.11 + g++ 13 on CPU and CUDA alike; ``LD_PRELOAD=libstdc++.so.6`` also cures it). Loading libstdc++ with
    RTLD_GLOBAL first puts the one the process already uses ahead of any other.

    Args:
        probe_host_isa: load through ``torch._inductor.aoti_load_package``, which compares the host CPU's vector ISA
            (from its flags: ``TRUSTED_HOST_ISA``) with the one the package was compiled for and logs a warning where
            they differ (what a CPU package's kernels run on). A CUDA package's kernels do not depend on it; fluxtrt
            checks torch, GPU and SM against the manifest. False: a ``PackageModel`` over the same loader, without
            that comparison and without importing inductor (``torch.export`` and dynamo with it: 0.9 s of a
            process's start on a 2-core CPU machine).
    """
    import ctypes
    import ctypes.util
    import os

    import torch

    name = ctypes.util.find_library("stdc++")
    if name:
        ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
    loader = package_loader()
    if not probe_host_isa and loader is not None:
        return PackageModel(loader(str(path), "model", run_single_threaded, 1, device_index))
    import torch._inductor

    with torch._inductor.config.patch(TRUSTED_HOST_ISA):
        return torch._inductor.aoti_load_package(str(path), run_single_threaded=run_single_threaded,
                                                 device_index=device_index)  # fmt: skip


def package_loader() -> Any:
    """torch's C++ ``AOTIModelPackageLoader`` class, None where this torch has none (asked of its C module, without
    importing inductor)."""
    import torch

    return getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)


class PackageModel:
    """A loaded package's model, called with its inputs as positional tensors (every fluxtrt component's are): what
    ``torch.export``'s ``AOTICompiledModel`` does for such a package, without that module's imports and without
    parsing the package's input and output tree specs at every call. Returns the one output, or a tuple of them.

    Args:
        loader: torch's ``AOTIModelPackageLoader`` of the package.
    """

    def __init__(self, loader: Any):
        self.loader = loader

    def __call__(self, *args: Any) -> Any:
        outputs = self.loader.boxed_run(list(args))  # boxed: the loader takes the list's tensors
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def load_constants(self, constants: Mapping[str, Any], *, check_full_update: bool,
                       user_managed: bool = False) -> None:  # fmt: skip
        """Point (user-managed) or copy the package's constants to ``constants`` (fqn -> tensor), in the active
        buffer."""
        self.loader.load_constants(dict(constants), False, check_full_update, user_managed)

    def get_constant_fqns(self) -> list[str]:
        return self.loader.get_constant_fqns()


def single_threaded(device: Any, cuda_graph: bool) -> bool:
    """Whether a runner loads its package with ``run_single_threaded``: for a CUDA graph (a capture cannot contain
    the locking) and for every CUDA package.

    The thread-safe ``run`` keeps one model instance per runner and, before starting a call, waits on the host until
    the previous call has finished on the GPU (AOTInductor's ``reclaim_finished_models``). A denoising loop then
    stalls at every step: the GPU idles while the host issues the scheduler's update and the next step's first
    kernels (an edit's time outside its components doubled). A runner is called from one thread at a time, and the
    package's buffers come from torch's stream-ordered allocator, so nothing needs that wait.
    """
    import torch

    return cuda_graph or torch.device(device).type == "cuda"


def external_weights_path(engine_path: Path) -> Path:
    """Where ``weights=external`` keeps an engine's weights: ``<stem>.safetensors`` beside it."""
    return Path(engine_path).with_suffix(".safetensors")


def error_text(exc: BaseException) -> str:
    """``Type: first line`` of an exception from torch's export, compile or load."""
    return f"{type(exc).__name__}: {first_line(exc, '')[:300]}"


class AotInductorRunner(Runner):
    """Runs an AOTInductor package; ``load`` loads it (and its external weights), ``close`` drops them.

    Args:
        spec: the component spec.
        path: the ``.pt2`` package.
        compute_dtype: dtype of the spec's ``compute`` tensors (the build precision).
        device: where inputs must live and outputs are returned.
        ranges: symbol -> (min, max) the package was compiled for.
        external_weights: the package is code only; its constants are in ``external_weights_path(path)``.
        cuda_graph: replay CUDA graphs (``CudaGraphs``) instead of calling the package directly.
    """

    def __init__(self, spec: ComponentSpec, path: Path, compute_dtype: Any, device: str,
                 ranges: Mapping[str, tuple[int, int]], external_weights: bool = False,
                 cuda_graph: bool = False):  # fmt: skip
        super().__init__(spec, compute_dtype, device, ranges)
        self.path = Path(path)
        self.external_weights = external_weights
        self.cuda_graph = cuda_graph
        self.model: Any = None
        self.call: Any = None
        self._constants: dict[str, Any] | None = None
        self._packed: dict[str, PackedLinear] | None = None
        # weight constant -> the merged constants in place of its linear's (set_linear_weights)
        self._replaced: dict[str, dict[str, Any]] = {}
        # constant -> the one tensor the package is pointed at for its merged values, filled again at each change
        self._merged: dict[str, Any] = {}
        # Seconds of the last load: "package" (the .pt2's code), "weights" (safetensors to the device), "constants"
        # (handing them to the package), "first_call" (on CUDA: one call at the smallest shapes).
        self.load_seconds: dict[str, float] = {}

    def _load(self) -> None:
        import time

        import torch

        device = torch.device(self.device)
        index = device.index if device.index is not None else -1
        t0 = time.perf_counter()
        try:
            model = load_package(self.path, index, run_single_threaded=single_threaded(device, self.cuda_graph),
                                 probe_host_isa=device.type == "cpu")  # fmt: skip
        except Exception as exc:
            raise EngineError(f"{self.name}: {self.path} does not load ({error_text(exc)}): {REBUILD}") from exc
        self.load_seconds = {"package": time.perf_counter() - t0}
        if self.external_weights:
            self._constants = self._load_weights(model, device)
        self.model = model
        self.call = CudaGraphs(model) if self.cuda_graph else model
        if device.type == "cuda":
            self._first_call(model)

    def _first_call(self, model: Any) -> None:
        """Call the package once, at the smallest shapes it takes, so that what a process's first call pays (loading
        each kernel, cuBLAS's first GEMMs, the allocator's growth: seconds for the 12B transformer) is paid by the
        load and the first edit runs as fast as the next. The plain package, so that no CUDA graph is captured for
        shapes an edit may never use."""
        import time

        import torch

        t0 = time.perf_counter()
        feed = self.spec.sample_feed({k: lo for k, (lo, _) in self.ranges.items()}, self.compute_dtype, self.device)
        try:
            model(*[feed[n].contiguous() for n in self.spec.input_names])
            torch.cuda.synchronize(self.device)
        except RuntimeError as exc:
            raise EngineError(f"{self.name}: {self.path.name} fails its first call at its smallest shapes "
                              f"({error_text(exc)}): {REBUILD}") from exc  # fmt: skip
        self.load_seconds["first_call"] = time.perf_counter() - t0

    def _load_weights(self, model: Any, device: Any) -> dict[str, Any]:
        import time

        import torch

        weights_path = external_weights_path(self.path)
        if not weights_path.is_file():
            raise EngineError(f"{self.name}: {self.path.name} keeps its weights in {weights_path}, which is missing: "
                              f"{REBUILD}")  # fmt: skip
        t0 = time.perf_counter()
        constants = reading.read_weights(weights_path, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        try:
            # user_managed: the package uses these tensors' memory as is (no second copy); the runner keeps them.
            model.load_constants(constants, check_full_update=True, user_managed=True)
        except Exception as exc:
            raise EngineError(
                f"{self.name}: {weights_path.name} does not fit {self.path.name} ({error_text(exc)}): {REBUILD}"
            ) from exc
        self.load_seconds.update(weights=t1 - t0, constants=time.perf_counter() - t1)
        return constants

    def linear_weights(self) -> LinearWeights:
        """Module name -> the package's original weight of each linear, [out, in] on the device: a fused projection
        (``to_qkv``, ``to_added_qkv``) shows as the model's three linears (views of its rows), an FP8 linear as its
        dequantized weight (fp32, computed when asked for); ``.shapes`` gives the shapes without computing any.

        Raises:
            EngineError: the weights are packaged in the .pt2 (they cannot be replaced without a rebuild), or an FP8
                weight's scales are compiled into the code.
        """
        if not self.external_weights or self._constants is None:
            raise EngineError(f"{self.name}: {self.path.name} packages its weights, which cannot be replaced: "
                              f"{REBUILD} --aoti-weights external")  # fmt: skip
        if self._packed is None:
            self._packed = packed_linears(self._constants, f"{self.name}: {self.path.name}", REBUILD)
        return LinearWeights(self._constants, self._packed)

    def set_linear_weights(self, weights: Mapping[str, Any] | None) -> None:
        """Point these linears' constants at ``weights`` (module -> [out, in], read one at a time: a lazy mapping
        keeps one merged weight in memory beside the constants) and every linear replaced before back at its
        original; None: all originals, bit for bit. An FP8 linear's weight is quantized again with new per-channel
        scales, its calibrated input scale kept. Takes effect from the next call (a CUDA-graph runner captures its
        graphs again).

        The constants are repointed one linear at a time in the active buffer (user-managed: no copy), from the
        thread that calls the runner, so between two calls. torch's package loader offers no swap of AOTInductor's
        inactive constant buffer, and filling one would hold a second full set of merged weights.

        A user-managed constant is never released: the package keeps a tensor handle of its own to it that nothing
        deletes (``MaybeOwningAtenTensorHandle`` in torch's aoti_runtime/utils.h, torch 2.11 to 2.13). Each constant
        is therefore handed over in one tensor for its merged values, made at its first change and filled in place
        at every later one: memory holds the originals and one merged copy of the linears ever replaced, however
        often LoRAs are swapped (a new tensor per change kept 8.6 GB more per swap on an H100).
        """
        self.linear_weights()
        packed = self._packed
        weights = weights if weights is not None else {}
        targets = sorted(n for n, p in packed.items() if any(m in weights for m in p.modules))
        try:
            for name in sorted(set(self._replaced) - set(targets)):
                self._point({k: self._constants[k] for k in self._replaced.pop(name)})
            for name in targets:
                update = self._fill(merged_constants(self._constants, packed[name], weights))
                if name not in self._replaced:  # one already pointed at its merged tensors sees them filled
                    self._point(update)
                self._replaced[name] = update
        except BaseException:
            for name in list(self._replaced):  # half merged is no state to run: all originals again
                self._point({k: self._constants[k] for k in self._replaced.pop(name)})
            raise
        finally:
            if self.cuda_graph:
                self.call = CudaGraphs(self.model)

    def _fill(self, update: Mapping[str, Any]) -> dict[str, Any]:
        """``update``'s values in the tensors kept for each constant's merged values (``update``'s own the first
        time)."""
        for name, value in update.items():
            kept = self._merged.setdefault(name, value)
            if kept is not value:
                kept.copy_(value)
        return {name: self._merged[name] for name in update}

    def _point(self, constants: Mapping[str, Any]) -> None:
        """Point the package's constants at these tensors (user-managed: the package keeps a reference, no copy)."""
        self.model.load_constants(constants, check_full_update=False, user_managed=True)

    def _close(self) -> None:
        self.call = self.model = self._constants = self._packed = None
        self._replaced, self._merged = {}, {}

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        # The compiled code assumes the dense strides it was exported with.
        args = [feed[n].contiguous() for n in self.spec.input_names]
        try:
            out = self.call(*args)
        except RuntimeError as exc:
            # The compiled code raises when a runtime shape assert (shape_guards "runtime_asserts") fails.
            shapes = {n: tuple(a.shape) for n, a in zip(self.spec.input_names, args, strict=True)}
            raise EngineError(
                f"{self.name}: the AOTInductor engine failed on input shapes {shapes} ({error_text(exc)}): {REBUILD} "
                "for a range that fits the model"
            ) from exc
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return dict(zip(self.spec.output_names, outs, strict=True))
