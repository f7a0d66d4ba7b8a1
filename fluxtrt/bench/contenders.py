"""What ``compare`` runs: PyTorch stages, engine directories, or any set of runners, each prepared into a pipeline.

PyTorch contenders share one loaded model (``ModelSession``): a stage that composes with what is applied reuses it,
one that would need undoing a compile or a quantization gets a freshly loaded model, and engines get the GPU to
themselves (the model is released first).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxtrt.backends.recording import RecordingRunner
from fluxtrt.backends.runner import Runner
from fluxtrt.bench.step_error import engine_step_error
from fluxtrt.config import DEFAULT_FBC_THRESHOLD, SamplerConfig
from fluxtrt.engines.manifest import Manifest
from fluxtrt.environment import free_device_memory
from fluxtrt.errors import InputError
from fluxtrt.pipeline.first_block_cache import SplitTransformerRunner
from fluxtrt.stages.config import STAGES, StageConfig, restrict_stage, stage_config


class ModelSession:
    """The loaded PyTorch model that stage and custom contenders share, loaded on first use and again when needed.

    Args:
        model: ``tiny``, ``random-full`` or a checkpoint.
        device, dtype: where and in what precision to load it.
        seed: initialisation seed of the synthetic models (the same weights after every reload).
        world: the processes the transformer is split over (``fluxtrt.parallel.context.World``), or None.
        tiny_vae: the slim autoencoder of ``vae=tiny`` stages: ``tiny`` (random weights) or a directory.
        loras: the LoRAs (``fluxtrt.lora.files.Lora``) every contender edits with: fused into the model after each
            load, before a stage quantizes or compiles it; merged into engines by their contenders.
    """

    def __init__(self, model: str, device: str, dtype: str, seed: int = 0, world: Any = None, tiny_vae: str = "tiny",
                 loras: Sequence[Any] = ()):  # fmt: skip
        self.model, self.device, self.dtype, self.seed = model, device, dtype, seed
        self.world, self.tiny_vae, self.loras = world, tiny_vae, tuple(loras)
        self.staged: Any = None  # fluxtrt.stages.apply.StagedModel
        self.loads: list[float] = []  # seconds of each load

    def staged_for(self, config: StageConfig) -> Any:
        """A ``StagedModel`` that ``config`` can be applied to, loading the model (again) if needed."""
        from fluxtrt.models import load_components
        from fluxtrt.stages.apply import StagedModel

        if self.staged is not None and self.staged.can_apply(config) is None:
            return self.staged
        self.release()
        t0 = time.perf_counter()
        if config.low_vram:
            from fluxtrt.stages.lowvram import load_low_vram

            if self.loras:
                raise InputError(f"--lora with stage {config.name}: the 24 GB mode quantizes the weights as it loads "
                                 "them")  # fmt: skip

            self.staged = load_low_vram(self.model, self.device, self.dtype, config, self.seed, self.tiny_vae)
        else:
            components = load_components(self.model, self.device, self.dtype, seed=self.seed)
            if self.loras:
                from fluxtrt.lora.fuse import fuse

                fuse(components.transformer, self.loras)
            if self.world is not None:
                from fluxtrt.parallel.context import enable_context_parallel

                enable_context_parallel(components.transformer, self.world)
            self.staged = StagedModel(components, tiny_vae=self.tiny_vae, seed=self.seed)
        self.loads.append(time.perf_counter() - t0)
        return self.staged

    def release(self) -> None:
        """Drop the model and free its device memory."""
        self.staged = None
        free_device_memory()

    def lora_what(self) -> list[str]:
        """The report's "what is on" item naming the LoRAs and their scales (none without)."""
        from fluxtrt.lora.files import lora_label

        return [lora_label(self.loras).removeprefix(" + ")] if self.loras else []


@dataclass
class Prepared:
    """A contender ready to edit.

    Attributes:
        pipeline: a ``KontextPipeline`` over the contender's runners.
        sampler: the sampler its edits use.
        what: what is on, for the report's table.
        begin_edit, end_edit: called around every edit; ``end_edit(edit)`` gets the timed edit's ``EditResult`` (None
            after a warmup edit) and returns per-edit extras (cache counts).
        details: returns the contender's details for the report (a stage's ``StageReport``), read after each edit.
        load_s: seconds the contender's model or engines took to load, if it loaded anything.
        after: run once the contender is closed (the engines' per-step error against PyTorch).
    """

    pipeline: Any
    sampler: SamplerConfig
    what: list[str]
    begin_edit: Callable[[], None] = lambda: None
    end_edit: Callable[[Any], dict | None] = lambda edit=None: None
    details: Callable[[], dict] = dict
    load_s: float | None = None
    after: Callable[[ModelSession], dict] | None = None

    def close(self) -> None:
        """Close the pipeline's runners (engines free their device memory)."""
        self.pipeline.close()


class Contender(ABC):
    """One thing ``compare`` measures. ``kind`` is ``stage``, ``engines`` or ``custom``."""

    name: str
    kind: str
    base: str | None = None  # the table stage, for speed-ups ("0", "1"); None for others

    @abstractmethod
    def prepare(self, session: ModelSession) -> Prepared:
        """Build the pipeline (raising on failure); ``session`` holds the shared PyTorch model."""


