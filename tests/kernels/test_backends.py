"""heron.kernels.backends: which backends run here, the choice of one for a device, and the errors
that name the argument, what it got and why a backend cannot run."""

from __future__ import annotations

import pytest
import torch

from heron.kernels import backends


@pytest.fixture
def without(monkeypatch):
    """without(module_name): that module fails to import for the rest of the test."""
    def hide(module_name: str) -> None:
        monkeypatch.setitem(backends._LOADED, module_name, (None, "ModuleNotFoundError: hidden by the test"))
    return hide


def test_auto_prefers_the_compiled_kernels_on_cpu():
    assert backends.resolve(None, torch.device("cpu")) == backends.available("cpu")[0]
    assert backends.resolve("auto", torch.device("cpu")) == backends.resolve(None, torch.device("cpu"))
    if backends.extension() is not None:
        assert backends.resolve(None, torch.device("cpu")) == "cpu"


def test_auto_falls_back_to_torch_when_nothing_is_built(without):
    without("heron._C")
    assert backends.resolve(None, torch.device("cpu")) == "torch"
    assert backends.available("cpu")[0] == "torch" and "cpu" not in backends.available("cpu")


def test_auto_on_cuda_falls_back_to_torch(without):
    """Without a GPU, availability on "cuda" is what the modules allow; with neither module, torch."""
    without("heron._C")
    without("heron_kernels")
    assert backends.resolve(None, torch.device("cuda")) == "torch"
    assert backends.available("cuda") == ["torch"]


def test_named_backend_is_checked(without):
    with pytest.raises(ValueError, match=r"backend must be one of \('triton', 'cuda', 'cpu', 'torch'\) or None, "
                                         r"got 'mkl'"):
        backends.resolve("mkl", torch.device("cpu"))
    with pytest.raises(ValueError, match="my_arg must be one of"):
        backends.resolve("mkl", torch.device("cpu"), argument="my_arg")
    with pytest.raises(backends.BackendUnavailableError, match="backend='cuda' is not available on cpu: backend "
                                                               "'cuda' runs on CUDA tensors, got a cpu tensor"):
        backends.resolve("cuda", torch.device("cpu"))
    without("heron._C")
    with pytest.raises(backends.BackendUnavailableError, match="heron._C is not built .ModuleNotFoundError: hidden"):
        backends.resolve("cpu", torch.device("cpu"))


def test_unsupported_device_is_named():
    with pytest.raises(ValueError, match="device must be one of \\('cpu', 'cuda'\\), got meta"):
        backends.resolve(None, torch.device("meta"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if backends.triton_kernels() is None:
        pytest.skip("triton cannot be imported")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backends.unavailable_reason("triton", "cpu")
    assert backends.unavailable_reason("triton", "cuda") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.unavailable_reason("triton", "cpu") is None


def test_cuda_backend_needs_a_cuda_build(monkeypatch):
    ext = backends.extension()
    if ext is None:
        pytest.skip("extension not built")
    monkeypatch.setattr(ext, "with_cuda", False)
    assert "built without CUDA" in backends.unavailable_reason("cuda", "cuda")
    assert backends.unavailable_reason("cpu", "cuda") == "backend 'cpu' runs on CPU tensors, got a cuda tensor"
    assert backends.unavailable_reason("torch", "cuda") is None


def test_a_failed_import_is_reported_once_and_cached():
    first = backends._load("heron_no_such_module")
    assert first[0] is None and first[1].startswith("ModuleNotFoundError")
    assert backends._load("heron_no_such_module") is first
