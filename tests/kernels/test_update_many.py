"""zo_sgd_update_many_ / zo_adam_update_many_: one call updating many parameters equals the
reference (heron.kernels.reference) per tensor within tests/helpers.assert_close_to_reference, and
equals one zo_*_update_ call per tensor on the same backend bit for bit; bad input anywhere in the
lists is refused, naming the argument and its index, before any tensor is written."""

from __future__ import annotations

import pytest
import torch

from heron.kernels import functional as HF
from heron.kernels import reference
from tests.helpers import DEVICE_BACKENDS, assert_close_to_reference, skip_unavailable

SHAPES = [(33,), (5, 7), (2, 3, 17), (0,), (1025,)]
OFFSETS = [0, 40, 2**33 + 1, 200, 300]  # the layout of a model: each parameter keyed from its own counter
PAIRS = [(11, 0.25), (12, -0.5)]  # q = 2 directions
ADAM = {"lr": 1e-2, "step": 3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}


def tensors(device_type: str, dtype=torch.float32, scale: float = 1.0, positive: bool = False) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    made = [scale * (torch.rand if positive else torch.randn)(s, generator=generator) for s in SHAPES]
    return [t.to(device=device_type, dtype=dtype) for t in made]


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sgd_many_equals_one_call_per_tensor_and_the_reference(device_type, backend, dtype):
    skip_unavailable(device_type, backend, "zo_sgd_update_")
    params = tensors(device_type, dtype)
    singles = [p.clone() for p in params]
    HF.zo_sgd_update_many_(params, PAIRS, lr=0.1, offsets=OFFSETS, weight_decay=0.01, backend=backend)
    for single, got, offset in zip(singles, params, OFFSETS, strict=True):
        want = reference.zo_sgd_update(single.float().cpu(), [s for s, _ in PAIRS], [g for _, g in PAIRS],
                                       offset=offset, lr=0.1, weight_decay=0.01)
        HF.zo_sgd_update_(single, PAIRS, lr=0.1, offset=offset, weight_decay=0.01, backend=backend)
        assert torch.equal(got, single)
        assert_close_to_reference(got, want, want.to(dtype), elementwise=True, what="param")


@pytest.mark.parametrize(("device_type", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_many_equals_one_call_per_tensor_and_the_reference(device_type, backend, decoupled):
    skip_unavailable(device_type, backend, "zo_adam_update_")
    params, exp_avgs = tensors(device_type), tensors(device_type, scale=0.1)
    exp_avg_sqs = tensors(device_type, scale=0.01, positive=True)
    singles = [[t.clone() for t in group] for group in (params, exp_avgs, exp_avg_sqs)]
    HF.zo_adam_update_many_(params, exp_avgs, exp_avg_sqs, PAIRS, offsets=OFFSETS,
                            decoupled_weight_decay=decoupled, backend=backend, **ADAM)
    hyper = {"lr": ADAM["lr"], "beta1": 0.9, "beta2": 0.999, "eps": ADAM["eps"], "weight_decay": 0.05, "step": 3,
             "decoupled_weight_decay": decoupled}
    for i, offset in enumerate(OFFSETS):
        p, m, v = (group[i] for group in singles)
        want_p, want_m, want_v = reference.zo_adam_update(p.cpu(), m.cpu(), v.cpu(), [s for s, _ in PAIRS],
                                                          [g for _, g in PAIRS], offset=offset, **hyper)
        HF.zo_adam_update_(p, m, v, PAIRS, offset=offset, decoupled_weight_decay=decoupled, backend=backend, **ADAM)
        assert torch.equal(params[i], p) and torch.equal(exp_avgs[i], m) and torch.equal(exp_avg_sqs[i], v)
        assert_close_to_reference(params[i], want_p, elementwise=True, what="param")
        assert_close_to_reference(exp_avgs[i], want_m, elementwise=True, what="exp_avg")
        assert_close_to_reference(exp_avg_sqs[i], want_v, elementwise=True, atol=1e-8, what="exp_avg_sq")


def _adam_lists():
    return tensors("cpu"), tensors("cpu", scale=0.1), tensors("cpu", scale=0.01, positive=True)


@pytest.mark.parametrize(("change", "error", "message"), [
    (lambda p, m, v: m.__setitem__(2, m[2].double()), TypeError, r"exp_avgs\[2\] must be a float32 tensor"),
    (lambda p, m, v: v.__setitem__(4, v[4][:-1]), ValueError, r"exp_avg_sqs\[4\] must have shape \(1025,\)"),
    (lambda p, m, v: p.__setitem__(2, p[2][..., :2]), ValueError, r"exp_avgs\[2\] must have shape \(2, 3, 2\)"),
    (lambda p, m, v: p.__setitem__(1, torch.zeros(5, 7, dtype=torch.int32)), TypeError, r"params\[1\] must be float"),
    (lambda p, m, v: p.__setitem__(0, p[4][:33]), ValueError, r"params\[\d\] and params\[\d\] must not share memory"),
    (lambda p, m, v: m.__setitem__(1, p[1]), ValueError, r"params\[1\] and exp_avgs\[1\] must not share memory"),
    (lambda p, m, v: m.pop(), ValueError, r"exp_avgs must hold one tensor per parameter \(5\), got 4 tensors"),
], ids=["moment-dtype", "moment-shape", "param-shape", "param-dtype", "params-overlap", "param-is-moment",
        "short-list"])
def test_bad_input_anywhere_is_refused_before_any_write(change, error, message):
    params, exp_avgs, exp_avg_sqs = _adam_lists()
    change(params, exp_avgs, exp_avg_sqs)
    before = [[t.clone() for t in group] for group in (params, exp_avgs, exp_avg_sqs)]
    with pytest.raises(error, match=message):
        HF.zo_adam_update_many_(params, exp_avgs, exp_avg_sqs, PAIRS, offsets=OFFSETS, **ADAM)
    for group, saved in zip((params, exp_avgs, exp_avg_sqs), before, strict=True):
        assert all(torch.equal(t, s) for t, s in zip(group, saved, strict=True))


def test_offsets_must_match_the_params():
    params = tensors("cpu")
    with pytest.raises(ValueError, match=r"offsets must hold one first counter per parameter \(5\), got 4 offsets"):
        HF.zo_sgd_update_many_(params, PAIRS, lr=0.1, offsets=OFFSETS[:4])
    with pytest.raises(TypeError, match="params must be a non-empty sequence of tensors, got Tensor"):
        HF.zo_sgd_update_many_(params[0], PAIRS, lr=0.1, offsets=[0])


def test_a_non_contiguous_parameter_is_updated_through_a_copy():
    """A transposed view among the parameters is updated as zo_sgd_update_ updates it (through a
    contiguous copy written back), in the same call as the others."""
    base = torch.randn(7, 5, generator=torch.Generator().manual_seed(6))
    params = [torch.randn(33), base.t()]
    singles = [params[0].clone(), base.clone().t()]
    HF.zo_sgd_update_many_(params, PAIRS, lr=0.1, offsets=[0, 40])
    for single, offset in zip(singles, [0, 40], strict=True):
        HF.zo_sgd_update_(single, PAIRS, lr=0.1, offset=offset)
    assert torch.equal(params[0], singles[0]) and torch.equal(base.t(), singles[1])
