"""PyTorch runners: the reference backend, and the base of the PyTorch stages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fluxtrt.backends.runner import Runner
from fluxtrt.backends.torch_modules import component_module
from fluxtrt.specs.component import ComponentSpec
from fluxtrt.specs.flux import COMPONENTS, component_specs, dims_from_components


class TorchRunner(Runner):
    """Runs a component's ``nn.Module`` under ``torch.inference_mode``.

    Args:
        spec: the component spec.
        module: a module from ``fluxtrt.backends.torch_modules`` (or any with the same forward signature).
        compute_dtype: dtype of the module's floating tensors.
        device: where inputs live and outputs are returned; None: where the module's first parameter is (a module
            whose weights stay on the host and stream through the device names the device here).
    """

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module, compute_dtype: torch.dtype, device: Any = None):
        if device is None:
            param = next(module.parameters(), None)
            device = param.device if param is not None else "cpu"
        super().__init__(spec, compute_dtype, device)
        self.module = module
        self.load()  # the module is the caller's and already in memory: nothing to acquire or release

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        with torch.inference_mode():
            out = self.module(*(feed[n] for n in self.spec.input_names))
        outs = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.spec.output_names, outs, strict=True))


def torch_runners(components: Any) -> dict[str, TorchRunner]:
    """A torch runner per component over loaded ``FluxKontextComponents``."""
    specs = component_specs(dims_from_components(components))
    dtype = components.transformer.dtype
    return {name: TorchRunner(specs[name], component_module(name, components), dtype) for name in COMPONENTS}
