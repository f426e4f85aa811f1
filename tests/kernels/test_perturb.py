"""perturb_ on every device and backend against heron.kernels.reference: 1-D to 3-D params, three
dtypes, params off a 16-byte boundary; the direction is the stream; +alpha then -alpha restores the
param up to rounding. Tolerances: tests/helpers.assert_close_to_reference (elementwise).
"""

from __future__ import annotations

import pytest
import torch

import heron
from heron.kernels import reference
from tests.helpers import (
    DEVICE_BACKENDS,
    DTYPES,
    SEED,
    assert_close_to_reference,
    param_inputs,
    run_op,
    sized_cases,
    small_cases,
)
from tests.kernels.test_zo_sgd_update import misaligned

OP = "perturb_"
SHAPES = [(1,), (3,), (17,), (97,), (1025,), (17, 97), (3, 1025), (2, 3, 17)]
SMALL_SHAPES = [(1,), (33,), (3, 5, 7), (17, 33)]
OFFSET, ALPHA = 2**37 + 1, -0.3


@pytest.mark.parametrize(("device_type", "backend", "shape"), sized_cases(SHAPES, SMALL_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset_by_one", [False, True], ids=["aligned", "misaligned"])
def test_perturb(device_type, backend, shape, dtype, offset_by_one):
    param = param_inputs(shape, dtype, device_type)[0]
    want = reference.perturb(param.float().cpu(), SEED, OFFSET, ALPHA)
    got = misaligned(param) if offset_by_one else param.clone()
    assert run_op(OP, device_type, backend, param=got, seed=SEED, offset=OFFSET, alpha=ALPHA) is None
    assert_close_to_reference(got, want, want.to(dtype), elementwise=True, what="param")


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
def test_direction_is_the_stream(device_type, backend):
    param = torch.zeros(5, 7, device=device_type)
    run_op(OP, device_type, backend, param=param, seed=SEED, offset=OFFSET, alpha=1.0)
    torch.testing.assert_close(param.cpu(), heron.seeded_randn((5, 7), SEED, OFFSET), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
def test_perturb_then_unperturb_is_close_to_identity(device_type, backend):
    param = param_inputs((30, 257) if small_cases(device_type, backend) else (300, 257), torch.float32,
                         device_type)[0]
    got = param.clone()
    run_op(OP, device_type, backend, param=got, seed=5, offset=2**33, alpha=1e-3)
    run_op(OP, device_type, backend, param=got, seed=5, offset=2**33, alpha=-1e-3)
    torch.testing.assert_close(got, param, rtol=0, atol=1e-6)
