"""Building an AOTInductor package: the module prepared for export (fused Q/K/V, static FP8 linears, FP8 attention),
``torch.export`` over the profile's symbol ranges, inductor's compile into a ``.pt2``, and the external weights."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch._inductor

from fluxtrt.backends.aotinductor.options import AotInductorOptions, AotInductorRecord
from fluxtrt.backends.aotinductor.runtime import TRUSTED_HOST_ISA, error_text, external_weights_path, load_package
from fluxtrt.backends.base import BuildJob, Profile
from fluxtrt.backends.profile import symbol_ranges
from fluxtrt.backends.torch_modules import fused_qkv
from fluxtrt.environment import device_environment
from fluxtrt.errors import BuildError, DeviceError, InputError, MissingDependencyError
from fluxtrt.specs.flux import TRANSFORMERS

AotiJob = BuildJob[AotInductorOptions]

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
# Components exported with fused Q/K/V projections (the module is unfused again after the export), and those whose
# attention may run in FP8 (FLUX attention processors).
FUSE_QKV = TRANSFORMERS
FP8_ATTENTION = TRANSFORMERS
SIGMOID_GELU = TRANSFORMERS


def build_package(job: AotiJob) -> AotInductorRecord:
    """Export ``job.module`` over the profile's ranges and compile it to ``job.engine_path``.

    Writes ``job.engine_path`` and, with ``weights=external``, ``external_weights_path`` of it; inductor's scratch
    and cache go to ``job.workdir/inductor-cache``.

    Returns:
        The record: torch, device (+ gpu, sm on CUDA), ``shape_guards`` (how export kept them), ``dims`` (symbol ->
        [min, max] of the dynamic ones), ``attention`` (the kernels), ``fused_qkv`` and ``fp8_attention``
        (transformer), ``fp8_linears`` (fp8).

    Raises:
        InputError: a precision this backend does not build, fp8 without calibrated scales, CUDA graphs on a CPU
            build.
        DeviceError: CUDA asked for on a machine without it.
        BuildError: the profile does not fit the spec, torch.export rejects the dynamic ranges, or inductor fails.
    """
    with warnings.catch_warnings():
        # torch's own deprecation inside export and inductor (raised from copyreg, once per component): nothing a
        # user of fluxtrt can act on.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        return _build_package(job)


def _build_package(job: AotiJob) -> AotInductorRecord:
    _check_job(job)
    record = AotInductorRecord.built_in(device_environment(job.device))
    ranges = symbol_ranges(job.spec, job.profile)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as changes, torch.inference_mode(False):
        changes.enter_context(_prepared_for_export(job, record))
        ep, record.shape_guards, attention = export_program(job, ranges)
    record.export_s = round(time.perf_counter() - t0, 1)
    job.say(f"exported in {record.export_s:.1f} s; compiling with inductor")
    configs = {
        # The host's vector ISA from the CPU's flags alone (TRUSTED_HOST_ISA), then what the caller set.
        **TRUSTED_HOST_ISA,
        **job.options.inductor_configs,
        "aot_inductor.package_constants_in_so": job.options.weights == "packaged",
    }
    external = job.options.weights == "external"
    written = [Path(job.engine_path)] + ([external_weights_path(job.engine_path)] if external else [])
    try:
        t0, before = time.perf_counter(), _compile_phases()
        try:
            with _inductor_cache(Path(job.workdir) / "inductor-cache"), open(job.engine_path, "wb") as f:
                # A file object, not a path: inductor insists on a ".pt2" name, the caller may stage another.
                torch._inductor.aoti_compile_and_package(ep, package_path=f, inductor_configs=configs)
        except Exception as exc:
            raise BuildError(
                f"{job.spec.name}: AOTInductor failed to compile the exported graph ({error_text(exc)}): rerun with "
                "--verbose for the traceback"
            ) from exc
        record.compile_s = round(time.perf_counter() - t0, 1)
        record.compile_phases_s = _phases_since(before)
        job.say(f"compiled in {record.compile_s:.1f} s" + ("; writing its weights" if external else ""))
        if external:
            t0 = time.perf_counter()
            save_weights(job, ep)
            record.weights_s = round(time.perf_counter() - t0, 1)
    except BaseException:
        for path in written:  # leave no half-written engine or weights file behind
            path.unlink(missing_ok=True)
        raise
    record.dims = {sym: [lo, hi] for sym, (lo, _, hi) in ranges.items() if lo != hi}
    if attention:
        record.attention = attention
    return record


def _compile_phases() -> dict[str, float] | None:
    """Seconds this process has spent so far in each of inductor's timed phases (torch's own bookkeeping, which a
    torch without it leaves None)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return None
    return {phase: sum(seconds) for phase, seconds in compilation_time_metrics.items()}


def _phases_since(before: dict[str, float] | None, at_least: float = 1.0) -> dict[str, float] | None:
    """The phases that took ``at_least`` seconds since ``before`` (``_compile_phases``), rounded."""
    after = _compile_phases()
    if before is None or after is None:
        return None
    spent = {phase: seconds - before.get(phase, 0.0) for phase, seconds in after.items()}
    return {phase: round(seconds, 1) for phase, seconds in spent.items() if seconds >= at_least} or None


def _max_rows(profile: Profile) -> int:
    """A bound on the rows of any linear's input in a component built for ``profile``: the inputs' largest shapes,
    every axis but the last multiplied, summed over the inputs (a FLUX single block's linears see the text and the
    image tokens joined)."""
    return sum(math.prod(shapes[2][:-1]) for shapes in profile.values())


