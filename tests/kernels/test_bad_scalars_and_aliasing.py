"""Bad input to the functional ops that is only bad in float32 or through memory layout: scalars
and projected gradients that overflow float32, 0-d tensor gradients of the wrong kind, Adam moments
that alias the parameter or each other, and the edges (empty in_features, meta tensors, the last
counter). Each is refused on every backend, naming the argument, before anything is written."""

from __future__ import annotations

import pytest
import torch

from heron.kernels import backends, stream
from heron.kernels import functional as HF
from tests.helpers import cpu_backends

FLOAT32_MAX = torch.finfo(torch.float32).max
TOO_BIG = 1e39  # finite as a Python float, inf in float32


def _adam(param, m, v, seed=1, grad=0.5, **kwargs):
    return HF.zo_adam_update_(param, m, v, seed, grad, **{"lr": 1e-3, "step": 1, **kwargs})


def _untouched(call, *tensors, error=ValueError, match=""):
    before = [t.clone() for t in tensors]
    with pytest.raises(error, match=match):
        call()
    for t, saved in zip(tensors, before, strict=True):
        assert torch.equal(t, saved)


@pytest.mark.parametrize("backend", cpu_backends("zo_sgd_update_"))
@pytest.mark.parametrize(("argument", "kwargs"), [
    ("lr", {"lr": TOO_BIG}), ("lr", {"lr": -TOO_BIG}), ("weight_decay", {"weight_decay": TOO_BIG}),
    ("grad", {"grad": TOO_BIG}), ("grad", {"grad": -3.5e38}),
])
def test_sgd_scalars_must_be_finite_in_float32(backend, argument, kwargs):
    p = torch.randn(4, 5)
    args = {"grad": 0.5, "lr": 0.1, **kwargs}
    _untouched(lambda: HF.zo_sgd_update_(p, 1, args.pop("grad"), **args, backend=backend), p,
               match=f"{argument} must be finite in float32")


@pytest.mark.parametrize("backend", cpu_backends("zo_adam_update_"))
@pytest.mark.parametrize(("argument", "kwargs"), [
    ("lr", {"lr": TOO_BIG}), ("eps", {"eps": TOO_BIG}), ("grad", {"grad": TOO_BIG}),
    ("weight_decay", {"weight_decay": 2 * FLOAT32_MAX}),
])
def test_adam_scalars_must_be_finite_in_float32(backend, argument, kwargs):
    p, m, v = torch.randn(4, 5), torch.zeros(4, 5), torch.zeros(4, 5)
    _untouched(lambda: _adam(p, m, v, backend=backend, **kwargs), p, m, v,
               match=f"{argument} must be finite in float32")


@pytest.mark.parametrize("backend", cpu_backends("perturb_"))
def test_perturb_alpha_must_be_finite_in_float32(backend):
    p = torch.randn(7)
    _untouched(lambda: HF.perturb_(p, 1, alpha=TOO_BIG, backend=backend), p, match="alpha must be finite in float32")


@pytest.mark.parametrize("backend", cpu_backends("perturbed_linear"))
def test_linear_mu_must_be_finite_and_nonzero_in_float32(backend):
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"mu must be finite in float32 \(\|mu\| <= 3.403e\+38\), got 1e\+39"):
        HF.perturbed_linear(x, w, seed=1, mu=TOO_BIG, backend=backend)
    with pytest.raises(ValueError, match="mu must be non-zero in float32"):
        HF.perturbed_linear(x, w, seed=1, mu=1e-50, backend=backend)  # 0.0 once the kernel reads it
    with pytest.raises(ValueError, match="scale must be finite in float32"):
        HF.lora_perturbed_linear(x, w, None, torch.randn(2, 5), torch.randn(4, 2), scale=TOO_BIG, seed=1, mu=0.1,
                                 backend=backend)


@pytest.mark.parametrize("backend", cpu_backends("zo_sgd_update_"))
@pytest.mark.parametrize(("grad", "error", "match"), [
    (torch.tensor(float("nan")), ValueError, r"grad must be finite in float32 .*got nan"),
    (torch.tensor(float("inf")), ValueError, r"grad must be finite in float32 .*got inf"),
    (torch.tensor(1e39, dtype=torch.float64), ValueError, "grad must be finite in float32"),
    (torch.tensor(True), TypeError, "grad must be a real number, got a torch.bool tensor"),
    (torch.tensor(1 + 2j), TypeError, "grad must be a real number, got a torch.complex64 tensor"),
])
def test_tensor_grads_are_checked_like_numbers(backend, grad, error, match):
    p = torch.randn(4, 5)
    _untouched(lambda: HF.zo_sgd_update_(p, 1, grad, lr=0.1, backend=backend), p, error=error, match=match)
    _untouched(lambda: HF.zo_sgd_update_(p, [(1, 0.5), (2, grad)], lr=0.1, backend=backend), p, error=error,
               match=match.replace("grad", r"seed\[1\]\[1\] \(grad\)", 1))


