"""Results do not depend on how a backend splits the work: the C++ CPU kernels give bit-identical
outputs for 1 and 2 threads (in this process and in fresh ones), for every instruction set of the
word generator, and match the reference when a layer spans many ragged tiles of the tile buffer; the
Triton kernels give the same outputs for other tile sizes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from heron.kernels import backends, reference
from tests.helpers import (
    BIAS_OFFSET,
    DTYPES,
    LOWRANK_KEYS,
    MU,
    SEED,
    U_OFFSET,
    U_SEED,
    V_OFFSET,
    WEIGHT_OFFSET,
    assert_outputs_close,
    linear_inputs,
    param_inputs,
    skip_unavailable,
)
from tests.kernels.test_lora_perturbed_linear import torch_lora
from tests.kernels.test_perturbed_linear import torch_linear

C = backends.extension()
ops = torch.ops.heron


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_tiles():
    """A 4 KiB tile budget (1024 floats) for the CPU kernels, so every layer below spans many tiles."""
    skip_unavailable("cpu", "cpu")
    previous = C._set_linear_tile_bytes_cpu(4096)
    yield
    C._set_linear_tile_bytes_cpu(previous)


def test_default_cpu_tile_budget_is_two_mib():
    skip_unavailable("cpu", "cpu")
    assert C._linear_tile_bytes_cpu() == 2 * 2**20


@pytest.mark.parametrize("mode", ["full_shared", "full_two", "lowrank_two", "lora_shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [17, 1030])
def test_cpu_many_tiles_with_ragged_edges(small_tiles, dtype, mode, m):
    """With a 1024-float budget, a 97 x 1025 weight is cut into ~100 ragged tiles. 1030 rows: the
    full direction's perturbed product runs cooperatively (all threads per tile, fixed row chunks),
    the frozen products on several row tiles."""
    inputs = linear_inputs((m, 97, 1025), dtype, shared=mode.endswith("shared"),
                           lora_rank=4 if mode.startswith("lora") else None)
    f32 = inputs.float32_cpu()
    n, k = inputs.weight.shape
    z_b = reference.direction(SEED, BIAS_OFFSET, (n,), "cpu")
    if mode.startswith("full"):
        keys = dict(seed=SEED, weight_offset=WEIGHT_OFFSET, bias_offset=BIAS_OFFSET, mu=MU)
        got = ops.perturbed_linear(**inputs.operands(), **keys, backend="cpu")
        want = reference.perturbed_linear(f32.x, f32.weight, f32.bias, seed=SEED, offset=WEIGHT_OFFSET,
                                          bias_offset=BIAS_OFFSET, mu=MU, x_pert=f32.x_pert)
        lowp = torch_linear(inputs, reference.direction(SEED, WEIGHT_OFFSET, (n, k), "cpu"), z_b, MU)
    elif mode.startswith("lowrank"):
        keys = dict(seed=SEED, bias_offset=BIAS_OFFSET, mu=MU, rank=4, **LOWRANK_KEYS)
        got = ops.lowrank_perturbed_linear(**inputs.operands(), **keys, backend="cpu")
        want = reference.lowrank_perturbed_linear(f32.x, f32.weight, f32.bias, seed=SEED, u_seed=U_SEED, rank=4,
                                                  u_offset=U_OFFSET, v_offset=V_OFFSET, bias_offset=BIAS_OFFSET,
                                                  mu=MU, x_pert=f32.x_pert)
        u, v = reference.lowrank_factors(n, k, 4, seed=SEED, u_seed=U_SEED, u_offset=U_OFFSET, v_offset=V_OFFSET,
                                         device="cpu")
        lowp = torch_linear(inputs, reference.lowrank_direction(u, v), z_b, MU)
    else:
        keys = dict(scale=2.0, seed=SEED, a_offset=3, b_offset=2**33, mu=MU)
        got = ops.lora_perturbed_linear(**inputs.operands(), **keys, backend="cpu")
        want = reference.lora_perturbed_linear(f32.x, f32.weight, f32.bias, f32.lora_a, f32.lora_b,
                                               x_pert=f32.x_pert, **keys)
        lowp = torch_lora(inputs, keys)
    assert_outputs_close(got, want, lowp, dtype)


# ---------------------------------------------------------------------------------------------
# Thread-count independence of the C++ CPU kernels
# ---------------------------------------------------------------------------------------------

def _run_every_op() -> list[torch.Tensor]:
    """Outputs of every op on the cpu backend, on shapes large enough to split over threads (8+ row
    blocks or output tiles, in columns and in rows; updates above the parallel grain)."""
    outputs = []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((97, 300, 1025), (1100, 40, 65)):
            for shared in (True, False):
                inputs = linear_inputs(shape, dtype, shared=shared, lora_rank=8, seed=1)
                operands = inputs.operands()
                lora = {name: operands.pop(name) for name in ("lora_a", "lora_b")}
                outputs += ops.perturbed_linear(**operands, seed=SEED, weight_offset=WEIGHT_OFFSET,
                                                bias_offset=BIAS_OFFSET, mu=MU, backend="cpu")
                outputs += ops.lowrank_perturbed_linear(**operands, seed=SEED, bias_offset=BIAS_OFFSET, mu=MU,
                                                        rank=4, **LOWRANK_KEYS, backend="cpu")
                outputs += ops.lora_perturbed_linear(**operands, **lora, scale=0.5, seed=SEED, a_offset=1,
                                                     b_offset=2, mu=MU, backend="cpu")
        adam = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, step=1, decoupled_weight_decay=True)
        for rank in (0, 4):
            param, seeds, grads = param_inputs((300, 257), dtype, q=3, seed=2)
            m, v = torch.zeros(300, 257), torch.zeros(300, 257)
            if rank == 0:
                ops.zo_sgd_update_(param=param, seeds=seeds, grads=grads, offset=WEIGHT_OFFSET, lr=0.05,
                                   weight_decay=0.01, backend="cpu")
                ops.zo_adam_update_(param=param, exp_avg=m, exp_avg_sq=v, seeds=seeds, grads=grads, offset=3,
                                    **adam, backend="cpu")
            else:
                ops.lowrank_zo_sgd_update_(param=param, seeds=seeds, grads=grads, lr=0.05, weight_decay=0.01,
                                           rank=rank, **LOWRANK_KEYS, backend="cpu")
                ops.lowrank_zo_adam_update_(param=param, exp_avg=m, exp_avg_sq=v, seeds=seeds, grads=grads,
                                            **adam, rank=rank, **LOWRANK_KEYS, backend="cpu")
            ops.perturb_(param=param, seed=9, offset=2**33, alpha=0.1, backend="cpu")
            outputs += [param, m, v]
        out = torch.empty(10**5 + 7, dtype=dtype)
        ops.philox_randn_(out=out, seed=SEED, offset=2**32 - 50_000, backend="cpu")
        outputs.append(out)
    return outputs


def test_cpu_identical_with_one_and_two_threads(restore_threads):
    skip_unavailable("cpu", "cpu")
    torch.set_num_threads(1)
    assert C.num_threads() == 1  # torch and the kernels share one OpenMP runtime
    one = _run_every_op()
    torch.set_num_threads(2)  # a fresh worker thread joins on the first call below
    assert C.num_threads() == 2
    two = _run_every_op()
    assert len(one) == len(two)
    for index, (a, b) in enumerate(zip(one, two, strict=True)):
        assert torch.equal(a, b), f"output {index} differs between 1 and 2 threads"


def _ops_digest() -> str:
    digest = hashlib.sha256()
    for t in _run_every_op():
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest_in_subprocess(function: str, **env: str) -> str:
    """function() (a module-level name here) run in a fresh interpreter with extra environment."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = f"import sys; sys.path.insert(0, {root!r})\n" \
           f"from tests.kernels.test_work_split import {function}\nprint({function}())"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                            check=True, timeout=300)
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_cpu_identical_in_fresh_processes(restore_threads):
    """OMP_NUM_THREADS=1 and =2 in fresh processes (new worker threads on the first call) and this
    process all agree."""
    skip_unavailable("cpu", "cpu")
    torch.set_num_threads(2)
    expected = _ops_digest()
    assert _digest_in_subprocess("_ops_digest", OMP_NUM_THREADS="1") == expected
    assert _digest_in_subprocess("_ops_digest", OMP_NUM_THREADS="2") == expected


