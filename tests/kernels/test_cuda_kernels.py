"""heron._C CUDA launchers (*_cuda) against heron.kernels.reference.

Needs a CUDA device and heron._C built with CUDA; skipped otherwise. Tolerances: float32 1e-4
relative to the output's magnitude; bfloat16/float16 at most twice the error torch itself makes at
that dtype against the float32 reference (its native op at the dtype, or at least rounding the
float32 reference to the dtype, whichever is larger).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from heron.kernels import backends, reference

_EXT = backends.extension()
HAS_CUDA_EXT = torch.cuda.is_available() and bool(getattr(_EXT, "with_cuda", False))
needs_cuda_ext = pytest.mark.skipif(not HAS_CUDA_EXT, reason="needs a CUDA device and heron._C built with CUDA")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = (1, 3, 17, 97, 1025)
# (M, N, K): every size of SIZES in every role.
LINEAR_SHAPES = [
    (1, 1, 1),
    (3, 17, 97),
    (17, 97, 1025),
    (97, 1025, 3),
    (1025, 3, 17),
    (1, 1025, 97),
    (97, 1, 1025),
    (1025, 97, 1),
]
SMALL_LINEAR_SHAPES = [(1, 1, 1), (3, 97, 17), (17, 1025, 97), (1025, 17, 1025)]
RANKS = (1, 4, 8)
# Seeds and counters above 2**32 so both halves of the Philox key and counter matter.
SEED = 2**33 + 5
U_SEED = 2**35 + 11
WEIGHT_OFFSET = 2**40 + 7
BIAS_OFFSET = 2**41 + 3
U_OFFSET = 2**42 + 1
V_OFFSET = 2**36 + 9
MU = 0.5
DEVICE = "cuda"


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _assert_matches(got, want32, dtype, *, torch_lowp=(), what=""):
    """`got` (dtype) against the float32 reference `want32` with the module's tolerances (on the CPU)."""
    assert got.shape == want32.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want32.shape)}"
    got, want32 = got.float().cpu(), want32.float().cpu()
    torch_lowp = [t.float().cpu() for t in torch_lowp]
    err = _max_abs(got - want32)
    fp32_tol = 1e-4 * _max_abs(want32) + 1e-6
    if dtype == torch.float32:
        tol = fp32_tol
    else:
        torch_err = max([_max_abs(want32.to(dtype).float() - want32)]
                        + [_max_abs(t - want32) for t in torch_lowp])
        tol = max(2.0 * torch_err, fp32_tol)
    assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g} at {dtype}"


def _linear_inputs(m, n, k, dtype, *, has_bias=True, two_inputs=False):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    x_pert = torch.randn(m, k, device=DEVICE).to(dtype) if two_inputs else None
    weight = (torch.randn(n, k, device=DEVICE) / math.sqrt(k)).to(dtype)
    bias = (0.5 * torch.randn(n, device=DEVICE)).to(dtype) if has_bias else None
    return x, x_pert, weight, bias


def _f32(t):
    """float32 CPU copy: the references run on the CPU, where float32 matmuls are never TF32."""
    return None if t is None else t.float().cpu()


def _torch_linear_lowp(x, x_pert, weight, bias, z):
    """torch's own (y_base, y_pert) at x's dtype for the direction z (float32) and z_b."""
    dtype = x.dtype
    xp = x if x_pert is None else x_pert
    b_pert = None
    if bias is not None:
        z_b = reference.direction(SEED, BIAS_OFFSET, bias.shape, DEVICE)
        b_pert = (bias.float() + MU * z_b).to(dtype)
    w_pert = (weight.float() + MU * z).to(dtype)
    return F.linear(x, weight, bias), F.linear(xp, w_pert, b_pert)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(("seed", "offset"), [(0, 0), (7, 2**32 - 5), (2**33 + 5, 2**40 + 7), (2**62 + 17, 2**62)])
