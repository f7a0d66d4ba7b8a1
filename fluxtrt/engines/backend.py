"""The interface every engine backend implements, and the registry that imports backends lazily.

A backend turns one component (its torch module and/or its exported ONNX) into an engine file, and loads an engine
file back as a ``Runner``. The build orchestration (``fluxtrt.engines.build``) owns exports, hashing, atomic
renames and the manifest; a backend only writes the file it is asked to write.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fluxtrt.backends.runner import Runner
from fluxtrt.errors import InputError
from fluxtrt.specs.component import ComponentSpec

# name -> "module:Class", imported only when asked for, so `import fluxtrt` never pulls a backend's library.
BACKENDS = {
    "onnxruntime": "fluxtrt.backends.onnxruntime:OnnxRuntimeBackend",
    "aotinductor": "fluxtrt.backends.aotinductor:AotInductorBackend",
    "tensorrt": "fluxtrt.backends.tensorrt:TensorRTBackend",
}

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass
class BuildJob:
    """One component to compile.

    Attributes:
        spec: the component spec.
        module: the component as an ``nn.Module`` (spec signature), on ``device`` in the compute dtype.
        onnx_path: the exported, checked ONNX (for backends with ``uses_onnx``), else None.
        engine_path: where to write the engine: its final file name, in a staging directory. Files the backend
            writes beside it (external weights) are moved into the engines directory with it, engine last.
        precision: ``fp32``, ``bf16``, ``fp8`` or ``fp4``.
        profile: min/opt/max shape per input, from the spec and the resolution/batch range.
        device: ``cpu`` or ``cuda``.
        workdir: scratch space that the caller deletes afterwards.
        options: backend-specific settings (recorded in the manifest).
        amax: for an fp8/fp4 transformer on a backend that reads no ONNX: calibrated input amax per quantized
            linear, named relative to ``module``. None otherwise (ONNX backends get the Q/DQ in the ONNX).
    """

    spec: ComponentSpec
    module: Any
    onnx_path: Path | None
    engine_path: Path
    precision: str
    profile: Profile
    device: str
    workdir: Path
    options: dict = field(default_factory=dict)
    amax: dict[str, float] | None = None


@dataclass
class LoadJob:
    """One engine to load as a runner.

    Attributes:
        spec: the component spec.
        engine_path: the engine file.
        device: where inputs and outputs live.
        compute_dtype: torch dtype of the spec's ``compute`` tensors.
        entry: the component's manifest entry (profile, options, sizes).
    """

    spec: ComponentSpec
    engine_path: Path
    device: str
    compute_dtype: Any
    entry: dict


class EngineBackend(ABC):
    """A way to compile and run components ahead of time."""

    name: ClassVar[str]
    extension: ClassVar[str]  # engine file suffix, e.g. ".onnx", ".plan", ".pt2"
    uses_onnx: ClassVar[bool]  # whether build() reads the exported ONNX
    precisions: ClassVar[tuple[str, ...]]

    @abstractmethod
    def check_available(self) -> None:
        """Raise MissingDependencyError (naming the install command) if the backend's library is absent."""

    def check_buildable(self) -> None:
        """Raise if engines cannot be built here (by default: what ``check_available`` raises)."""
        self.check_available()

    @abstractmethod
    def version(self) -> str:
        """The backend library's version, recorded in the manifest and checked at load."""

    @abstractmethod
    def build(self, job: BuildJob) -> None:
        """Write the engine for ``job`` to ``job.engine_path``."""

    @abstractmethod
    def load(self, job: LoadJob) -> Runner:
        """A runner over the engine file; raises EngineError if the file is unusable."""


def get_backend(name: str) -> EngineBackend:
    """The backend called ``name``, its module imported now.

    Raises:
        InputError: unknown name.
    """
    if name not in BACKENDS:
        raise InputError(f"--backend is '{name}', expected one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise  # the backend exists; something it imports is missing, and it says so itself
        ready = [b for b in BACKENDS if importlib.util.find_spec(BACKENDS[b].split(":")[0]) is not None]
        raise InputError(
            f"--backend {name} is not part of this fluxtrt build; available here: {', '.join(ready)}"
        ) from None
