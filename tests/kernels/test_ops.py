"""The torch.library ops (heron.kernels.ops): opcheck of every op on every device and backend it runs
on, fake impls that check shapes and dtypes, torch.compile, and every op defined once (its launchers
take exactly its arguments)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import heron
from heron.kernels import backends
from heron.kernels import functional as HF
from heron.kernels.launchers import LAUNCHERS
from heron.kernels.ops import OPS
from tests.helpers import DEVICE_BACKENDS, skip_unavailable


def op_cases(device: str) -> dict[str, list[dict]]:
    """Keyword arguments (less backend) of every op, small, on `device`: two cases where the op has modes
    (shared / two inputs, bias or none)."""
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(device=device, dtype=dtype)

    x, w, b = t(3, 5), t(4, 5), t(4)
    seeds, grads = torch.tensor([3, 4], device=device), torch.tensor([0.1, -0.2], device=device)
    adam = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "step": 1,
            "decoupled_weight_decay": True}
    lowrank = {"rank": 2, "u_seed": 7, "u_offset": 0, "v_offset": 8}
    return {
        "philox_randn_": [{"out": torch.empty(37, 5, device=device), "seed": 3, "offset": 2**33},
                          {"out": torch.empty(9, device=device, dtype=torch.bfloat16), "seed": 2**40, "offset": 1}],
        "philox_words_": [{"out": torch.empty(19, 4, dtype=torch.int32, device=device), "seed": 2**40, "offset": 7}],
        "perturbed_linear": [
            {"x_base": x, "x_pert": None, "weight": w, "bias": b, "seed": 1, "weight_offset": 0, "bias_offset": 20,
             "mu": 0.1},
            {"x_base": x, "x_pert": x + 1, "weight": w, "bias": None, "seed": 1, "weight_offset": 0,
             "bias_offset": 20, "mu": 0.1}],
        "lowrank_perturbed_linear": [
            {"x_base": x, "x_pert": x + 1, "weight": w, "bias": None, "seed": 1, "bias_offset": 20, "mu": 0.1,
             **lowrank},
            {"x_base": x, "x_pert": None, "weight": w, "bias": b, "seed": 1, "bias_offset": 20, "mu": 0.1,
             **lowrank}],
        "lora_perturbed_linear": [
            {"x_base": x, "x_pert": None, "weight": w, "bias": b, "lora_a": t(2, 5), "lora_b": t(4, 2),
             "scale": 2.0, "seed": 1, "a_offset": 0, "b_offset": 10, "mu": 0.1}],
        "zo_sgd_update_": [{"param": t(4, 5), "seeds": seeds, "grads": grads, "offset": 0, "lr": 0.1,
                            "weight_decay": 0.0}],
        "lowrank_zo_sgd_update_": [{"param": t(4, 5), "seeds": seeds, "grads": grads, "lr": 0.1,
                                    "weight_decay": 0.01, **lowrank}],
        "zo_adam_update_": [{"param": t(4, 5), "exp_avg": t(4, 5), "exp_avg_sq": t(4, 5).abs(), "seeds": seeds,
                             "grads": grads, "offset": 0, **adam}],
        "lowrank_zo_adam_update_": [{"param": t(4, 5), "exp_avg": t(4, 5), "exp_avg_sq": t(4, 5).abs(),
                                     "seeds": seeds, "grads": grads, **adam, **lowrank}],
        "perturb_": [{"param": t(4, 5), "seed": 1, "offset": 0, "alpha": 0.1}],
    }


def test_every_op_has_cases_and_launchers():
    assert set(op_cases("cpu")) == set(OPS) == set(LAUNCHERS)
    for name, launchers in LAUNCHERS.items():
        assert set(launchers) == set(backends.BACKENDS), name


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("op", sorted(OPS))
def test_opcheck(device_type, backend, op):
    """torch.library.opcheck: schema, fake impl against the real outputs, autograd registration, and
    tracing through AOT dispatch with dynamic shapes."""
    skip_unavailable(device_type, backend, op)
    for kwargs in op_cases(device_type)[op]:
        torch.library.opcheck(getattr(torch.ops.heron, op).default, (), {**kwargs, "backend": backend})


BAD_SHAPES = {  # op -> (argument, a tensor of the wrong shape or dtype, what the error names)
    "perturbed_linear": ("weight", torch.empty(4, 6), "weight"),
    "lowrank_perturbed_linear": ("x_pert", torch.empty(2, 5), "x_pert"),
    "lora_perturbed_linear": ("lora_b", torch.empty(4, 3), "lora_b"),
    "zo_sgd_update_": ("grads", torch.empty(3), "grads"),
    "lowrank_zo_sgd_update_": ("param", torch.empty(20), "2-D"),
    "zo_adam_update_": ("exp_avg", torch.empty(5, 4), "exp_avg"),
    "lowrank_zo_adam_update_": ("exp_avg_sq", torch.empty(4, 5, dtype=torch.bfloat16), "exp_avg_sq"),
    "perturb_": ("param", torch.empty(4, dtype=torch.int64), "param"),
    "philox_randn_": ("out", torch.empty(4, dtype=torch.int32), "out"),
    "philox_words_": ("out", torch.empty(4, 3, dtype=torch.int32), "out"),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_fake_impl_checks_shapes_and_dtypes(op):
    """Under fake tensors (torch.compile, meta) a wrong shape or dtype fails in the fake impl, naming the
    argument; the right ones give outputs of the right shapes."""
    assert set(BAD_SHAPES) == set(OPS)
    kwargs = op_cases("cpu")[op][0]
    name, bad, message = BAD_SHAPES[op]
    real = getattr(torch.ops.heron, op)(**{k: v.clone() if isinstance(v, torch.Tensor) else v
                                           for k, v in kwargs.items()}, backend="torch")
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        outputs = getattr(torch.ops.heron, op)(**fake, backend="auto")
        if real is not None:
            assert [tuple(o.shape) for o in outputs] == [tuple(o.shape) for o in real]
            assert [o.dtype for o in outputs] == [o.dtype for o in real]
        with pytest.raises(RuntimeError, match=message):
            getattr(torch.ops.heron, op)(**{**fake, name: mode.from_tensor(bad)}, backend="auto")


def test_compiled_matches_eager():
    def direction_dot(x):
        z = heron.seeded_randn(x.shape, 11, 2**34)
        return (x * z).sum()

    x = torch.randn(64, 3)
    compiled = torch.compile(direction_dot, fullgraph=True)
    torch.testing.assert_close(compiled(x), direction_dot(x))


def test_compiled_dual_forward_matches_eager():
    layer = heron.PerturbedLinear(12, 5)
    x = torch.randn(4, 12)

    def step(x):
        y_base, y_pert = layer.dual_forward(x, seed=3, mu=1e-2)
        return (y_pert - y_base).square().sum()

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x))


@pytest.mark.parametrize("op", sorted(name for name in OPS if OPS[name].mutates))
def test_ops_bump_the_version_of_what_they_write(op):
    """An op that writes a tensor in place bumps its version counter, so autograd still refuses a
    backward through a tensor saved before heron overwrote it."""
    kwargs = op_cases("cpu")[op][0]
    written = [kwargs[name] for name in OPS[op].mutates]
    before = [t._version for t in written]
    getattr(torch.ops.heron, op)(**kwargs, backend="cpu" if "cpu" in backends.available("cpu") else "torch")
    assert [t._version for t in written] == [v + 1 for v in before]


def test_a_write_to_a_saved_tensor_fails_the_backward():
    w = torch.randn(4, 5, requires_grad=True)
    param = w * 2
    loss = (param * param).sum()  # saves param for backward
    with torch.no_grad():
        HF.perturb_(param, 3, alpha=0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _python_calls(call) -> int:
    """How many Python functions one call of `call` enters (sys.setprofile)."""
    import sys

    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += event == "call"

    sys.setprofile(tracer)
    try:
        call()
    finally:
        sys.setprofile(None)
    return count


@pytest.mark.parametrize("op", sorted(OPS))
def test_an_op_call_runs_little_python_beyond_its_launcher(op):
    """The ops sit on the hot path of a ZO step (one call per parameter and stream), so their dispatch
    must stay thin: a call enters at most 8 Python functions besides the launcher's own (torch.library's
    custom_op wrappers entered 30-40: about 22 us per call on the CPU, against 3 us)."""
    kwargs = op_cases("cpu")[op][0]
    backend = "torch"  # the pure-PyTorch launcher, present everywhere: the count is the dispatch's
    launcher, arguments = LAUNCHERS[op][backend], OPS[op].bind((), {**kwargs, "backend": backend})
    del arguments["backend"]

    def direct():
        return launcher(**arguments)

    def through_the_op():
        return getattr(torch.ops.heron, op)(**kwargs, backend=backend)

    direct(), through_the_op()  # first calls may import or cache
    direct, through_the_op = _python_calls(direct), _python_calls(through_the_op)
    assert through_the_op - direct <= 8, (through_the_op, direct)