def test_philox_words_match_reference(n, seed, offset):
    out = torch.empty(n, 4, dtype=torch.int32, device=DEVICE)
    _EXT.philox_words_cuda(out, seed, offset)
    want = reference.philox_words(seed, offset + torch.arange(n, dtype=torch.int64))
    assert torch.equal(out.cpu().to(torch.int64) & 0xFFFFFFFF, want)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), LINEAR_SHAPES)
@pytest.mark.parametrize("two_inputs", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
def test_perturbed_linear_full(dtype, m, n, k, two_inputs, has_bias):
    x, x_pert, weight, bias = _linear_inputs(m, n, k, dtype, has_bias=has_bias, two_inputs=two_inputs)
    y_base, y_pert = _EXT.perturbed_linear_cuda(x, x_pert, weight, bias, seed=SEED, weight_offset=WEIGHT_OFFSET,
                                                bias_offset=BIAS_OFFSET, mu=MU)
    assert y_base.dtype == dtype and y_pert.dtype == dtype
    want_base, want_pert = reference.perturbed_linear(
        _f32(x), _f32(weight), _f32(bias), seed=SEED, offset=WEIGHT_OFFSET, bias_offset=BIAS_OFFSET, mu=MU,
        x_pert=_f32(x_pert))
    z = reference.direction(SEED, WEIGHT_OFFSET, (n, k), DEVICE)
    lowp_base, lowp_pert = _torch_linear_lowp(x, x_pert, weight, bias, z)
    _assert_matches(y_base, want_base, dtype, torch_lowp=[lowp_base], what="y_base")
    _assert_matches(y_pert, want_pert, dtype, torch_lowp=[lowp_pert], what="y_pert")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SMALL_LINEAR_SHAPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("two_inputs", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
def test_perturbed_linear_lowrank(dtype, m, n, k, rank, two_inputs, has_bias):
    x, x_pert, weight, bias = _linear_inputs(m, n, k, dtype, has_bias=has_bias, two_inputs=two_inputs)
    y_base, y_pert = _EXT.perturbed_linear_cuda(
        x, x_pert, weight, bias, seed=SEED, weight_offset=WEIGHT_OFFSET, bias_offset=BIAS_OFFSET, mu=MU, rank=rank,
        u_seed=U_SEED, u_offset=U_OFFSET, v_offset=V_OFFSET)
    want_base, want_pert = reference.lowrank_perturbed_linear(
        _f32(x), _f32(weight), _f32(bias), seed=SEED, u_seed=U_SEED, rank=rank, u_offset=U_OFFSET,
        v_offset=V_OFFSET, bias_offset=BIAS_OFFSET, mu=MU, x_pert=_f32(x_pert))
    u, v = reference.lowrank_factors(n, k, rank, seed=SEED, u_seed=U_SEED, u_offset=U_OFFSET, v_offset=V_OFFSET,
                                     device=DEVICE)
    lowp_base, lowp_pert = _torch_linear_lowp(x, x_pert, weight, bias, reference.lowrank_direction(u, v))
    _assert_matches(y_base, want_base, dtype, torch_lowp=[lowp_base], what="y_base")
    _assert_matches(y_pert, want_pert, dtype, torch_lowp=[lowp_pert], what="y_pert")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("rank", [15, 16, 17, 33, 64])
def test_perturbed_linear_lowrank_rank_buckets(rank):
    """Ranks on both sides of the kernels' compile-time rank buckets (16, 64)."""
    x, x_pert, weight, bias = _linear_inputs(97, 129, 65, torch.float32, two_inputs=True)
    for xp in (None, x_pert):
        got = _EXT.perturbed_linear_cuda(x, xp, weight, bias, seed=SEED, weight_offset=0, bias_offset=BIAS_OFFSET,
                                         mu=MU, rank=rank, u_seed=U_SEED, u_offset=U_OFFSET, v_offset=V_OFFSET)
        want = reference.lowrank_perturbed_linear(_f32(x), _f32(weight), _f32(bias), seed=SEED, u_seed=U_SEED,
                                                  rank=rank, u_offset=U_OFFSET, v_offset=V_OFFSET,
                                                  bias_offset=BIAS_OFFSET, mu=MU, x_pert=_f32(xp))
        for g, w, what in zip(got, want, ("y_base", "y_pert"), strict=True):
            _assert_matches(g, w, torch.float32, what=what)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("rank", [0, 4])
def test_perturbed_linear_shared_input_equals_two_inputs(rank):
    """x_pert=None (x read once for both streams) computes what x_pert=x computes."""
    x, _, weight, bias = _linear_inputs(65, 130, 67, torch.float32)
    kwargs = dict(seed=SEED, weight_offset=WEIGHT_OFFSET, bias_offset=BIAS_OFFSET, mu=MU, rank=rank, u_seed=U_SEED,
                  u_offset=U_OFFSET, v_offset=V_OFFSET)
    shared = _EXT.perturbed_linear_cuda(x, None, weight, bias, **kwargs)
    separate = _EXT.perturbed_linear_cuda(x, x.clone(), weight, bias, **kwargs)
    for a, b in zip(shared, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize(("m", "n", "k"), [(0, 5, 7), (4, 5, 0)])
@pytest.mark.parametrize("rank", [0, 3])
def test_perturbed_linear_empty_batch_or_features(m, n, k, rank):
    x, x_pert, weight, bias = _linear_inputs(m, n, k, torch.float32, two_inputs=True)
    got = _EXT.perturbed_linear_cuda(x, x_pert, weight, bias, seed=SEED, weight_offset=WEIGHT_OFFSET,
                                     bias_offset=BIAS_OFFSET, mu=MU, rank=rank, u_seed=U_SEED, u_offset=U_OFFSET,
                                     v_offset=V_OFFSET)
    if rank == 0:
        want = reference.perturbed_linear(_f32(x), _f32(weight), _f32(bias), seed=SEED, offset=WEIGHT_OFFSET,
                                          bias_offset=BIAS_OFFSET, mu=MU, x_pert=_f32(x_pert))
    else:
        want = reference.lowrank_perturbed_linear(_f32(x), _f32(weight), _f32(bias), seed=SEED, u_seed=U_SEED,
                                                  rank=rank, u_offset=U_OFFSET, v_offset=V_OFFSET,
                                                  bias_offset=BIAS_OFFSET, mu=MU, x_pert=_f32(x_pert))
    for g, w, what in zip(got, want, ("y_base", "y_pert"), strict=True):
        _assert_matches(g, w, torch.float32, what=what)


def _lora_inputs(m, n, k, r, dtype, *, has_bias, two_inputs):
    x, x_pert, weight, bias = _linear_inputs(m, n, k, dtype, has_bias=has_bias, two_inputs=two_inputs)
    lora_a = (torch.randn(r, k, device=DEVICE) / math.sqrt(k)).to(dtype)
    lora_b = (torch.randn(n, r, device=DEVICE) / math.sqrt(r)).to(dtype)
    return x, x_pert, weight, bias, lora_a, lora_b


def _check_lora(m, n, k, r, dtype, *, has_bias, two_inputs, scale=0.75):
    x, x_pert, weight, bias, lora_a, lora_b = _lora_inputs(m, n, k, r, dtype, has_bias=has_bias,
                                                           two_inputs=two_inputs)
    a_offset, b_offset = 2**39 + 13, 2**43 + 17
    y_base, y_pert = _EXT.lora_perturbed_linear_cuda(x, x_pert, weight, bias, lora_a, lora_b, scale=scale, seed=SEED,
                                                     a_offset=a_offset, b_offset=b_offset, mu=MU)
    assert y_base.dtype == dtype and y_pert.dtype == dtype
    want_base, want_pert = reference.lora_perturbed_linear(
        _f32(x), _f32(weight), _f32(bias), _f32(lora_a), _f32(lora_b), scale=scale, seed=SEED,
        a_offset=a_offset, b_offset=b_offset, mu=MU, x_pert=_f32(x_pert))
    xp = x if x_pert is None else x_pert
    a_pert = (lora_a.float() + MU * reference.direction(SEED, a_offset, lora_a.shape, DEVICE)).to(dtype)
    b_pert = (lora_b.float() + MU * reference.direction(SEED, b_offset, lora_b.shape, DEVICE)).to(dtype)
    lowp_base = F.linear(x, weight, bias) + scale * (x @ lora_a.T) @ lora_b.T
    lowp_pert = F.linear(xp, weight, bias) + scale * (xp @ a_pert.T) @ b_pert.T
    _assert_matches(y_base, want_base, dtype, torch_lowp=[lowp_base], what="y_base")
    _assert_matches(y_pert, want_pert, dtype, torch_lowp=[lowp_pert], what="y_pert")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SMALL_LINEAR_SHAPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("two_inputs", [False, True])
@pytest.mark.parametrize("has_bias", [True, False])
def test_lora_perturbed_linear(dtype, m, n, k, rank, two_inputs, has_bias):
    _check_lora(m, n, k, rank, dtype, has_bias=has_bias, two_inputs=two_inputs)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("rank", [16, 17, 64])
@pytest.mark.parametrize(("m", "k"), [(1, 4099), (300, 33)])
def test_lora_rank_buckets_and_split_k(rank, m, k):
    """Adapter ranks across the rank buckets and the LoRA epilogue chunk (16); a small M with a long
    K takes the split-K path of x @ A.T."""
    _check_lora(m, 70, k, rank, torch.float32, has_bias=True, two_inputs=True)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize(("m", "k"), [(0, 7), (4, 0)])
def test_lora_empty_batch_or_features(m, k):
    _check_lora(m, 5, k, 3, torch.float32, has_bias=True, two_inputs=True)


@pytest.mark.gpu
@needs_cuda_ext
def test_lora_is_deterministic():
    x, x_pert, weight, bias, lora_a, lora_b = _lora_inputs(5, 200, 3000, 8, torch.float32, has_bias=True,
                                                           two_inputs=True)
    kwargs = dict(scale=0.5, seed=SEED, a_offset=0, b_offset=2**40, mu=MU)
    first = _EXT.lora_perturbed_linear_cuda(x, x_pert, weight, bias, lora_a, lora_b, **kwargs)
    second = _EXT.lora_perturbed_linear_cuda(x, x_pert, weight, bias, lora_a, lora_b, **kwargs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _param_pair(shape, dtype, *, misaligned=False):
    """(param, a copy to update in place); misaligned: both start one element into their buffer
    (storage offset 1), which takes the kernels' scalar path."""
    numel = math.prod(shape)
    lead = 1 if misaligned else 0
    buffer = torch.randn(numel + lead, device=DEVICE).to(dtype)
    copy = buffer.clone()
    return buffer[lead:].view(shape), copy[lead:].view(shape)


def _directions(q):
    seeds = torch.tensor([2**33 + 1 + 7919 * j for j in range(q)], dtype=torch.int64, device=DEVICE)
    grads = torch.randn(q, device=DEVICE)
    return seeds, grads


def _lowrank(rank):
    return None if rank == 0 else {"rank": rank, "u_seed": U_SEED, "u_offset": U_OFFSET, "v_offset": V_OFFSET}


def _lowrank_kwargs(rank):
    return {} if rank == 0 else dict(rank=rank, u_seed=U_SEED, u_offset=U_OFFSET, v_offset=V_OFFSET)


def _run_sgd(shape, dtype, q, rank, *, misaligned=False):
    lr, weight_decay, offset = 0.05, 0.01, WEIGHT_OFFSET
    param, got = _param_pair(shape, dtype, misaligned=misaligned)
    seeds, grads = _directions(q)
    start = _f32(param)
    want = reference.zo_sgd_update(start, seeds.tolist(), grads.tolist(), offset=offset, lr=lr,
                                   weight_decay=weight_decay, lowrank=_lowrank(rank))
    g = reference.combined_direction(shape, seeds.tolist(), grads.tolist(), offset=offset, device=DEVICE,
                                     lowrank=_lowrank(rank))
    lowp = param - lr * (g.to(dtype) + weight_decay * param)  # torch at the parameter's dtype
    _EXT.zo_sgd_update_cuda(got, seeds, grads, offset=offset, lr=lr, weight_decay=weight_decay,
                            **_lowrank_kwargs(rank))
    assert got.dtype == dtype
    # Compare the updates (new - old): the parameter's own magnitude would hide them.
    _assert_matches(got.float().cpu() - start, want - start, dtype, torch_lowp=[lowp.float().cpu() - start],
                    what="param")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("q", [1, 3])
def test_zo_sgd_update_full(dtype, n, q):
    _run_sgd((n,), dtype, q, 0)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(17, 97), (3, 1025)])
def test_zo_sgd_update_full_2d_and_misaligned(dtype, shape):
    _run_sgd(shape, dtype, 3, 0)
    _run_sgd(shape, dtype, 3, 0, misaligned=True)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize(("shape", "rank"), [((0,), 0), ((0, 5), 3)])
def test_updates_of_empty_params(shape, rank):
    _run_sgd(shape, torch.float32, 2, rank)
    _run_adam(shape, torch.float32, 2, rank, True)


@pytest.mark.gpu
@needs_cuda_ext
def test_zo_sgd_update_no_directions_is_weight_decay():
    _run_sgd((97,), torch.float32, 0, 0)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 97), (1025, 3), (97, 1025)])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("q", [1, 3])
