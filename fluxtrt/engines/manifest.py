"""``manifest.json``: what an engines directory holds and what it was built for.

Layout (DESIGN 6)::

    <dir>/manifest.json
    <dir>/onnx/<component>/model.onnx (+ model.onnx_data when the weights pass 2 GB)
    <dir>/<component><backend extension>
    <dir>/tokenizer/, <dir>/tokenizer_2/     so an edit needs no checkpoint
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fluxtrt.backends.base import record_type
from fluxtrt.backends.record import BackendRecord
from fluxtrt.environment import DeviceEnvironment
from fluxtrt.errors import EngineError, InputError
from fluxtrt.io import atomic_write
from fluxtrt.specs.flux import FluxDims, Resolution

MANIFEST = "manifest.json"
FORMAT = 3
# Format 1 kept the backend's record in a field "options" and had no "vae" in its model; format 2 wrote the GPU's SM
# as a string. Both are read as format 3.
READABLE_FORMATS = (1, 2, 3)
# Files up to this size are hashed on every load (milliseconds to a second); larger ones are checked by size only,
# since hashing a 24 GB transformer engine would add about 15 s to every start.
HASH_ON_LOAD_LIMIT = 2**31


def rebuild_hint(root: Path, force: bool = True) -> str:
    """The command that rebuilds ``root``, with the model, backend, precision and resolutions its manifest records
    (``MODEL`` where the manifest cannot be read); other options are named as what to repeat."""
    command = f"fluxtrt build --model {_recorded_build(root) or 'MODEL'} --out {root}"
    return f"rebuild it: `{command}{' --force' if force else ''}`, adding any other options the first build had"


def _recorded_build(root: Path) -> str | None:
    """``MODEL --backend B --precision P --min-resolution ...`` as ``root/manifest.json`` records them, or None where
    it cannot be read or records no model."""
    import shlex

    try:
        raw = json.loads((root / MANIFEST).read_text())
        words = [shlex.quote(str(raw["model"]["source"]))]
        words += [f"--{key} {raw[key]}" for key in ("backend", "precision") if isinstance(raw.get(key), str)]
        resolutions = raw.get("resolutions") or {}
        words += [f"--{k}-resolution {resolutions[k]}" for k in ("min", "opt", "max") if k in resolutions]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return " ".join(words)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def settings_hash(settings: dict) -> str:
    """A stable hash of a JSON-able settings dict: equal settings, equal hash."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelInfo:
    """The model the engines were built from.

    Attributes:
        source: the checkpoint as given to ``--model`` (a path, a hub id, or ``tiny``...).
        fingerprint: what identifies its weights (``model_fingerprint``); settings record it.
        dims: the sizes the checkpoint fixes.
        vae_scaling, vae_shift: the VAE's latent scaling and shift.
        scheduler_config: the scheduler's configuration, as diffusers saves it.
        max_sequence_length: T5 tokens per prompt.
        vae: the ``--vae`` the build replaced the checkpoint's VAE with (None: its own).
    """

    source: str
    fingerprint: str
    dims: FluxDims
    vae_scaling: float
    vae_shift: float
    scheduler_config: dict[str, Any]
    max_sequence_length: int
    vae: str | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelInfo:
        """As ``to_json`` writes it (format 1 had no ``vae``: None)."""
        return cls(
            source=raw["source"],
            fingerprint=raw["fingerprint"],
            dims=FluxDims(**raw["dims"]),
            vae_scaling=raw["vae_scaling"],
            vae_shift=raw["vae_shift"],
            scheduler_config=dict(raw["scheduler_config"]),
            max_sequence_length=raw["max_sequence_length"],
            vae=raw.get("vae"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "vae": self.vae,
            "dims": asdict(self.dims),
            "vae_scaling": self.vae_scaling,
            "vae_shift": self.vae_shift,
            "scheduler_config": self.scheduler_config,
            "max_sequence_length": self.max_sequence_length,
        }


@dataclass(frozen=True)
class ResolutionRange:
    """The smallest, the optimised-for and the largest image size the engines take."""

    min: Resolution
    opt: Resolution
    max: Resolution

    @classmethod
    def from_json(cls, raw: Mapping[str, str]) -> ResolutionRange:
        """From ``{"min": "WxH", "opt": "WxH", "max": "WxH"}``."""
        return cls(*(Resolution.parse(raw[k], f"the manifest's {k} resolution") for k in ("min", "opt", "max")))

    def to_json(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    def __str__(self) -> str:
        return f"min {self.min}, opt {self.opt}, max {self.max}"


@dataclass(frozen=True)
class BatchRange:
    """The smallest, the optimised-for and the largest batch the engines take."""

    min: int
    opt: int
    max: int

    @classmethod
    def from_json(cls, raw: Mapping[str, int]) -> BatchRange:
        return cls(int(raw["min"]), int(raw["opt"]), int(raw["max"]))

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.min}..{self.max}"


@dataclass
class FileRecord:
    """One file of the directory: its path relative to the directory and what identifies its content (each None
    where not recorded): size in bytes, sha256, modification time (seconds since the epoch)."""

    path: str
    bytes: int | None = None
    sha256: str | None = None
    mtime: float | None = field(default=None, compare=False)  # not what makes two records equal

    @classmethod
    def of(cls, root: Path, path: Path) -> FileRecord:
        stat = path.stat()
        return cls(str(path.relative_to(root)), stat.st_size, sha256_file(path), stat.st_mtime)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> FileRecord:
        return cls(raw["path"], raw.get("bytes"), raw.get("sha256"), raw.get("mtime"))

    def to_json(self) -> dict[str, Any]:
        """The path and each recorded property."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def size(self) -> int:
        """The recorded size (0 where none is recorded)."""
        return self.bytes or 0

    def check(self, root: Path, component: str) -> Path:
        """The absolute path, after checking the file is there with its recorded size and, up to
        ``HASH_ON_LOAD_LIMIT`` bytes, its recorded sha256 (each where recorded).

        Raises:
            EngineError: missing, of another size, or of another hash.
        """
        path = root / self.path
        if not path.is_file():
            raise EngineError(f"{component}: {path} is missing: {rebuild_hint(root, force=False)}")
        size = path.stat().st_size
        if self.bytes is not None and size != self.bytes:
            raise EngineError(
                f"{component}: {path} has {size} bytes but the manifest records {self.bytes}: the file is truncated "
                f"or was replaced; {rebuild_hint(root)}"
            )
        if self.sha256 is not None and size <= HASH_ON_LOAD_LIMIT and sha256_file(path) != self.sha256:
            raise EngineError(
                f"{component}: {path} does not have the sha256 the manifest records: the file is corrupt or was "
                f"replaced; {rebuild_hint(root)}"
            )
        return path


@dataclass
class ComponentEntry:
    """A built component.

    Attributes:
        settings: everything the component's build depends on; ``settings_hash`` of it decides skipping.
        onnx: the exported ONNX files (model, external data), empty for backends that need no ONNX.
        engine: the engine file.
        engine_extra: files the engine needs beside it (external weights).
        profile: per input, [min, opt, max] shapes.
        build_s: export + compile seconds.
        record: what the backend recorded when it built the engine (versions, GPU, kernels chosen, counts).
    """

    settings: dict[str, Any]
    onnx: list[FileRecord]
    engine: FileRecord
    profile: dict[str, list[list[int]]]
    build_s: float
    record: BackendRecord = field(default_factory=BackendRecord)
    engine_extra: list[FileRecord] = field(default_factory=list)

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], record: type[BackendRecord] = BackendRecord) -> ComponentEntry:
        """As ``to_json`` writes it, the backend's record read as ``record`` (format 1 kept it in ``options``)."""
        return cls(
            settings=dict(raw["settings"]),
            onnx=[FileRecord.from_json(f) for f in raw["onnx"]],
            engine=FileRecord.from_json(raw["engine"]),
            profile=raw["profile"],
            build_s=raw["build_s"],
            record=record.from_json(raw.get("record", raw.get("options", {}))),
            engine_extra=[FileRecord.from_json(f) for f in raw.get("engine_extra", [])],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "onnx": [f.to_json() for f in self.onnx],
            "engine": self.engine.to_json(),
            "profile": self.profile,
            "build_s": self.build_s,
            "record": self.record.to_json(),
            "engine_extra": [f.to_json() for f in self.engine_extra],
        }


@dataclass
class Manifest:
    """The whole ``manifest.json``."""

    backend: str
    backend_version: str
    precision: str
    fluxtrt_version: str
    model: ModelInfo
    build_env: DeviceEnvironment
    resolutions: ResolutionRange
    batch: BatchRange
    components: dict[str, ComponentEntry] = field(default_factory=dict)
    calibration: str | None = None
    format: int = FORMAT

    @property
    def dims(self) -> FluxDims:
        return self.model.dims

    def resolution(self, which: str) -> Resolution:
        """The ``min``, ``opt`` or ``max`` resolution."""
        return getattr(self.resolutions, which)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Manifest:
        """A manifest of any readable format, as this format (the caller checks ``raw["format"]``).

        Raises:
            KeyError, TypeError, ValueError, AttributeError, InputError: a field missing or of the wrong kind.
        """
        record = record_type(raw["backend"])
        return cls(
            backend=raw["backend"],
            backend_version=raw["backend_version"],
            precision=raw["precision"],
            fluxtrt_version=raw["fluxtrt_version"],
            model=ModelInfo.from_json(raw["model"]),
            build_env=DeviceEnvironment.from_json(raw["build_env"]),
            resolutions=ResolutionRange.from_json(raw["resolutions"]),
            batch=BatchRange.from_json(raw["batch"]),
            components={name: ComponentEntry.from_json(e, record) for name, e in raw["components"].items()},
            calibration=raw.get("calibration"),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "backend": self.backend,
                "backend_version": self.backend_version,
                "precision": self.precision,
                "fluxtrt_version": self.fluxtrt_version,
                "model": self.model.to_json(),
                "build_env": self.build_env.to_json(),
                "resolutions": self.resolutions.to_json(),
                "batch": self.batch.to_json(),
                "components": {name: e.to_json() for name, e in self.components.items()},
                "calibration": self.calibration,
                "format": self.format,
            },
            indent=2,
        )

    def save(self, root: Path) -> None:
        """Write ``root/manifest.json`` atomically."""
        text = self.to_json()
        atomic_write(root / MANIFEST, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, root: Path, label: str = "--engines") -> Manifest:
        """Read and check ``root/manifest.json`` (any of ``READABLE_FORMATS``, read as ``FORMAT``).

        Args:
            root: the engines directory.
            label: what the user called it, for the messages (``--engines``, or ``fluxtrt inspect``'s argument).

        Raises:
            EngineError: no directory, no manifest, unparsable JSON or an unknown format.
        """
        path = root / MANIFEST
        fix = f"build it with `fluxtrt build --model MODEL --out {root}`"
        if not root.is_dir():
            raise EngineError(f"{label} '{root}' is not a directory: {fix}")
        if not path.is_file():
            raise EngineError(f"{label} '{root}' has no {MANIFEST}, so it is not a finished engines directory: {fix}")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") not in READABLE_FORMATS:
                raise EngineError(
                    f"{path} has format {raw.get('format')!r}, this fluxtrt reads formats "
                    f"{', '.join(map(str, READABLE_FORMATS))}: {rebuild_hint(root)}"
                )
            return cls.from_json(raw)
        except EngineError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError,
                InputError) as exc:  # fmt: skip
            raise EngineError(
                f"{path} is not a valid fluxtrt manifest ({type(exc).__name__}: {exc}): {rebuild_hint(root)}"
            ) from None
