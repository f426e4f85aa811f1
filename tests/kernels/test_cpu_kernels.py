"""heron._C C++ CPU launchers (docs/kernels.md) against heron.reference.

Every launcher and mode: full / low-rank / LoRA linear layers with shared or two inputs, with and
without bias; SGD, Adam, AdamW and perturb updates, full and low-rank, q directions; float32,
bfloat16 and float16; seeds and offsets above 2**32; odd shapes; a layer larger than the tile
budget; bit-identical results for 1 and 2 threads; argument checks; the faster randn.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from heron import reference

C = pytest.importorskip("heron._C")
if not hasattr(C, "perturbed_linear_cpu"):
    pytest.skip("heron._C was built without the fused CPU kernels", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEED = 2**40 + 123
WEIGHT_OFFSET = 2**33 + 5
BIAS_OFFSET = 2**34 + 17
U_SEED = 2**41 + 9
U_OFFSET = 2**35 + 3
V_OFFSET = 2**36 + 1
MU = 1e-2
LOWRANK_KEYS = dict(u_seed=U_SEED, u_offset=U_OFFSET, v_offset=V_OFFSET)
# (M, K, N): each of 1, 3, 17, 97, 1025 appears as M, as K and as N.
LINEAR_SHAPES = [(1, 1, 1), (3, 17, 97), (17, 97, 3), (97, 3, 17), (1025, 97, 17), (17, 1025, 97), (3, 97, 1025)]
LOWRANK_SHAPES = [(17, 97, 33), (97, 1025, 17), (3, 17, 1025), (1025, 33, 17)]
RANKS = [1, 4, 8]


def _ids(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_tiles():
    """A 4 KiB tile budget (1024 floats), so every layer below spans many tiles."""
    previous = C._set_linear_tile_bytes_cpu(4096)
    yield
    C._set_linear_tile_bytes_cpu(previous)


# ---------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------

def _linear_inputs(m, k, n, dtype, bias):
    """x, x_pert (m, k), weight (n, k) scaled like a trained layer, bias (n,) or None; in dtype."""
    x = torch.randn(m, k).to(dtype)
    x_pert = torch.randn(m, k).to(dtype)
    weight = (torch.randn(n, k) / math.sqrt(k)).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    return x, x_pert, weight, b


def _assert_outputs(got, ref32, low, dtype):
    """got: the launcher's (y_base, y_pert); ref32: float32 reference; low: the same computation in
    PyTorch at `dtype` (None for float32). float32: max error <= 1e-4 of the output scale;
    bfloat16 / float16: no more than twice the error of PyTorch at that dtype."""
    for name, out, ref, low_out in zip(("y_base", "y_pert"), got, ref32, low or (None, None), strict=True):
        assert out.dtype == dtype, name
        assert out.shape == ref.shape, name
        ref = ref.float()
        err = (out.float() - ref).abs().max().item() if ref.numel() else 0.0
        scale = ref.abs().max().item() if ref.numel() else 0.0
        if dtype == torch.float32:
            assert err <= 1e-4 * scale + 1e-6, f"{name}: max error {err} at output scale {scale}"
        else:
            low_err = (low_out.float() - ref).abs().max().item() if ref.numel() else 0.0
            assert err <= 2 * low_err + 1e-6 * scale, f"{name}: max error {err}, PyTorch {dtype}: {low_err}"


def _torch_linear(x, x_pert, weight, bias, z, z_b, mu):
    """y_base, y_pert computed by PyTorch in x's dtype with the direction z (weight's shape)."""
    x_pert = x if x_pert is None else x_pert
    z = z.to(x.dtype)
    y_base = x @ weight.T
    y_pert = x_pert @ (weight + mu * z).T
    if bias is not None:
        y_base = y_base + bias
        y_pert = y_pert + (bias + mu * z_b.to(x.dtype))
    return y_base, y_pert


def _bias_direction(n):
    return reference.direction(SEED, BIAS_OFFSET, (n,), "cpu")


def _lowrank_direction(n, k, rank):
    u, v = reference.lowrank_factors(n, k, rank, seed=SEED, u_seed=U_SEED, u_offset=U_OFFSET, v_offset=V_OFFSET,
                                     device="cpu")
    return reference.lowrank_direction(u, v)


def _assert_update_close(out, ref):
    """Updates: float32 to a few ulp; bfloat16 / float16 to one ulp of the dtype."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=torch.finfo(out.dtype).eps, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# perturbed_linear, full direction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=_ids)