@dataclass
class StageContender(Contender):
    """A PyTorch stage (``"0"`` .. ``"4k"``, with optional ``:key=value`` overrides).

    Args:
        spec: the stage spec.
        strict: fail when a requested feature is unavailable instead of leaving it off and naming it.
    """

    spec: str
    strict: bool = False
    kind: str = field(default="stage", init=False)

    def __post_init__(self) -> None:
        self.config = stage_config(self.spec)
        self.name = self.config.name
        self.base = self.config.base

    def prepare(self, session: ModelSession) -> Prepared:
        from fluxtrt.pipeline.kontext import KontextPipeline

        loads = len(session.loads)
        config, notes = self.config, []
        if session.world is not None:
            config, notes = restrict_stage(config)
        staged = session.staged_for(config)
        applied = staged.apply(config, strict=self.strict)
        report = applied.report
        if session.world is not None:
            from fluxtrt.parallel.context import attach_processors

            attach_processors(staged.components.transformer)  # the stage set new attention processors
            report.unavailable.extend(notes)
            report.features.append(f"context parallel over {session.world.size} processes (Ulysses)")

        def end_edit(edit: Any = None) -> dict | None:
            stats = applied.end_edit(*((edit.timings_ms, edit.calls) if edit is not None else ()))
            return stats.to_dict() if stats is not None else None

        return Prepared(
            pipeline=KontextPipeline.from_components(staged.components, runners=applied.runners),
            sampler=self.config.sampler,
            what=(report.features or ["eager, default SDPA"]) + session.lora_what(),
            begin_edit=applied.begin_edit,
            end_edit=end_edit,
            details=report.to_dict,
            load_s=session.loads[-1] if len(session.loads) > loads else None,
        )


@dataclass
class EngineContender(Contender):
    """An engines directory from ``fluxtrt build``, through ``fluxtrt.engines.load.load_engine_pipeline``.

    Args:
        path: the engines directory.
        sampler: the sampler of its edits (fluxtrt's default, stage 4's, unless given).
        first_block_cache: the cache's threshold where the directory was built with ``--first-block-cache`` (None:
            off); its counts are reported per edit as for a stage.
    """

    path: Path
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    first_block_cache: float | None = DEFAULT_FBC_THRESHOLD
    kind: str = field(default="engines", init=False)

    def __post_init__(self) -> None:
        self.name = f"engines:{self.path.name}"

    def prepare(self, session: ModelSession) -> Prepared:
        from fluxtrt.engines.load import EngineSource

        session.release()  # the engines get the GPU to themselves
        t0 = time.perf_counter()
        source = EngineSource(self.path, session.device, self.first_block_cache, require_fbc=False)
        pipeline = source.load(session.loras)  # the LoRAs merged into the transformer engine's weights
        load_s = time.perf_counter() - t0
        transformer = pipeline.runners["transformer"]
        cached = isinstance(transformer, SplitTransformerRunner) and transformer.threshold is not None
        recorder = RecordingRunner(transformer)
        pipeline.runners["transformer"] = recorder
        manifest = Manifest.load(self.path)  # loaded once already by the pipeline: it parses
        what = [f"{manifest.backend} {manifest.precision} engines ({self.path.name})"]
        if cached:
            what.append(f"first-block cache {transformer.threshold:g}")
        what += session.lora_what()

        def begin_edit() -> None:
            recorder.clear()
            if cached:
                transformer.reset()

        # Each edit starts a fresh recording, so after the runs it holds the last timed edit's transformer calls.
        return Prepared(
            pipeline=pipeline,
            sampler=self.sampler,
            what=what,
            begin_edit=begin_edit,
            end_edit=lambda edit=None: transformer.stats().to_dict() if cached else None,
            details=lambda: {
                "path": str(self.path),
                "first_block_cache": transformer.threshold if cached else None,
            },  # fmt: skip
            load_s=load_s,
            after=lambda session: engine_step_error(self.path, recorder.calls, session),
        )


@dataclass
class CustomContender(Contender):
    """Any runners over the loaded (unmodified) PyTorch model: ``make_runners(components) -> {name: Runner}``.

    Components missing from the returned mapping use the plain torch runners.

    Args:
        name: the row's name.
        make_runners: builds the runners from loaded ``FluxKontextComponents``.
        what: the report's "what is on".
        sampler: the sampler of its edits.
    """

    name: str
    make_runners: Callable[[Any], Mapping[str, Runner]]
    what: str = "custom runners"
    sampler: SamplerConfig = field(default_factory=lambda: STAGES["0"].sampler)
    kind: str = field(default="custom", init=False)

    def prepare(self, session: ModelSession) -> Prepared:
        from fluxtrt.pipeline.kontext import KontextPipeline

        loads = len(session.loads)
        staged = session.staged_for(STAGES["0"])
        runners = dict(staged.apply(STAGES["0"]).runners)  # plain runners, reversible switches reset
        if session.world is not None:
            from fluxtrt.parallel.context import attach_processors

            attach_processors(staged.components.transformer)
        runners.update(self.make_runners(staged.components))
        return Prepared(
            pipeline=KontextPipeline.from_components(staged.components, runners=runners),
            sampler=self.sampler,
            what=[self.what, *session.lora_what()],
            load_s=session.loads[-1] if len(session.loads) > loads else None,
        )


def contenders_from_config(stages: tuple[str, ...], engines: tuple[Path, ...],
                           engines_fbc: float | None = DEFAULT_FBC_THRESHOLD) -> list[Contender]:  # fmt: skip
    """The stage contenders in the given order, then one per engines directory (``engines_fbc``: the first-block
    cache's threshold for those built with ``--first-block-cache``)."""
    return [StageContender(s) for s in stages] + [EngineContender(p, first_block_cache=engines_fbc) for p in engines]
