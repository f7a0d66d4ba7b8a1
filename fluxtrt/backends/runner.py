"""The runner contract every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from fluxtrt.specs.component import ComponentSpec


class Runner(ABC):
    """Runs one component: ``infer(feed)`` takes and returns ``{binding name: torch tensor}``.

    The base validates every feed against the component spec (names, dtypes, ranks, fixed sizes, consistent
    symbols) so no backend repeats it and the pipeline never knows which backend it drives.

    Args:
        spec: the component's spec.
        compute_dtype: the torch dtype that the spec's ``compute`` tensors have (fp32 or bf16).
    """

    def __init__(self, spec: ComponentSpec, compute_dtype: Any):
        self.spec = spec
        self.compute_dtype = compute_dtype

    @property
    def name(self) -> str:
        return self.spec.name

    def infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``feed``, run the component, return its outputs by name.

        Raises:
            ShapeError: the feed does not match the spec.
        """
        self.spec.check_feed(feed, self.compute_dtype)
        return self._infer(feed)

    @abstractmethod
    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Backend-specific execution of an already validated feed."""
