"""The machine a result was measured or an engine was built on: one probe of the GPU, one check of a device and its
compute capability and of its free memory, and the environment recorded with every benchmark result.

What each precision and kernel needs of a GPU is written here once (``MIN_SM``), for the stages, the engine builders
and their runners alike.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fluxtrt.errors import DeviceError

# The smallest compute capability (as 89 for 8.9) with tensor cores for each low precision, and for FP8 attention
# (FlashAttention 3 and cuDNN's FP8 SDPA are Hopper kernels).
MIN_SM = {"fp8": 89, "fp4": 100, "fp8_attention": 90}


def package_version(package: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def fluxtrt_commit() -> str | None:
    """The git commit of the fluxtrt checkout, or ``FLUXTRT_COMMIT`` where the tree has no .git."""
    if os.environ.get("FLUXTRT_COMMIT"):
        return os.environ["FLUXTRT_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def check_device(device: str) -> None:
    """Raise DeviceError if the torch device ``device`` (``cpu``, ``cuda``, ``cuda:1``) cannot run here."""
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"--device {device} was asked for but this machine has no CUDA device visible to PyTorch "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): use --device cpu or install a CUDA build"
        )


def available_memory(device: str) -> int | None:
    """Bytes ``device`` can still allocate, or None where that cannot be read.

    On the host: MemAvailable of /proc/meminfo (what can be allocated without swapping), capped by the cgroup's
    memory.max less its memory.current in a container; elsewhere the free physical pages. On CUDA: the GPU's free
    memory plus what PyTorch's caching allocator holds unused (a model released earlier in the process leaves its
    memory there, for the next one).
    """
    if str(device).startswith("cuda"):
        import torch

        dev = torch.device(device)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return torch.cuda.mem_get_info(dev)[0] + cached
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        with contextlib.suppress(OSError, ValueError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(found) if found else None


def check_memory(needed: int, device: str, what: str, fix: str) -> None:
    """Raise DeviceError, before anything is allocated, when ``device`` has less than ``needed`` bytes available.

    Args:
        needed: bytes the work needs.
        device: ``cpu`` or a CUDA device.
        what: what needs them, for the message ("--model random-full in fp32").
        fix: what to do instead.
    """
    free = available_memory(device)
    if free is not None and free < needed:
        where = "of GPU memory" if str(device).startswith("cuda") else "of memory"
        raise DeviceError(
            f"{what} needs about {needed / 2**30:.1f} GiB {where} on {device}, but {free / 2**30:.1f} GiB is "
            f"available: {fix}"
        )


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA GPU: its name and compute capability (``sm``, as 90 for 9.0)."""

    name: str
    sm: int


def gpu_info(device: Any = "cuda") -> GpuInfo:
    """The GPU behind ``device``.

    Raises:
        DeviceError: torch sees no CUDA GPU.
    """
    import torch

    check_device("cuda")
    dev = torch.device(device)
    props = torch.cuda.get_device_properties(dev.index if dev.index is not None else torch.cuda.current_device())
    return GpuInfo(props.name, props.major * 10 + props.minor)


@dataclass(frozen=True)
class DeviceEnvironment:
    """What code compiled for a device is tied to: the torch build, the device type and, on CUDA, the GPU's name and
    compute capability (``sm``, as 90)."""

    torch: str
    device: str
    gpu: str | None = None
    sm: int | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> DeviceEnvironment:
        """As ``to_json`` writes it; an SM written as a string (``"90"``, manifests of format 1 and 2) is read as
        the integer."""
        sm = raw.get("sm")
        return cls(str(raw["torch"]), str(raw["device"]), raw.get("gpu"), int(sm) if sm is not None else None)

    def to_json(self) -> dict[str, Any]:
        """``{"torch", "device"}``, with ``"gpu"`` and ``"sm"`` on CUDA."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def device_environment(device: Any) -> DeviceEnvironment:
    """What code compiled for ``device`` is tied to: the torch build, the device type and, on CUDA, GPU and SM."""
    import torch

    kind = torch.device(device).type
    if kind != "cuda":
        return DeviceEnvironment(torch.__version__, kind)
    gpu = gpu_info(device)
    return DeviceEnvironment(torch.__version__, kind, gpu.name, gpu.sm)


def require_sm(sm: str | int, need: str, fix: str, feature: str | None = None) -> None:
    """Raise DeviceError unless compute capability ``sm`` (as ``"90"`` or 90) runs ``need`` (a key of MIN_SM).

    Args:
        sm: the GPU's (or an engine target's) compute capability.
        need: ``fp8``, ``fp4`` or ``fp8_attention``.
        fix: what the user can do instead, ending the message.
        feature: how the message names what needs it (default: from ``need``, e.g. "FP8").
    """
    want, have = MIN_SM[need], int(sm)
    if have < want:
        raise DeviceError(
            f"{feature or _feature(need)} needs compute capability {want // 10}.{want % 10} or newer, this one is "
            f"{have // 10}.{have % 10}: {fix}"
        )


def require_cuda_sm(device: Any, need: str, fix: str, feature: str | None = None) -> None:
    """``require_sm`` for a torch device, with a DeviceError naming the fix when it is no CUDA device."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        what = feature or _feature(need)
        verb = "are" if what.endswith("s") else "is"  # "FP8 linears are", "FP8 attention is"
        raise DeviceError(f"{what} {verb} unavailable on {dev.type}: it needs a CUDA GPU; run with --device cuda")
    require_sm(gpu_info(dev).sm, need, fix, feature)


def _feature(need: str) -> str:
    return {"fp8": "FP8", "fp4": "FP4", "fp8_attention": "FP8 attention"}[need]


def environment() -> dict[str, Any]:
    """GPU, driver, CUDA, cuDNN, library versions and the fluxtrt commit."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "tensorrt": package_version("tensorrt"),
        "tensorrt_rtx": package_version("tensorrt-rtx"),
        "onnxruntime": package_version("onnxruntime"),
        "fluxtrt_commit": fluxtrt_commit(),
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = gpu_info("cuda:0")
        env.update(gpu=gpu.name, sm=str(gpu.sm), gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def free_device_memory() -> None:
    """Collect garbage and return cached CUDA memory to the driver."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
