"""Host-resident weights streamed through the device (the 24 GB mode's text encoders, DESIGN 13).

Each group of modules keeps its weights on the host; a forward pre-hook copies the group's tensors to the device
just before it runs and a forward hook points them back at the host copies after, so the device holds one group at
a time and nothing once the encoder has run. The host copies are the weights (page-locked on CUDA): nothing is
copied back. T5-XXL at 512 tokens is bound by these copies (9.5 GB a prompt), not by its compute (36 ms on an H100),
so a prefetch of the next group would hide little and the copies run in order on the compute stream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HostOffload:
    """Streams ``groups`` (modules whose forward is called, in any order) from the host through ``device``.

    Args:
        groups: modules that together hold every parameter and buffer of ``owner``, each tensor in one group.
        device: where the groups run.
        owner: the model the groups belong to; checked for full coverage.

    Attributes:
        resident_bytes: bytes of the groups' tensors on the device now (0 between forwards).
        max_resident_bytes: the most ever held at once.
        onloads: groups copied to the device so far.

    Raises:
        ValueError: a tensor of ``owner`` is in no group or in two.
    """

    def __init__(self, groups: list[nn.Module], device: Any, owner: nn.Module):
        self.device = torch.device(device)
        self.groups = groups
        self.resident_bytes = 0
        self.max_resident_bytes = 0
        self.onloads = 0
        self._host: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        seen: set[int] = set()
        for group in groups:
            tensors = [*group.parameters(), *group.buffers()]
            if any(id(t) in seen for t in tensors):
                raise ValueError(f"a tensor of {type(group).__name__} is in two offload groups")
            seen.update(id(t) for t in tensors)
            self._host.append([(t, t.data) for t in tensors])
        missing = [n for n, t in [*owner.named_parameters(), *owner.named_buffers()] if id(t) not in seen]
        if missing:
            raise ValueError(f"{type(owner).__name__} tensors in no offload group: {', '.join(missing[:5])}")
        self._handles = []
        for index, group in enumerate(groups):
            self._handles.append(group.register_forward_pre_hook(lambda m, a, i=index: self._onload(i)))
            self._handles.append(group.register_forward_hook(lambda m, a, o, i=index: self._drop(i)))

    def _onload(self, index: int) -> None:
        for tensor, host in self._host[index]:
            tensor.data = host.to(self.device, non_blocking=True)
            self.resident_bytes += host.numel() * host.element_size()
        self.max_resident_bytes = max(self.max_resident_bytes, self.resident_bytes)
        self.onloads += 1

    def _drop(self, index: int) -> None:
        for tensor, host in self._host[index]:
            # The device copy is freed once the compute stream is done with it (the caching allocator's rule for
            # memory allocated on the stream that uses it).
            tensor.data = host
            self.resident_bytes -= host.numel() * host.element_size()

    def remove(self) -> None:
        """Take the hooks off; the weights stay on the host."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def text_encoder_groups(text_encoder: nn.Module, text_encoder_2: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The offload groups of CLIP (the whole model, 0.25 GB in bf16) and of T5 (its embedding, each of its blocks,
    its final norm: 0.26 GB, 24 x 0.39 GB and a few KB for T5-XXL in bf16)."""
    encoder = text_encoder_2.encoder
    return [text_encoder], [encoder.embed_tokens, *encoder.block, encoder.final_layer_norm]
