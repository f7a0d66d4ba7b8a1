"""The TensorRT build decided without TensorRT: options, the plan of one component's build, and what the ONNX holds.

One plan serves TensorRT 10 and TensorRT-RTX (``flavour``): the RTX plan has compute-capability targets instead of
a timing cache and a workspace limit, and refuses a precision one of its targets cannot run.

``build_plan`` decides everything from the spec, the precision, the profile and the options without importing
TensorRT (so it is tested everywhere): network flags, parser flags, the profile, builder level, workspace, timing
cache, the precision of each component and where the ONNX keeps its weights. ``fluxtrt.backends.tensorrt.build``
then hands that plan to TensorRT.

Strongly typed networks take every tensor's type from the ONNX: a BF16 export builds a BF16 engine, and FP8/FP4 come
from QuantizeLinear/DequantizeLinear pairs in the transformer's graph (DESIGN 5). The text encoders and the VAE stay
BF16 at ``--precision fp8|fp4``, as the orchestrator exports them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fluxtrt.backends.base import BackendOptions, cuda_graph_option, option
from fluxtrt.backends.profile import check_profile
from fluxtrt.backends.tensorrt.flavour import TENSORRT, TENSORRT_RTX, Flavour
from fluxtrt.environment import MIN_SM, require_sm
from fluxtrt.errors import BuildError, InputError
from fluxtrt.specs.component import ComponentSpec
from fluxtrt.specs.flux import TRANSFORMERS

PRECISIONS = ("fp32", "bf16", "fp8", "fp4")
# precision -> the components it quantises (DESIGN 5): the transformer, or its two parts
QUANTIZED = {"fp8": TRANSFORMERS, "fp4": TRANSFORMERS}
# ONNX element types of the quantised tensors a Q/DQ pair carries: FLOAT8E4M3FN = 17, FLOAT4E2M1 = 23.
QUANT_ELEM_TYPES = {"fp8": (17,), "fp4": (23,)}
DEFAULT_WORKSPACE_GIB = 8.0
DEFAULT_OPT_LEVEL = 3


def _check_opt_level(level: int) -> None:
    if not 0 <= int(level) <= 5:
        raise InputError(f"--opt-level is {level}, expected 0..5 (TensorRT's builder optimisation level)")


def _check_workspace(gib: float) -> None:
    if float(gib) <= 0:
        raise InputError(f"--workspace-gib is {gib}, expected a positive size in GiB such as 8")


def _check_targets_given(capabilities: tuple[str, ...]) -> None:
    for cc in capabilities:
        parse_compute_capability(cc)


def _refittable_option() -> Any:
    """``--refittable``, of both flavours: the transformer's linear weights stay refittable in its plan."""
    return option(
        False,
        "--refittable",
        help="tensorrt, tensorrt-rtx: build the transformer with refittable linear weights, so that infer --lora "
        "merges LoRAs into the plan without a rebuild (bf16/fp32; TensorRT-RTX builds it with a GPU present).",
    )


def _opt_level_option() -> Any:
    """``--opt-level``, the builder level of both flavours."""
    return option(
        DEFAULT_OPT_LEVEL,
        "--opt-level",
        check=_check_opt_level,
        help="TensorRT builder optimisation level 0-5 (default 3).",
    )


@dataclass(frozen=True)
class TensorRTOptions(BackendOptions):
    """The tensorrt backend's settings.

    Attributes:
        workspace_gib: the builder's workspace pool limit in GiB.
        opt_level: ``IBuilderConfig.builder_optimization_level`` (0..5).
        timing_cache: the timing cache file (None: ``default_timing_cache()``).
        cuda_graph: the runner replays a CUDA graph per input shape.
        refittable: the transformer's linear weights can be refit (LoRAs merged into the loaded plan).
    """

    workspace_gib: float = option(
        DEFAULT_WORKSPACE_GIB,
        "--workspace-gib",
        check=_check_workspace,
        help="TensorRT builder workspace limit in GiB (default 8).",
    )
    opt_level: int = _opt_level_option()
    timing_cache: Path | None = option(
        None, "--timing-cache", help="TensorRT timing cache file (default ~/.cache/fluxtrt/tensorrt/timing.cache)."
    )
    cuda_graph: bool = cuda_graph_option()
    refittable: bool = _refittable_option()


