"""zo_adam_update_ (full directions) and lowrank_zo_adam_update_ on every device and backend against
heron.kernels.reference: Adam and AdamW, q = 1 and 3, three dtypes, params off a 16-byte boundary,
empty params. The moments are float32. Tolerances: tests/helpers.assert_close_to_reference (elementwise).
"""

from __future__ import annotations

import pytest
import torch

from heron.kernels import reference
from tests.helpers import (
    BIAS_OFFSET,
    DEVICE_BACKENDS,
    DTYPES,
    assert_close_to_reference,
    param_inputs,
    run_op,
    sized_cases,
)
from tests.kernels.test_zo_sgd_update import lowrank, misaligned

# (shape, rank): full and low-rank directions; the interpreter and the reference take the small cases
CASES = [((1025,), 0), ((17, 97), 0), ((2, 3, 17), 0), ((17, 97), 4), ((3, 1025), 8), ((1025, 3), 1),
         ((97, 1025), 8)]
SMALL_CASES = [((33,), 0), ((3, 5, 7), 0), ((17, 33), 1), ((33, 3), 4), ((1, 17), 8)]


def hyper(decoupled: bool) -> dict:
    return {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.05, "step": 3,
            "decoupled_weight_decay": decoupled}


def check(device_type: str, backend: str, shape, dtype, q: int, rank: int, decoupled: bool, *,
          offset_by_one: bool = False) -> None:
    param, seeds, grads = param_inputs(shape, dtype, device_type, q=q)
    generator = torch.Generator().manual_seed(1)
    exp_avg = (0.1 * torch.randn(shape, generator=generator)).to(device_type)
    exp_avg_sq = (0.01 * torch.rand(shape, generator=generator)).to(device_type)
    start = param.float().cpu()
    want_p, want_m, want_v = reference.zo_adam_update(
        start, exp_avg.cpu(), exp_avg_sq.cpu(), seeds.tolist(), grads.tolist(), offset=BIAS_OFFSET,
        lowrank=lowrank(rank), **hyper(decoupled))
    got_p = misaligned(param) if offset_by_one else param.clone()
    got_m, got_v = exp_avg.clone(), exp_avg_sq.clone()
    tensors = {"param": got_p, "exp_avg": got_m, "exp_avg_sq": got_v, "seeds": seeds, "grads": grads}
    if rank == 0:
        run_op("zo_adam_update_", device_type, backend, **tensors, offset=BIAS_OFFSET, **hyper(decoupled))
    else:
        run_op("lowrank_zo_adam_update_", device_type, backend, **tensors, **lowrank(rank), **hyper(decoupled))
    assert got_p.dtype == dtype and got_m.dtype == got_v.dtype == torch.float32
    assert_close_to_reference(got_p, want_p, want_p.to(dtype), elementwise=True, what="param")
    assert_close_to_reference(got_m, want_m, elementwise=True, what="exp_avg")
    assert_close_to_reference(got_v, want_v, elementwise=True, atol=1e-8, what="exp_avg_sq")


@pytest.mark.parametrize(("device_type", "backend", "case"), sized_cases(CASES, SMALL_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_zo_adam_update(device_type, backend, case, dtype, q, decoupled):
    shape, rank = case
    check(device_type, backend, shape, dtype, q, rank, decoupled)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [0, 4])
def test_param_off_a_16_byte_boundary(device_type, backend, dtype, rank):
    check(device_type, backend, (17, 97), dtype, 3, rank, True, offset_by_one=True)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("shape", "rank"), [((0,), 0), ((0, 5), 3)])
def test_empty_param(device_type, backend, shape, rank):
    check(device_type, backend, shape, torch.float32, 2, rank, True)
