"""The launchers of every backend (heron.kernels.launchers.LAUNCHERS): each takes exactly its op's
arguments (heron.kernels.ops) by keyword, and checks its input itself (the C++ and CUDA launchers are
the last line of defence for direct callers of heron._C)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from heron.kernels import backends
from heron.kernels.launchers import LAUNCHERS, launcher_function
from heron.kernels.ops import OPS

C = backends.extension()
HAS_CUDA_EXT = torch.cuda.is_available() and bool(getattr(C, "with_cuda", False))
needs_cuda_ext = pytest.mark.skipif(not HAS_CUDA_EXT, reason="needs a CUDA device and heron._C built with CUDA")


def keyword_layout(names_and_kinds: list[tuple[str, bool]]) -> str:
    """'a, b, *, c, d' from [(name, keyword_only)], the form every launcher signature is compared in."""
    parts, starred = [], False
    for name, keyword_only in names_and_kinds:
        if keyword_only and not starred:
            parts.append("*")
            starred = True
        parts.append(name)
    return ", ".join(parts)


def op_layout(op: str) -> str:
    """The op's arguments less `backend`, as defined once in heron.kernels.ops."""
    parameters = OPS[op].signature.parameters.values()
    return keyword_layout([(p.name, p.kind == p.KEYWORD_ONLY) for p in parameters if p.name != "backend"])


def launcher_layout(function) -> str:
    """A launcher's signature: Python's own, or the first line of a pybind11 docstring."""
    if not inspect.isbuiltin(function):
        parameters = inspect.signature(function).parameters.values()
        assert all(p.default is p.empty for p in parameters), "launcher arguments have no defaults"
        return keyword_layout([(p.name, p.kind == p.KEYWORD_ONLY) for p in parameters])
    first_line = function.__doc__.splitlines()[0]
    params = first_line[first_line.index("(") + 1:first_line.rindex(") ->")].split(", ")
    names = [param.split(":")[0] for param in params]
    assert not any("=" in param for param in params), f"{first_line}: launcher arguments have no defaults"
    keyword_only = [name for name in names if name != "*"]
    star = names.index("*") if "*" in names else len(names)
    return keyword_layout([(name, index >= star) for index, name in enumerate(keyword_only)])


CASES = [(op, backend) for op in sorted(LAUNCHERS) for backend in backends.BACKENDS]


@pytest.mark.parametrize(("op", "backend"), CASES)
def test_launcher_takes_exactly_the_op_arguments(op, backend):
    if backend == "cuda" and not getattr(C, "with_cuda", False):
        pytest.skip("heron._C was built without CUDA")
    function = launcher_function(op, backend)
    if function is None:
        pytest.skip(f"backend {backend} is not installed here: {backends.unavailable_reason(backend, 'cpu')}")
    assert launcher_layout(function) == op_layout(op)


def test_compiled_launchers_refuse_positional_scalars():
    x, weight = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(TypeError):
        C.perturbed_linear_cpu(x, None, weight, None, 1, 0, 0, 0.1)


def test_every_backend_has_a_launcher_of_every_op():
    """The table is complete; the launchers of the backends installed here exist."""
    for op, launchers in LAUNCHERS.items():
        assert set(launchers) == set(backends.BACKENDS), op
        for backend in ("torch", "cpu"):
            assert launcher_function(op, backend) is not None, (op, backend)


# ---------------------------------------------------------------------------------------------
# Argument checks of the C++ CPU launchers
# ---------------------------------------------------------------------------------------------

LINEAR = dict(x_base=torch.randn(3, 5), x_pert=None, weight=torch.randn(4, 5), bias=torch.randn(4), seed=1,
              bias_offset=0, mu=0.1)


