"""torch.library registration: opcheck and torch.compile over heron's ops."""

from __future__ import annotations

import pytest
import torch

import heron
from heron.kernels import backends

CPU_BACKENDS = [b for b in ("cpu", "torch") if b in backends.available("cpu")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_philox_randn(backend, dtype):
    out = torch.empty(37, 5, dtype=dtype)
    torch.library.opcheck(torch.ops.heron.philox_randn_.default, (out, 3, 2**33, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_philox_words(backend):
    out = torch.empty(19, 4, dtype=torch.int32)
    torch.library.opcheck(torch.ops.heron.philox_words_.default, (out, 2**40, 7, backend))


def test_compiled_matches_eager():
    def direction_dot(x):
        z = heron.seeded_randn(x.shape, 11, 2**34)
        return (x * z).sum()

    x = torch.randn(64, 3)
    compiled = torch.compile(direction_dot, fullgraph=True)
    torch.testing.assert_close(compiled(x), direction_dot(x))