def test_perturbed_linear_full(shape, dtype, bias, shared):
    m, k, n = shape
    x, x_pert, weight, b = _linear_inputs(m, k, n, dtype, bias)
    x_pert = None if shared else x_pert
    got = C.perturbed_linear_cpu(x, x_pert, weight, b, seed=SEED, weight_offset=WEIGHT_OFFSET,
                                 bias_offset=BIAS_OFFSET, mu=MU)
    ref32 = reference.perturbed_linear(x.float(), weight.float(), None if b is None else b.float(), seed=SEED,
                                       offset=WEIGHT_OFFSET, bias_offset=BIAS_OFFSET, mu=MU,
                                       x_pert=None if x_pert is None else x_pert.float())
    low = None
    if dtype != torch.float32:
        z = reference.direction(SEED, WEIGHT_OFFSET, (n, k), "cpu")
        low = _torch_linear(x, x_pert, weight, b, z, _bias_direction(n), MU)
    _assert_outputs(got, ref32, low, dtype)


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_base_stream_ignores_the_direction(dtype, rank):
    """y_base is bit-identical whatever mu, the key and the perturbed input."""
    x, x_pert, weight, b = _linear_inputs(17, 97, 33, dtype, True)
    key = dict(seed=SEED, weight_offset=WEIGHT_OFFSET, bias_offset=BIAS_OFFSET, rank=rank, **LOWRANK_KEYS)
    y_base = C.perturbed_linear_cpu(x, None, weight, b, mu=MU, **key)[0]
    assert torch.equal(y_base, C.perturbed_linear_cpu(x, x_pert, weight, b, mu=MU, **key)[0])
    assert torch.equal(y_base, C.perturbed_linear_cpu(x, None, weight, b, mu=0.0, **{**key, "seed": 3})[0])


# ---------------------------------------------------------------------------------------------
# perturbed_linear, low-rank direction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=_ids)
def test_perturbed_linear_lowrank(shape, rank, dtype, bias, shared):
    m, k, n = shape
    x, x_pert, weight, b = _linear_inputs(m, k, n, dtype, bias)
    x_pert = None if shared else x_pert
    got = C.perturbed_linear_cpu(x, x_pert, weight, b, seed=SEED, weight_offset=WEIGHT_OFFSET,
                                 bias_offset=BIAS_OFFSET, mu=MU, rank=rank, u_seed=U_SEED, u_offset=U_OFFSET,
                                 v_offset=V_OFFSET)
    ref32 = reference.lowrank_perturbed_linear(
        x.float(), weight.float(), None if b is None else b.float(), seed=SEED, u_seed=U_SEED, rank=rank,
        u_offset=U_OFFSET, v_offset=V_OFFSET, bias_offset=BIAS_OFFSET, mu=MU,
        x_pert=None if x_pert is None else x_pert.float())
    low = None
    if dtype != torch.float32:
        low = _torch_linear(x, x_pert, weight, b, _lowrank_direction(n, k, rank), _bias_direction(n), MU)
    _assert_outputs(got, ref32, low, dtype)


# ---------------------------------------------------------------------------------------------
# lora_perturbed_linear
# ---------------------------------------------------------------------------------------------

def _torch_lora(x, x_pert, weight, bias, a, b_mat, z_a, z_b, scale, mu):
    x_pert = x if x_pert is None else x_pert
    frozen_base = x @ weight.T
    frozen_pert = x_pert @ weight.T
    if bias is not None:
        frozen_base, frozen_pert = frozen_base + bias, frozen_pert + bias
    a_pert = a + mu * z_a.to(a.dtype)
    b_pert = b_mat + mu * z_b.to(a.dtype)
    return (frozen_base + scale * (x @ a.T) @ b_mat.T, frozen_pert + scale * (x_pert @ a_pert.T) @ b_pert.T)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", LOWRANK_SHAPES, ids=_ids)
