"""philox_randn_ beyond the stream contract every backend meets (tests/kernels/test_stream.py, normals
within 1e-5): the C++ CPU generator (SIMD log/cos) stays within 1e-6 of the reference, at every length
(every SIMD tail), and its bfloat16 / float16 output is the rounded float32 normal."""

from __future__ import annotations

import pytest
import torch

from heron.kernels import reference
from tests.helpers import run_op

OP = "philox_randn_"


def cpu_randn(n: int, seed: int, offset: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = torch.empty(n, dtype=dtype)
    run_op(OP, "cpu", "cpu", out=out, seed=seed, offset=offset)
    return out


def test_cpu_randn_matches_reference_within_1e6():
    n = 10**6 + 3
    seed, offset = 2**40 + 7, 2**33 - 500_000  # the counter's low word wraps inside the range
    assert (cpu_randn(n, seed, offset) - reference.randn(seed, offset, n)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_randn_low_precision_is_the_rounded_normal(dtype):
    n = 4099
    want = reference.randn(2**33 + 1, 2**32 - 7, n)
    torch.testing.assert_close(cpu_randn(n, 2**33 + 1, 2**32 - 7, dtype).float(), want.to(dtype).float(),
                               rtol=torch.finfo(dtype).eps, atol=6e-8)


def test_cpu_randn_every_length_matches_reference():
    for n in range(1, 41):
        assert (cpu_randn(n, 2**40 + 3, 2**32 - 20) - reference.randn(2**40 + 3, 2**32 - 20, n)).abs().max() <= 1e-6, n
