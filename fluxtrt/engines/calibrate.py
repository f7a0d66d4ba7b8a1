"""Calibration: per-linear input amax of the transformer over calibration edits and all their denoising steps, and
each attention's V amax (for a static FP8 V in engines with FP8 attention).

The result is a safetensors file (one fp32 scalar ``amax`` per quantized linear, keyed by its name in the
transformer, and one per attention, keyed by its name and ``ATTENTION_V``) and a JSON sidecar ``<file>.json`` saying
what it was computed from. A calibration belongs to one model (its fingerprint) and one precision; loading it for
anything else is refused.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fluxtrt import __version__
from fluxtrt.errors import BuildError, InputError
from fluxtrt.pipeline.sizes import SizeRange
from fluxtrt.specs.flux import Resolution

# Linears left in the compute dtype (fnmatch patterns over names in the transformer): embedders, the final norm's
# modulation and projection, and the AdaLN modulation linears of every block (one token per image: no gain).
KEEP_OUT = (
    "x_embedder",
    "context_embedder",
    "time_text_embed.*",
    "norm_out.*",
    "proj_out",
    "*.norm1.linear",
    "*.norm1_context.linear",
    "*.norm.linear",
)
# Shipped calibration edits: varied instructions (colour, style, object, text, background, lighting).
PROMPTS = (
    "make the sky a deep orange sunset",
    "turn the photo into a watercolor painting",
    "add a red umbrella in the foreground",
    "replace the background with a snowy mountain range",
    "change the car's color to matte black",
    "make it look like a pencil sketch",
    "add the text 'OPEN' on the sign in bold letters",
    "remove the person on the left",
    "make the scene look like it is night with neon lights",
    "turn the cat into a small bronze statue",
    "give the image a 1970s film look with grain",
    "add gentle rain and reflections on the street",
    "make the walls brick instead of plaster",
    "convert to a flat vector illustration",
    "put a wooden table under the vase",
    "make the lighting soft and golden like late afternoon",
)
CALIBRATION_SUFFIX = ".safetensors"
# A transformer under this many parameters is a test model (the tiny one has 82 thousand, FLUX.1 12 billion): its
# activations say nothing about a trained model's, so it is calibrated for what it needs, an amax for every linear,
# with every edit in one batch at SMALL_MODEL_SIDE px a side (seconds on a CPU where the full recipe, one ~1 MP edit
# after another, takes minutes).
SMALL_MODEL_PARAMETERS = 10**8
SMALL_MODEL_SIDE = 128


@dataclass(frozen=True)
class Recipe:
    """What a build calibrates with: ``edits`` edits of ``steps`` steps (None: the default sampler's) from
    ``width`` x ``height`` images; ``batched``: every edit in one pipeline call at exactly that size, where
    otherwise each edit is its own call at the image's preferred Kontext size."""

    edits: int
    steps: int | None
    width: int
    height: int
    batched: bool = False


def recipe_for(config: Any) -> Recipe:
    """The calibration of a build: ``config.calibration_edits`` edits at its opt resolution, one after another; for a
    test-sized model (under ``SMALL_MODEL_PARAMETERS`` transformer parameters, counted without loading it), those
    edits in one batch at ``SMALL_MODEL_SIDE`` px."""
    from fluxtrt.models.loading import part_parameters

    res = config.opt_resolution
    if part_parameters(config.model, "transformer") < SMALL_MODEL_PARAMETERS:
        return Recipe(config.calibration_edits, None, SMALL_MODEL_SIDE, SMALL_MODEL_SIDE, batched=True)
    return Recipe(config.calibration_edits, None, res.width, res.height)


def quantized_linears(transformer: Any, keep_out: tuple[str, ...] = KEEP_OUT) -> list[str]:
    """Names of the transformer's ``nn.Linear`` modules that are quantized: every one not matching ``keep_out``."""
    import torch

    return [
        name
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in keep_out)
    ]


