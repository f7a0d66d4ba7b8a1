"""Loading an engines directory as a ``KontextPipeline`` whose runners are its engines."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxtrt.backends.base import EngineBackend, LoadJob, get_backend
from fluxtrt.backends.runner import Runner
from fluxtrt.config import COMPUTE_DTYPE, DEFAULT_FBC_THRESHOLD
from fluxtrt.engines.manifest import Manifest, rebuild_hint
from fluxtrt.errors import EngineError, FluxtrtError, InputError, first_line
from fluxtrt.lora.files import Lora
from fluxtrt.specs.component import ComponentSpec
from fluxtrt.specs.flux import COMPONENTS, TRANSFORMER_PARTS, component_specs

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EngineSource:
    """A pipeline's engines (``infer --engines``): ``load_engine_pipeline``'s arguments, loaded by ``load``.

    Args:
        path: the engines directory.
        device: where they run.
        fbc_threshold: the first-block cache's threshold where the engines hold the transformer's parts (None: off).
        require_fbc: raise when they do not (the threshold was given explicitly).
    """

    path: Path
    device: str
    fbc_threshold: float | None
    require_fbc: bool

    @property
    def name(self) -> str:
        """What the pipeline runs, for the report."""
        return f"engines {self.path}"

    def load(self, loras: Sequence[Lora] = (), prepare: Callable[[Any], None] | None = None) -> Any:
        """Load the engines, with ``loras`` merged into the transformer engine's weights. ``prepare`` must be None:
        engines hold no transformer module (``InferConfig`` refuses ``--gpus`` with ``--engines``).

        Raises:
            FluxtrtError: as ``load_engine_pipeline``, or a LoRA that does not fit (nothing stays loaded).
        """
        if prepare is not None:
            raise ValueError("engines hold no transformer module to prepare")
        pipeline = load_engine_pipeline(self.path, self.device, self.fbc_threshold, self.require_fbc)
        if loras:
            from fluxtrt.lora.engines import apply_to_runner

            try:
                apply_to_runner(pipeline.runners["transformer"], loras)
            except BaseException:
                pipeline.close()
                raise
        return pipeline


def engines_device(path: Path) -> str | None:
    """The device the engines in ``path`` run on, what ``--device auto`` means with ``--engines``: cuda for TensorRT
    plans, else the device the directory was built for (CPU-built engines stay on the CPU of a machine with a GPU);
    None where the manifest does not read or names an unknown backend (loading it then says why)."""
    try:
        manifest = Manifest.load(Path(path))
        backend = get_backend(manifest.backend)
    except FluxtrtError:
        return None
    return backend.runs_on or manifest.build_env.device


def transformer_engines(manifest: Manifest, first_block_cache: float | None) -> tuple[str, ...]:
    """Which engines serve the transformer: its two parts (the first-block cache) where the directory holds them and
    the cache is on or no monolithic transformer was built, else the one transformer engine; () when neither."""
    components = manifest.components
    parts = all(p in components for p in TRANSFORMER_PARTS)
    if parts and (first_block_cache is not None or "transformer" not in components):
        return TRANSFORMER_PARTS
    return ("transformer",) if "transformer" in components else ()


def load_engine_pipeline(path: Path, device: str = "cpu", first_block_cache: float | None = DEFAULT_FBC_THRESHOLD,
                         require_first_block_cache: bool = False, concurrent: bool = False):  # fmt: skip
    """A ``KontextPipeline`` whose runners are the engines in ``path``, loaded.

    Args:
        path: an engines directory written by ``fluxtrt build``.
        device: where the engines run (``cpu`` or ``cuda``).
        first_block_cache: for a directory built with ``--first-block-cache``, the cache's threshold (None: off;
            the parts then run every step, unless a monolithic transformer engine is there too). The pipeline's
            transformer runner is then a ``SplitTransformerRunner`` (its ``stats()`` count the skipped steps).
        require_first_block_cache: raise when the directory holds no transformer parts (the threshold was asked
            for explicitly).
        concurrent: load the engines and the tokenizers from threads at once (reading files, copying weights to
            the device, each engine's first call and loading libraries overlap) instead of one after the other.
            Off by default: on the CPU threads only contend (tiny engines: 3.5 s against 3.2), and on a GPU it is
            not yet measured (``benchmarks.serve_gpu``'s ``load_concurrent``).

    Returns:
        A ``KontextPipeline`` whose runners refuse shapes outside the built range and which fits an edit into the
        built resolution range (close it to free the engines).

    Raises:
        EngineError: missing/unreadable manifest, a component not built, a missing or truncated engine file, an
            unknown backend, or an engine the backend cannot load.
        InputError: ``require_first_block_cache`` and the directory has no transformer parts.
    """
    from fluxtrt.models.loading import torch_dtype
    from fluxtrt.pipeline.kontext import KontextPipeline
    from fluxtrt.pipeline.sizes import SizeRange

    started = time.perf_counter()
    path = Path(path)
    manifest = Manifest.load(path)
    try:
        backend = get_backend(manifest.backend)
    except FluxtrtError:
        raise EngineError(
            f"{path}/manifest.json names backend '{manifest.backend}', which this fluxtrt does not know: rebuild "
            "with `fluxtrt build --backend onnxruntime|aotinductor|tensorrt`"
        ) from None
    backend.check_available()
    transformer = transformer_engines(manifest, first_block_cache)
    _check_complete(path, manifest, transformer, require_first_block_cache)
    dtype = torch_dtype(COMPUTE_DTYPE[manifest.precision])
    specs = component_specs(manifest.dims)
    runners: dict[str, Any] = {}
    seconds = {"checks": time.perf_counter() - started}
    try:
        names = (*[c for c in COMPONENTS if c != "transformer"], *transformer)
        engine = functools.partial(_load_engine, path, backend, manifest)
        loads = {n: _timed(seconds, n, device, functools.partial(engine, n, specs[n], device, dtype)) for n in names}
        tokenizers = _timed(seconds, "tokenizers", "cpu", functools.partial(_load_tokenizers, path))
        if concurrent:
            tokenizer, tokenizer_2 = _load_concurrently(loads, tokenizers, runners)
        else:
            for name, load in loads.items():
                runners[name] = load()
            tokenizer, tokenizer_2 = tokenizers()
    except BaseException:
        _close(runners)
        raise
    if transformer == TRANSFORMER_PARTS:
        from fluxtrt.pipeline.first_block_cache import SplitTransformerRunner

        first, rest = (runners.pop(p) for p in TRANSFORMER_PARTS)
        runners["transformer"] = SplitTransformerRunner(specs["transformer"], first, rest, first_block_cache)
    model = manifest.model
    pipeline = KontextPipeline(
        runners={name: runners[name] for name in COMPONENTS},
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        dims=manifest.dims,
        vae_scaling=model.vae_scaling,
        vae_shift=model.vae_shift,
        scheduler_config=model.scheduler_config,
        device=device,
        dtype=dtype,
        source=str(path),
        sizes=SizeRange(manifest.resolution("min"), manifest.resolution("max")),
    )
    pipeline.load_seconds = seconds
    return pipeline


def _timed(seconds: dict[str, float], name: str, device: str, load: Callable[[], Any]) -> Callable[[], Any]:
    """``load``, recording in ``seconds[name]`` how long it took (on CUDA until the device has finished)."""

    def run() -> Any:
        t0 = time.perf_counter()
        result = load()
        if str(device).startswith("cuda"):
            import torch

            torch.cuda.synchronize(device)
        seconds[name] = time.perf_counter() - t0
        return result

    return run


def _load_engine(path: Path, backend: EngineBackend, manifest: Manifest, name: str, spec: ComponentSpec,
                 device: str, dtype: torch.dtype) -> Runner:  # fmt: skip
    """The engine of component ``name``, its files checked against the manifest, loaded by the backend.

    Raises:
        EngineError: a missing, truncated or corrupt file, or an engine the backend cannot load (its own
            EngineError, or the OSError/ValueError of the library reading the file, named as the engine's).
    """
    entry = manifest.components[name]
    for extra in entry.engine_extra:
        extra.check(path, name)
    engine = entry.engine.check(path, name)
    options = backend.options(entry.settings.get("options", {}))
    job = LoadJob(spec, engine, device, dtype, entry.profile, options, entry.record)
    try:
        return backend.load(job)
    except (OSError, ValueError) as exc:
        raise EngineError(
            f"{name}: the {manifest.backend} engine {engine} cannot be loaded ({type(exc).__name__}: "
            f"{first_line(exc)}): {rebuild_hint(path)}"
        ) from None


def _load_tokenizers(path: Path) -> tuple[Any, Any]:
    """The CLIP and T5 tokenizers saved beside the engines.

    Raises:
        EngineError: a tokenizer folder that is missing or does not read.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
        tokenizer_2 = T5TokenizerFast.from_pretrained(str(path / "tokenizer_2"), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path}: the tokenizers beside the engines cannot be read ({exc}): rebuild") from None
    return tokenizer, tokenizer_2


def _check_complete(path: Path, manifest: Manifest, transformer: tuple[str, ...], require_parts: bool) -> None:
    """Raise unless every component (the transformer as one engine or as its parts) is built."""
    if require_parts and transformer != TRANSFORMER_PARTS:
        raise InputError(
            f"a first-block-cache threshold was given but {path} holds no transformer parts "
            f"({', '.join(TRANSFORMER_PARTS)}): build them with `fluxtrt build ... --first-block-cache --out {path}`, "
            "or leave the threshold out"
        )
    missing = [c for c in COMPONENTS if c != "transformer" and c not in manifest.components]
    if not transformer:
        missing.append("transformer")
    if missing:
        vae = f" --vae {manifest.model.vae}" if manifest.model.vae else ""
        raise EngineError(
            f"{path} has no engines for {', '.join(missing)}: finish the build with `fluxtrt build --model "
            f"{manifest.model.source}{vae} --backend {manifest.backend} --precision {manifest.precision} "
            f"--out {path} "
            f"--components {','.join(missing)}` (and the original build's range options; the transformer may be "
            "built as its two parts with --first-block-cache)"
        )


def _load_concurrently(loads: dict[str, Callable[[], Runner]], tokenizers: Callable[[], Any], runners: dict) -> Any:
    """Run every engine's load and the tokenizers' from threads; fills ``runners`` with those that loaded (for the
    caller to close on failure), raises the first failure (in component order) once all have finished, else returns
    the tokenizers."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(loads) + 1, thread_name_prefix="fluxtrt-load") as pool:
        futures = {name: pool.submit(load) for name, load in loads.items()}
        tokenized = pool.submit(tokenizers)
    failures = [f.exception() for f in (*futures.values(), tokenized) if f.exception() is not None]
    runners.update({name: f.result() for name, f in futures.items() if f.exception() is None})
    if failures:
        raise failures[0]
    return tokenized.result()


def _close(runners: dict) -> None:
    for runner in runners.values():
        runner.close()