def _generator_digest() -> str:
    """sha256 of philox_randn_ (cpu) over lengths 1..40 and 10**5 + 13 (every SIMD tail), counters
    crossing a 2**32 boundary, all three output dtypes."""
    digest = hashlib.sha256()
    for dtype in DTYPES:
        for n in [*range(1, 41), 10**5 + 13]:
            out = torch.empty(n, dtype=dtype)
            ops.philox_randn_(out=out, seed=2**40 + 3, offset=2**32 - 20, backend="cpu")
            digest.update(out.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_cpu_generator_paths_are_bit_identical(isa):
    """HERON_CPU_ISA caps the generator's instruction set: the AVX2 + FMA and generic paths give the
    same bits as the default (AVX-512 where the CPU has it) one."""
    skip_unavailable("cpu", "cpu")
    assert _digest_in_subprocess("_generator_digest", HERON_CPU_ISA=isa) == _generator_digest()


# ---------------------------------------------------------------------------------------------
# Tile independence of the Triton kernels
# ---------------------------------------------------------------------------------------------

def _triton_linear_outputs(inputs) -> list[torch.Tensor]:
    operands = inputs.operands()
    lora = {name: operands.pop(name) for name in ("lora_a", "lora_b")}
    return [*ops.perturbed_linear(**operands, seed=SEED, weight_offset=WEIGHT_OFFSET, bias_offset=0, mu=MU,
                                  backend="triton"),
            *ops.lowrank_perturbed_linear(**operands, seed=SEED, bias_offset=0, mu=MU, rank=4, **LOWRANK_KEYS,
                                          backend="triton"),
            *ops.lora_perturbed_linear(**operands, **lora, scale=0.75, seed=SEED, a_offset=WEIGHT_OFFSET,
                                       b_offset=BIAS_OFFSET, mu=MU, backend="triton")]


def test_triton_linear_independent_of_tiles(monkeypatch):
    """Other tile sizes give the same outputs up to float32 summation order."""
    skip_unavailable("cpu", "triton")
    from heron_kernels import linear as triton_linear

    inputs = linear_inputs((33, 40, 50), torch.float32, lora_rank=4)
    default = _triton_linear_outputs(inputs)
    monkeypatch.setattr(triton_linear, "INTERPRETER_BLOCKS", (16, 64, 16))
    monkeypatch.setattr(triton_linear, "INTERPRETER_LORA_DOWN_BLOCKS", (16, 16))
    for got, expected in zip(_triton_linear_outputs(inputs), default, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _triton_updates(lowrank: bool) -> list[torch.Tensor]:
    param, seeds, grads = param_inputs((40, 50), torch.float32, q=3, seed=3)
    m, v = torch.zeros(40, 50), torch.rand(40, 50, generator=torch.Generator().manual_seed(4))
    adam = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1, decoupled_weight_decay=True)
    if lowrank:
        keys = dict(rank=4, **LOWRANK_KEYS)
        ops.lowrank_zo_sgd_update_(param=param, seeds=seeds, grads=grads, lr=0.1, weight_decay=0.0, **keys,
                                   backend="triton")
        ops.lowrank_zo_adam_update_(param=param, exp_avg=m, exp_avg_sq=v, seeds=seeds, grads=grads, **adam, **keys,
                                    backend="triton")
    else:
        ops.zo_sgd_update_(param=param, seeds=seeds, grads=grads, offset=WEIGHT_OFFSET, lr=0.1, weight_decay=0.0,
                           backend="triton")
        ops.zo_adam_update_(param=param, exp_avg=m, exp_avg_sq=v, seeds=seeds, grads=grads, offset=WEIGHT_OFFSET,
                            **adam, backend="triton")
    return [param, m, v]


@pytest.mark.parametrize("lowrank", [False, True], ids=["full", "lowrank"])
def test_triton_updates_independent_of_tiles(monkeypatch, lowrank):
    """Full directions are element-wise math: other tiles give bit-identical results. A low-rank tile
    forms U @ (sum_j g_j V_j).T with one tl.dot over the padded rank (16); the interpreter runs tl.dot on
    numpy, whose BLAS may sum those 16 products in an order that depends on the tile's shape (it does on
    AMD EPYC with OpenBLAS 0.3.31). Reordering 16 float32 products moves G by at most 16 eps sum|terms|,
    which lr (and Adam's normalisation) bring far below a rounding unit of the results: they agree to
    a few float32 rounding units (4 eps, relative and absolute)."""
    skip_unavailable("cpu", "triton")
    from heron_kernels import updates as triton_updates

    first = _triton_updates(lowrank)
    monkeypatch.setattr(triton_updates, "FULL_BLOCK", 64)
    monkeypatch.setattr(triton_updates, "INTERPRETER_LOWRANK_BLOCKS", (32, 16))
    second = _triton_updates(lowrank)
    for got, expected in zip(second, first, strict=True):
        ulps = 4 * torch.finfo(torch.float32).eps if lowrank else 0.0
        torch.testing.assert_close(got, expected, rtol=ulps, atol=ulps)
