"""``export_onnx``: one component spec + its torch module -> a checked ONNX file with the spec's dynamic axes.

Opset 19, fixed: it is the first opset whose QuantizeLinear/DequantizeLinear carry float8e4m3fn (the FP8 Q/DQ form
TensorRT's strongly typed FP8 path reads), TensorRT 10 parses it, and ONNX Runtime's CPU provider runs every op the
exporter emits for FLUX at this opset (RMSNorm is decomposed rather than emitted as opset 23's RMSNormalization).
NVFP4 graphs need opset 23 and are produced by the quantization step, not here.

The exporter is torch.export-based (``torch.onnx.export(dynamo=True)``); every output keeps the spec's symbolic axis
names, so no graph-surgery pass is needed before TensorRT's parser. The graph is then optimized with onnxscript's
passes as its ``optimize_ir`` runs them (constant folding, which also folds each weight's transpose into the
initializer, pattern rewrites, dead-node removal, deduplication, common subexpressions), less the one pattern rule
whose time grows with the square of the node count: with it, the rewriter took 10 s for a 7,300-node graph (full
width, 6+12 blocks) against 2.8 s for 3,800, and the full transformer (about 22,000 nodes) spent more than 6
minutes in it; without it, optimizing is linear.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxtrt.errors import BuildError, MissingDependencyError, first_line
from fluxtrt.specs.component import ComponentSpec

OPSET = 19
# Protobuf cannot hold a message over 2 GB: larger weights go to one external-data file beside the model.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"


@dataclass
class OnnxExport:
    """An exported component: its files and what the export cost."""

    model: Path
    data: Path | None
    seconds: float
    initializer_bytes: int
    # Seconds per step: "export" (torch.export), "translate" (to ONNX), "optimize" (onnxscript's constant folding
    # and rewrites), "save" (serialization and the external-data write), "check" (onnx.checker and the interface).
    phases: dict[str, float]


def _require(package: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise MissingDependencyError(package, "ONNX export", "pip install 'fluxtrt[onnx]'") from None


def export_onnx(
    spec: ComponentSpec,
    module: Any,
    sample_feed: dict[str, Any],
    out_dir: Path,
    *,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    rewrite: Callable[[Any], None] | None = None,
    checker: bool = True,
    progress: Callable[[str, float], None] | None = None,
) -> OnnxExport:
    """Export ``module`` (forward signature = ``spec.input_names``) to ``out_dir/model.onnx`` and check it.

    Args:
        spec: the component spec; its symbolic axes become ONNX dynamic dimensions with the same names.
        module: the component as an ``nn.Module`` in its compute dtype, on the device of ``sample_feed``.
        sample_feed: example inputs. Sizes of dynamic axes must not be 1 (torch.export specialises 0 and 1) and
            should differ between axes that are free to differ.
        out_dir: an empty directory that receives ``model.onnx`` (+ ``model.onnx_data`` above the threshold).
        external_data_threshold: total initializer bytes above which weights go to one external file.
        rewrite: called with the in-memory ``onnx_ir`` model before it is written (the Q/DQ insertion), so a
            large graph is written once.
        checker: run onnx.checker on the written model (not for graphs with TensorRT's custom ops).
        progress: called with each phase's name and seconds as it ends (a full-size transformer takes minutes).

    Returns:
        The written files and timings.

    Raises:
        MissingDependencyError: onnx or onnxscript is not installed.
        BuildError: the exporter or the ONNX checker failed.
    """
    import torch

    _require("onnx")
    _require("onnxscript")

    t0 = time.perf_counter()
    args = tuple(sample_feed[n] for n in spec.input_names)
    # Every spec symbol is dynamic. Dim.DYNAMIC lets torch.export derive the ranges and equalities itself (a VAE
    # needs sides divisible by 8, S of img_ids equals S of hidden_states); the spec's names are put back afterwards.
    dynamic_shapes = {
        t.name: {i: torch.export.Dim.DYNAMIC for i, d in enumerate(t.shape) if isinstance(d, str)} or None
        for t in spec.inputs
    }
    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[phase], mark = now - mark, now
        if progress is not None:
            progress(phase, phases[phase])

    try:
        with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
            exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            exported = exported.run_decompositions(_fused_kernel_decompositions())
            lap("export")
            program = torch.onnx.export(
                exported,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                opset_version=OPSET,
                dynamo=True,
                optimize=False,
                verbose=False,
            )
            del exported
            lap("translate")
            _optimize(program.model)
            lap("optimize")
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        first = first_line(exc)
        raise BuildError(f"{spec.name}: ONNX export failed ({type(exc).__name__}: {first[:300]})") from exc
    _name_axes(spec, program.model)
    if rewrite is not None:
        rewrite(program.model)
        lap("rewrite")

    model_path = out_dir / MODEL_FILE
    initializer_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value)
    external = initializer_bytes > external_data_threshold
    _save_and_check(spec, program.model, model_path, external, lap, checker)
    del program
    data_path = out_dir / DATA_FILE if external else None
    return OnnxExport(model_path, data_path, time.perf_counter() - t0, initializer_bytes, phases)


def _optimize(model: Any) -> None:
    """onnxscript's ``optimize_ir`` with its pattern rules but not the one that matches several outputs.

    That rule (SlicesSplit) lists every node of the graph for every node it tries, so its time grows with the
    square of the node count (see the module's docstring); what it does, several Slices into one Split, TensorRT's
    optimizer does itself; on a 6+12-block graph at full width the result has the same node count (2,433) as
    ``optimize_ir``'s. Folding runs with ONNX shape inference, as in ``optimize_ir``: that is what turns the
    exporter's SplitToSequence/SequenceAt pairs, which TensorRT's parser rejects, into Split.
    """
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript import optimizer, rewriter

    default_rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)  # the optimizer's own list: no public name
    if default_rules is None:  # another onnxscript layout: its whole optimizer, right but slow on large graphs
        optimizer.optimize_ir(model)
        return
    rules = [
        rule
        for rule in default_rules
        if getattr(getattr(rule, "_target_pattern", None), "has_single_output_node", True)
    ]
    cleanup = ir.passes.Sequential(
        rewriter.RewritePass(rules), common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass()
    )
    common.InlinePass()(model)
    for _ in range(2):  # as optimize_ir: each pass can expose work for the other
        folded = optimizer.fold_constants(model, onnx_shape_inference=True).modified  # optimize_ir's setting
        if not cleanup(model).modified and not folded:
            break
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _save_and_check(spec: ComponentSpec, model: Any, model_path: Path, external: bool, lap: Any,
                    checker: bool) -> None:  # fmt: skip
    """Write the model (weights to one data file when ``external``), then check it and its interface."""
    import onnx
    import onnx_ir as ir

    if external:
        # Every weight goes to the one data file; tiny constants (shape and axes operands) stay inline, where
        # shape inference in ONNX Runtime and TensorRT's parser read them.
        ir.save(model, model_path, external_data=DATA_FILE, size_threshold_bytes=1024)
    else:
        ir.save(model, model_path)
    lap("save")
    try:
        if checker:
            onnx.checker.check_model(str(model_path))  # path-based: works past protobuf's 2 GB limit
    except onnx.checker.ValidationError as exc:
        raise BuildError(f"{spec.name}: the exported ONNX fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    _check_interface(spec, model_path)
    lap("check")


def _fused_rms_norm(input, normalized_shape, weight=None, eps=None):  # noqa: A002 (aten's argument names)
    """``aten._fused_rms_norm`` in elementary ops, as torch's own reference decomposition computes it.

    Returns (output in the input dtype, rstd in float32).
    """
    import torch

    dims = [input.dim() - 1 - i for i in range(len(normalized_shape))]
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    rstd = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    out = x * rstd
    if weight is not None:
        out = out * weight
    return out.type_as(input), rstd


def _fused_kernel_decompositions() -> dict:
    """Decompositions of fused CUDA kernels that a trace on the GPU records and ONNX has no translation for.

    Traced on CUDA, diffusers' RMSNorm becomes ``aten._fused_rms_norm``; decomposed, it exports as the same
    elementwise/ReduceMean graph a CPU trace gives (opset 19 has no RMSNormalization). Older torch releases have
    no decomposition registered for it, so fluxtrt carries its own.
    """
    import torch

    def rms_norm(input, normalized_shape, weight=None, eps=None):  # noqa: A002
        return _fused_rms_norm(input, normalized_shape, weight, eps)[0]

    # rms_norm too: left to the exporter's own decompositions it would turn into the fused kernel again on CUDA.
    return {torch.ops.aten._fused_rms_norm.default: _fused_rms_norm, torch.ops.aten.rms_norm.default: rms_norm}


@contextmanager
def _quiet_exporter():
    """Silence the exporter's notices that concern optional packages fluxtrt does not use (torchvision ops)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message="# The axis name")
            yield
    finally:
        logger.setLevel(level)


def _name_axes(spec: ComponentSpec, model: Any) -> None:
    """Give every dynamic axis the spec's symbol (the exporter writes its own, such as ``s72`` or ``(H//8)``).

    Raises:
        BuildError: an axis the spec calls dynamic came out static, or a static size differs from the spec.
    """
    values = list(model.graph.inputs) + list(model.graph.outputs)
    for value, tensor in zip(values, spec.inputs + spec.outputs, strict=True):
        dims = list(value.shape) if value.shape is not None else []
        if len(dims) != len(tensor.shape):
            raise BuildError(f"{spec.name}: exported {value.name} has rank {len(dims)}, expected {tensor.shape}")
        for axis, (got, want) in enumerate(zip(dims, tensor.shape, strict=True)):
            if isinstance(want, str) and isinstance(got, int):
                raise BuildError(
                    f"{spec.name}: {value.name} axis {axis} ({want}) was specialised to {got} during export: the "
                    "sample inputs must give dynamic axes sizes other than 0 and 1 and unlike each other"
                )
            if isinstance(want, int) and got != want:
                raise BuildError(f"{spec.name}: {value.name} axis {axis} is {got}, expected {want}")
        value.shape = type(value.shape)(list(tensor.shape))


def _check_interface(spec: ComponentSpec, path: Path) -> None:
    """The graph's inputs/outputs are the spec's, in order, with the spec's symbolic axes."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for kind, values, tensors in (("inputs", graph.input, spec.inputs), ("outputs", graph.output, spec.outputs)):
        names = [v.name for v in values]
        if names != [t.name for t in tensors]:
            raise BuildError(f"{spec.name}: exported {kind} are {names}, expected {[t.name for t in tensors]}")
        for value, tensor in zip(values, tensors, strict=True):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            if dims != list(tensor.shape):
                raise BuildError(
                    f"{spec.name}: exported {value.name} has dims {dims}, expected {list(tensor.shape)}: "
                    "a dynamic axis was specialised during export"
                )