def test_zo_sgd_update_lowrank(dtype, shape, rank, q):
    _run_sgd(shape, dtype, q, rank)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("rank", [31, 32, 33, 70])
def test_zo_sgd_update_lowrank_rank_chunks(rank):
    """Ranks around the low-rank update's rank chunk (32)."""
    _run_sgd((65, 130), torch.float32, 3, rank)


def _run_adam(shape, dtype, q, rank, decoupled, *, misaligned=False):
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, step=3,
                 decoupled_weight_decay=decoupled)
    offset = BIAS_OFFSET
    param, got_p = _param_pair(shape, dtype, misaligned=misaligned)
    exp_avg = 0.1 * torch.randn(shape, device=DEVICE)
    exp_avg_sq = 0.01 * torch.rand(shape, device=DEVICE)
    seeds, grads = _directions(q)
    start = _f32(param)
    want_p, want_m, want_v = reference.zo_adam_update(start, exp_avg.cpu(), exp_avg_sq.cpu(), seeds.tolist(),
                                                      grads.tolist(), offset=offset, lowrank=_lowrank(rank), **hyper)
    # torch at the parameter's dtype: the float32 step applied to the low-precision parameter
    lowp = param.cpu() - (start - want_p).to(dtype)
    got_m, got_v = exp_avg.clone(), exp_avg_sq.clone()
    _EXT.zo_adam_update_cuda(got_p, got_m, got_v, seeds, grads, offset=offset, **hyper, **_lowrank_kwargs(rank))
    assert got_p.dtype == dtype and got_m.dtype == torch.float32 and got_v.dtype == torch.float32
    _assert_matches(got_p.float().cpu() - start, want_p - start, dtype, torch_lowp=[lowp.float() - start],
                    what="param")
    _assert_matches(got_m, want_m, torch.float32, what="exp_avg")
    _assert_matches(got_v, want_v, torch.float32, what="exp_avg_sq")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("decoupled", [False, True])
