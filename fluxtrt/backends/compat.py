"""Whether an engine built in one environment can run in another: one rule for every backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# key of a recorded environment -> how a message names it
KEY_NAMES = {
    "tensorrt": "TensorRT",
    "tensorrt_rtx": "TensorRT-RTX",
    "torch": "torch",
    "device": "device",
    "sm": "SM",
    "gpu": "GPU",
}


def incompatibility(recorded: Mapping[str, Any], current: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    """Why an engine built in ``recorded`` cannot run in ``current``, comparing ``keys`` in order; None if it can.

    A key absent from both is skipped (a CPU build records no GPU). A plan or package runs only under the library
    version that built it; one for another SM has no kernels for this GPU, and one built on another GPU of the same
    SM was tuned for that GPU (refused too, so timings stay honest).

    Returns:
        e.g. "was built with torch 2.11.0+cu130 but this is torch 2.13.0+cpu".
    """
    for key in keys:
        if key not in current and key not in recorded:
            continue
        have, now = recorded.get(key), current.get(key)
        if have != now:
            what = KEY_NAMES.get(key, key)
            return f"was built with {what} {have} but this is {what} {now}"
    return None