def test_lora_perturbed_linear(shape, rank, dtype, bias, shared):
    m, k, n = shape
    x, x_pert, weight, b = _linear_inputs(m, k, n, dtype, bias)
    x_pert = None if shared else x_pert
    lora_a = (torch.randn(rank, k) / math.sqrt(k)).to(dtype)
    lora_b = (torch.randn(n, rank) / math.sqrt(rank)).to(dtype)
    a_offset, b_offset, scale = 2**33 + 7, 2**37 + 1, 0.5
    got = C.lora_perturbed_linear_cpu(x, x_pert, weight, b, lora_a, lora_b, scale=scale, seed=SEED,
                                      a_offset=a_offset, b_offset=b_offset, mu=MU)
    ref32 = reference.lora_perturbed_linear(
        x.float(), weight.float(), None if b is None else b.float(), lora_a.float(), lora_b.float(), scale=scale,
        seed=SEED, a_offset=a_offset, b_offset=b_offset, mu=MU, x_pert=None if x_pert is None else x_pert.float())
    low = None
    if dtype != torch.float32:
        z_a = reference.direction(SEED, a_offset, (rank, k), "cpu")
        z_b = reference.direction(SEED, b_offset, (n, rank), "cpu")
        low = _torch_lora(x, x_pert, weight, b, lora_a, lora_b, z_a, z_b, scale, MU)
    _assert_outputs(got, ref32, low, dtype)


# ---------------------------------------------------------------------------------------------
# The tile buffer is bounded: layers larger than the budget still match
# ---------------------------------------------------------------------------------------------

def test_default_tile_budget_is_two_mib():
    assert C._linear_tile_bytes_cpu() == 2 * 2**20


@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_larger_than_default_tile_budget(dtype, shared):
    m, k, n = 5, 2049, 300  # N*K*4 = 2.46 MB > 2 MiB: several tiles per block
    assert n * k * 4 > C._linear_tile_bytes_cpu()
    x, x_pert, weight, b = _linear_inputs(m, k, n, dtype, True)
    x_pert = None if shared else x_pert
    got = C.perturbed_linear_cpu(x, x_pert, weight, b, seed=SEED, weight_offset=WEIGHT_OFFSET,
                                 bias_offset=BIAS_OFFSET, mu=MU)
    ref32 = reference.perturbed_linear(x.float(), weight.float(), b.float(), seed=SEED, offset=WEIGHT_OFFSET,
                                       bias_offset=BIAS_OFFSET, mu=MU,
                                       x_pert=None if x_pert is None else x_pert.float())
    low = None
    if dtype != torch.float32:
        z = reference.direction(SEED, WEIGHT_OFFSET, (n, k), "cpu")
        low = _torch_linear(x, x_pert, weight, b, z, _bias_direction(n), MU)
    _assert_outputs(got, ref32, low, dtype)


