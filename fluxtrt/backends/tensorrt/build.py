"""Applying a ``BuildPlan`` through Polygraphy: the ONNX parsed from its path (``NetworkFromOnnxPath``), the builder
config (``CreateConfig``, ``CreateConfigRTX`` with the compute-capability targets), the build
(``EngineBytesFromNetwork``, timing cache saved where TensorRT 10 has one), and the plan written atomically. Before
building, the parsed network of a quantized transformer is checked (``fluxtrt.backends.tensorrt.network``): every
Q/DQ linear of the ONNX must be an FP8 (FP4) matrix multiply in TensorRT's network. Errors of the parser and the
builder become one line each (``BuildError``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fluxtrt.backends.tensorrt.flavour import Flavour
from fluxtrt.backends.tensorrt.network import check_quantized, onnx_quantized_linears
from fluxtrt.backends.tensorrt.plan import QUANTIZED, BuildPlan
from fluxtrt.backends.tensorrt.refit import mark_refittable
from fluxtrt.errors import BuildError, first_line
from fluxtrt.io import atomic_write


def build_plan_file(flavour: Flavour, plan: BuildPlan, engine_path: Path,
                    say: Callable[[str], None] = lambda message: None) -> dict[str, Any]:  # fmt: skip
    """Apply ``plan`` with ``flavour``'s TensorRT and write the serialized plan to ``engine_path``, telling ``say``
    each of the builder's phases as it ends.

    Returns:
        What to record: the network's layer count and, for a quantized component, its quantized matrix multiplies.

    Raises:
        BuildError: the parser rejected the ONNX, the network lost quantized linears, or the build failed.
    """
    from polygraphy.exception import PolygraphyException

    trt, polygraphy = flavour.lib(), flavour.polygraphy()
    flags = [getattr(trt.OnnxParserFlag, name) for name in plan.parser_flags]
    try:
        builder, network, parser = polygraphy.NetworkFromOnnxPath(
            plan.onnx_path, flags=flags, strongly_typed=plan.strongly_typed
        )()
    except PolygraphyException as exc:
        raise BuildError(
            f"{plan.component}: {flavour.name}'s ONNX parser rejected {plan.onnx_path} ({first_line(exc)[:500]}): "
            "rerun with --verbose for the parser's errors, and check the ONNX exports with the spec's ops and opset"
        ) from None
    details: dict[str, Any] = {"layers": network.num_layers}
    if plan.compute in QUANTIZED:
        linears = onnx_quantized_linears(Path(plan.onnx_path))
        details["quantized_matmuls"] = check_quantized(trt, network, plan.compute, linears, plan.component)
    if plan.refittable:
        details["refit_weights"] = mark_refittable(network, Path(plan.onnx_path), plan.component)
    recorder = _error_recorder(trt)
    builder.error_recorder = recorder
    config = _config(flavour, trt, polygraphy, plan, say)
    try:
        with warnings.catch_warnings():
            # Polygraphy sets an (empty) timing cache on every config, which TensorRT-RTX deprecates as a no-op.
            warnings.filterwarnings("ignore", "Use Deprecated in TensorRT-RTX", DeprecationWarning)
            build = polygraphy.EngineBytesFromNetwork((builder, network, parser), config=config,
                                                      save_timing_cache=plan.timing_cache)  # fmt: skip
            serialized = build()
    except (PolygraphyException, RuntimeError, MemoryError) as exc:
        raise _build_failure(plan, flavour, [*recorder.errors, first_line(exc)]) from None
    atomic_write(Path(engine_path), lambda tmp: Path(tmp).write_bytes(bytes(serialized)))
    return details


def _config(flavour: Flavour, trt: Any, polygraphy: Any, plan: BuildPlan, say: Callable[[str], None]) -> Any:
    """Polygraphy's builder config for ``plan``: one profile, the optimisation level, per flavour the targets
    (TensorRT-RTX) or the workspace limit and timing cache (TensorRT 10), for a refittable plan
    ``REFIT_INDIVIDUAL`` (only the weights marked refittable in the network are), and a progress monitor that
    tells ``say`` each of the builder's top-level phases as it ends."""
    config = _flavour_config(flavour, trt, polygraphy, plan)
    monitor = _progress_monitor(trt, flavour, say)

    def finish(builder: Any, network: Any, config: Any) -> None:
        config.progress_monitor = monitor
        if plan.refittable:
            config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)

    return polygraphy.PostprocessConfig(config, func=finish)


