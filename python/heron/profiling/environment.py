"""The environment block every report records: versions, platform, threads, the allocator and the kernel
backends here (timings depend on all of them)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from heron.kernels import backends

# Shared-library name fragments of the malloc replacements a run may preload (LD_PRELOAD), by allocator.
_ALLOCATOR_LIBRARIES = {"jemalloc": "libjemalloc", "tcmalloc": "libtcmalloc"}


def allocator_of(maps: str) -> str:
    """The malloc implementation of a process whose /proc/<pid>/maps text is `maps`: "jemalloc" or
    "tcmalloc" when that library is mapped, else "glibc"."""
    for name, library in _ALLOCATOR_LIBRARIES.items():
        if library in maps:
            return name
    return "glibc"


def _allocator() -> str:
    try:
        with open("/proc/self/maps") as handle:
            return allocator_of(handle.read())
    except OSError:  # not Linux: the platform's own malloc
        return "system"


def environment() -> dict[str, Any]:
    """{"python", "torch", "platform", "threads", "allocator", "malloc_conf", "cpu_backends",
    "cuda_device"} of this process."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "allocator": _allocator(),
        "malloc_conf": os.environ.get("MALLOC_CONF"),
        "cpu_backends": backends.available("cpu"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
