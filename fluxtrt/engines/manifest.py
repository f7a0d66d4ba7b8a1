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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fluxtrt.errors import EngineError
from fluxtrt.io import atomic_write
from fluxtrt.specs.flux import FluxDims, Resolution

MANIFEST = "manifest.json"
FORMAT = 2
# Format 1 kept settings and the backend's record in one field, "options"; it is read as format 2.
READABLE_FORMATS = (1, 2)
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


@dataclass
class FileRecord:
    """One file of the directory: its path relative to the directory, size and sha256, and its modification time
    when it was recorded (None in manifests from before it was; not part of what makes two records equal)."""

    path: str
    bytes: int
    sha256: str
    mtime: float | None = field(default=None, compare=False)

    @classmethod
    def of(cls, root: Path, path: Path) -> FileRecord:
        stat = path.stat()
        return cls(str(path.relative_to(root)), stat.st_size, sha256_file(path), stat.st_mtime)

    def check(self, root: Path, component: str) -> Path:
        """The absolute path, after checking the file is there with its recorded size and, up to
        ``HASH_ON_LOAD_LIMIT`` bytes, its recorded sha256.

        Raises:
            EngineError: missing, of another size, or of another hash.
        """
        path = root / self.path
        if not path.is_file():
            raise EngineError(f"{component}: {path} is missing: {rebuild_hint(root, force=False)}")
        size = path.stat().st_size
        if size != self.bytes:
            raise EngineError(
                f"{component}: {path} has {size} bytes but the manifest records {self.bytes}: the file is truncated "
                f"or was replaced; {rebuild_hint(root)}"
            )
        if size <= HASH_ON_LOAD_LIMIT and sha256_file(path) != self.sha256:
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

    settings: dict
    onnx: list[FileRecord]
    engine: FileRecord
    profile: dict[str, list[list[int]]]
    build_s: float
    record: dict = field(default_factory=dict)
    engine_extra: list[FileRecord] = field(default_factory=list)

    @property
    def settings_hash(self) -> str:
        return settings_hash(self.settings)


@dataclass
class Manifest:
    """The whole ``manifest.json``."""

    backend: str
    backend_version: str
    precision: str
    fluxtrt_version: str
    model: dict  # source, fingerprint, dims, vae scaling/shift, scheduler config, max_sequence_length
    build_env: dict  # torch, device, GPU name and SM (or cpu)
    resolutions: dict  # {"min": "WxH", "opt": "WxH", "max": "WxH"}
    batch: dict  # {"min": 1, "opt": 1, "max": B}
    components: dict[str, ComponentEntry] = field(default_factory=dict)
    calibration: str | None = None
    format: int = FORMAT

    @property
    def dims(self) -> FluxDims:
        return FluxDims(**self.model["dims"])

    def resolution(self, which: str) -> Resolution:
        return Resolution.parse(self.resolutions[which])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, root: Path) -> None:
        """Write ``root/manifest.json`` atomically."""
        text = self.to_json()
        atomic_write(root / MANIFEST, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, root: Path, label: str = "--engines") -> Manifest:
        """Read and check ``root/manifest.json``.

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
            raw["format"] = FORMAT
            components = {
                name: ComponentEntry(
                    settings=e["settings"],
                    onnx=[FileRecord(**f) for f in e["onnx"]],
                    engine=FileRecord(**e["engine"]),
                    profile=e["profile"],
                    build_s=e["build_s"],
                    record=e.get("record", e.get("options", {})),
                    engine_extra=[FileRecord(**f) for f in e.get("engine_extra", [])],
                )
                for name, e in raw.pop("components").items()
            }
            return cls(**raw, components=components)
        except EngineError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise EngineError(
                f"{path} is not a valid fluxtrt manifest ({type(exc).__name__}: {exc}): {rebuild_hint(root)}"
            ) from None