@pytest.mark.parametrize(("launcher", "overrides", "message"), [
    ("perturbed_linear_cpu", dict(x_base=torch.randn(3, 5).t()), "x_base must be 2-D|x_base must be contiguous"),
    ("perturbed_linear_cpu", dict(x_base=torch.randn(3, 5, dtype=torch.float64)),
     "x_base must be float32, bfloat16 or float16"),
    ("perturbed_linear_cpu", dict(x_base=torch.randn(3)), "x_base must be 2-D"),
    ("perturbed_linear_cpu", dict(x_pert=torch.randn(2, 5)), r"x_pert must have shape \[3, 5\]"),
    ("perturbed_linear_cpu", dict(x_pert=torch.randn(3, 5, dtype=torch.bfloat16)), "x_pert must have x_base's dtype"),
    ("perturbed_linear_cpu", dict(weight=torch.randn(4, 6)),
     "weight must have shape .N, K. with K = x_base.size.1. = 5"),
    ("perturbed_linear_cpu", dict(bias=torch.randn(5)), r"bias must have shape \[4\]"),
    ("perturbed_linear_cpu", dict(bias=torch.randn(4, dtype=torch.float16)), "bias must have x_base's dtype"),
    ("perturbed_linear_cpu", dict(seed=-1), "seed must be non-negative, got -1"),
    ("perturbed_linear_cpu", dict(weight_offset=2**63 - 3), "weight_offset \\+ numel overflows"),
    ("perturbed_linear_cpu", dict(bias_offset=-5), "bias_offset must be non-negative, got -5"),
    ("perturbed_linear_cpu", dict(mu=float("nan")), "mu must be finite"),
    ("lowrank_perturbed_linear_cpu", dict(rank=-2), "rank must be >= 1 for a low-rank direction, got -2"),
    ("lowrank_perturbed_linear_cpu", dict(rank=0), "rank must be >= 1 for a low-rank direction, got 0"),
    ("lowrank_perturbed_linear_cpu", dict(u_seed=-3), "u_seed must be non-negative, got -3"),
    ("lowrank_perturbed_linear_cpu", dict(v_offset=2**63 - 4), "v_offset \\+ numel overflows"),
])
def test_linear_argument_checks(launcher, overrides, message):
    args = {**LINEAR, **({"weight_offset": 0} if launcher == "perturbed_linear_cpu" else
                         {"rank": 2, "u_seed": 0, "u_offset": 0, "v_offset": 0}), **overrides}
    tensors = [args.pop(name) for name in ("x_base", "x_pert", "weight", "bias")]
    with pytest.raises(RuntimeError, match=message):
        getattr(C, launcher)(*tensors, **args)


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
    lowrank = dict(lr=0.1, weight_decay=0.0, rank=2, u_seed=0, u_offset=0, v_offset=0)
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
        C.lowrank_zo_sgd_update_cpu(torch.randn(24), seeds, grads, **lowrank)
    with pytest.raises(RuntimeError, match="rank must be >= 1 for a low-rank direction, got 0"):
        C.lowrank_zo_sgd_update_cpu(param, seeds, grads, **{**lowrank, "rank": 0})
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
    lowrank_adam = {**{k: val for k, val in adam.items() if k != "offset"}, **lowrank, "rank": -1}
    with pytest.raises(RuntimeError, match="rank must be >= 1 for a low-rank direction, got -1"):
        C.lowrank_zo_adam_update_cpu(param, m, v, seeds, grads, **lowrank_adam)
    with pytest.raises(RuntimeError, match="alpha must be finite"):
        C.perturb_cpu(param, seed=1, offset=0, alpha=float("inf"))
    with pytest.raises(RuntimeError, match="seed must be non-negative"):
        C.perturb_cpu(param, seed=-1, offset=0, alpha=1.0)


def test_triton_low_rank_launchers_check_their_input():
    kernels = backends.triton_kernels()
    if kernels is None:
        pytest.skip("triton cannot be imported")
    seeds, grads = torch.tensor([1]), torch.tensor([0.5])
    lowrank = dict(lr=0.1, weight_decay=0.0, u_seed=0, u_offset=0, v_offset=1)
    with pytest.raises(ValueError, match="2-D"):
        kernels.lowrank_zo_sgd_update_(torch.zeros(5), seeds, grads, rank=4, **lowrank)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        kernels.lowrank_zo_sgd_update_(torch.zeros(5, 4), seeds, grads, rank=0, **lowrank)


