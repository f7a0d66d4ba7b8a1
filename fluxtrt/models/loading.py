"""``--model``: resolve a name or path to loaded components, offline."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fluxtrt.errors import ModelLoadError, first_line
from fluxtrt.models.components import PARTS, SUBFOLDERS, FluxKontextComponents

BUILTIN_MODELS = ("tiny", "random-full", "random-full-2blocks")
# Memory a model needs beyond its weights while it loads and runs (activations, allocator slack), as a fraction.
MEMORY_HEADROOM = 0.1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def torch_dtype(name: str) -> Any:
    """``fp32``/``bf16`` -> the torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def load_components(
    model: str,
    device: str = "cpu",
    dtype: str = "fp32",
    seed: int = 0,
    vae: str | None = None,
    parts: Iterable[str] | None = None,
) -> FluxKontextComponents:
    """Load a FLUX.1-Kontext model without touching the network.

    Args:
        model: ``tiny``, ``random-full``, a diffusers-format directory, or a hub id already in the local cache.
        device: ``cpu`` or ``cuda``.
        dtype: ``fp32`` or ``bf16``.
        seed: initialisation seed of the synthetic models.
        vae: None for the model's own VAE, or the slim autoencoder in its place: ``tiny`` (random weights) or an
            AutoencoderTiny directory (``fluxtrt.models.tiny_vae``).
        parts: load only these models (names of ``PARTS``: ``transformer``, ``vae``, ``text_encoder``,
            ``text_encoder_2``), the others left None; None loads all four. Each has the weights a whole load gives
            it (a checkpoint loads only their subfolders; a synthetic model builds only them, with the same seeds).
            The tokenizers and the scheduler config are always loaded.

    Returns:
        The components, on ``device`` in ``dtype``, in eval mode.

    Raises:
        ModelLoadError: the path is missing or not a FLUX.1-Kontext checkpoint, a hub id has no local copy, or
            ``vae`` is not a usable AutoencoderTiny.
        DeviceError: ``random-full`` would not fit the memory available on ``device``.
    """
    parts = check_parts(parts)
    if vae is not None and "vae" in parts:
        check_slim_vae(vae)
        return use_slim_vae(load_components(model, device, dtype, seed, parts=parts), vae, seed)
    from fluxtrt.models.synthetic import FULL, FULL_2BLOCKS, TINY, build_synthetic

    if model == "tiny":
        # Built on the CPU in fp32 whatever the target, so every device and dtype starts from the same weights.
        tiny = build_synthetic(TINY, seed, "cpu", torch_dtype("fp32"), "tiny", parts)
        return tiny.to(device, torch_dtype(dtype)) if (device, dtype) != ("cpu", "fp32") else tiny
    if model == "random-full":
        check_full_fits(device, dtype, parts)
        return build_synthetic(FULL, seed, device, torch_dtype(dtype), "random-full", parts)
    if model == "random-full-2blocks":
        return build_synthetic(FULL_2BLOCKS, seed, device, torch_dtype(dtype), model, parts)
    return load_checkpoint(resolve_checkpoint(model), device, dtype, parts)


