"""What an engine backend is: typed options, the build and load jobs it takes, and the registry that imports a
backend only when it is asked for.

A backend turns one component (its torch module and/or its exported ONNX) into an engine file and returns a record
of what it built; it loads an engine file back as a loaded ``Runner``. The build orchestration
(``fluxtrt.engines.build``) owns exports, hashing, atomic renames and the manifest, which keeps the settings a
component was built with apart from the backend's record; a backend only writes the files it is asked to write.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
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
    "tensorrt-rtx": "fluxtrt.backends.tensorrt:TensorRTRtxBackend",
    "onnx": "fluxtrt.backends.onnx:OnnxOnlyBackend",
}

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
# What a backend recorded about one engine (versions, GPU, kernels chosen, counts): JSON-able, kept in the manifest.
Record = dict[str, Any]

# Option name -> the command-line flag that sets it, for messages.
OPTION_FLAGS = {
    "workspace_gib": "--workspace-gib",
    "opt_level": "--opt-level",
    "timing_cache": "--timing-cache",
    "weights": "--aoti-weights",
    "cuda_graph": "--cuda-graph",
    "fp8_attention": "--aoti-fp8-attention",
    "inductor_configs": "inductor_configs",
    "compute_capabilities": "--compute-capability",
}


@dataclass(frozen=True)
class BackendOptions:
    """A backend's settings. Subclasses are frozen dataclasses whose fields have defaults; a name that is not a
    field is an error, never ignored."""

    @classmethod
    def from_dict(cls, given: Mapping[str, Any], backend: str) -> BackendOptions:
        """The options with ``given`` (name -> value) set and the rest at their defaults.

        Raises:
            InputError: a name that is not an option of this backend.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            takes = ", ".join(OPTION_FLAGS.get(n, n) for n in names) or "no options"
            raise InputError(
                f"{OPTION_FLAGS.get(unknown[0], unknown[0])} is not an option of the {backend} backend (it takes "
                f"{takes}): leave it out, or pick the backend it belongs to"
            )
        return cls(**given)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class NoOptions(BackendOptions):
    """A backend without settings."""


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
        options: the backend's typed options.
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
    options: Any
    amax: dict[str, float] | None = None


@dataclass
class LoadJob:
    """One engine to load as a runner.

    Attributes:
        spec: the component spec.
        engine_path: the engine file.
        device: where inputs and outputs live.
        compute_dtype: torch dtype of the spec's ``compute`` tensors.
        profile: per input, the [min, opt, max] shapes the engine was built for.
        options: the backend's typed options the engine was built with.
        record: what the backend recorded when it built the engine.
    """

    spec: ComponentSpec
    engine_path: Path
    device: str
    compute_dtype: Any
    profile: Mapping[str, Any]
    options: Any
    record: Record


class EngineBackend(ABC):
    """A way to compile and run components ahead of time."""

    name: ClassVar[str]
    extension: ClassVar[str]  # engine file suffix, e.g. ".onnx", ".plan", ".pt2"; "" for no engine file
    uses_onnx: ClassVar[bool]  # whether build() reads the exported ONNX
    writes_engine: ClassVar[bool] = True  # False: the component's ONNX is what the directory holds
    precisions: ClassVar[tuple[str, ...]]
    options_type: ClassVar[type[BackendOptions]] = NoOptions

    def options(self, given: Mapping[str, Any]) -> BackendOptions:
        """This backend's typed options from the settings given (InputError for one it does not have)."""
        return self.options_type.from_dict(given, self.name)

    def check_build(self, precision: str, options: BackendOptions) -> None:  # noqa: B027 (optional hook)
        """Raise before anything is loaded when a build of ``precision`` with ``options`` cannot succeed here (by
        default, nothing to check)."""

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
    def build(self, job: BuildJob) -> Record:
        """Write the engine for ``job`` to ``job.engine_path``; return the record of what was built."""

    @abstractmethod
    def load(self, job: LoadJob) -> Runner:
        """A loaded runner over the engine file; raises EngineError if the file is unusable."""


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
