"""Benchmark matrices: a TOML file naming the contenders, inputs and repetitions of a comparison (no shell variants).

    [compare]
    model = "random-full"
    device = "cuda"
    resolution = "1024x1024"
    runs = 3
    stages = ["0", "1:fbc=off", "1", ...]
    engines = ["engines/*"]          # globs; directories holding a manifest.json
    loras = ["style.safetensors:0.8"]  # optional: every contender edits with them (--lora)

Every key of ``CompareConfig`` may appear (``report_dir`` is given on the command line); relative paths are relative
to the matrix file's directory's parent when they do not exist relative to the working directory.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from fluxtrt.bench.config import CompareConfig
from fluxtrt.errors import InputError, MissingDependencyError
from fluxtrt.specs.flux import Resolution

_KEYS = (
    "model", "stages", "engines", "image", "prompt", "resolution", "runs", "warmup", "warmup_steps", "device",
    "dtype", "seed", "guidance", "diffusers_check", "loras",
)  # fmt: skip


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            feature = "reading a benchmark matrix on Python 3.10"
            raise MissingDependencyError("tomli", feature, "pip install tomli") from None
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"--matrix '{path}' does not exist: pass a TOML file such as benchmarks/matrix.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--matrix '{path}' is not valid TOML ({exc}): fix the file") from None


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else root / p


def load_matrix(path: Path, report_dir: Path | None = None, overrides: dict[str, Any] | None = None) -> CompareConfig:
    """The ``CompareConfig`` a matrix file describes.

    Args:
        path: the TOML file (its ``[compare]`` table).
        report_dir: where the report goes.
        overrides: values replacing the file's (e.g. ``{"runs": 1}`` for a quick run).

    Raises:
        InputError: unreadable file, unknown key or invalid value.
    """
    data = _read_toml(path).get("compare")
    if not isinstance(data, dict):
        raise InputError(f"--matrix '{path}' has no [compare] table: see benchmarks/matrix.toml for the layout")
    data = {**data, **(overrides or {})}
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise InputError(f"--matrix '{path}': unknown keys {', '.join(unknown)}, expected some of {', '.join(_KEYS)}")
    if "model" not in data:
        raise InputError(f"--matrix '{path}': no model = ... in [compare]; give tiny, random-full or a checkpoint")
    root = path.resolve().parent.parent
    engines: list[Path] = []
    for pattern in data.pop("engines", []):
        for hit in sorted(glob.glob(str(_resolve(pattern, root)))):
            if (Path(hit) / "manifest.json").is_file():
                engines.append(Path(hit))
    if data.get("image"):
        data["image"] = _resolve(data["image"], root)
    if data.get("resolution"):
        data["resolution"] = Resolution.parse(str(data["resolution"]), "resolution")
    for key in ("stages", "loras"):
        if key in data:
            data[key] = tuple(str(s) for s in data[key])
    return CompareConfig(**data, engines=tuple(engines), report_dir=report_dir)