def check_parts(parts: Iterable[str] | None) -> tuple[str, ...]:
    """``parts`` as a tuple in ``PARTS`` order (all of them for None).

    Raises:
        ValueError: a name that is not one of ``PARTS``.
    """
    if parts is None:
        return PARTS
    asked = set(parts)
    unknown = sorted(asked - set(PARTS))
    if unknown:
        raise ValueError(f"unknown model parts {', '.join(unknown)}, expected some of {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in asked)


def part_parameters(model: str, part: str) -> int:
    """Parameters of model ``part`` (one of ``PARTS``) of ``model``, without loading it: synthetic models are counted
    on the meta device (random-full's counts are constants), a checkpoint from its safetensors headers (from its
    weight files' sizes at 2 bytes a parameter where it has none).

    Raises:
        ModelLoadError: as ``resolve_checkpoint``.
    """
    from fluxtrt.models.synthetic import FULL_2BLOCKS, FULL_PART_PARAMETERS, TINY
    from fluxtrt.models.synthetic import part_parameters as synthetic_parameters

    check_parts((part,))
    if model == "tiny":
        return synthetic_parameters(TINY, part)
    if model == "random-full":
        return FULL_PART_PARAMETERS[part]
    if model == "random-full-2blocks":
        return synthetic_parameters(FULL_2BLOCKS, part)
    folder = resolve_checkpoint(model) / part
    tensors = sorted(folder.glob("*.safetensors"))
    if not tensors:
        weights = [f for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        return sum(f.stat().st_size for f in weights) // 2
    return sum(_safetensors_numel(f) for f in tensors)


def _safetensors_numel(path: Path) -> int:
    """Elements of every tensor of a safetensors file, read from its header (8 bytes of length, then JSON)."""
    import math
    import struct

    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def check_slim_vae(vae: str) -> None:
    """Raise ModelLoadError, before a model loads (30 GB), when the slim autoencoder ``vae`` is a directory that
    cannot serve FLUX's 16 latent channels; the loaded model's own count is checked when the autoencoder loads."""
    from fluxtrt.models.tiny_vae import TINY_VAE, check_tiny_vae

    if vae != TINY_VAE:
        check_tiny_vae(vae, 16)


def use_slim_vae(components: FluxKontextComponents, vae: str, seed: int = 0) -> FluxKontextComponents:
    """Put the slim autoencoder ``vae`` (``tiny`` or an AutoencoderTiny directory) in place of the components' VAE,
    on its device in its dtype; returns the components.

    Raises:
        ModelLoadError: ``vae`` is not a usable AutoencoderTiny for the model's latent channels.
    """
    from fluxtrt.models.tiny_vae import load_tiny_vae

    full = components.vae
    components.vae = load_tiny_vae(vae, full.device, full.dtype, seed, full.config.latent_channels)
    components.vae_source = vae
    return components


def check_full_fits(device: str, dtype: str, parts: Iterable[str] = PARTS) -> None:
    """Raise DeviceError, before allocating anything, when random-full's weights (plus headroom) would not fit the
    memory available on ``device``: on a CPU machine the kernel's OOM killer would otherwise end the process after
    a minute, without a word. ``parts``: the models loaded (all four by default)."""
    from fluxtrt.environment import check_memory
    from fluxtrt.models.synthetic import FULL_PARAMETERS, FULL_PART_PARAMETERS

    parts = check_parts(parts)
    count = FULL_PARAMETERS if parts == PARTS else sum(FULL_PART_PARAMETERS[p] for p in parts)

    def needed(dtype_name: str) -> int:
        return round(count * {"fp32": 4, "bf16": 2}[dtype_name] * (1 + MEMORY_HEADROOM))

    if str(device).startswith("cuda"):
        fix = "free the GPU's memory, or use a GPU with more" + (" (or --dtype bf16)" if dtype == "fp32" else "")
    else:
        fix = (
            f"run it on a GPU machine (--device cuda; in bf16 it needs about {needed('bf16') / 2**30:.0f} GiB of GPU "
            "memory), or use --model tiny on the CPU"
        )
    which = "" if parts == PARTS else f"'s {', '.join(parts)}"
    what = f"--model random-full{which} ({count / 1e9:.1f}B parameters in {dtype})"
    check_memory(needed(dtype), device, what, fix)


def resolve_checkpoint(model: str) -> Path:
    """A local directory for ``model``: the path itself, or the cached snapshot of a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        check_checkpoint(path)
        return path
    if _HUB_ID.match(model):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(model, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise ModelLoadError(
                f"--model '{model}' is not a local directory and has no copy in the Hugging Face cache: download it "
                f"with `hf download {model}` (accept its license on the model page first), then pass the same "
                "--model again or the downloaded directory"
            ) from None
        check_checkpoint(path)
        return path
    raise ModelLoadError(
        f"--model '{model}' does not exist: expected {', '.join(BUILTIN_MODELS)}, a diffusers-format FLUX.1-Kontext "
        "directory or a downloaded hub id such as black-forest-labs/FLUX.1-Kontext-dev"
    )


def vae_scale(model: str) -> int | None:
    """Pixels per latent of ``model``'s VAE (2 ** (its blocks - 1)), read from its config without loading a weight;
    None where the config cannot be read (loading the model then says why)."""
    from fluxtrt.specs.flux import vae_scale_of

    if model in BUILTIN_MODELS:
        from fluxtrt.models.synthetic import FULL, TINY

        return vae_scale_of((TINY if model == "tiny" else FULL).vae["block_out_channels"])
    try:
        config = json.loads((resolve_checkpoint(model) / "vae" / "config.json").read_text())
        return vae_scale_of(config["block_out_channels"])
    except (ModelLoadError, OSError, ValueError, KeyError, TypeError):
        return None


def check_checkpoint(path: Path) -> None:
    """Raise ModelLoadError unless ``path`` looks like a diffusers-format FLUX.1-Kontext checkpoint."""
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise ModelLoadError(
            f"--model '{path}' is not a diffusers-format checkpoint: no model_index.json in it; expected a "
            "FLUX.1-Kontext directory such as a download of black-forest-labs/FLUX.1-Kontext-dev"
        )
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"--model '{path}': model_index.json is not valid JSON ({exc}); re-download it") from None
    if not class_name.startswith("Flux"):
        raise ModelLoadError(
            f"--model '{path}' is a {class_name or 'unnamed'} checkpoint, expected FluxKontextPipeline "
            "(FLUX.1-Kontext in diffusers format)"
        )
    missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise ModelLoadError(
            f"--model '{path}' lacks the subfolders {', '.join(missing)} of a FLUX.1-Kontext checkpoint: the download "
            "is incomplete, download it again"
        )


def load_checkpoint(path: Path, device: str, dtype: str, parts: Iterable[str] = PARTS) -> FluxKontextComponents:
    """Load the four models (or only ``parts`` of them, each from its own subfolder), two tokenizers and the
    scheduler config of a checked checkpoint directory."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    kw = {"dtype": torch_dtype(dtype), "local_files_only": True}
    classes = {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": T5EncoderModel}  # fmt: skip
    try:
        models = {p: classes[p].from_pretrained(path, subfolder=p, **kw) for p in check_parts(parts)}
        components = FluxKontextComponents(
            transformer=models.get("transformer"),
            vae=models.get("vae"),
            text_encoder=models.get("text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
            text_encoder_2=models.get("text_encoder_2"),
            tokenizer_2=T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True),
            scheduler_config=json.loads((path / "scheduler" / "scheduler_config.json").read_text()),
            source=str(path),
        )
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        first = first_line(exc)
        raise ModelLoadError(f"--model '{path}' could not be loaded: {first}; re-download the checkpoint") from None
    return components.to(device, torch_dtype(dtype))


def model_fingerprint(model: str, seed: int = 0, vae: str | None = None) -> str:
    """What identifies the weights of ``model`` (with the slim autoencoder ``vae`` in place of its own, if given)
    cheaply: a rebuild is needed when it changes.

    Synthetic models are fixed by their name and seed; a checkpoint by its config files and the names and sizes of
    its weight files (hashing 30 GB of weights on every build would cost minutes).
    """
    import hashlib

    if vae is not None:
        from fluxtrt.models.tiny_vae import tiny_vae_fingerprint

        return f"{model_fingerprint(model, seed)}+{tiny_vae_fingerprint(vae, seed)}"
    if model in BUILTIN_MODELS:
        return f"{model}-seed{seed}"
    path = resolve_checkpoint(model)
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            rel = str(f.relative_to(path)).encode()
            digest.update(rel + (f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode()))
    return digest.hexdigest()[:16]