# A nested phase of the builder's that takes this long is told when it ends (most take milliseconds; the tactic
# timing of a full-size transformer takes minutes).
TELL_PHASE_S = 1.0


def _progress_monitor(trt: Any, flavour: Flavour, say: Callable[[str], None]) -> Any:
    """An IProgressMonitor telling ``say`` "<flavour>: <phase> done in N s" as the builder's top-level phase ends,
    and each nested one that took ``TELL_PHASE_S`` or more."""
    import time

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, tuple[float, bool]] = {}  # phase -> (when it started, whether it is top-level)

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.started[phase_name] = (time.perf_counter(), parent_phase is None)

        def step_complete(self, phase_name, step):
            return True  # go on

        def phase_finish(self, phase_name):
            t0, top = self.started.pop(phase_name, (None, False))
            if t0 is not None and (top or time.perf_counter() - t0 >= TELL_PHASE_S):
                say(f"{flavour.name}: {phase_name} done in {time.perf_counter() - t0:.1f} s")

    return Monitor()


def _flavour_config(flavour: Flavour, trt: Any, polygraphy: Any, plan: BuildPlan) -> Any:
    profile = polygraphy.Profile()
    for name, (lo, opt, hi) in plan.profile.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    common = {"profiles": [profile], "builder_optimization_level": plan.opt_level}
    if not flavour.rtx:
        limits = {trt.MemoryPoolType.WORKSPACE: plan.workspace_bytes}
        return polygraphy.CreateConfig(tf32=plan.tf32, memory_pool_limits=limits, load_timing_cache=plan.timing_cache,
                                       **common)  # fmt: skip
    from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

    config = CreateConfigRTX(compute_capabilities=[divmod(sm, 10) for sm in plan.targets], **common)
    if plan.tf32:
        return config
    # TensorRT-RTX has TF32 on by default and CreateConfigRTX no switch for it: fp32 means fp32.
    return polygraphy.PostprocessConfig(config, func=lambda builder, network, c: c.clear_flag(trt.BuilderFlag.TF32))


def _error_recorder(trt: Any) -> Any:
    """An IErrorRecorder that keeps the builder's errors (Polygraphy reports only that the build failed)."""

    class Recorder(trt.IErrorRecorder):
        def __init__(self):
            trt.IErrorRecorder.__init__(self)
            self.errors: list[str] = []

        def clear(self):
            self.errors = []

        def get_error_code(self, i):
            return trt.ErrorCode.UNSPECIFIED_ERROR

        def get_error_desc(self, i):
            return self.errors[i]

        def has_overflowed(self):
            return False

        def num_errors(self):
            return len(self.errors)

        def report_error(self, code, desc):
            self.errors.append(str(desc).strip().replace("\n", " "))
            return False  # keep going: the build reports failure itself

    return Recorder()


def _build_failure(plan: BuildPlan, flavour: Flavour, errors: list[str]) -> BuildError:
    """The one-line error for a build that returned no plan: out of memory (with what to shrink), or the log."""
    errors = [e for e in errors if e] or [f"{flavour.name} returned no plan"]
    if any(_is_oom(e) for e in errors):
        largest = {k: v[2] for k, v in plan.profile.items()}
        workspace = "" if plan.workspace_bytes is None else f"workspace {plan.workspace_bytes / 2**30:g} GiB, "
        return BuildError(
            f"{plan.component}: the {flavour.name} build ran out of memory ({workspace}profile max {largest}): build "
            "with a smaller --max-resolution or --max-batch" + ("" if flavour.rtx else ", or a smaller --workspace-gib")
        )
    return BuildError(
        f"{plan.component}: {flavour.name} failed to build the engine ({' | '.join(errors)[:1500]}): rerun with "
        "--verbose, or lower --opt-level"
    )


def _is_oom(text: str) -> bool:
    text = text.lower()
    return any(k in text for k in ("out of memory", "outofmemory", "cudaerrormemoryallocation", "failed to allocate"))