def test_zo_adam_update_full(dtype, n, q, decoupled):
    _run_adam((n,), dtype, q, 0, decoupled)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_zo_adam_update_misaligned(dtype):
    _run_adam((1025,), dtype, 3, 0, True, misaligned=True)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 97), (1025, 3), (97, 1025)])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("decoupled", [False, True])
def test_zo_adam_update_lowrank(dtype, shape, rank, q, decoupled):
    _run_adam(shape, dtype, q, rank, decoupled)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_perturb(dtype, n, misaligned):
    alpha, offset = -0.3, 2**37 + 1
    param, got = _param_pair((n,), dtype, misaligned=misaligned)
    start = _f32(param)
    want = reference.perturb(start, SEED, offset, alpha)
    lowp = param + (alpha * reference.direction(SEED, offset, (n,), DEVICE)).to(dtype)
    _EXT.perturb_cuda(got, SEED, offset, alpha)
    _assert_matches(got.float().cpu() - start, want - start, dtype, torch_lowp=[lowp.float().cpu() - start],
                    what="param")


@pytest.mark.gpu
@needs_cuda_ext
def test_invalid_arguments_are_rejected_with_their_names():
    x, x_pert, weight, bias = _linear_inputs(4, 6, 5, torch.float32, two_inputs=True)
    kwargs = dict(seed=1, weight_offset=0, bias_offset=0, mu=0.1)
    with pytest.raises(RuntimeError, match="rank"):
        _EXT.perturbed_linear_cuda(x, None, weight, bias, rank=65, **kwargs)
    with pytest.raises(RuntimeError, match="x_pert"):
        _EXT.perturbed_linear_cuda(x, x_pert.half(), weight, bias, **kwargs)
    with pytest.raises(RuntimeError, match="weight"):
        _EXT.perturbed_linear_cuda(x, None, weight[:, :4].contiguous(), bias, **kwargs)
    with pytest.raises(RuntimeError, match="contiguous"):
        _EXT.perturbed_linear_cuda(x, None, torch.randn(5, 6, device=DEVICE).t(), bias, **kwargs)
    with pytest.raises(RuntimeError, match="bias"):
        _EXT.perturbed_linear_cuda(x, None, weight, bias[:5].contiguous(), **kwargs)
    with pytest.raises(RuntimeError, match="mu"):
        _EXT.perturbed_linear_cuda(x, None, weight, bias, **{**kwargs, "mu": float("nan")})
    with pytest.raises(RuntimeError, match="lora_a"):
        _EXT.lora_perturbed_linear_cuda(x, None, weight, bias, torch.randn(65, 5, device=DEVICE),
                                        torch.randn(6, 65, device=DEVICE), scale=1.0, seed=1, a_offset=0,
                                        b_offset=0, mu=0.1)
    param = torch.randn(10, device=DEVICE)
    seeds, grads = _directions(2)
    with pytest.raises(RuntimeError, match="2-D"):
        _EXT.zo_sgd_update_cuda(param, seeds, grads, offset=0, lr=0.1, weight_decay=0.0, rank=2)
    with pytest.raises(RuntimeError, match="seeds"):
        _EXT.zo_sgd_update_cuda(param, seeds.int(), grads, offset=0, lr=0.1, weight_decay=0.0)
    with pytest.raises(RuntimeError, match="grads"):
        _EXT.zo_sgd_update_cuda(param, seeds, grads[:1], offset=0, lr=0.1, weight_decay=0.0)
    with pytest.raises(RuntimeError, match="exp_avg"):
        _EXT.zo_adam_update_cuda(param, torch.zeros(10, device=DEVICE, dtype=torch.float16),
                                 torch.zeros(10, device=DEVICE), seeds, grads, offset=0, lr=0.1, beta1=0.9,
                                 beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, decoupled_weight_decay=True)
    with pytest.raises(RuntimeError, match="offset"):
        _EXT.perturb_cuda(param, 1, 2**63 - 5, 0.1)
    with pytest.raises(RuntimeError, match="param"):
        _EXT.perturb_cuda(param.cpu(), 1, 0, 0.1)
