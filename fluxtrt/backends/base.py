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
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from fluxtrt.backends.record import BackendRecord
from fluxtrt.backends.runner import Runner
from fluxtrt.errors import InputError
from fluxtrt.specs.component import ComponentSpec

if TYPE_CHECKING:
    import torch

# name -> "module:Class", imported only when asked for, so `import fluxtrt` never pulls a backend's library.
BACKENDS = {
    "onnxruntime": "fluxtrt.backends.onnxruntime:OnnxRuntimeBackend",
    "aotinductor": "fluxtrt.backends.aotinductor:AotInductorBackend",
    "tensorrt": "fluxtrt.backends.tensorrt:TensorRTBackend",
    "tensorrt-rtx": "fluxtrt.backends.tensorrt:TensorRTRtxBackend",
    "onnx": "fluxtrt.backends.onnx:OnnxOnlyBackend",
}

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

# A backend option's value, as the command line, the code and the manifest give it.
OptionValue = str | int | float | bool | Path | tuple[str, ...] | dict[str, object] | None
OptionsT = TypeVar("OptionsT", bound="BackendOptions")


@dataclass(frozen=True)
class OptionFlag:
    """How ``fluxtrt build`` sets one backend option: its click declarations (``--aoti-weights``; aliases
    ``--cuda-graph``, ``--aoti-cuda-graph``; an on/off pair ``--aoti-fp8-attention/--aoti-no-fp8-attention``), its
    help, and what a value must be (``choices``; ``check`` raises InputError for a bad one)."""

    decls: tuple[str, ...]
    help: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None

    @property
    def name(self) -> str:
        """The flag messages name, e.g. ``--aoti-weights``."""
        return self.decls[0].split("/")[0]

    def validate(self, value: Any) -> None:
        """Raise InputError naming the flag unless ``value`` (not None) is one this option takes."""
        if self.choices and value not in self.choices:
            raise InputError(f"{self.name} is '{value}', expected one of {', '.join(map(str, self.choices))}")
        if self.check is not None:
            self.check(value)


def option(default: OptionValue, *decls: str, help: str, choices: tuple[str, ...] = (),
           check: Callable[[Any], None] | None = None) -> Any:  # fmt: skip
    """A field of a ``BackendOptions`` class that ``fluxtrt build`` sets with the flag ``decls``: the one place the
    option is declared (type: the field's annotation; default; flag; help; validation)."""
    return field(default=default, metadata={"flag": OptionFlag(decls, help, choices, check)})


def cuda_graph_option() -> Any:
    """``--cuda-graph``, one flag for every backend whose runner can replay CUDA graphs."""
    return option(
        False,
        "--cuda-graph",
        "--aoti-cuda-graph",
        help="aotinductor, tensorrt on cuda: replay the transformer step as a CUDA graph per shape.",
    )


@dataclass(frozen=True)
class DeclaredOption:
    """One option as a backend declares it: field name, type (``None`` left out of an optional one), flag (None: set
    from code only) and default."""

    name: str
    type: Any
    flag: OptionFlag | None
    default: Any


