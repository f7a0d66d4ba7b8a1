"""TensorRT: ONNX -> strongly typed network -> one optimisation profile -> serialized plan (``.plan``), and its runner.

Build has two halves. ``build_plan`` decides everything from the spec, the precision, the profile and the options
without importing TensorRT (so it is tested everywhere): network flags, parser flags, the profile, builder level,
workspace, timing cache, the precision of each component and where the ONNX keeps its weights. ``_build_network``
and ``_build_plan_file`` then hand that plan to TensorRT 10's Python API.

Strongly typed networks take every tensor's type from the ONNX: a BF16 export builds a BF16 engine, and FP8/FP4 come
from QuantizeLinear/DequantizeLinear pairs in the transformer's graph (DESIGN 5). The text encoders and the VAE stay
BF16 at ``--precision fp8|fp4``, as the orchestrator exports them.

A plan runs only under the TensorRT version and on the GPU architecture that built it; ``build`` records both in
``job.options`` and ``load`` refuses an engine whose record differs (``incompatibility``, a pure function).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fluxtrt.backends.runner import Runner
from fluxtrt.engines.backend import BuildJob, EngineBackend, LoadJob
from fluxtrt.errors import BuildError, DeviceError, EngineError, InputError, MissingDependencyError, ShapeError
from fluxtrt.specs.component import ComponentSpec

INSTALL = (
    "install TensorRT 10 (pip install tensorrt-cu12 from NVIDIA's package index) or use the Docker image in docker/"
)
REBUILD = "rebuild with fluxtrt build --backend tensorrt"
QUANTIZED = {"fp8": "transformer", "fp4": "transformer"}  # precision -> the component it quantises (DESIGN 5)
MIN_SM = {"fp8": 89, "fp4": 100}  # Ada/Hopper run FP8; only Blackwell runs NVFP4
# ONNX element types of the quantised tensors a Q/DQ pair carries: FLOAT8E4M3FN = 17, FLOAT4E2M1 = 23.
QUANT_ELEM_TYPES = {"fp8": (17,), "fp4": (23,)}
DEFAULT_WORKSPACE_GIB = 8.0
DEFAULT_OPT_LEVEL = 3
CUDA_GRAPH = "cuda_graph"


@dataclass(frozen=True)
class BuildPlan:
    """Everything one TensorRT build does, decided before TensorRT is imported.

    Attributes:
        component: the spec's name.
        onnx_path: the ONNX that the parser reads from its file, so external data beside it is found.
        external_data: files of external weights next to the ONNX (empty when the weights are inside it).
        strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
        parser_flags: ``trt.OnnxParserFlag`` member names to set.
        profile: per input, the (min, opt, max) shapes of the one optimisation profile.
        opt_level: ``IBuilderConfig.builder_optimization_level`` (0..5).
        workspace_bytes: the ``MemoryPoolType.WORKSPACE`` limit.
        timing_cache: file the timing cache is read from and written back to.
        precision: the build's ``--precision``.
        compute: what this component computes in (``fp32``, ``bf16``, ``fp8`` or ``fp4``).
        min_sm: the smallest compute capability (as 89, 90, 100) that runs the plan fast, 0 for any.
        tf32: let fp32 matrix products use TF32 (off for fp32 builds: fp32 means fp32 there).
    """

    component: str
    onnx_path: str
    external_data: tuple[str, ...]
    strongly_typed: bool
    parser_flags: tuple[str, ...]
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    opt_level: int
    workspace_bytes: int
    timing_cache: str
    precision: str
    compute: str
    min_sm: int = 0
    tf32: bool = False

    def record(self) -> dict[str, Any]:
        """The plan as JSON-able options for the manifest."""
        out = asdict(self)
        out["profile"] = {k: [list(s) for s in v] for k, v in self.profile.items()}
        return out


def component_precision(component: str, precision: str) -> str:
    """What ``component`` computes in for a build at ``precision``: FP8/FP4 quantise the transformer only."""
    if precision in QUANTIZED:
        return precision if QUANTIZED[precision] == component else "bf16"
    return precision


def default_timing_cache() -> Path:
    """``$XDG_CACHE_HOME/fluxtrt/tensorrt/timing.cache`` (``~/.cache`` by default), kept across builds."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "fluxtrt" / "tensorrt" / "timing.cache"


