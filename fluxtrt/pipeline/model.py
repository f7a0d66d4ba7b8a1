"""A pipeline over a model on PyTorch: torch runners placed as the model was loaded (``fluxtrt.models.options``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fluxtrt.backends.runner import Runner
from fluxtrt.backends.torch_runner import TorchRunner, torch_runners
from fluxtrt.lora.files import Lora
from fluxtrt.models.options import LoadedModel, ModelOptions, load_model
from fluxtrt.pipeline.kontext import KontextPipeline


def model_runners(
    components: Any, offloads: Mapping[str, Any] | None = None, tiled_vae: bool = False
) -> dict[str, Runner]:
    """A torch runner per component over loaded ``FluxKontextComponents``.

    Args:
        components: the loaded components.
        offloads: the components whose weights stay on the host and stream through the device (the 24 GB mode's
            text encoders, by runner name): their runners take inputs and return outputs on the transformer's device.
        tiled_vae: tile the VAE above its tile size (the 24 GB mode). Only the FLUX VAE (AutoencoderKL) is tiled:
            diffusers tiles an image over its sample_size (1024 px for FLUX) a side; the slim AutoencoderTiny needs
            no tiling (64-channel activations) and its tiled path assumes 4 latent channels.
    """
    runners: dict[str, Runner] = dict(torch_runners(components))
    transformer = components.transformer
    for name in offloads or {}:
        runners[name] = TorchRunner(runners[name].spec, runners[name].module, transformer.dtype, transformer.device)
    vae = components.vae
    if tiled_vae and hasattr(vae, "enable_tiling") and hasattr(vae, "tiled_decode"):
        vae.enable_tiling()
    return runners


def model_pipeline(model: LoadedModel) -> KontextPipeline:
    """The edit over a model loaded by ``fluxtrt.models.options.load_model``, on torch runners."""
    runners = model_runners(model.components, model.offloads, tiled_vae=model.options.low_vram)
    return KontextPipeline.from_components(model.components, runners=runners)


@dataclass(frozen=True)
class ModelSource:
    """A pipeline's model on PyTorch, loaded as ``options`` say (``infer --model``)."""

    options: ModelOptions

    @property
    def name(self) -> str:
        """What the pipeline runs, for the report."""
        return self.options.model + (" (low-VRAM)" if self.options.low_vram else "")

    @property
    def device(self) -> str:
        """Where the model runs."""
        return self.options.device

    def load(self, loras: Sequence[Lora] = (), prepare: Callable[[Any], None] | None = None) -> KontextPipeline:
        """Load the model and make its pipeline, with ``loras`` fused into the transformer's weights; ``prepare`` is
        then called with the transformer before its runner is made (``--gpus``: context parallelism).

        Raises:
            ModelLoadError, DeviceError, MissingDependencyError: as ``fluxtrt.models.options.load_model``.
            InputError: a LoRA that does not fit the transformer.
        """
        model = load_model(self.options)
        if loras:
            from fluxtrt.lora.fuse import fuse

            fuse(model.components.transformer, loras)
        if prepare is not None:
            prepare(model.components.transformer)
        return model_pipeline(model)