@pytest.mark.parametrize("mode", ["full_shared", "full_two", "lowrank_two", "lora_shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [17, 1030])
def test_many_tiles_with_ragged_edges(small_tiles, dtype, mode, m):
    """With a 1024-float budget, a 97 x 1025 weight is cut into ~100 ragged tiles. 1030 rows: the
    full direction's perturbed product runs cooperatively (all threads per tile, fixed row chunks),
    the frozen products on several row tiles."""
    k, n = 1025, 97
    x, x_pert, weight, b = _linear_inputs(m, k, n, dtype, True)
    shared = mode.endswith("shared")
    x_pert = None if shared else x_pert
    xf, xpf, wf, bf = x.float(), None if x_pert is None else x_pert.float(), weight.float(), b.float()
    if mode.startswith("full"):
        got = C.perturbed_linear_cpu(x, x_pert, weight, b, seed=SEED, weight_offset=WEIGHT_OFFSET,
                                     bias_offset=BIAS_OFFSET, mu=MU)
        ref32 = reference.perturbed_linear(xf, wf, bf, seed=SEED, offset=WEIGHT_OFFSET, bias_offset=BIAS_OFFSET,
                                           mu=MU, x_pert=xpf)
        z = reference.direction(SEED, WEIGHT_OFFSET, (n, k), "cpu")
        low = _torch_linear(x, x_pert, weight, b, z, _bias_direction(n), MU)
    elif mode.startswith("lowrank"):
        got = C.perturbed_linear_cpu(x, x_pert, weight, b, seed=SEED, weight_offset=0, bias_offset=BIAS_OFFSET,
                                     mu=MU, rank=4, u_seed=U_SEED, u_offset=U_OFFSET, v_offset=V_OFFSET)
        ref32 = reference.lowrank_perturbed_linear(xf, wf, bf, seed=SEED, u_seed=U_SEED, rank=4, u_offset=U_OFFSET,
                                                   v_offset=V_OFFSET, bias_offset=BIAS_OFFSET, mu=MU, x_pert=xpf)
        low = _torch_linear(x, x_pert, weight, b, _lowrank_direction(n, k, 4), _bias_direction(n), MU)
    else:
        lora_a, lora_b = torch.randn(4, k).to(dtype) / 32, torch.randn(n, 4).to(dtype) / 2
        got = C.lora_perturbed_linear_cpu(x, x_pert, weight, b, lora_a, lora_b, scale=2.0, seed=SEED, a_offset=3,
                                          b_offset=2**33, mu=MU)
        ref32 = reference.lora_perturbed_linear(xf, wf, bf, lora_a.float(), lora_b.float(), scale=2.0, seed=SEED,
                                                a_offset=3, b_offset=2**33, mu=MU, x_pert=xpf)
        low = _torch_lora(x, x_pert, weight, b, lora_a, lora_b, reference.direction(SEED, 3, (4, k), "cpu"),
                          reference.direction(SEED, 2**33, (n, 4), "cpu"), 2.0, MU)
    _assert_outputs(got, ref32, None if dtype == torch.float32 else low, dtype)


@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("shape", [(0, 7, 5), (4, 0, 5), (4, 7, 0), (1030, 7, 0)], ids=_ids)
def test_degenerate_shapes(shape, rank):
    """Empty batch, K = 0 (y = b) and N = 0 all return the reference's shapes and values (N = 0
    with 1024+ rows: the cooperative perturbed product's path)."""
    m, k, n = shape
    x, x_pert, weight, b = _linear_inputs(m, k, n, torch.float32, True)
    for xp in (None, x_pert):
        got = C.perturbed_linear_cpu(x, xp, weight, b, seed=1, weight_offset=0, bias_offset=0, mu=MU, rank=rank)
        if rank:
            ref = reference.lowrank_perturbed_linear(x, weight, b, seed=1, u_seed=0, rank=rank, u_offset=0,
                                                     v_offset=0, bias_offset=0, mu=MU, x_pert=xp)
        else:
            ref = reference.perturbed_linear(x, weight, b, seed=1, offset=0, bias_offset=0, mu=MU, x_pert=xp)
        for out, expected in zip(got, ref, strict=True):
            assert out.shape == expected.shape == (m, n)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Updates
# ---------------------------------------------------------------------------------------------

UPDATE_SEEDS = [2**40 + 1, 7, 2**62 + 3]
UPDATE_GRADS = [0.75, -1.5, 0.25]
UPDATE_OFFSET = 2**33 + 11


def _seeds_grads(q):
    return torch.tensor(UPDATE_SEEDS[:q], dtype=torch.int64), torch.tensor(UPDATE_GRADS[:q], dtype=torch.float32)


def _lowrank_arg(rank):
    return None if rank == 0 else dict(rank=rank, **LOWRANK_KEYS)


FULL_SHAPES = [(1,), (1025,), (17, 97), (3, 1025), (2, 3, 17)]
LOWRANK_PARAM_SHAPES = [(17, 97), (97, 3), (1, 1025)]


def _update_cases():
    for shape in FULL_SHAPES:
        yield shape, 0
    for shape in LOWRANK_PARAM_SHAPES:
        for rank in RANKS:
            yield shape, rank


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "rank"), list(_update_cases()), ids=lambda v: _ids(v) if isinstance(v, tuple)
                         else f"rank{v}")