def check_profile(spec: ComponentSpec, profile: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The profile as tuples, after checking it covers every input with ordered shapes of the spec's rank.

    Raises:
        BuildError: a missing input, a wrong rank, a fixed size that differs from the spec, or min > opt > max.
    """
    out = {}
    for t in spec.inputs:
        if t.name not in profile:
            raise BuildError(f"{spec.name}: the profile has no shapes for input {t.name} (it has {sorted(profile)})")
        shapes = tuple(tuple(int(d) for d in s) for s in profile[t.name])
        if len(shapes) != 3 or any(len(s) != len(t.shape) for s in shapes):
            raise BuildError(f"{spec.name}.{t.name}: profile {shapes} is not three shapes of rank {len(t.shape)}")
        for axis, sym in enumerate(t.shape):
            lo, opt, hi = (s[axis] for s in shapes)
            if isinstance(sym, int) and (lo, opt, hi) != (sym, sym, sym):
                raise BuildError(f"{spec.name}.{t.name}: profile axis {axis} is {(lo, opt, hi)}, the spec fixes {sym}")
            if not lo <= opt <= hi:
                raise BuildError(f"{spec.name}.{t.name}: profile {sym} is min {lo}, opt {opt}, max {hi}, not ordered")
        out[t.name] = shapes
    return out


def onnx_quantization(onnx_path: Path) -> set[str]:
    """Which of ``fp8``/``fp4`` the ONNX's Q/DQ nodes carry (read without loading external weights)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found: set[str] = set()
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    inits = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        # The zero point (input 2) or, for DQ of stored weights, the quantised input/initialiser has the low type.
        names = list(node.input) + list(node.output)
        elem = {types.get(n) or inits.get(n) for n in names}
        for attr in node.attribute:
            if attr.name == "output_dtype":
                elem.add(attr.i)
        for precision, codes in QUANT_ELEM_TYPES.items():
            if elem & set(codes):
                found.add(precision)
    return found


def build_plan(spec: ComponentSpec, onnx_path: Path, precision: str, profile: Mapping[str, Any],
               options: Mapping[str, Any] | None = None) -> BuildPlan:  # fmt: skip
    """Decide a TensorRT build without TensorRT.

    Args:
        spec: the component spec.
        onnx_path: the component's ``model.onnx`` (external data files, if any, beside it).
        precision: ``fp32``, ``bf16``, ``fp8`` or ``fp4``.
        profile: per input, (min, opt, max) shapes.
        options: ``workspace_gib`` (float), ``opt_level`` (0..5), ``timing_cache`` (path).

    Returns:
        The ``BuildPlan``.

    Raises:
        InputError: an unknown precision or an option out of range.
        BuildError: a profile that does not fit the spec, a missing ONNX, or an FP8/FP4 transformer graph without
            Q/DQ nodes of that type.
    """
    options = dict(options or {})
    if precision not in TensorRTBackend.precisions:
        raise InputError(f"--precision is '{precision}', the tensorrt backend builds "
                         f"{', '.join(TensorRTBackend.precisions)}: pick one of those")  # fmt: skip
    opt_level = int(options.get("opt_level", DEFAULT_OPT_LEVEL))
    if not 0 <= opt_level <= 5:
        raise InputError(f"--opt-level is {opt_level}, expected 0..5 (TensorRT's builder optimisation level)")
    workspace = float(options.get("workspace_gib", DEFAULT_WORKSPACE_GIB))
    if workspace <= 0:
        raise InputError(f"--workspace-gib is {workspace}, expected a positive size in GiB such as 8")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BuildError(f"{spec.name}: no ONNX at {onnx_path}: export it first (fluxtrt build does) or fix --onnx-dir")
    compute = component_precision(spec.name, precision)
    if compute in QUANTIZED and compute not in onnx_quantization(onnx_path):
        raise BuildError(
            f"{spec.name}: --precision {precision} needs {compute.upper()} QuantizeLinear/DequantizeLinear nodes in "
            f"{onnx_path}, which has none: pass --onnx-dir with a quantised export (such as NVIDIA's FLUX.1-Kontext "
            f"{compute.upper()} ONNX) or build --precision bf16"
        )
    external = tuple(sorted(p.name for p in onnx_path.parent.iterdir() if p.is_file() and p.name != onnx_path.name))
    # Native InstanceNormalization keeps the VAE's GroupNorm (exported as reshape + InstanceNorm) in one kernel.
    flags = ("NATIVE_INSTANCENORM",) if spec.name.startswith("vae") else ()
    return BuildPlan(
        component=spec.name,
        onnx_path=str(onnx_path),
        external_data=external,
        strongly_typed=True,
        parser_flags=flags,
        profile=check_profile(spec, profile),
        opt_level=opt_level,
        workspace_bytes=int(workspace * 2**30),
        timing_cache=str(options.get("timing_cache") or default_timing_cache()),
        precision=precision,
        compute=compute,
        min_sm=MIN_SM.get(compute, 0),
        tf32=precision != "fp32",
    )


def incompatibility(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """Why a plan built in ``recorded`` cannot run in ``current`` (keys ``tensorrt``, ``gpu``, ``sm``), or None.

    TensorRT refuses a plan from another version; a plan for another SM has no kernels for this GPU, and one built
    on another GPU of the same SM was tuned for it (TensorRT warns, fluxtrt refuses so the timings stay honest).
    """
    for key, what in (("tensorrt", "TensorRT"), ("sm", "SM"), ("gpu", "GPU")):
        have, now = recorded.get(key), current.get(key)
        if have != now:
            return f"was built with {what} {have} but this is {what} {now}"
    return None


def check_precision_supported(compute: str, sm: str | int) -> None:
    """Raise DeviceError when the GPU's compute capability cannot run ``compute`` (FP8 from SM 89, FP4 from 100)."""
    need = MIN_SM.get(compute, 0)
    if int(sm) < need:
        raise DeviceError(
            f"--precision {compute} needs a GPU of compute capability {need // 10}.{need % 10} or newer, this one is "
            f"{int(sm) // 10}.{int(sm) % 10}: build --precision bf16 here, or build on a newer GPU"
        )


def _trt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError("tensorrt", "the tensorrt backend", INSTALL) from None
    return tensorrt


def gpu_environment() -> dict[str, str]:
    """The running GPU and its compute capability, as ``{"gpu": name, "sm": "90"}``.

    Raises:
        DeviceError: torch sees no CUDA GPU (TensorRT builds and runs only on one).
    """
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(
            f"the tensorrt backend needs a CUDA GPU but this torch ({torch.__version__}) sees none: run on a GPU "
            "machine, or use --backend onnxruntime"
        )
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu": props.name, "sm": f"{props.major}{props.minor}"}


def _is_oom(text: str) -> bool:
    text = text.lower()
    return any(k in text for k in ("out of memory", "outofmemory", "cudaerrormemoryallocation", "failed to allocate"))


class _Logger:
    """A TensorRT logger that keeps the builder's errors so a failed build can say why in one line."""

    def __init__(self, trt: Any):
        class Logger(trt.ILogger):
            def __init__(inner):
                trt.ILogger.__init__(inner)
                inner.errors: list[str] = []

            def log(inner, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    inner.errors.append(str(msg).strip().replace("\n", " "))

        self.logger = Logger()

    @property
    def errors(self) -> list[str]:
        return self.logger.errors


def parser_errors(parser: Any) -> list[str]:
    """Every error the ONNX parser recorded, one line each: ``node <name> (<op>): <description>``."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = err.node_name() if hasattr(err, "node_name") else err.node()
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        lines.append(f"node {where}{f' ({op})' if op else ''}: {err.desc()}".replace("\n", " "))
    return lines


def _build_plan_file(trt: Any, plan: BuildPlan, engine_path: Path) -> dict[str, Any]:
    """Apply ``plan`` with TensorRT and write the serialized plan to ``engine_path``; returns what to record."""
    log = _Logger(trt)
    builder = trt.Builder(log.logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log.logger)
    for name in plan.parser_flags:
        parser.set_flag(getattr(trt.OnnxParserFlag, name))
    # From the file, not from bytes: the parser finds external data relative to the model's path.
    if not parser.parse_from_file(plan.onnx_path):
        errors = parser_errors(parser) or log.errors or ["no error recorded"]
        raise BuildError(
            f"{plan.component}: TensorRT's ONNX parser rejected {plan.onnx_path} with {len(errors)} error(s): "
            f"{' | '.join(errors)[:1500]}: check the ONNX exports with the spec's ops and opset"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    config.builder_optimization_level = plan.opt_level
    if not plan.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in plan.profile:
            raise BuildError(
                f"{plan.component}: the ONNX input {name} is not in the spec's profile {list(plan.profile)}"
            )
        profile.set_shape(name, *plan.profile[name])
    config.add_optimization_profile(profile)

    cache_path = Path(plan.timing_cache)
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    cache_loaded = bool(blob) and config.set_timing_cache(cache, False)
    if not cache_loaded:  # absent, or from another TensorRT/GPU: start an empty one (TensorRT ignores stale entries)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    try:
        serialized = builder.build_serialized_network(network, config)
    except (RuntimeError, MemoryError) as exc:  # allocation failures surface as exceptions in some releases
        log.errors.append(f"{type(exc).__name__}: {exc}".replace("\n", " "))
        serialized = None
    if serialized is None:
        errors = log.errors or ["TensorRT returned no plan"]
        if any(_is_oom(e) for e in errors):
            largest = {k: v[2] for k, v in plan.profile.items()}
            raise BuildError(
                f"{plan.component}: the TensorRT build ran out of GPU memory (workspace "
                f"{plan.workspace_bytes / 2**30:g} GiB, profile max {largest}): build with a smaller "
                "--max-resolution or --max-batch, or a smaller --workspace-gib"
            )
        raise BuildError(
            f"{plan.component}: TensorRT failed to build the engine ({' | '.join(errors)[:1500]}): rerun with "
            "--verbose, or lower --opt-level"
        )
    _atomic_bytes(engine_path, memoryview(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(cache_path, memoryview(config.get_timing_cache().serialize()))
    return {"timing_cache_loaded": bool(cache_loaded), "layers": network.num_layers}


def _atomic_bytes(path: Path, data: Any) -> None:
    from fluxtrt.io import atomic_write

    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(bytes(data)))


class TrtRunner(Runner):
    """Runs a deserialized TensorRT engine on torch CUDA tensors.

    Inputs are bound in place (made contiguous); outputs are torch tensors allocated for each call's shapes and
    returned. With ``cuda_graph``, the first call at a new set of input shapes runs normally (warm-up), the second
    captures ``execute_async_v3`` into a ``torch.cuda.CUDAGraph`` over static copies of the inputs, and later calls
    at those shapes copy the inputs in and replay it; a change of shapes captures again.

    Args:
        spec: the component spec.
        engine: the ``ICudaEngine``.
        compute_dtype: dtype of the spec's ``compute`` tensors.
        cuda_graph: capture and replay CUDA graphs for repeated shapes.
    """

    def __init__(self, spec: ComponentSpec, engine: Any, compute_dtype: Any, cuda_graph: bool = False):
        super().__init__(spec, compute_dtype)
        trt = _trt()
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{spec.name}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if sorted(inputs) != sorted(spec.input_names) or sorted(outputs) != sorted(spec.output_names):
            raise EngineError(
                f"{spec.name}: the engine's inputs/outputs are {inputs}/{outputs}, expected "
                f"{list(spec.input_names)}/{list(spec.output_names)}: {REBUILD}"
            )
        self.profile = {n: [tuple(s) for s in engine.get_tensor_profile_shape(n, 0)] for n in inputs}
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self.cuda_graph = cuda_graph
        self._graph: Any = None
        self._graph_key: tuple | None = None
        self._graph_io: tuple[dict, dict] | None = None
        self._seen: tuple | None = None

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise ShapeError for an input shape outside the engine's profile, with the fix."""
        check_against_profile(self.name, shapes, self.profile)

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        shapes = {n: tuple(feed[n].shape) for n in self.spec.input_names}
        self.check_shapes(shapes)
        for n in self.spec.input_names:
            if feed[n].device.type != "cuda":
                raise ShapeError(f"{self.name}.{n} is on {feed[n].device}, expected a CUDA tensor (the engine's GPU)")
        key = tuple(shapes.values())
        if self.cuda_graph and key == self._graph_key:
            ins, outs = self._graph_io
            for n in self.spec.input_names:
                ins[n].copy_(feed[n])
            self._graph.replay()
            return {n: outs[n].clone() for n in self.spec.output_names}
        inputs = {n: feed[n].to(self.dtypes[n]).contiguous() for n in self.spec.input_names}
        outputs = self._bind(inputs)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"{self.name}: TensorRT execute_async_v3 failed on input shapes {shapes}")
        if self.cuda_graph:
            if self._seen == key:
                self._capture(inputs, outputs, key)
            self._seen = key
        return outputs

    def _bind(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        for n, t in inputs.items():
            if not self.context.set_input_shape(n, tuple(t.shape)):
                raise ShapeError(f"{self.name}.{n}: TensorRT refused shape {tuple(t.shape)}: {REBUILD} for it")
            self.context.set_tensor_address(n, t.data_ptr())
        outputs = {}
        for n in self.spec.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            outputs[n] = torch.empty(shape, dtype=self.dtypes[n], device=next(iter(inputs.values())).device)
            self.context.set_tensor_address(n, outputs[n].data_ptr())
        return outputs

    def _capture(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], key: tuple) -> None:
        """Capture execute_async_v3 over static copies of this call's buffers (shapes already warmed up)."""
        import torch

        static_in = {n: t.clone() for n, t in inputs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            static_out = self._bind(static_in)
            # TensorRT may do lazy work on the first enqueue after a shape change: run once outside the capture.
            self.context.execute_async_v3(stream.cuda_stream)
            with torch.cuda.graph(graph, stream=stream):
                self.context.execute_async_v3(stream.cuda_stream)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph, self._graph_key, self._graph_io = graph, key, (static_in, static_out)


def check_against_profile(component: str, shapes: Mapping[str, tuple[int, ...]],
                          profile: Mapping[str, list[tuple[int, ...]]]) -> None:  # fmt: skip
    """Raise ShapeError naming the first axis outside [min, max] of ``profile`` (per input: min, opt, max shapes)."""
    for name, shape in shapes.items():
        lo, _, hi = profile[name]
        if len(shape) != len(lo):
            raise ShapeError(f"{component}.{name} has shape {shape}, the engine takes rank {len(lo)}")
        for axis, (v, a, b) in enumerate(zip(shape, lo, hi, strict=True)):
            if not a <= v <= b:
                fix = "--max-resolution/--max-batch" if v > b else "--min-resolution"
                raise ShapeError(
                    f"{component}.{name} has size {v} on axis {axis} but the engine profile allows {a}..{b}: rebuild "
                    f"with {fix} covering it"
                )


def torch_dtype(trt_dtype: Any) -> Any:
    """The torch dtype of a ``trt.DataType``."""
    import torch

    trt = _trt()
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
        raise EngineError(f"the engine has an I/O tensor of type {trt_dtype}, which fluxtrt cannot bind: {REBUILD}")
    return table[trt_dtype]


class TensorRTBackend(EngineBackend):
    """TensorRT plans (``.plan``) from the exported ONNX; see the module docstring."""

    name = "tensorrt"
    extension = ".plan"
    uses_onnx = True
    precisions = ("fp32", "bf16", "fp8", "fp4")

    def check_available(self) -> None:
        """Raise MissingDependencyError (how to install TensorRT, or the Docker image) when it does not import."""
        _trt()

    def version(self) -> str:
        return _trt().__version__

    def build(self, job: BuildJob) -> None:
        """Plan the build, apply it with TensorRT, write ``job.engine_path`` and record the plan and environment.

        Raises:
            InputError, BuildError: see ``build_plan``; the parser's errors; a failed or out-of-memory build.
            DeviceError: no CUDA GPU, or one too old for the precision.
        """
        if job.onnx_path is None:
            raise BuildError(f"{job.spec.name}: the tensorrt backend builds from ONNX but the job has none")
        plan = build_plan(job.spec, job.onnx_path, job.precision, job.profile, job.options)
        trt = _trt()
        env = gpu_environment()
        check_precision_supported(plan.compute, env["sm"])
        try:
            details = _build_plan_file(trt, plan, Path(job.engine_path))
        except BaseException:
            Path(job.engine_path).unlink(missing_ok=True)
            raise
        job.options.update(tensorrt=trt.__version__, **env, plan=plan.record(), **details)

    def load(self, job: LoadJob) -> TrtRunner:
        """Deserialize the plan as a ``TrtRunner`` (``entry["options"]["cuda_graph"]`` turns CUDA graphs on).

        Raises:
            EngineError: no recorded TensorRT version, another TensorRT, GPU or SM, or a plan that does not load.
            DeviceError: no CUDA GPU.
        """
        spec, path = job.spec, Path(job.engine_path)
        options = job.entry.get("options") or {}
        if "tensorrt" not in options:
            raise EngineError(f"{spec.name}: {path.name} records no TensorRT version in the manifest: {REBUILD}")
        trt = _trt()
        problem = incompatibility(options, {"tensorrt": trt.__version__, **gpu_environment()})
        if problem:
            raise EngineError(f"{spec.name}: {path.name} {problem}: {REBUILD}")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"{spec.name}: TensorRT cannot deserialize {path} (corrupt or truncated): {REBUILD}")
        runner = TrtRunner(spec, engine, job.compute_dtype, cuda_graph=bool(options.get(CUDA_GRAPH, False)))
        runner._runtime = runtime  # the engine must not outlive its runtime
        return runner
