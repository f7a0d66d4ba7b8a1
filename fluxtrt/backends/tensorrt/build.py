"""Applying a ``BuildPlan`` with TensorRT's Python API: parse the ONNX from its path, configure the builder, build,
and write the serialized plan and the timing cache atomically. Errors of the parser and the builder become one
line each (``BuildError``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fluxtrt.backends.tensorrt.plan import BuildPlan
from fluxtrt.errors import BuildError
from fluxtrt.io import atomic_write


def build_plan_file(trt: Any, plan: BuildPlan, engine_path: Path) -> dict[str, Any]:
    """Apply ``plan`` with TensorRT and write the serialized plan to ``engine_path``; returns what to record.

    Raises:
        BuildError: the parser rejected the ONNX, the build ran out of memory or failed.
    """
    log = _Logger(trt)
    builder = trt.Builder(log.logger)
    network, _parser = parse_network(trt, builder, plan, log)  # the parser owns weights the network refers to
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
    cache_loaded = _load_timing_cache(config, Path(plan.timing_cache))
    try:
        serialized = builder.build_serialized_network(network, config)
    except (RuntimeError, MemoryError) as exc:  # allocation failures surface as exceptions in some releases
        log.errors.append(f"{type(exc).__name__}: {exc}".replace("\n", " "))
        serialized = None
    if serialized is None:
        raise _build_failure(plan, log.errors)
    _atomic_bytes(engine_path, memoryview(serialized))
    Path(plan.timing_cache).parent.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(Path(plan.timing_cache), memoryview(config.get_timing_cache().serialize()))
    return {"timing_cache_loaded": bool(cache_loaded), "layers": network.num_layers}


def parse_network(trt: Any, builder: Any, plan: BuildPlan, log: _Logger) -> tuple[Any, Any]:
    """(network, parser) of ``plan.onnx_path``, parsed from the file (so external data beside it is found); keep
    the parser as long as the network."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log.logger)
    for name in plan.parser_flags:
        parser.set_flag(getattr(trt.OnnxParserFlag, name))
    if not parser.parse_from_file(plan.onnx_path):
        errors = parser_errors(parser) or log.errors or ["no error recorded"]
        raise BuildError(
            f"{plan.component}: TensorRT's ONNX parser rejected {plan.onnx_path} with {len(errors)} error(s): "
            f"{' | '.join(errors)[:1500]}: check the ONNX exports with the spec's ops and opset"
        )
    return network, parser


def _load_timing_cache(config: Any, path: Path) -> bool:
    """Give the builder the timing cache at ``path``; an absent or foreign one (another TensorRT or GPU) is replaced
    by an empty one, since TensorRT ignores stale entries. Returns whether the file was used."""
    blob = path.read_bytes() if path.is_file() else b""
    loaded = bool(blob) and config.set_timing_cache(config.create_timing_cache(blob), False)
    if not loaded:
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return bool(loaded)


def _build_failure(plan: BuildPlan, errors: list[str]) -> BuildError:
    """The one-line error for a build that returned no plan: out of memory (with what to shrink), or the log."""
    errors = errors or ["TensorRT returned no plan"]
    if any(_is_oom(e) for e in errors):
        largest = {k: v[2] for k, v in plan.profile.items()}
        return BuildError(
            f"{plan.component}: the TensorRT build ran out of GPU memory (workspace {plan.workspace_bytes / 2**30:g} "
            f"GiB, profile max {largest}): build with a smaller --max-resolution or --max-batch, or a smaller "
            "--workspace-gib"
        )
    return BuildError(
        f"{plan.component}: TensorRT failed to build the engine ({' | '.join(errors)[:1500]}): rerun with --verbose, "
        "or lower --opt-level"
    )


def _atomic_bytes(path: Path, data: Any) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(bytes(data)))


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
