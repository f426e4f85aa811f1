"""Which kernel backends exist on this machine, and the choice of one for a device.

Backends:
  "triton"  heron_kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  "cuda"    heron._C CUDA C++ kernels (CUDA tensors; needs a CUDA build of the extension)
  "cpu"     heron._C C++ kernels, OpenMP + SIMD (CPU tensors)
  "torch"   heron.kernels.reference, plain PyTorch; any device, nothing compiled, the last fallback
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")
# Preference order when the caller does not name a backend.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailableError(RuntimeError):
    """A named backend cannot run here (not built, not installed, or wrong device)."""


_LOADED: dict[str, tuple[ModuleType | None, str]] = {}


def _load(module_name: str) -> tuple[ModuleType | None, str]:
    """(module, "") once imported, or (None, why the import failed); cached per name."""
    if module_name not in _LOADED:
        try:
            _LOADED[module_name] = importlib.import_module(module_name), ""
        except Exception as error:  # noqa: BLE001 - any import failure means "not available"
            _LOADED[module_name] = None, f"{type(error).__name__}: {error}"
    return _LOADED[module_name]


def extension() -> ModuleType | None:
    """The compiled heron._C module, or None when it was not built."""
    return _load("heron._C")[0]


def triton_kernels() -> ModuleType | None:
    """The heron_kernels package, or None when triton cannot be imported."""
    return _load("heron_kernels")[0]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None when `backend` can run on `device_type`, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        if triton_kernels() is None:
            return f"triton cannot be imported ({_load('heron_kernels')[1]})"
        if device_type == "cpu" and not triton_interpreted():
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
        return None
    ext = extension()
    if ext is None:
        return f"the compiled extension heron._C is not built ({_load('heron._C')[1]})"
    if backend == "cpu":
        return None if device_type == "cpu" else f"backend 'cpu' runs on CPU tensors, got a {device_type} tensor"
    if backend == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got a {device_type} tensor"
        if not getattr(ext, "with_cuda", False):
            return "heron._C was built without CUDA (set HERON_BUILD_CUDA=1 with a CUDA torch and nvcc)"
        return None
    raise AssertionError(backend)


def available(device_type: str) -> list[str]:
    """Backends that can run on tensors of `device_type`, best first."""
    order = _AUTO_ORDER.get(device_type, ("torch",))
    extra = [b for b in BACKENDS if b not in order]
    return [b for b in (*order, *extra) if unavailable_reason(b, device_type) is None]


def resolve(backend: str | None, device: torch.device, *, argument: str = "backend") -> str:
    """The backend to use for tensors on `device`: `backend` checked, or the best available."""
    if device.type not in SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"device must be one of {SUPPORTED_DEVICE_TYPES}, got {device}")
    if backend is None or backend == "auto":
        for name in _AUTO_ORDER[device.type]:
            if unavailable_reason(name, device.type) is None:
                return name
        raise AssertionError("the torch backend is always available")
    if backend not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS} or None, got {backend!r}")
    reason = unavailable_reason(backend, device.type)
    if reason is not None:
        raise BackendUnavailableError(f"{argument}={backend!r} is not available on {device}: {reason}")
    return backend
