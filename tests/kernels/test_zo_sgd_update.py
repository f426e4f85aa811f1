"""zo_sgd_update_ (full directions) and lowrank_zo_sgd_update_ on every device and backend against
heron.kernels.reference: q = 1 and 3 directions, three dtypes, 1-D to 3-D params, params starting off a
16-byte boundary, ranks across the CUDA rank chunk (32), no directions (weight decay only), empty params.
Tolerances: tests/helpers.assert_close_to_reference (elementwise).
"""

from __future__ import annotations

import pytest
import torch

from heron.kernels import reference
from tests.helpers import (
    DEVICE_BACKENDS,
    DTYPES,
    LOWRANK_KEYS,
    WEIGHT_OFFSET,
    assert_close_to_reference,
    interpreted,
    param_inputs,
    run_op,
    sized_cases,
)

FULL_SHAPES = [(1,), (3,), (17,), (97,), (1025,), (17, 97), (3, 1025), (2, 3, 17)]
LOWRANK_SHAPES = [(1, 1), (17, 97), (97, 3), (1, 1025), (1025, 3), (97, 1025)]
SMALL_FULL_SHAPES = [(33,), (3, 5, 7), (17, 33)]
SMALL_LOWRANK_SHAPES = [(17, 33), (33, 3), (1, 17)]
RANKS = [1, 4, 8]
HYPER = {"lr": 0.05, "weight_decay": 0.01}


def misaligned(param: torch.Tensor) -> torch.Tensor:
    """A copy of param that starts one element into its buffer (a contiguous view at storage offset 1)."""
    buffer = torch.empty(param.numel() + 1, dtype=param.dtype, device=param.device)
    view = buffer[1:].view(param.shape)
    view.copy_(param)
    return view


def lowrank(rank: int) -> dict | None:
    return None if rank == 0 else {"rank": rank, **LOWRANK_KEYS}


def check(device_type: str, backend: str, shape, dtype, q: int, rank: int, *, offset_by_one: bool = False) -> None:
    """One update through the op against reference.zo_sgd_update on the float32 param."""
    param, seeds, grads = param_inputs(shape, dtype, device_type, q=q)
    start = param.float().cpu()
    want = reference.zo_sgd_update(start, seeds.tolist(), grads.tolist(), offset=WEIGHT_OFFSET, lowrank=lowrank(rank),
                                   **HYPER)
    got = misaligned(param) if offset_by_one else param.clone()
    if rank == 0:
        result = run_op("zo_sgd_update_", device_type, backend, param=got, seeds=seeds, grads=grads,
                        offset=WEIGHT_OFFSET, **HYPER)
    else:
        result = run_op("lowrank_zo_sgd_update_", device_type, backend, param=got, seeds=seeds, grads=grads,
                        **lowrank(rank), **HYPER)
    assert result is None and got.dtype == dtype
    assert_close_to_reference(got, want, want.to(dtype), elementwise=True, what="param")


@pytest.mark.parametrize(("device_type", "backend", "shape"), sized_cases(FULL_SHAPES, SMALL_FULL_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q", [1, 3])
def test_zo_sgd_update(device_type, backend, shape, dtype, q):
    check(device_type, backend, shape, dtype, q, 0)


@pytest.mark.parametrize(("device_type", "backend", "shape"), sized_cases(LOWRANK_SHAPES, SMALL_LOWRANK_SHAPES))
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q", [1, 3])
def test_lowrank_zo_sgd_update(device_type, backend, shape, rank, dtype, q):
    check(device_type, backend, shape, dtype, q, rank)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [0, 4])
def test_param_off_a_16_byte_boundary(device_type, backend, dtype, rank):
    """A param one element into its buffer (the CUDA kernels' scalar path) updates like an aligned one."""
    check(device_type, backend, (17, 97), dtype, 3, rank, offset_by_one=True)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("rank", [31, 32, 33, 70])
def test_ranks_around_the_cuda_rank_chunk(device_type, backend, rank):
    """Ranks around the CUDA low-rank update's rank chunk (32)."""
    if interpreted(device_type, backend):
        pytest.skip("too slow for the interpreter")
    check(device_type, backend, (65, 130), torch.float32, 3, rank)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
def test_no_directions_is_weight_decay_only(device_type, backend):
    check(device_type, backend, (33, 17), torch.float32, 0, 0)


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize(("shape", "rank"), [((0,), 0), ((0, 5), 3)])
def test_empty_param(device_type, backend, shape, rank):
    check(device_type, backend, shape, torch.float32, 2, rank)
