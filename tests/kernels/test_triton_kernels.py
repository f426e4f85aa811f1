"""Triton launchers (heron_kernels) against heron.kernels.reference, on CPU tensors through the interpreter.

Linear ops: float32 within 1e-4 of the output scale; bfloat16/float16 no worse than twice the error of
the same computation done in PyTorch at that dtype (both measured against the float32 reference).
Updates: float32 within 1e-6 relative; low-precision parameters within one ulp of the reference.
Seeds and offsets are above 2**32 so the high Philox key and counter words are exercised.
"""

from __future__ import annotations

import math

import pytest
import torch

import heron
import heron_kernels as hk
from heron.kernels import reference as ref
from heron_kernels import linear as hk_linear
from heron_kernels import updates as hk_updates

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 3, 17), (3, 17, 33), (17, 33, 1), (33, 1, 3)]  # (M, N, K)
RANKS = [1, 4, 8]
SEED = 2**40 + 12345
U_SEED = 2**45 + 7
OFFSET = 2**33 + 17
HIGH_OFFSET = 2**61 + 5
MU = 0.25
SCALE = 0.75


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def _inputs(shape, dtype, shared, with_bias):
    """x (M, K), x_pert (M, K) or None, W (N, K), b (N,) or None, in `dtype`."""
    M, N, K = shape
    x = _randn(M, K, dtype=dtype)
    x_pert = None if shared else _randn(M, K, dtype=dtype)
    return x, x_pert, _randn(N, K, dtype=dtype), _randn(N, dtype=dtype) if with_bias else None