def _check_job(job: AotiJob) -> None:
    if job.precision not in COMPUTE_DTYPES:
        raise InputError(
            f"--precision is '{job.precision}' but the aotinductor backend builds {', '.join(COMPUTE_DTYPES)}: pick "
            "one of those, or --backend tensorrt for fp4"
        )
    if job.options.cuda_graph and torch.device(job.device).type != "cuda":
        raise InputError(
            f"--cuda-graph is set but the engines are built for device '{job.device}': CUDA graphs need --device cuda "
            "(or leave --cuda-graph out)"
        )
    if job.precision == "fp8" and job.spec.name in TRANSFORMERS and job.amax is None:
        raise InputError(
            f"{job.spec.name}: --precision fp8 needs calibrated input scales for the transformer's linears and the "
            "build passed none: build through `fluxtrt build` (it calibrates) or pass --calibration FILE"
        )


@contextlib.contextmanager
def _prepared_for_export(job: AotiJob, record: AotInductorRecord) -> Iterator[None]:
    """The module as the package computes it, for the duration: fused Q/K/V, static FP8 linears (fp8), FP8
    attention and the tanh GELUs in their sigmoid form (transformer); everything is put back on exit. What was
    changed is set in ``record``."""
    with contextlib.ExitStack() as changes:
        if job.spec.name in FUSE_QKV:
            record.fused_qkv = changes.enter_context(fused_qkv(job.module.transformer))
        attention_v: dict[str, float] = {}
        if job.precision == "fp8" and job.amax is not None:
            from fluxtrt.kernels.attention_scales import split_calibration
            from fluxtrt.kernels.fp8_linear import amax_for_fused_qkv, static_fp8_linears

            linears, attention_v = split_calibration(job.amax)
            amax = amax_for_fused_qkv(job.module, linears)
            changes.enter_context(static_fp8_linears(job.module, amax, max_rows=_max_rows(job.profile)))
            record.fp8_linears = len(amax)
        if job.spec.name in SIGMOID_GELU:
            from fluxtrt.kernels.gelu import sigmoid_form_gelus

            record.sigmoid_form_gelus = changes.enter_context(sigmoid_form_gelus(job.module))
        if job.spec.name in FP8_ATTENTION:
            from fluxtrt.kernels.attention import fp8_attention

            kernel, record.fp8_attention, unavailable = _fp8_attention_kernel(job)
            if unavailable:
                record.fp8_attention_unavailable = unavailable
            if kernel is not None:
                # Q and K quantized with their static bound, each by one fluxtrt::norm_rope_fp8 (norm, RoPE, e4m3);
                # V with its calibrated amax where the calibration has it (names relative to the transformer).
                v_amax = {k.removeprefix("transformer."): v for k, v in attention_v.items()}
                changes.enter_context(fp8_attention(job.module.transformer, kernel, static_qk=True, v_amax=v_amax))
                v = "calibrated amax" if v_amax else "dynamic amax"
                record.fp8_attention_scales = f"Q, K: static norm bound (fluxtrt::norm_rope_fp8); V: {v}"
        yield


def _fp8_attention_kernel(job: AotiJob) -> tuple[Any, bool, str | None]:
    """(the FP8 attention kernel or None for SDPA, whether FP8 attention is on, why the default could not have it).

    Raises:
        DeviceError, MissingDependencyError: FP8 attention was asked for and cannot run here.
    """
    from fluxtrt.kernels.attention import checked_fp8_attention_kernel

    asked = job.options.fp8_attention
    wanted = asked if asked is not None else job.precision == "fp8" and torch.device(job.device).type == "cuda"
    if not wanted:
        return None, False, None
    try:
        return checked_fp8_attention_kernel(job.device), True, None
    except (DeviceError, MissingDependencyError) as exc:
        if asked:
            raise
        return None, False, str(exc)


@contextlib.contextmanager
def _inductor_cache(directory: Path) -> Iterator[None]:
    """Point inductor's (and triton's) caches at ``directory``, made absolute, for the duration, restoring them after.

    Absolute because inductor compiles a CUDA package's C++ in other working directories: with a relative cache
    (``fluxtrt build --out engines``) every CUDA build failed with a CppCompileError (seen on an H200).
    """
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with temporary_cache_dir(str(directory)):
        yield


def _violations(exc: BaseException) -> str:
    """The constraint lines of a torch.export dynamic-shape error, on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    # "- Not all values of B ... satisfy the generated guard ..." and the suggested "B = Dim('B', max=63)".
    picked = [ln.lstrip("- ") for ln in lines if ln.startswith("- ") or " = Dim(" in ln]
    return ("; ".join(picked) or next((ln for ln in lines if ln), ""))[:600]


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


def export_program(job: AotiJob, ranges: Mapping[str, tuple[int, int, int]]) -> tuple[Any, str, list[str]]:
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
                    f"{spec.name}: torch.export failed ({error_text(exc)}): rerun with --verbose for the traceback"
                ) from exc
    want = {s: [lo, hi] for s, (lo, _, hi) in ranges.items() if s in dims}
    raise BuildError(
        f"{spec.name}: torch.export cannot keep the profile's dynamic ranges {want} "
        f"({_violations(first_violation)}): build with a resolution/batch range inside what the model allows"
    ) from first_violation


def save_weights(job: AotiJob, ep: Any) -> None:
    """Write the constants the compiled graph uses to ``external_weights_path(job.engine_path)``."""
    from safetensors.torch import save_file

    # Only the package knows which constants survived inductor's dead-code elimination (a VAE decoder's
    # exported program still carries the encoder's weights); a code-only package loads in milliseconds.
    names = load_package(job.engine_path, probe_host_isa=torch.device(job.device).type == "cpu").get_constant_fqns()
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
