"""The two TensorRTs fluxtrt builds with, and everything in which they differ.

- TensorRT 10 (``tensorrt``): data-center GPUs (H100, H200, B200); builds on the GPU it targets, with a timing
  cache and a workspace limit; plans run on the GPU and TensorRT version that built them. Its builder wheels are on
  NVIDIA's own package index only.
- TensorRT-RTX (``tensorrt_rtx``, ``pip install tensorrt-rtx``): Ampere, Ada and RTX Blackwell (compute capability
  8.0, 8.6, 8.9, 12.0, 12.1); always strongly typed; builds ahead of time for chosen compute capabilities, also on a
  machine without a GPU; no timing cache (its kernels are compiled just in time on the user's GPU and kept in a
  runtime cache); refuses Hopper (9.0). A workspace limit makes it allocate on a GPU, so none is set.

Everything else (the ONNX parser, the profile, building, the runner) is one implementation over Polygraphy, which
switches between the two with ``polygraphy.config.USE_TENSORRT_RTX``. Polygraphy picks the module when its TensorRT
backend is first imported, so one process builds with one of them.
"""

from __future__ import annotations

import importlib
import struct
import sys
from dataclasses import dataclass
from typing import Any

from fluxtrt.errors import BuildError, MissingDependencyError


@dataclass(frozen=True)
class Flavour:
    """One TensorRT.

    Attributes:
        backend: the fluxtrt backend name.
        module: the Python module.
        package: the distribution that provides it.
        name: how messages name it.
        install: how to install it (a command or an instruction).
        record_key: the key its version is recorded under in an engine's record.
        rtx: TensorRT-RTX (compute-capability targets, no timing cache, no workspace limit).
        runs_on: the compute capabilities its runtime supports (as 89, 120); empty for any.
    """

    backend: str
    module: str
    package: str
    name: str
    install: str
    record_key: str
    rtx: bool
    runs_on: tuple[int, ...] = ()

    def lib(self) -> Any:
        """The TensorRT module (MissingDependencyError naming the install if absent)."""
        try:
            return importlib.import_module(self.module)
        except ImportError:
            feature = f"the {self.backend} backend ({self.name})"
            raise MissingDependencyError(self.package, feature, self.install) from None

    def polygraphy(self) -> Any:
        """``polygraphy.backend.trt`` driving this TensorRT.

        Raises:
            MissingDependencyError: polygraphy is not installed.
            BuildError: Polygraphy's TensorRT backend was imported in this process for the other TensorRT.
        """
        self.lib()
        try:
            import polygraphy.config as polygraphy_config
        except ImportError:
            feature = f"the {self.backend} backend"
            raise MissingDependencyError("polygraphy", feature, "pip install polygraphy") from None
        if "polygraphy.backend.trt" in sys.modules and self.rtx != polygraphy_config.USE_TENSORRT_RTX:
            other = "TensorRT-RTX" if polygraphy_config.USE_TENSORRT_RTX else "TensorRT 10"
            raise BuildError(
                f"this process already drives {other} through Polygraphy, which cannot switch: build "
                f"{self.backend} engines in a separate process"
            )
        polygraphy_config.USE_TENSORRT_RTX = self.rtx
        import polygraphy.backend.trt as polygraphy_trt
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.ERROR  # fluxtrt reports progress itself; errors still show
        return polygraphy_trt


TENSORRT = Flavour(
    backend="tensorrt",
    module="tensorrt",
    package="tensorrt",
    name="TensorRT 10",
    install=(
        "install TensorRT 10 from NVIDIA's Python package index (`pip install tensorrt-cu12` with that index as an "
        "extra index), or use the Docker image in docker/"
    ),
    record_key="tensorrt",
    rtx=False,
)
TENSORRT_RTX = Flavour(
    backend="tensorrt-rtx",
    module="tensorrt_rtx",
    package="tensorrt-rtx",
    name="TensorRT-RTX",
    install="pip install 'fluxtrt[tensorrt-rtx]'",
    record_key="tensorrt_rtx",
    rtx=True,
    runs_on=(80, 86, 89, 120, 121),
)

# A TensorRT-RTX plan starts with a 64-byte header: b"vtrt", and at byte 24 the version that wrote it (major, minor,
# patch, build as single bytes: 1.7.1.116 is 01 07 01 74). Read before deserializing, so a plan of another
# release is refused with both versions named rather than by a failing deserialization.
RTX_MAGIC = b"vtrt"


def rtx_plan_version(header: bytes) -> str | None:
    """The TensorRT-RTX version that wrote a plan, from its first 28 bytes; None if it is no TensorRT-RTX plan."""
    if len(header) < 28 or header[:4] != RTX_MAGIC:
        return None
    return ".".join(str(b) for b in struct.unpack_from("4B", header, 24))