# ---------------------------------------------------------------------------------------------
# Argument checks of the CUDA launchers
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_invalid_arguments_are_rejected_with_their_names():
    device = "cuda"
    x, x_pert = torch.randn(4, 5, device=device), torch.randn(4, 5, device=device)
    weight, bias = torch.randn(6, 5, device=device), torch.randn(6, device=device)
    full = dict(seed=1, weight_offset=0, bias_offset=0, mu=0.1)
    lowrank = dict(seed=1, bias_offset=0, mu=0.1, u_seed=0, u_offset=0, v_offset=0)
    with pytest.raises(RuntimeError, match="rank"):
        C.lowrank_perturbed_linear_cuda(x, None, weight, bias, rank=65, **lowrank)
    with pytest.raises(RuntimeError, match="rank must be >= 1"):
        C.lowrank_perturbed_linear_cuda(x, None, weight, bias, rank=0, **lowrank)
    with pytest.raises(RuntimeError, match="x_pert"):
        C.perturbed_linear_cuda(x, x_pert.half(), weight, bias, **full)
    with pytest.raises(RuntimeError, match="weight"):
        C.perturbed_linear_cuda(x, None, weight[:, :4].contiguous(), bias, **full)
    with pytest.raises(RuntimeError, match="contiguous"):
        C.perturbed_linear_cuda(x, None, torch.randn(5, 6, device=device).t(), bias, **full)
    with pytest.raises(RuntimeError, match="bias"):
        C.perturbed_linear_cuda(x, None, weight, bias[:5].contiguous(), **full)
    with pytest.raises(RuntimeError, match="mu"):
        C.perturbed_linear_cuda(x, None, weight, bias, **{**full, "mu": float("nan")})
    with pytest.raises(RuntimeError, match="lora_a"):
        C.lora_perturbed_linear_cuda(x, None, weight, bias, torch.randn(65, 5, device=device),
                                     torch.randn(6, 65, device=device), scale=1.0, seed=1, a_offset=0, b_offset=0,
                                     mu=0.1)
    param = torch.randn(10, device=device)
    seeds = torch.tensor([2**33 + 1, 5], device=device)
    grads = torch.randn(2, device=device)
    with pytest.raises(RuntimeError, match="2-D"):
        C.lowrank_zo_sgd_update_cuda(param, seeds, grads, lr=0.1, weight_decay=0.0, rank=2, u_seed=0, u_offset=0,
                                     v_offset=0)
    with pytest.raises(RuntimeError, match="seeds"):
        C.zo_sgd_update_cuda(param, seeds.int(), grads, offset=0, lr=0.1, weight_decay=0.0)
    with pytest.raises(RuntimeError, match="grads"):
        C.zo_sgd_update_cuda(param, seeds, grads[:1], offset=0, lr=0.1, weight_decay=0.0)
    with pytest.raises(RuntimeError, match="exp_avg"):
        C.zo_adam_update_cuda(param, torch.zeros(10, device=device, dtype=torch.float16),
                              torch.zeros(10, device=device), seeds, grads, offset=0, lr=0.1, beta1=0.9,
                              beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, decoupled_weight_decay=True)
    with pytest.raises(RuntimeError, match="offset"):
        C.perturb_cuda(param, seed=1, offset=2**63 - 5, alpha=0.1)
    with pytest.raises(RuntimeError, match="param"):
        C.perturb_cuda(param.cpu(), seed=1, offset=0, alpha=0.1)


def test_signature_layout_reads_pybind_docstrings():
    """The parser above against a known pybind11 first line."""
    assert re.search(r"\*, seed", C.perturb_cpu.__doc__.splitlines()[0])
    assert launcher_layout(C.perturb_cpu) == "param, *, seed, offset, alpha"