def _direction(seed: int, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
    return ref.direction(seed, offset, shape, "cpu").to(dtype)


def _linear(x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def _assert_linear_close(outputs, truth, torch_lowp, dtype):
    """outputs/torch_lowp in `dtype`, truth float32; see the module docstring for the tolerances."""
    for out, expected, lowp in zip(outputs, truth, torch_lowp, strict=True):
        assert out.dtype == dtype and out.shape == expected.shape
        scale = max(expected.float().abs().max().item(), 1.0)
        err = (out.float() - expected.float()).abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-4 * scale, (err, scale)
        else:
            torch_err = (lowp.float() - expected.float()).abs().max().item()
            assert err <= max(2 * torch_err, 1e-6 * scale), (err, torch_err)


# ------------------------------------------------------------------------------------------------
# perturbed_linear, full direction
# ------------------------------------------------------------------------------------------------

def _full_torch_lowp(x, x_pert, w, b, *, seed, weight_offset, bias_offset, mu):
    """The full-direction perturbed linear done in PyTorch at x's dtype."""
    xp = x if x_pert is None else x_pert
    z = _direction(seed, weight_offset, w.shape, w.dtype)
    b_pert = None if b is None else b + mu * _direction(seed, bias_offset, b.shape, b.dtype)
    return _linear(x, w, b), _linear(xp, w + mu * z, b_pert)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_perturbed_linear_full(shape, dtype, shared, with_bias):
    x, x_pert, w, b = _inputs(shape, dtype, shared, with_bias)
    keys = {"seed": SEED, "bias_offset": HIGH_OFFSET, "mu": MU}
    out = hk.perturbed_linear(x, x_pert, w, b, weight_offset=OFFSET, **keys)
    truth = ref.perturbed_linear(x.float(), w.float(), None if b is None else b.float(), offset=OFFSET,
                                 x_pert=None if shared else x_pert.float(), **keys)
    lowp = _full_torch_lowp(x, x_pert, w, b, weight_offset=OFFSET, **keys)
    _assert_linear_close(out, truth, lowp, dtype)


# ------------------------------------------------------------------------------------------------
# perturbed_linear, low-rank direction
# ------------------------------------------------------------------------------------------------

def _lowrank_torch_lowp(x, x_pert, w, b, *, rank, seed, u_seed, u_offset, v_offset, bias_offset, mu):
    """The low-rank perturbed linear done in PyTorch at x's dtype (Z = U V.T / sqrt(r) at that dtype)."""
    dtype = x.dtype
    xp = x if x_pert is None else x_pert
    u = _direction(u_seed, u_offset, (w.shape[0], rank), dtype)
    v = _direction(seed, v_offset, (w.shape[1], rank), dtype)
    z = (u @ v.T) / math.sqrt(rank)
    b_pert = None if b is None else b + mu * _direction(seed, bias_offset, b.shape, dtype)
    return _linear(x, w, b), _linear(xp, w + mu * z, b_pert)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_perturbed_linear_lowrank(shape, rank, dtype, shared):
    with_bias = rank != 4
    x, x_pert, w, b = _inputs(shape, dtype, shared, with_bias)
    keys = {"seed": SEED, "u_seed": U_SEED, "u_offset": HIGH_OFFSET, "v_offset": OFFSET,
            "bias_offset": OFFSET + 3, "mu": MU}
    out = hk.perturbed_linear(x, x_pert, w, b, weight_offset=0, rank=rank, **keys)
    truth = ref.lowrank_perturbed_linear(x.float(), w.float(), None if b is None else b.float(), rank=rank,
                                         x_pert=None if shared else x_pert.float(), **keys)
    lowp = _lowrank_torch_lowp(x, x_pert, w, b, rank=rank, **keys)
    _assert_linear_close(out, truth, lowp, dtype)


# ------------------------------------------------------------------------------------------------
# lora_perturbed_linear
# ------------------------------------------------------------------------------------------------

def _lora_torch_lowp(x, x_pert, w, b, a, b_mat, *, scale, seed, a_offset, b_offset, mu):
    """The LoRA perturbed linear done in PyTorch at x's dtype."""
    xp = x if x_pert is None else x_pert
    a_pert = a + mu * _direction(seed, a_offset, a.shape, a.dtype)
    b_pert = b_mat + mu * _direction(seed, b_offset, b_mat.shape, b_mat.dtype)
    y_base = _linear(x, w, b) + scale * (x @ a.T) @ b_mat.T
    y_pert = _linear(xp, w, b) + scale * (xp @ a_pert.T) @ b_pert.T
    return y_base, y_pert


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_lora_perturbed_linear(shape, rank, dtype, shared):
    with_bias = rank != 1
    x, x_pert, w, b = _inputs(shape, dtype, shared, with_bias)
    a, b_mat = _randn(rank, shape[2], dtype=dtype), _randn(shape[1], rank, dtype=dtype)
    keys = {"scale": SCALE, "seed": SEED, "a_offset": HIGH_OFFSET, "b_offset": OFFSET, "mu": MU}
    out = hk.lora_perturbed_linear(x, x_pert, w, b, a, b_mat, **keys)
    truth = ref.lora_perturbed_linear(x.float(), w.float(), None if b is None else b.float(), a.float(),
                                      b_mat.float(), x_pert=None if shared else x_pert.float(), **keys)
    lowp = _lora_torch_lowp(x, x_pert, w, b, a, b_mat, **keys)
    _assert_linear_close(out, truth, lowp, dtype)


# ------------------------------------------------------------------------------------------------
# The direction inside the GEMMs is the stream (heron.seeded_randn), independent of tiles
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [True, False])
def test_full_direction_is_seeded_randn(shared):
    """x = I and mu = 1: y_pert - y_base = Z.T; x = 0: y_pert - y_base = z_b."""
    N, K = 33, 17
    w, b = torch.randn(N, K), torch.randn(N)
    eye = torch.eye(K)
    y_base, y_pert = hk.perturbed_linear(eye, None if shared else eye.clone(), w, None, seed=SEED,
                                         weight_offset=HIGH_OFFSET, bias_offset=0, mu=1.0)
    z = heron.seeded_randn((N, K), SEED, HIGH_OFFSET)
    torch.testing.assert_close(y_pert - y_base, z.T, rtol=0, atol=1e-5)
    zero = torch.zeros(1, K)
    y_base, y_pert = hk.perturbed_linear(zero, None if shared else zero.clone(), w, b, seed=SEED,
                                         weight_offset=0, bias_offset=OFFSET, mu=1.0)
    torch.testing.assert_close((y_pert - y_base)[0], heron.seeded_randn(N, SEED, OFFSET), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 4])
def test_lowrank_direction_is_seeded_randn(rank):
    """x = I and mu = 1: y_pert - y_base = (U V.T / sqrt(rank)).T with U, V from heron.seeded_randn."""
    N, K = 17, 33
    w = torch.randn(N, K)
    eye = torch.eye(K)
    y_base, y_pert = hk.perturbed_linear(eye, None, w, None, seed=SEED, weight_offset=0, bias_offset=0, mu=1.0,
                                         rank=rank, u_seed=U_SEED, u_offset=OFFSET, v_offset=HIGH_OFFSET)
    u = heron.seeded_randn((N, rank), U_SEED, OFFSET)
    v = heron.seeded_randn((K, rank), SEED, HIGH_OFFSET)
    torch.testing.assert_close(y_pert - y_base, (u @ v.T).T / math.sqrt(rank), rtol=0, atol=1e-5)


