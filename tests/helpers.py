"""Shared test helpers: backend lists and dtype-aware closeness."""

from __future__ import annotations

import pytest
import torch

from heron import backends

# Launcher names per op for each compiled/Triton backend (docs/kernels.md).
OPS = ("perturbed_linear", "lora_perturbed_linear", "zo_sgd_update_", "zo_adam_update_", "perturb_")


def op_available(backend: str, device_type: str, op: str) -> bool:
    if backends.unavailable_reason(backend, device_type) is not None:
        return False
    if backend == "torch":
        return True
    if backend == "triton":
        return hasattr(backends.triton_kernels(), op)
    suffix = "_cpu" if backend == "cpu" else "_cuda"
    return hasattr(backends.extension(), op.rstrip("_") + suffix)


CPU_BACKENDS = [b for b in ("cpu", "triton", "torch") if b in backends.available("cpu")]
GPU_BACKENDS = ["triton", "cuda", "torch"]
# (device type, backend) pairs: the CPU backends this machine has, every GPU backend marked gpu
DEVICE_BACKENDS = [pytest.param("cpu", b) for b in CPU_BACKENDS] + [
    pytest.param("cuda", b, marks=[pytest.mark.gpu]) for b in GPU_BACKENDS]


def skip_unavailable(device_type: str, backend: str) -> None:
    """Skip the calling test when `backend` cannot run on `device_type` here."""
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reason = backends.unavailable_reason(backend, device_type)
    if reason:
        pytest.skip(reason)


def cpu_backends(op: str) -> list[str]:
    return [b for b in ("cpu", "triton", "torch") if op_available(b, "cpu", op)]


def assert_close_like_torch(got: torch.Tensor, reference: torch.Tensor, torch_lowp: torch.Tensor | None,
                            *, fp32_rtol: float = 1e-4) -> None:
    """got vs the float32 reference: float32 within fp32_rtol of the output scale; low precision
    no looser than twice the error of the same computation done by PyTorch at that dtype."""
    assert got.shape == reference.shape and got.dtype == reference.dtype
    scale = reference.float().abs().max().item() + 1e-6
    error = (got.float() - reference.float()).abs().max().item()
    if got.dtype == torch.float32:
        assert error <= fp32_rtol * scale, f"max error {error:.3g} > {fp32_rtol} * scale {scale:.3g}"
        return
    assert torch_lowp is not None
    torch_error = (torch_lowp.float() - reference.float()).abs().max().item()
    ulp = torch.finfo(got.dtype).eps * scale
    assert error <= 2 * torch_error + ulp, f"max error {error:.3g} > 2 * torch's {torch_error:.3g} + ulp {ulp:.3g}"


def reference_direction(updater, step: int = 0, j: int = 0) -> dict[str, torch.Tensor]:
    """Direction j of `updater`'s step `step` materialised, by parameter name: U V^T / sqrt(r) on
    the (out, -1) matrix of each low-rank weight (U keyed by the step's u_seed), the full
    Gaussian z elsewhere."""
    import math

    from heron import functional, reference

    seed = updater.direction_seeds(step)[j]
    direction = {}
    for entry in updater.layout:
        if entry.name not in updater.lowrank_names:
            direction[entry.name] = updater.layout.direction(entry.name, seed)
            continue
        rows, cols = entry.shape[0], math.prod(entry.shape[1:])
        rank = min(updater.rank, rows, cols)
        u_offset, v_offset = functional.lowrank_offsets(entry.offset, rows, rank)
        u, v = reference.lowrank_factors(rows, cols, rank, seed=seed, u_seed=updater.u_seed(step), u_offset=u_offset,
                                         v_offset=v_offset, device="cpu")
        direction[entry.name] = reference.lowrank_direction(u, v).reshape(entry.shape)
    return direction