def test_zo_sgd_update(shape, rank, dtype, q):
    param = torch.randn(shape).to(dtype)
    seeds, grads = _seeds_grads(q)
    expected = reference.zo_sgd_update(param, seeds.tolist(), grads.tolist(), offset=UPDATE_OFFSET, lr=0.05,
                                       weight_decay=0.01, lowrank=_lowrank_arg(rank))
    out = param.clone()
    extra = {} if rank == 0 else dict(rank=rank, **LOWRANK_KEYS)
    assert C.zo_sgd_update_cpu(out, seeds, grads, offset=UPDATE_OFFSET, lr=0.05, weight_decay=0.01, **extra) is None
    _assert_update_close(out, expected)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "rank"), [((1025,), 0), ((17, 97), 0), ((17, 97), 4), ((3, 1025), 8)],
                         ids=lambda v: _ids(v) if isinstance(v, tuple) else f"rank{v}")
def test_zo_adam_update(shape, rank, dtype, q, decoupled):
    param = torch.randn(shape).to(dtype)
    exp_avg = 0.1 * torch.randn(shape)
    exp_avg_sq = 0.01 * torch.rand(shape)
    seeds, grads = _seeds_grads(q)
    hyper = dict(offset=UPDATE_OFFSET, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3,
                 decoupled_weight_decay=decoupled)
    ref_param, ref_m, ref_v = reference.zo_adam_update(param, exp_avg, exp_avg_sq, seeds.tolist(), grads.tolist(),
                                                       lowrank=_lowrank_arg(rank), **hyper)
    out, m, v = param.clone(), exp_avg.clone(), exp_avg_sq.clone()
    extra = {} if rank == 0 else dict(rank=rank, **LOWRANK_KEYS)
    assert C.zo_adam_update_cpu(out, m, v, seeds, grads, **hyper, **extra) is None
    _assert_update_close(out, ref_param)
    torch.testing.assert_close(m, ref_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FULL_SHAPES, ids=_ids)
def test_perturb(shape, dtype):
    param = torch.randn(shape).to(dtype)
    out = param.clone()
    assert C.perturb_cpu(out, 2**45 + 1, UPDATE_OFFSET, -0.3) is None
    _assert_update_close(out, reference.perturb(param, 2**45 + 1, UPDATE_OFFSET, -0.3))


def test_perturb_then_unperturb_is_close_to_identity():
    param = torch.randn(300, 257)
    out = param.clone()
    C.perturb_cpu(out, 5, 2**33, 1e-3)
    C.perturb_cpu(out, 5, 2**33, -1e-3)
    torch.testing.assert_close(out, param, rtol=0, atol=1e-6)