@contextlib.contextmanager
def recorded_input_amax(transformer: Any, keep_out: tuple[str, ...] = KEEP_OUT) -> Iterator[dict[str, float]]:
    """For the duration, the largest absolute input each quantized linear (``quantized_linears``) sees, by name,
    over every call; the hooks are removed on exit.

    Yields:
        The amax dict, filled in as the transformer runs (0.0 for a linear not called yet).
    """
    names = quantized_linears(transformer, keep_out)
    amax = dict.fromkeys(names, 0.0)

    def hook(name):
        def record(module, args):
            amax[name] = max(amax[name], float(args[0].detach().abs().max()))

        return record

    handles = [transformer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield amax
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def recorded_attention_v_amax(transformer: Any) -> Iterator[dict[str, float]]:
    """For the duration, the largest absolute V each FLUX attention computes (both streams of a double block: their
    tokens share the tensor FP8 attention quantizes), by attention name; the hooks are removed on exit. Projections
    may be separate (``to_v``, ``add_v_proj``) or fused (V is the last third)."""
    from diffusers.models.attention import AttentionModuleMixin

    amax: dict[str, float] = {}
    handles = []

    def hook(key, fused):
        def record(module, args, output):
            v = output.chunk(3, dim=-1)[2] if fused else output
            amax[key] = max(amax.get(key, 0.0), float(v.detach().abs().max()))

        return record

    for name, attn in transformer.named_modules():
        if not isinstance(attn, AttentionModuleMixin):
            continue
        fused = getattr(attn, "fused_projections", False)
        for proj in ("to_qkv", "to_added_qkv") if fused else ("to_v", "add_v_proj"):
            module = getattr(attn, proj, None)
            if module is not None:
                handles.append(module.register_forward_hook(hook(name, fused)))
    try:
        yield amax
    finally:
        for h in handles:
            h.remove()


@dataclass
class Calibration:
    """Input amax per quantized linear and what it was computed from.

    Attributes:
        amax: linear name (in the transformer) -> amax of its input over every edit and step.
        meta: model_fingerprint, precision, seed, edits, steps, resolution, keep_out, attention_v, fluxtrt.
        attention_v: attention name (in the transformer) -> amax of its V over every edit and step (empty for a
            calibration from before V was recorded: V's scale stays dynamic).
    """

    amax: dict[str, float]
    meta: dict = field(default_factory=dict)
    attention_v: dict[str, float] = field(default_factory=dict)

    def scales(self) -> dict[str, float]:
        """``amax`` and each V amax under its attention's name + ``ATTENTION_V``, one dict (what a build carries;
        ``split_calibration`` takes it apart)."""
        from fluxtrt.kernels.attention_scales import ATTENTION_V

        return {**self.amax, **{name + ATTENTION_V: v for name, v in self.attention_v.items()}}

    def save(self, path: Path) -> Path:
        """Write ``path`` (safetensors) and ``path.json``; returns ``path``."""
        import torch
        from safetensors.torch import save_file

        from fluxtrt.io import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: torch.tensor([v], dtype=torch.float32) for k, v in sorted(self.scales().items())}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"fluxtrt": "calibration"}))
        text = json.dumps(self.meta, indent=2, sort_keys=True)
        atomic_write(sidecar(path), lambda tmp: tmp.write_text(text))
        return path


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_calibration(path: Path, fingerprint: str, precision: str) -> Calibration:
    """Read a calibration and check it belongs to the model ``fingerprint`` and ``precision``.

    Raises:
        InputError: the file or its sidecar is missing or unreadable, or it was computed for another model or
            precision.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    fix = "pass --calibration with a file from this model and precision, or leave it out to calibrate again"
    if not path.is_file() or not sidecar(path).is_file():
        raise InputError(f"--calibration '{path}' or its sidecar {sidecar(path).name} does not exist: {fix}")
    try:
        meta = json.loads(sidecar(path).read_text())
        scales = {k: float(v.reshape(-1)[0]) for k, v in load_file(str(path)).items()}
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise InputError(f"--calibration '{path}' is not a fluxtrt calibration ({type(exc).__name__}): {fix}") from None
    for key, want in (("model_fingerprint", fingerprint), ("precision", precision)):
        if meta.get(key) != want:
            raise InputError(
                f"--calibration '{path}' was computed for {key} '{meta.get(key)}', this build has '{want}': {fix}"
            )
    from fluxtrt.kernels.attention_scales import split_calibration

    amax, attention_v = split_calibration(scales)
    return Calibration(amax, meta, attention_v)


def calibration_image(seed: int, width: int, height: int) -> Any:
    """A procedural reference image: smooth colour gradients with a few filled shapes, fixed by ``seed``."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(xx * rng.uniform(2, 8) + yy * rng.uniform(2, 8) + rng.uniform(0, 6)) for _ in range(3)]
    image = Image.fromarray((127.5 * (np.stack(channels, -1) + 1)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        box = (x0, y0, x0 + int(rng.integers(8, width // 3)), y0 + int(rng.integers(8, height // 3)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return image


def calibrate(
    components: Any,
    *,
    fingerprint: str,
    precision: str,
    edits: int,
    seed: int = 0,
    steps: int | None = None,
    width: int = 512,
    height: int = 512,
    keep_out: tuple[str, ...] = KEEP_OUT,
    batched: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Run the Kontext pipeline (torch runners) on ``edits`` calibration edits and record each linear's input amax.

    Args:
        components: loaded ``FluxKontextComponents`` in the compute dtype of the build.
        fingerprint: the model's fingerprint (``model_fingerprint``), recorded and checked on load.
        precision: ``fp8`` or ``fp4``, recorded and checked on load.
        edits: how many calibration edits (prompts cycle through ``PROMPTS``; image i has seed ``seed + i``).
        seed: fixes the images and the noise; equal arguments give equal scales.
        steps: denoising steps per edit (the default sampler's when None); amax is taken over all of them.
        width, height: size of the calibration images.
        keep_out: patterns of linears left unquantized.
        batched: run every edit in one pipeline call at exactly ``width`` x ``height`` (noise from ``seed``) instead
            of one call per edit at its image's preferred Kontext size (for a test-sized model: see ``recipe_for``).
        on_progress: called with a line after each edit (or the batch): how many are done and the time left.

    Returns:
        The calibration (not yet saved).

    Raises:
        InputError: ``edits`` < 1.
    """
    import torch

    from fluxtrt.config import SamplerConfig
    from fluxtrt.pipeline.kontext import KontextPipeline

    if edits < 1:
        raise InputError(f"--calibration-edits is {edits}, expected an integer >= 1: pass e.g. --calibration-edits 8")
    transformer = components.transformer
    sampler = SamplerConfig(steps=steps)
    pipeline = KontextPipeline.from_components(components)
    tell = on_progress or (lambda message: None)
    t0 = time.perf_counter()
    with (
        recorded_input_amax(transformer, keep_out) as amax,
        recorded_attention_v_amax(transformer) as v_amax,
        torch.inference_mode(),
    ):
        if batched:
            size = Resolution(width, height)
            pipeline.sizes = SizeRange(size, size)
            images = [calibration_image(seed + i, width, height) for i in range(edits)]
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(edits)]
            tell(f"{edits} edits of {sampler.num_steps} steps at {size}, in one batch")
            pipeline.edit(images, prompts, sampler=sampler, seed=seed)
            tell(f"{edits} edits done in {time.perf_counter() - t0:.1f} s")
        for i in range(0 if batched else edits):
            image = calibration_image(seed + i, width, height)
            pipeline.edit(image, PROMPTS[i % len(PROMPTS)], sampler=sampler, seed=seed + i)
            spent = time.perf_counter() - t0
            tell(f"edit {i + 1}/{edits} ({sampler.num_steps} steps) done, {spent:.1f} s; about "
                 f"{spent / (i + 1) * (edits - i - 1):.0f} s left")  # fmt: skip
    meta = {
        "model_fingerprint": fingerprint,
        "precision": precision,
        "seed": seed,
        "edits": edits,
        "steps": sampler.num_steps,
        "sampler": asdict(sampler),
        "resolution": f"{width}x{height}",
        "compute_dtype": str(transformer.dtype).removeprefix("torch."),
        "keep_out": list(keep_out),
        "linears": len(amax),
        "attention_v": len(v_amax),
        "fluxtrt": __version__,
        **({"batched": True} if batched else {}),
    }
    missing = [n for n, v in amax.items() if v == 0.0]
    if missing:
        raise BuildError(
            f"calibration saw no input (or only zeros) for {len(missing)} linears, e.g. {missing[0]}: the pipeline "
            "does not call them; add them to the kept-out list"
        )
    # An attention whose V was all zeros keeps a dynamic scale (no static one describes it).
    return Calibration(amax, meta, {k: v for k, v in v_amax.items() if v > 0.0})


def calibration_for_build(
    config: Any, components: Any, fingerprint: str, out: Path, on_progress: Callable[[str], None] | None = None
) -> tuple[Path, Calibration, str]:
    """The calibration a quantized build uses, saved in the engines directory so a rebuild needs no calibration run.

    ``config.calibration`` (a file) is checked and copied in; otherwise ``out/calibration/transformer-<precision>``
    is reused when it was computed for this model, precision and recipe (``recipe_for``: seed, edit count,
    resolution, batching), and computed anew (``calibrate``) when not.

    Args:
        on_progress: called with a line as the calibration goes (what is used; each edit done).

    Returns:
        (the file inside ``out``, the calibration, how it was had: ``given``, ``reused`` or ``computed``).

    Raises:
        InputError: the given file belongs to another model or precision; zero calibration edits.
    """
    import shutil

    tell = on_progress or (lambda message: None)
    path = out / "calibration" / f"transformer-{config.precision}{CALIBRATION_SUFFIX}"
    if config.calibration is not None:
        tell(f"using --calibration {config.calibration}")
        given = load_calibration(Path(config.calibration), fingerprint, config.precision)
        if Path(config.calibration).resolve() != path.resolve():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config.calibration, path)
            shutil.copyfile(sidecar(Path(config.calibration)), sidecar(path))
        return path, given, "given"
    recipe = recipe_for(config)
    want = {"seed": 0, "edits": recipe.edits, "resolution": f"{recipe.width}x{recipe.height}",
            "batched": recipe.batched or None}  # fmt: skip
    # A saved calibration from before V's amax was recorded (no "attention_v" in its sidecar) is computed again.
    if path.is_file() and sidecar(path).is_file():
        try:
            saved = load_calibration(path, fingerprint, config.precision)
        except InputError:
            saved = None
        current = saved is not None and "attention_v" in saved.meta
        if current and all(saved.meta.get(k) == v for k, v in want.items()):
            tell(f"reusing {path.relative_to(out)}, computed for this model and recipe")
            return path, saved, "reused"
    result = calibrate(
        components,
        fingerprint=fingerprint,
        precision=config.precision,
        edits=recipe.edits,
        steps=recipe.steps,
        width=recipe.width,
        height=recipe.height,
        batched=recipe.batched,
        on_progress=tell,
    )
    return result.save(path), result, "computed"