def test_lora_direction_is_seeded_randn():
    """W, b, A, B = 0 and x = I: y_pert = scale * mu**2 * Z_A.T @ Z_B.T."""
    N, K, rank = 17, 33, 4
    eye = torch.eye(K)
    y_base, y_pert = hk.lora_perturbed_linear(eye, None, torch.zeros(N, K), None, torch.zeros(rank, K),
                                              torch.zeros(N, rank), scale=SCALE, seed=SEED, a_offset=OFFSET,
                                              b_offset=HIGH_OFFSET, mu=0.5)
    z_a = heron.seeded_randn((rank, K), SEED, OFFSET)
    z_b = heron.seeded_randn((N, rank), SEED, HIGH_OFFSET)
    assert torch.count_nonzero(y_base) == 0
    torch.testing.assert_close(y_pert, SCALE * 0.25 * z_a.T @ z_b.T, rtol=0, atol=1e-5)


def _all_linear_outputs(x, x_pert, w, b, a, b_mat):
    full = hk.perturbed_linear(x, x_pert, w, b, seed=SEED, weight_offset=OFFSET, bias_offset=0, mu=MU)
    lowrank = hk.perturbed_linear(x, x_pert, w, b, seed=SEED, weight_offset=0, bias_offset=0, mu=MU, rank=4,
                                  u_seed=U_SEED, u_offset=OFFSET, v_offset=HIGH_OFFSET)
    lora = hk.lora_perturbed_linear(x, x_pert, w, b, a, b_mat, scale=SCALE, seed=SEED, a_offset=OFFSET,
                                    b_offset=HIGH_OFFSET, mu=MU)
    return [*full, *lowrank, *lora]