@pytest.mark.parametrize("backend", cpu_backends("zo_sgd_update_"))
def test_tensor_grad_keeps_its_value(backend):
    """A valid 0-d tensor grad (any real dtype) updates exactly like the same Python number."""
    p, q = torch.randn(4, 5), None
    q = p.clone()
    HF.zo_sgd_update_(p, 3, torch.tensor(0.25, dtype=torch.float64), lr=0.1, backend=backend)
    HF.zo_sgd_update_(q, 3, 0.25, lr=0.1, backend=backend)
    assert torch.equal(p, q)


def _overlapping_moments(kind: str, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(param, exp_avg, exp_avg_sq) of shape (4, 5) that share memory as `kind` says."""
    if kind == "exp_avg is param":
        return p, p, torch.zeros(4, 5)
    if kind == "exp_avg_sq is param":
        return p, torch.zeros(4, 5), p
    if kind == "moments are one tensor":
        m = torch.zeros(4, 5)
        return p, m, m
    if kind == "moments overlap partly":
        buffer = torch.zeros(30)
        return p, buffer[:20].view(4, 5), buffer[10:30].view(4, 5)
    if kind == "exp_avg overlaps param partly":
        buffer = torch.randn(30)
        return buffer[:20].view(4, 5), buffer[10:30].view(4, 5), torch.zeros(4, 5)
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", cpu_backends("zo_adam_update_"))
@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("kind", ["exp_avg is param", "exp_avg_sq is param", "moments are one tensor",
                                  "moments overlap partly", "exp_avg overlaps param partly"])
def test_adam_moments_must_not_alias(backend, rank, kind):
    p, m, v = _overlapping_moments(kind, torch.randn(4, 5))
    _untouched(lambda: _adam(p, m, v, rank=rank, backend=backend), p, m, v, match="must not share memory")


@pytest.mark.parametrize("backend", cpu_backends("zo_adam_update_"))
def test_adam_moments_side_by_side_in_one_buffer_are_fine(backend):
    """Disjoint slices of one storage do not overlap: accepted, and the same result as separate tensors."""
    buffer = torch.zeros(40)
    p = torch.randn(4, 5)
    q = p.clone()
    _adam(p, buffer[:20].view(4, 5), buffer[20:].view(4, 5), backend=backend)
    _adam(q, torch.zeros(4, 5), torch.zeros(4, 5), backend=backend)
    assert torch.equal(p, q)


@pytest.mark.parametrize("backend", cpu_backends("perturbed_linear"))
def test_zero_in_features_is_a_bias_only_layer(backend):
    x, w, b = torch.randn(3, 2, 0), torch.randn(4, 0), torch.randn(4)
    y_base, y_pert = HF.perturbed_linear(x, w, b, seed=5, mu=0.5, backend=backend)
    z_b = stream.seeded_randn(4, 5, 0)
    assert y_base.shape == (3, 2, 4)
    assert torch.equal(y_base, b.expand(3, 2, 4))
    torch.testing.assert_close(y_pert, (b + 0.5 * z_b).expand(3, 2, 4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tensor", ["weight", "bias", "targets"])
def test_linear_cross_entropy_refuses_tensors_on_another_device(tensor):
    hidden, weight, bias, targets = torch.randn(3, 4), torch.randn(6, 4), torch.randn(6), torch.tensor([0, 1, 2])
    args = {"weight": weight, "bias": bias, "targets": targets}
    args[tensor] = args[tensor].to("meta")
    with pytest.raises(ValueError, match=f"{tensor} must be on hidden's device cpu, got .*meta"):
        HF.linear_cross_entropy(hidden, **args)


def test_counter_limit_is_the_same_in_python_and_cpp():
    ext = backends.extension()
    if ext is None:
        pytest.skip("heron._C not built")
    assert ext.COUNTER_LIMIT == stream.COUNTER_LIMIT == 2**63
    last = stream.COUNTER_LIMIT - 4  # the last 4 counters: offset + numel == COUNTER_LIMIT is allowed
    for backend in cpu_backends("philox_words_"):  # the words are exact on every backend
        assert torch.equal(stream.philox_words(4, 1, last, backend=backend), stream.philox_words(4, 1, last,
                                                                                              backend="torch"))
    ext.philox_randn_cpu(torch.empty(4), seed=1, offset=last)
    with pytest.raises(RuntimeError, match="offset \\+ numel overflows"):
        ext.philox_randn_cpu(torch.empty(5), seed=1, offset=last)