def _value_type(annotation: Any) -> Any:
    """``float | None`` -> float; anything else as it is."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (types.UnionType, typing.Union) and len(args) == 1:
        return args[0]
    return annotation


def _coerce(kind: Any, value: Any) -> Any:
    """``value`` as given in code or read from JSON, as ``kind``: a list becomes a tuple, a string a Path."""
    if value is None:
        return None
    if kind is Path:
        return Path(value)
    if typing.get_origin(kind) is tuple:
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass(frozen=True)
class BackendOptions:
    """A backend's settings, each field declared once with ``option`` (flag, help, validation). Subclasses are
    frozen dataclasses whose fields have defaults; a name that is not a field is an error, never ignored."""

    @classmethod
    def declared(cls) -> list[DeclaredOption]:
        """Every option of this backend, in declaration order."""
        hints = typing.get_type_hints(cls)
        return [
            DeclaredOption(
                f.name,
                _value_type(hints[f.name]),
                f.metadata.get("flag"),
                f.default if f.default is not MISSING else f.default_factory(),
            )  # fmt: skip
            for f in fields(cls)
        ]

    @classmethod
    def flag_name(cls, name: str) -> str:
        """How messages name option ``name``: its flag, or the field name for an option set from code only."""
        flag = next((o.flag for o in cls.declared() if o.name == name), None)
        return flag.name if flag else name

    def __post_init__(self) -> None:
        for declared in self.declared():
            value = _coerce(declared.type, getattr(self, declared.name))
            object.__setattr__(self, declared.name, value)
            flag = declared.flag
            if flag is not None and value is not None:
                flag.validate(value)

    @classmethod
    def from_dict(cls: type[OptionsT], given: Mapping[str, Any], backend: str) -> OptionsT:
        """The options with ``given`` (name -> value, as code or a manifest's JSON gives them) set and the rest at
        their defaults.

        Raises:
            InputError: a name that is not an option of this backend, or a value its declaration refuses.
        """
        names = [o.name for o in cls.declared()]
        unknown = sorted(set(given) - set(names))
        if unknown:
            takes = ", ".join(cls.flag_name(n) for n in names) or "no options"
            raise InputError(
                f"{_flag_of_any_backend(unknown[0])} is not an option of the {backend} backend (it takes {takes}): "
                "leave it out, or pick the backend it belongs to"
            )
        return cls(**given)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (paths as strings), as the manifest's settings hold it."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class NoOptions(BackendOptions):
    """A backend without settings."""


def options_type(backend: str) -> type[BackendOptions]:
    """The options class of the registered backend ``backend`` (its module imported now)."""
    module, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls).options_type


def record_type(backend: str) -> type[BackendRecord]:
    """The record class of the registered backend ``backend`` (its module imported now); ``BackendRecord`` (every
    key kept as it is) for a name this fluxtrt does not know."""
    if backend not in BACKENDS:
        return BackendRecord
    module, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls).record_type


def declared_options() -> dict[str, DeclaredOption]:
    """The options of every registered backend, by name; an option several backends take (``cuda_graph``) once.

    Raises:
        TypeError: two backends declare one name with another type, flag or help (a programming error).
    """
    out: dict[str, DeclaredOption] = {}
    for backend in BACKENDS:
        for declared in options_type(backend).declared():
            seen = out.setdefault(declared.name, declared)
            if (seen.type, seen.flag) != (declared.type, declared.flag):
                raise TypeError(f"backend option {declared.name} is declared differently by {backend}")
    return out


def _flag_of_any_backend(name: str) -> str:
    """The flag of option ``name`` of whichever backend declares it (the name itself if none does)."""
    found = declared_options().get(name)
    return found.flag.name if found and found.flag else name


@dataclass
class BuildJob(Generic[OptionsT]):
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
        say: tells the user what the build is doing, one short message per step of a long build (raises
            KeyboardInterrupt where a Ctrl-C arrived during the step before).
    """

    spec: ComponentSpec
    module: torch.nn.Module
    onnx_path: Path | None
    engine_path: Path
    precision: str
    profile: Profile
    device: str
    workdir: Path
    options: OptionsT
    amax: dict[str, float] | None = None
    say: Callable[[str], None] = field(default=lambda message: None, compare=False, repr=False)


@dataclass
class LoadJob(Generic[OptionsT]):
    """One engine to load as a runner.

    Attributes:
        spec: the component spec.
        engine_path: the engine file.
        device: where inputs and outputs live.
        compute_dtype: torch dtype of the spec's ``compute`` tensors.
        profile: per input, the [min, opt, max] shapes the engine was built for.
        options: the backend's typed options the engine was built with.
        record: what the backend recorded when it built the engine (its ``record_type``).
    """

    spec: ComponentSpec
    engine_path: Path
    device: str
    compute_dtype: torch.dtype
    profile: Mapping[str, Sequence[Sequence[int]]]
    options: OptionsT
    record: BackendRecord


class EngineBackend(ABC, Generic[OptionsT]):
    """A way to compile and run components ahead of time."""

    name: ClassVar[str]
    extension: ClassVar[str]  # engine file suffix, e.g. ".onnx", ".plan", ".pt2"; "" for no engine file
    uses_onnx: ClassVar[bool]  # whether build() reads the exported ONNX
    writes_engine: ClassVar[bool] = True  # False: the component's ONNX is what the directory holds
    # Whether building even a small component keeps a core busy long enough (a compiler) that `--jobs auto` builds
    # small components side by side in worker processes on a host with several cores (fluxtrt.engines.fit).
    compiles_small_components: ClassVar[bool] = False
    # The device its engines run on, whatever device built them (TensorRT plans: cuda); None: the build's device.
    runs_on: ClassVar[str | None] = None
    precisions: ClassVar[tuple[str, ...]]
    options_type: ClassVar[type[BackendOptions]] = NoOptions
    record_type: ClassVar[type[BackendRecord]] = BackendRecord  # what build() returns and load() is given

    def options(self, given: Mapping[str, Any]) -> OptionsT:
        """This backend's typed options from the settings given (InputError for one it does not have)."""
        return typing.cast(OptionsT, self.options_type.from_dict(given, self.name))

    def check_build(self, precision: str, options: OptionsT) -> None:  # noqa: B027 (optional hook)
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
    def build(self, job: BuildJob[OptionsT]) -> BackendRecord:
        """Write the engine for ``job`` to ``job.engine_path``; return the record of what was built."""

    @abstractmethod
    def load(self, job: LoadJob[OptionsT]) -> Runner:
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
