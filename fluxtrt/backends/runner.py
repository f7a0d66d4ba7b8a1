"""The runner contract every backend implements (in the spirit of Polygraphy's runners).

A runner runs one component: ``infer(feed)`` takes and returns ``{binding name: torch tensor}``. The base class does
every check once, so no backend repeats it and the pipeline never knows which backend it drives:

- the feed against the component spec (names, dtypes, ranks, fixed sizes, consistent symbols): ``ShapeError``;
- each symbol against the range the engine was built for (``ranges``): ``ShapeError`` naming the rebuild;
- each tensor's device against the runner's: ``DeviceMismatchError``.

Lifecycle: ``load()`` acquires what the runner needs (an engine deserialized, a package and its weights loaded, a
session created) and ``close()`` releases it, GPU memory included; a runner is also a context manager. Loading is
idempotent, a closed runner can be loaded again, and ``infer`` on a closed runner is an error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from fluxtrt.errors import DeviceMismatchError, EngineError, ShapeError
from fluxtrt.specs.component import ComponentSpec

# The build option that widens a symbol's range, for the fix in an out-of-range message.
_WIDEN = {"B": "--max-batch"}
_WIDEN_DEFAULT = "--min-resolution/--max-resolution"


class Runner(ABC):
    """Runs one component.

    Args:
        spec: the component's spec.
        compute_dtype: the torch dtype that the spec's ``compute`` tensors have (fp32 or bf16).
        device: where inputs must live and outputs are returned (``cpu``, ``cuda``, ``cuda:1``).
        ranges: symbol -> (min, max) the engine accepts; symbols not named are unbounded (a PyTorch module).
    """

    def __init__(
        self,
        spec: ComponentSpec,
        compute_dtype: Any,
        device: Any = "cpu",
        ranges: Mapping[str, tuple[int, int]] | None = None,
    ):
        self.spec = spec
        self.compute_dtype = compute_dtype
        self.device = str(device)
        self.ranges = {k: (int(lo), int(hi)) for k, (lo, hi) in (ranges or {}).items()}
        self._loaded = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_loaded(self) -> bool:
        return self._loaded

    def load(self) -> Runner:
        """Acquire the runner's resources (nothing happens when it is loaded already); returns the runner."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def close(self) -> None:
        """Release the runner's resources (device memory included); ``load()`` makes it usable again."""
        if self._loaded:
            self._close()
            self._loaded = False

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def check_dims(self, dims: Mapping[str, int]) -> None:
        """Raise ShapeError naming the first symbol of ``dims`` outside the built range, and the rebuild.

        The pipeline calls this with the symbol values of a whole edit before it starts, so an edit the engines
        cannot run fails before any work; ``infer`` calls it for every feed.
        """
        for sym, value in dims.items():
            if sym not in self.ranges:
                continue
            lo, hi = self.ranges[sym]
            if not lo <= value <= hi:
                raise ShapeError(
                    f"{self.name}: {sym} is {value} but the engine was built for {sym} in [{lo}, {hi}]: rebuild "
                    f"with {_WIDEN.get(sym, _WIDEN_DEFAULT)} covering it"
                )

    def infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``feed``, run the component, return its outputs by name.

        Raises:
            EngineError: the runner is not loaded.
            ShapeError: the feed does not match the spec or lies outside the built range.
            DeviceMismatchError: a tensor is on another device than the runner.
        """
        if not self._loaded:
            raise EngineError(f"{self.name}: the runner is closed: call load() (or use it in a with block) first")
        self.check_dims(self.spec.check_feed(feed, self.compute_dtype))
        device_type = self.device.split(":")[0]
        for name in self.spec.input_names:
            if feed[name].device.type != device_type:
                raise DeviceMismatchError(
                    f"{self.name}.{name} is on {feed[name].device}, expected {self.device} (where the runner "
                    f"runs): move the input with .to('{self.device}')"
                )
        return self._infer(feed)

    def _load(self) -> None:  # noqa: B027 (optional hook)
        """Backend-specific acquisition; by default there is nothing to acquire."""

    def _close(self) -> None:  # noqa: B027 (optional hook)
        """Backend-specific release; by default there is nothing to release."""

    @abstractmethod
    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        """Backend-specific execution of an already validated feed."""


class DelegatingRunner(Runner):
    """A runner in front of another (recording, timing): same spec, dtype, device and range; loading and closing
    go through to ``inner``, and every call is validated by both.

    Args:
        inner: the runner called.
    """

    def __init__(self, inner: Runner):
        super().__init__(inner.spec, inner.compute_dtype, inner.device, inner.ranges)
        self.inner = inner
        self._loaded = inner.is_loaded

    def _load(self) -> None:
        self.inner.load()

    def _close(self) -> None:
        self.inner.close()

    def _infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        return self.inner.infer(feed)