# TensorRT-RTX's builder targets (IBuilderConfig.set_compute_capability), as 89 for SM89.
RTX_TARGETS = (75, 80, 86, 89, 120, 121)
# The targets a TensorRT-RTX build gets when --compute-capability is not given and no supported GPU is present:
# every RTX target that runs the precision (FP8 from Ada, NVFP4 on Blackwell), except Turing (no BF16 kernels) and
# SM121 (one product, the GB10): GeForce/RTX PRO 3000, 4000 and 5000 series.
RTX_DEFAULT_TARGETS = {"fp32": (80, 86, 89, 120), "bf16": (80, 86, 89, 120), "fp8": (89, 120), "fp4": (120,)}


@dataclass(frozen=True)
class TensorRTRtxOptions(BackendOptions):
    """The tensorrt-rtx backend's settings.

    Attributes:
        compute_capabilities: the GPUs the plans are built for, as "8.9"; None: the current GPU where it is
            supported, else ``RTX_DEFAULT_TARGETS`` of the precision.
        opt_level: ``IBuilderConfig.builder_optimization_level`` (0..5).
        cuda_graph: the runner replays a CUDA graph per input shape.
        refittable: the transformer's linear weights can be refit (LoRAs merged into the loaded plan).
    """

    compute_capabilities: tuple[str, ...] | None = option(
        None,
        "--compute-capability",
        check=_check_targets_given,
        help="tensorrt-rtx: GPUs to build for, e.g. 8.9,12.0 (default: "
        "this GPU if supported, else every target that runs the "
        "precision).",
    )
    opt_level: int = _opt_level_option()
    cuda_graph: bool = cuda_graph_option()
    refittable: bool = _refittable_option()

    def targets(self, precision: str, current_sm: int | None) -> tuple[int, ...]:
        """The build's targets (as 89): the ones given, else the current GPU's if supported, else the defaults."""
        if self.compute_capabilities:
            return tuple(parse_compute_capability(cc) for cc in self.compute_capabilities)
        if current_sm in TENSORRT_RTX.runs_on:
            return (current_sm,)
        return RTX_DEFAULT_TARGETS[precision]


def check_targets(compute: str, targets: tuple[int, ...]) -> None:
    """Raise DeviceError naming the first TensorRT-RTX target (as 89) that cannot run ``compute`` (FP8 below 8.9,
    FP4 below 10.0)."""
    for sm in targets if compute in MIN_SM else ():
        cc = f"{sm // 10}.{sm % 10}"
        fix = f"leave {cc} out of --compute-capability, or build --precision bf16"
        require_sm(sm, compute, fix, f"--precision {compute} for target {cc}")


