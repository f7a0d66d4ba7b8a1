"""A runner that records what passes through another one, to compare backends step by step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fluxtrt.backends.runner import DelegatingRunner, Runner


class RecordingRunner(DelegatingRunner):
    """Delegates to ``inner`` and keeps every call's feed and outputs (detached clones, on their device).

    Clones stay on the device, so recording adds no host synchronisation inside a timed loop; ``clear()`` drops them.
    """

    def __init__(self, inner: Runner):
        super().__init__(inner)
        self.calls: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def clear(self) -> None:
        self.calls = []

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        out = self.inner.infer(feed)
        self.calls.append(
            ({k: v.detach().clone() for k, v in feed.items()}, {k: v.detach().clone() for k, v in out.items()})
        )
        return out