def test_update_with_no_directions_is_weight_decay_only():
    param = torch.randn(33, 17)
    out = param.clone()
    C.zo_sgd_update_cpu(out, torch.empty(0, dtype=torch.int64), torch.empty(0), offset=0, lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(out, param - 0.1 * (0.5 * param), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Thread-count independence
# ---------------------------------------------------------------------------------------------

def _run_every_launcher():
    """Outputs of every launcher on shapes large enough to split over threads (8+ row blocks or
    output tiles, in columns and in rows; updates above the parallel grain), as a list of tensors."""
    gen = torch.Generator().manual_seed(1)
    outputs = []
    for dtype in (torch.float32, torch.bfloat16):
        for m, k, n in ((97, 1025, 300), (1100, 65, 40)):
            x = torch.randn(m, k, generator=gen).to(dtype)
            x_pert = torch.randn(m, k, generator=gen).to(dtype)
            weight = (torch.randn(n, k, generator=gen) / 32).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype)
            lora_a, lora_b = torch.randn(8, k, generator=gen).to(dtype), torch.randn(n, 8, generator=gen).to(dtype)
            key = dict(seed=SEED, weight_offset=WEIGHT_OFFSET, bias_offset=BIAS_OFFSET, mu=MU)
            for xp in (None, x_pert):
                outputs += C.perturbed_linear_cpu(x, xp, weight, b, **key)
                outputs += C.perturbed_linear_cpu(x, xp, weight, b, **key, rank=4, **LOWRANK_KEYS)
                outputs += C.lora_perturbed_linear_cpu(x, xp, weight, b, lora_a, lora_b, scale=0.5, seed=SEED,
                                                       a_offset=1, b_offset=2, mu=MU)
        seeds, grads = _seeds_grads(3)
        for rank in (0, 4):
            extra = {} if rank == 0 else dict(rank=rank, **LOWRANK_KEYS)
            param = torch.randn(300, 257, generator=gen).to(dtype)
            C.zo_sgd_update_cpu(param, seeds, grads, offset=UPDATE_OFFSET, lr=0.05, weight_decay=0.01, **extra)
            m, v = torch.zeros(300, 257), torch.zeros(300, 257)
            C.zo_adam_update_cpu(param, m, v, seeds, grads, offset=3, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                                 weight_decay=0.01, step=1, decoupled_weight_decay=True, **extra)
            C.perturb_cpu(param, 9, 2**33, 0.1)
            outputs += [param, m, v]
        out = torch.empty(10**5 + 7, dtype=dtype)
        C.philox_randn_cpu(out, SEED, 2**32 - 50_000)
        outputs.append(out)
    return outputs


def test_identical_with_one_and_two_threads(restore_threads):
    torch.set_num_threads(1)
    assert C.num_threads() == 1  # torch and the kernels share one OpenMP runtime
    one = _run_every_launcher()
    torch.set_num_threads(2)  # a fresh worker thread joins on the first call below
    assert C.num_threads() == 2
    two = _run_every_launcher()
    assert len(one) == len(two)
    for index, (a, b) in enumerate(zip(one, two, strict=True)):
        assert torch.equal(a, b), f"output {index} differs between 1 and 2 threads"


def _launchers_digest():
    import hashlib

    digest = hashlib.sha256()
    for t in _run_every_launcher():
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest_in_subprocess(function, **env):
    """function() (a module-level name here) run in a fresh interpreter with extra environment."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = f"import sys; sys.path.insert(0, {root!r})\n" \
           f"from tests.kernels.test_cpu_kernels import {function}\nprint({function}())"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                            check=True, timeout=300)
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_identical_in_fresh_processes(restore_threads):
    """OMP_NUM_THREADS=1 and =2 in fresh processes (new worker threads on the first call) and this
    process all agree."""
    torch.set_num_threads(2)
    expected = _launchers_digest()
    assert _digest_in_subprocess("_launchers_digest", OMP_NUM_THREADS="1") == expected
    assert _digest_in_subprocess("_launchers_digest", OMP_NUM_THREADS="2") == expected


# ---------------------------------------------------------------------------------------------
# The faster generator
# ---------------------------------------------------------------------------------------------

def test_randn_matches_reference_within_1e6():
    n = 10**6 + 3
    seed, offset = 2**40 + 7, 2**33 - 500_000  # the counter's low word wraps inside the range
    out = torch.empty(n)
    C.philox_randn_cpu(out, seed, offset)
    err = (out - reference.randn(seed, offset, n)).abs().max().item()
    assert err <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_randn_low_precision_is_the_rounded_normal(dtype):
    n = 4099
    out = torch.empty(n, dtype=dtype)
    C.philox_randn_cpu(out, 2**33 + 1, 2**32 - 7)
    ref = reference.randn(2**33 + 1, 2**32 - 7, n)
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=torch.finfo(dtype).eps, atol=6e-8)


def _generator_digest():
    """sha256 of philox_randn_cpu over lengths 1..40 and 10**5 + 13 (every SIMD tail), counters
    crossing a 2**32 boundary, all three output dtypes."""
    import hashlib

    digest = hashlib.sha256()
    for dtype in DTYPES:
        for n in [*range(1, 41), 10**5 + 13]:
            out = torch.empty(n, dtype=dtype)
            C.philox_randn_cpu(out, 2**40 + 3, 2**32 - 20)
            digest.update(out.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_generator_paths_are_bit_identical(isa):
    """HERON_CPU_ISA caps the generator's instruction set: the AVX2 + FMA and generic paths give the
    same bits as the default (AVX-512 where the CPU has it) one."""
    assert _digest_in_subprocess("_generator_digest", HERON_CPU_ISA=isa) == _generator_digest()


def test_randn_every_length_matches_reference():
    for n in range(1, 41):
        out = torch.empty(n)
        C.philox_randn_cpu(out, 2**40 + 3, 2**32 - 20)
        assert (out - reference.randn(2**40 + 3, 2**32 - 20, n)).abs().max().item() <= 1e-6, n


# ---------------------------------------------------------------------------------------------
# Signatures and argument checks
# ---------------------------------------------------------------------------------------------

SIGNATURES = {
    "perturbed_linear_cpu": "x_base, x_pert, weight, bias, *, seed, weight_offset, bias_offset, mu, rank=0, "
                            "u_seed=0, u_offset=0, v_offset=0",
    "lora_perturbed_linear_cpu": "x_base, x_pert, weight, bias, lora_a, lora_b, *, scale, seed, a_offset, "
                                 "b_offset, mu",
    "zo_sgd_update_cpu": "param, seeds, grads, *, offset, lr, weight_decay, rank=0, u_seed=0, u_offset=0, "
                         "v_offset=0",
    "zo_adam_update_cpu": "param, exp_avg, exp_avg_sq, seeds, grads, *, offset, lr, beta1, beta2, eps, "
                          "weight_decay, step, decoupled_weight_decay, rank=0, u_seed=0, u_offset=0, v_offset=0",
    "perturb_cpu": "param, seed, offset, alpha",
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_keyword_signature_matches_the_contract(name):
    first_line = getattr(C, name).__doc__.splitlines()[0]
    params = first_line[first_line.index("(") + 1:first_line.rindex(") ->")].split(", ")
    names = []
    for param in params:
        default = re.search(r" = (\S+)$", param)
        names.append(param.split(":")[0] + (f"={default.group(1)}" if default else ""))
    assert ", ".join(names) == SIGNATURES[name]


def test_keyword_only_arguments_are_enforced():
    x, weight = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(TypeError):
        C.perturbed_linear_cpu(x, None, weight, None, 1, 0, 0, 0.1)


def _linear_call(**overrides):
    args = dict(x_base=torch.randn(3, 5), x_pert=None, weight=torch.randn(4, 5), bias=torch.randn(4), seed=1,
                weight_offset=0, bias_offset=0, mu=0.1)
    args.update(overrides)
    return C.perturbed_linear_cpu(args.pop("x_base"), args.pop("x_pert"), args.pop("weight"), args.pop("bias"),
                                  **args)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(x_base=torch.randn(3, 5).t()), "x_base must be 2-D|x_base must be contiguous"),
    (dict(x_base=torch.randn(3, 5, dtype=torch.float64)), "x_base must be float32, bfloat16 or float16"),
    (dict(x_base=torch.randn(3)), "x_base must be 2-D"),
    (dict(x_pert=torch.randn(2, 5)), r"x_pert must have shape \[3, 5\]"),
    (dict(x_pert=torch.randn(3, 5, dtype=torch.bfloat16)), "x_pert must have x_base's dtype"),
    (dict(weight=torch.randn(4, 6)), "weight must have shape .N, K. with K = x_base.size.1. = 5"),
    (dict(bias=torch.randn(5)), r"bias must have shape \[4\]"),
    (dict(bias=torch.randn(4, dtype=torch.float16)), "bias must have x_base's dtype"),
    (dict(seed=-1), "seed must be non-negative, got -1"),
    (dict(weight_offset=2**63 - 3), "weight_offset \\+ numel overflows"),
    (dict(bias_offset=-5), "bias_offset must be non-negative, got -5"),
    (dict(mu=float("nan")), "mu must be finite"),
    (dict(rank=-2), "rank must be non-negative, got -2"),
    (dict(rank=2, u_seed=-3), "u_seed must be non-negative, got -3"),
    (dict(rank=2, v_offset=2**63 - 4), "v_offset \\+ numel overflows"),
])
def test_linear_argument_checks(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        _linear_call(**overrides)


def test_lora_argument_checks():
    x, weight = torch.randn(3, 5), torch.randn(4, 5)
    kwargs = dict(scale=1.0, seed=1, a_offset=0, b_offset=0, mu=0.1)
    with pytest.raises(RuntimeError, match=r"lora_b must have shape \[4, 2\]"):
        C.lora_perturbed_linear_cpu(x, None, weight, None, torch.randn(2, 5), torch.randn(4, 3), **kwargs)
    with pytest.raises(RuntimeError, match=r"lora_a must have shape \[2, 5\]"):
        C.lora_perturbed_linear_cpu(x, None, weight, None, torch.randn(2, 6), torch.randn(4, 2), **kwargs)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        C.lora_perturbed_linear_cpu(x, None, weight, None, torch.randn(2, 5), torch.randn(4, 2),
                                    **{**kwargs, "scale": float("inf")})


def test_update_argument_checks():
    param, seeds, grads = torch.randn(6, 4), torch.tensor([1, 2]), torch.tensor([0.5, 0.5])
    sgd = dict(offset=0, lr=0.1, weight_decay=0.0)
    with pytest.raises(RuntimeError, match="param must be float32, bfloat16 or float16, got Long"):
        C.zo_sgd_update_cpu(torch.zeros(3, dtype=torch.int64), seeds, grads, **sgd)
    with pytest.raises(RuntimeError, match="param must be contiguous"):
        C.zo_sgd_update_cpu(param.t(), seeds, grads, **sgd)
    with pytest.raises(RuntimeError, match="seeds must be int64, got Int"):
        C.zo_sgd_update_cpu(param, seeds.int(), grads, **sgd)
    with pytest.raises(RuntimeError, match="grads must be float32"):
        C.zo_sgd_update_cpu(param, seeds, grads.double(), **sgd)
    with pytest.raises(RuntimeError, match=r"grads must have shape \(q,\) = \(2,\)"):
        C.zo_sgd_update_cpu(param, seeds, torch.tensor([1.0]), **sgd)
    with pytest.raises(RuntimeError, match=r"seeds\[1\] must be non-negative, got -2"):
        C.zo_sgd_update_cpu(param, torch.tensor([1, -2]), grads, **sgd)
    with pytest.raises(RuntimeError, match="low-rank updates .rank > 0. need a 2-D param"):
        C.zo_sgd_update_cpu(torch.randn(24), seeds, grads, **sgd, rank=2)
    with pytest.raises(RuntimeError, match="lr must be finite"):
        C.zo_sgd_update_cpu(param, seeds, grads, **{**sgd, "lr": float("nan")})
    with pytest.raises(RuntimeError, match="offset \\+ numel overflows"):
        C.zo_sgd_update_cpu(param, seeds, grads, **{**sgd, "offset": 2**63 - 10})
    adam = dict(offset=0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1,
                decoupled_weight_decay=False)
    m, v = torch.zeros(6, 4), torch.zeros(6, 4)
    with pytest.raises(RuntimeError, match="exp_avg must be float32, got BFloat16"):
        C.zo_adam_update_cpu(param, m.bfloat16(), v, seeds, grads, **adam)
    with pytest.raises(RuntimeError, match="exp_avg_sq must have param's shape"):
        C.zo_adam_update_cpu(param, m, torch.zeros(4, 6), seeds, grads, **adam)
    with pytest.raises(RuntimeError, match="exp_avg and exp_avg_sq must not share memory"):
        C.zo_adam_update_cpu(param, m, m, seeds, grads, **adam)
    with pytest.raises(RuntimeError, match="step must be >= 1"):
        C.zo_adam_update_cpu(param, m, v, seeds, grads, **{**adam, "step": 0})
    with pytest.raises(RuntimeError, match="beta2 must be in \\[0, 1\\), got 1"):
        C.zo_adam_update_cpu(param, m, v, seeds, grads, **{**adam, "beta2": 1.0})
    with pytest.raises(RuntimeError, match="alpha must be finite"):
        C.perturb_cpu(param, 1, 0, float("inf"))
    with pytest.raises(RuntimeError, match="seed must be non-negative"):
        C.perturb_cpu(param, -1, 0, 1.0)