def parse_compute_capability(text: str) -> int:
    """``"8.9"`` (or ``"89"``, ``"sm89"``) -> 89, checked against TensorRT-RTX's targets.

    Raises:
        InputError: not a compute capability TensorRT-RTX builds for.
    """
    digits = str(text).lower().removeprefix("sm").replace(".", "")
    allowed = ", ".join(f"{t // 10}.{t % 10}" for t in RTX_TARGETS)
    if not digits.isdigit() or int(digits) not in RTX_TARGETS:
        raise InputError(f"--compute-capability '{text}' is not a TensorRT-RTX target, expected some of {allowed}")
    return int(digits)


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
        workspace_bytes: the ``MemoryPoolType.WORKSPACE`` limit (None: TensorRT's own, TensorRT-RTX).
        timing_cache: file the timing cache is read from and written back to (None: TensorRT-RTX has none).
        precision: the build's ``--precision``.
        compute: what this component computes in (``fp32``, ``bf16``, ``fp8`` or ``fp4``).
        min_sm: the smallest compute capability (as 89, 90, 100) that runs the plan fast, 0 for any.
        tf32: let fp32 matrix products use TF32 (off for fp32 builds: fp32 means fp32 there).
        flavour: ``tensorrt`` or ``tensorrt-rtx`` (the backend name).
        targets: TensorRT-RTX's compute-capability targets (as 89); empty for TensorRT 10 (the building GPU).
        refittable: build with ``BuilderFlag.REFIT_INDIVIDUAL``, the linears' weight initializers marked refittable
            (``--refittable``, for a transformer only).
    """

    component: str
    onnx_path: str
    external_data: tuple[str, ...]
    strongly_typed: bool
    parser_flags: tuple[str, ...]
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    opt_level: int
    workspace_bytes: int | None
    timing_cache: str | None
    precision: str
    compute: str
    min_sm: int = 0
    tf32: bool = False
    flavour: str = TENSORRT.backend
    targets: tuple[int, ...] = ()
    refittable: bool = False

    def record(self) -> dict[str, Any]:
        """The plan as JSON-able options for the manifest."""
        out = asdict(self)
        out["profile"] = {k: [list(s) for s in v] for k, v in self.profile.items()}
        return out


def component_precision(component: str, precision: str) -> str:
    """What ``component`` computes in for a build at ``precision``: FP8/FP4 quantise the transformer (or its parts)
    only."""
    if precision in QUANTIZED:
        return precision if component in QUANTIZED[precision] else "bf16"
    return precision


def default_timing_cache() -> Path:
    """``$XDG_CACHE_HOME/fluxtrt/tensorrt/timing.cache`` (``~/.cache`` by default), kept across builds."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "fluxtrt" / "tensorrt" / "timing.cache"


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
               options: TensorRTOptions | TensorRTRtxOptions | None = None, flavour: Flavour = TENSORRT,
               current_sm: int | None = None) -> BuildPlan:  # fmt: skip
    """Decide a TensorRT (or TensorRT-RTX) build without TensorRT.

    Args:
        spec: the component spec.
        onnx_path: the component's ``model.onnx`` (external data files, if any, beside it).
        precision: ``fp32``, ``bf16``, ``fp8`` or ``fp4``.
        profile: per input, (min, opt, max) shapes.
        options: the backend's options (defaults when None).
        flavour: which TensorRT.
        current_sm: the GPU present (as 89), or None; TensorRT-RTX targets it by default where it is supported.

    Returns:
        The ``BuildPlan``.

    Raises:
        InputError: an unknown precision.
        DeviceError: a TensorRT-RTX target that cannot run the component's precision (FP8 below 8.9, FP4 below 12.0).
        BuildError: a profile that does not fit the spec, a missing ONNX, or an FP8/FP4 transformer graph without
            Q/DQ nodes of that type.
    """
    options = options or (TensorRTRtxOptions() if flavour.rtx else TensorRTOptions())
    if precision not in PRECISIONS:
        raise InputError(f"--precision is '{precision}', the {flavour.backend} backend builds {', '.join(PRECISIONS)}: "
                         "pick one of those")  # fmt: skip
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BuildError(f"{spec.name}: no ONNX at {onnx_path}: export it first (fluxtrt build does) or fix --onnx-dir")
    compute = component_precision(spec.name, precision)
    targets = options.targets(precision, current_sm) if flavour.rtx else ()
    check_targets(compute, targets)
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
        opt_level=int(options.opt_level),
        workspace_bytes=None if flavour.rtx else int(float(options.workspace_gib) * 2**30),
        timing_cache=None if flavour.rtx else str(options.timing_cache or default_timing_cache()),
        precision=precision,
        compute=compute,
        min_sm=MIN_SM.get(compute, 0),
        tf32=precision != "fp32",
        flavour=flavour.backend,
        targets=targets,
        refittable=bool(options.refittable) and spec.name in TRANSFORMERS,
    )


def trtexec_command(component: str, onnx_path: Path, profile: Mapping[str, Any], compute: str) -> str:
    """The ``trtexec`` command line (TensorRT 10) that builds what fluxtrt's tensorrt backend would from this ONNX:
    strongly typed, the component's min/opt/max shapes, a timing cache, TF32 off for fp32."""

    def shapes(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in profile.items())

    parts = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--saveEngine={component}.plan",
        "--stronglyTyped",
        f"--minShapes={shapes(0)}",
        f"--optShapes={shapes(1)}",
        f"--maxShapes={shapes(2)}",
        "--timingCacheFile=timing.cache",
    ]
    if compute == "fp32":
        parts.append("--noTF32")
    return " ".join(parts)