def test_linear_independent_of_tiles(monkeypatch):
    """Other tile sizes give the same outputs up to float32 summation order."""
    M, N, K = 33, 40, 50
    x, x_pert, w, b = _inputs((M, N, K), torch.float32, False, True)
    a, b_mat = torch.randn(4, K), torch.randn(N, 4)
    default = _all_linear_outputs(x, x_pert, w, b, a, b_mat)
    monkeypatch.setattr(hk_linear, "INTERPRETER_BLOCKS", (16, 64, 16))
    monkeypatch.setattr(hk_linear, "INTERPRETER_LORA_DOWN_BLOCKS", (16, 16))
    for got, expected in zip(_all_linear_outputs(x, x_pert, w, b, a, b_mat), default, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dot_precision_follows_allow_tf32():
    x32, x16 = torch.randn(3, 17), torch.randn(3, 17).to(torch.bfloat16)
    w = torch.randn(5, 17)
    saved = torch.backends.cuda.matmul.allow_tf32  # a property: monkeypatch cannot restore it
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert hk_linear.dot_precision(x32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert hk_linear.dot_precision(x32) == "tf32"
        assert hk_linear.dot_precision(x16) == "ieee"
        y_base, _ = hk.perturbed_linear(x32, None, w, None, seed=SEED, weight_offset=0, bias_offset=0, mu=MU)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    torch.testing.assert_close(y_base, x32 @ w.T, rtol=1e-2, atol=1e-2)


def test_linear_empty_batch():
    x, w = torch.randn(0, 17), torch.randn(5, 17)
    y_base, y_pert = hk.perturbed_linear(x, None, w, None, seed=SEED, weight_offset=0, bias_offset=0, mu=MU)
    assert y_base.shape == y_pert.shape == (0, 5)


# ------------------------------------------------------------------------------------------------
# Updates
# ------------------------------------------------------------------------------------------------

UPDATE_SHAPES = {0: [(33,), (3, 5, 7), (17, 33)], 1: [(17, 33)], 4: [(33, 3)], 8: [(1, 17)]}
UPDATE_CASES = [(rank, shape) for rank, shapes in UPDATE_SHAPES.items() for shape in shapes]


def _seeds_grads(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    seeds = torch.tensor([SEED + 977 * j for j in range(q)], dtype=torch.int64)
    return seeds, torch.randn(q, dtype=torch.float32)


def _lowrank_keys(rank: int) -> dict:
    return {"rank": rank, "u_seed": U_SEED, "u_offset": HIGH_OFFSET, "v_offset": OFFSET + 1}


def _assert_param_close(got: torch.Tensor, expected: torch.Tensor):
    """float32: 1e-6 relative to the parameter's scale; bfloat16/float16: within one ulp."""
    assert got.dtype == expected.dtype
    if got.dtype == torch.float32:
        scale = max(expected.abs().max().item(), 1.0)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * scale)
    else:
        torch.testing.assert_close(got.float(), expected.float(), rtol=torch.finfo(got.dtype).eps, atol=1e-7)


@pytest.mark.parametrize(("rank", "shape"), UPDATE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q", [1, 3])
def test_zo_sgd_update(rank, shape, dtype, q):
    param = _randn(*shape, dtype=dtype)
    seeds, grads = _seeds_grads(q)
    lowrank = _lowrank_keys(rank) if rank else None
    expected = ref.zo_sgd_update(param, seeds.tolist(), grads.tolist(), offset=HIGH_OFFSET, lr=0.5,
                                 weight_decay=0.01, lowrank=lowrank)
    hk.zo_sgd_update_(param, seeds, grads, offset=HIGH_OFFSET, lr=0.5, weight_decay=0.01, **(lowrank or {}))
    _assert_param_close(param, expected)


def test_zo_sgd_update_no_directions():
    param = torch.randn(17, 3)
    expected = param * (1 - 0.1 * 0.5)
    hk.zo_sgd_update_(param, torch.zeros(0, dtype=torch.int64), torch.zeros(0), offset=0, lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("rank", "shape"), UPDATE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("decoupled", [True, False])
def test_zo_adam_update(rank, shape, dtype, q, decoupled):
    param = _randn(*shape, dtype=dtype)
    exp_avg, exp_avg_sq = torch.randn(shape), torch.rand(shape)
    seeds, grads = _seeds_grads(q)
    lowrank = _lowrank_keys(rank) if rank else None
    hyper = {"lr": 0.3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "step": 3,
             "decoupled_weight_decay": decoupled}
    expected = ref.zo_adam_update(param, exp_avg, exp_avg_sq, seeds.tolist(), grads.tolist(), offset=OFFSET,
                                  lowrank=lowrank, **hyper)
    hk.zo_adam_update_(param, exp_avg, exp_avg_sq, seeds, grads, offset=OFFSET, **hyper, **(lowrank or {}))
    _assert_param_close(param, expected[0])
    torch.testing.assert_close(exp_avg, expected[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exp_avg_sq, expected[2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(1,), (33,), (3, 5, 7), (17, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb(shape, dtype):
    param = _randn(*shape, dtype=dtype)
    expected = ref.perturb(param, SEED, HIGH_OFFSET, -0.5)
    hk.perturb_(param, SEED, HIGH_OFFSET, -0.5)
    _assert_param_close(param, expected)


def test_perturb_direction_is_seeded_randn():
    param = torch.zeros(5, 7)
    hk.perturb_(param, SEED, HIGH_OFFSET, 1.0)
    torch.testing.assert_close(param, heron.seeded_randn((5, 7), SEED, HIGH_OFFSET), rtol=0, atol=1e-6)


def _run_updates(param, exp_avg, exp_avg_sq, seeds, grads):
    hk.zo_sgd_update_(param, seeds, grads, offset=OFFSET, lr=0.1, weight_decay=0.0)
    hk.zo_sgd_update_(param, seeds, grads, offset=0, lr=0.1, weight_decay=0.0, **_lowrank_keys(4))
    hk.zo_adam_update_(param, exp_avg, exp_avg_sq, seeds, grads, offset=OFFSET, lr=0.01, beta1=0.9, beta2=0.99,
                       eps=1e-8, weight_decay=0.0, step=1, decoupled_weight_decay=True, **_lowrank_keys(4))


def test_updates_independent_of_tiles(monkeypatch):
    """Element-wise math and a per-element rank sum: other tiles give bit-identical results."""
    seeds, grads = _seeds_grads(3)
    first = [torch.randn(40, 50), torch.randn(40, 50), torch.rand(40, 50)]
    second = [t.clone() for t in first]
    _run_updates(*first, seeds, grads)
    monkeypatch.setattr(hk_updates, "FULL_BLOCK", 64)
    monkeypatch.setattr(hk_updates, "INTERPRETER_LOWRANK_BLOCKS", (32, 16))
    _run_updates(*second, seeds, grads)
    for got, expected in zip(second, first, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_lowrank_update_needs_2d_param():
    seeds, grads = _seeds_grads(1)
    with pytest.raises(ValueError, match="2-D"):
        hk.zo_sgd_update_(torch.zeros(5), seeds, grads, offset=0, lr=0.1, weight_decay=0.0, **_lowrank_keys(4))
