"""The environment block every report records: versions, platform and the kernel backends here."""

from __future__ import annotations

import platform
from typing import Any

import torch

from heron.kernels import backends


def environment() -> dict[str, Any]:
    """{"python", "torch", "platform", "cpu_backends", "cuda_device"} of this process."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_backends": backends.available("cpu"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
