"""The public functional API over every available backend: results, batch dims, odd layouts, FLOP
counting and bad input (the ops themselves: tests/kernels/test_<op>.py and test_ops.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import heron
from heron.kernels import functional as HF
from heron.kernels import reference
from tests.helpers import assert_close_to_reference, cpu_backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEED, OFFSET = 2**33 + 7, 2**35 + 3


def _lowp_linear(x, w, b):
    y = torch.nn.functional.linear(x, w)
    return y if b is None else y + b


@pytest.mark.parametrize("backend", cpu_backends("perturbed_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared_input", [True, False])
def test_perturbed_linear_batch_dims(backend, dtype, shared_input):
    x = torch.randn(2, 3, 17, dtype=dtype)
    x_pert = None if shared_input else torch.randn(2, 3, 17, dtype=dtype)
    w, b = torch.randn(9, 17, dtype=dtype), torch.randn(9, dtype=dtype)
    mu = 1e-2
    y_base, y_pert = HF.perturbed_linear(x, w, b, seed=SEED, offset=OFFSET, mu=mu, x_pert=x_pert, backend=backend)
    assert y_base.shape == y_pert.shape == (2, 3, 9)
    ref_base, ref_pert = reference.perturbed_linear(x, w, b, seed=SEED, offset=OFFSET, bias_offset=OFFSET + 9 * 17,
                                                    mu=mu, x_pert=x_pert)
    z = heron.seeded_randn((9, 17), SEED, OFFSET)
    zb = heron.seeded_randn(9, SEED, OFFSET + 9 * 17)
    xp = x if x_pert is None else x_pert
    torch_base = _lowp_linear(x, w, b)
    torch_pert = _lowp_linear(xp, (w.float() + mu * z).to(dtype), (b.float() + mu * zb).to(dtype))
    assert_close_to_reference(y_base, ref_base, torch_base)
    assert_close_to_reference(y_pert, ref_pert, torch_pert)


@pytest.mark.parametrize("backend", cpu_backends("perturbed_linear"))
def test_perturbed_linear_non_contiguous_inputs(backend):
    x = torch.randn(17, 5).t()  # (5, 17), non-contiguous
    w = torch.randn(17, 3).t()  # (3, 17)
    got = HF.perturbed_linear(x, w, None, seed=1, mu=0.1, backend=backend)
    want = HF.perturbed_linear(x.contiguous(), w.contiguous(), None, seed=1, mu=0.1, backend=backend)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", cpu_backends("perturbed_linear"))
def test_direction_inside_linear_is_the_stream(backend):
    """With x = I and the shared-input path, (y_pert - y_base) / mu recovers Z.T exactly enough."""
    n_in, n_out, mu = 13, 6, 0.5
    w = torch.randn(n_out, n_in)
    y_base, y_pert = HF.perturbed_linear(torch.eye(n_in), w, seed=5, offset=2**40, mu=mu, backend=backend)
    z = heron.seeded_randn((n_out, n_in), 5, 2**40)
    torch.testing.assert_close((y_pert - y_base) / mu, z.T, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends("perturbed_linear"))
@pytest.mark.parametrize("shared_input", [True, False])
def test_lowrank_perturbed_linear(backend, shared_input):
    x = torch.randn(4, 11)
    x_pert = None if shared_input else torch.randn(4, 11)
    w, b = torch.randn(7, 11), torch.randn(7)
    got = HF.lowrank_perturbed_linear(x, w, b, seed=SEED, u_seed=99, rank=3, mu=0.1, offset=OFFSET, x_pert=x_pert,
                                      backend=backend)
    u_off, v_off = HF.lowrank_offsets(OFFSET, 7, 3)
    want = reference.lowrank_perturbed_linear(x, w, b, seed=SEED, u_seed=99, rank=3, u_offset=u_off, v_offset=v_off,
                                              bias_offset=OFFSET + 77, mu=0.1, x_pert=x_pert)
    for g, e in zip(got, want, strict=True):
        assert_close_to_reference(g, e, None)


@pytest.mark.parametrize("backend", cpu_backends("lora_perturbed_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared_input", [True, False])
def test_lora_perturbed_linear(backend, dtype, shared_input):
    layer = heron.LoRALinear(19, 10, rank=4).to(dtype)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 19, dtype=dtype)
    x_pert = None if shared_input else torch.randn(3, 19, dtype=dtype)
    y_base, y_pert = layer.dual_forward(x, x_pert, seed=SEED, mu=0.05, offset=OFFSET, backend=backend)
    ref_base, ref_pert = reference.lora_perturbed_linear(
        x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, scale=layer.scale, seed=SEED, a_offset=OFFSET,
        b_offset=OFFSET + 4 * 19, mu=0.05, x_pert=x_pert)
    torch_base = layer(x)
    za = heron.seeded_randn((4, 19), SEED, OFFSET)
    zb = heron.seeded_randn((10, 4), SEED, OFFSET + 76)
    xp = x if x_pert is None else x_pert
    a_p = (layer.lora_a.float() + 0.05 * za).to(dtype)
    b_p = (layer.lora_b.float() + 0.05 * zb).to(dtype)
    torch_pert = _lowp_linear(xp, layer.weight, layer.bias) + layer.scale * (xp @ a_p.T) @ b_p.T
    assert_close_to_reference(y_base, ref_base, torch_base.detach())
    assert_close_to_reference(y_pert, ref_pert, torch_pert.detach())
    torch.testing.assert_close(y_base, layer(x).detach(), atol=2e-2 if dtype != torch.float32 else 1e-5, rtol=2e-2)


@pytest.mark.parametrize("backend", cpu_backends("zo_sgd_update_"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_zo_sgd_update_q_directions(backend, dtype):
    p = torch.randn(5, 33, dtype=dtype)
    pairs = [(SEED, 0.3), (SEED + 1, -1.2), (7, 0.05)]
    want = reference.zo_sgd_update(p, [s for s, _ in pairs], [g for _, g in pairs], offset=OFFSET, lr=0.1,
                                   weight_decay=0.01)
    HF.zo_sgd_update_(p, pairs, lr=0.1, offset=OFFSET, weight_decay=0.01, backend=backend)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(p.float(), want.float(), atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("backend", cpu_backends("zo_sgd_update_"))
def test_zo_sgd_update_lowrank(backend):
    p = torch.randn(9, 14)
    want = reference.zo_sgd_update(p, [3, 4], [0.5, -0.25], offset=OFFSET, lr=0.1,
                                   lowrank={"rank": 2, "u_seed": 11, "u_offset": OFFSET, "v_offset": OFFSET + 18})
    HF.zo_sgd_update_(p, [(3, 0.5), (4, -0.25)], lr=0.1, offset=OFFSET, rank=2, u_seed=11, backend=backend)
    torch.testing.assert_close(p, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends("zo_adam_update_"))
@pytest.mark.parametrize("decoupled", [False, True])
def test_zo_adam_matches_reference_over_steps(backend, decoupled):
    p = torch.randn(4, 21)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    for step in range(1, 4):
        seed, g = heron.derive_seed(1, step), 0.7 / step
        HF.zo_adam_update_(p, m, v, seed, g, lr=1e-2, step=step, offset=OFFSET, weight_decay=0.1,
                           decoupled_weight_decay=decoupled, backend=backend)
        p_ref, m_ref, v_ref = reference.zo_adam_update(
            p_ref, m_ref, v_ref, [seed], [g], offset=OFFSET, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=0.1, step=step, decoupled_weight_decay=decoupled)
    torch.testing.assert_close(p, p_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m, m_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v, v_ref, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends("zo_adam_update_"))
def test_zo_adam_matches_torch_optim_with_materialised_gradient(backend):
    """The fused Adam equals torch.optim.Adam fed the materialised gradient g * z."""
    p = torch.randn(3, 8)
    twin = torch.nn.Parameter(p.clone())
    optimizer = torch.optim.Adam([twin], lr=1e-2)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in (1, 2):
        HF.zo_adam_update_(p, m, v, 40 + step, 0.9, lr=1e-2, step=step, offset=5, backend=backend)
        twin.grad = 0.9 * heron.seeded_randn((3, 8), 40 + step, 5)
        optimizer.step()
    torch.testing.assert_close(p, twin.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends("perturb_"))
def test_perturb_round_trip(backend):
    p = torch.randn(1025)
    original = p.clone()
    HF.perturb_(p, SEED, alpha=1e-3, offset=OFFSET, backend=backend)
    torch.testing.assert_close(p, original + 1e-3 * heron.seeded_randn(1025, SEED, OFFSET), atol=1e-7, rtol=0)
    HF.perturb_(p, SEED, alpha=-1e-3, offset=OFFSET, backend=backend)
    torch.testing.assert_close(p, original, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", cpu_backends("perturb_"))
def test_update_non_contiguous_param(backend):
    base = torch.randn(6, 4)
    p = base.t()  # (4, 6) non-contiguous view
    want = reference.perturb(p.contiguous(), 3, 0, 0.5)
    HF.perturb_(p, 3, alpha=0.5, backend=backend)
    torch.testing.assert_close(p, want)
    torch.testing.assert_close(base.t(), want)  # the caller's storage was updated


def test_flop_counter_counts_fused_ops():
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with FlopCounterMode(display=False) as counter:
        HF.perturbed_linear(x, w, seed=1, mu=1e-3)
    assert counter.get_total_flops() == 2 * (2 * 8 * 4 * 16)
    layer = heron.LoRALinear(16, 4, rank=2)
    with FlopCounterMode(display=False) as counter:
        layer.dual_forward(x, seed=1, mu=1e-3)
    assert counter.get_total_flops() == 2 * 8 * 4 * 16 + 2 * (2 * 8 * 16 * 2 + 2 * 8 * 2 * 4)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_input", "two_inputs"])
def test_flop_counter_counts_lowrank_linear(shared):
    """Low rank: the frozen product once per distinct input, plus (x_pert V) U^T."""
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    x_pert = None if shared else torch.randn(8, 16)
    with FlopCounterMode(display=False) as counter:
        HF.lowrank_perturbed_linear(x, w, seed=1, rank=2, mu=1e-3, x_pert=x_pert)
    frozen = 2 * 8 * 4 * 16 * (1 if shared else 2)
    assert counter.get_total_flops() == frozen + 2 * 8 * 16 * 2 + 2 * 8 * 2 * 4


class TestBadInput:
    def test_mismatched_in_features(self):
        with pytest.raises(ValueError, match=r"x's last dim must equal weight's in_features 6.*\(3, 5\)"):
            HF.perturbed_linear(torch.randn(3, 5), torch.randn(4, 6), seed=1, mu=0.1)

    def test_mismatched_dtype(self):
        with pytest.raises(TypeError, match="weight must have x's dtype torch.float32"):
            HF.perturbed_linear(torch.randn(3, 5), torch.randn(4, 5, dtype=torch.float16), seed=1, mu=0.1)

    def test_mismatched_device(self):
        with pytest.raises(ValueError, match="bias must be on x's device cpu.*device meta"):
            HF.perturbed_linear(torch.randn(3, 5), torch.randn(4, 5), torch.empty(4, device="meta"), seed=1, mu=0.1)

    def test_bias_shape(self):
        with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
            HF.perturbed_linear(torch.randn(3, 5), torch.randn(4, 5), torch.randn(5), seed=1, mu=0.1)

    def test_x_pert_shape(self):
        with pytest.raises(ValueError, match=r"x_pert must have shape \(3, 5\)"):
            HF.perturbed_linear(torch.randn(3, 5), torch.randn(4, 5), seed=1, mu=0.1, x_pert=torch.randn(2, 5))

    @pytest.mark.parametrize("mu", [0.0, float("nan"), float("inf")])
    def test_bad_mu(self, mu):
        with pytest.raises(ValueError, match="mu must be"):
            HF.perturbed_linear(torch.randn(3, 5), torch.randn(4, 5), seed=1, mu=mu)

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16.*torch.int64"):
            HF.perturbed_linear(torch.ones(3, 5, dtype=torch.int64), torch.randn(4, 5), seed=1, mu=0.1)

    def test_lora_rank_mismatch(self):
        with pytest.raises(ValueError, match=r"lora_b must have shape \(out_features, r\) = \(4, 2\).*\(4, 3\)"):
            HF.lora_perturbed_linear(torch.randn(3, 5), torch.randn(4, 5), None, torch.randn(2, 5),
                                     torch.randn(4, 3), scale=1.0, seed=1, mu=0.1)

    def test_lora_a_in_features(self):
        with pytest.raises(ValueError, match=r"lora_a must have shape \(2, 5\)"):
            HF.lora_perturbed_linear(torch.randn(3, 5), torch.randn(4, 5), None, torch.randn(2, 6),
                                     torch.randn(4, 2), scale=1.0, seed=1, mu=0.1)

    def test_lowrank_rank_too_big(self):
        with pytest.raises(ValueError, match=r"rank must be in \[1, min\(out, in\) = 4\], got 5"):
            HF.lowrank_perturbed_linear(torch.randn(3, 5), torch.randn(4, 5), seed=1, rank=5, mu=0.1)

    def test_counter_overflow(self):
        with pytest.raises(ValueError, match="offset \\+ numel overflows"):
            HF.perturbed_linear(torch.randn(3, 5), torch.randn(4, 5), seed=1, mu=0.1, offset=2**63 - 10)

    def test_update_seed_pairs(self):
        with pytest.raises(TypeError, match=r"seed\[1\] must be a \(seed, grad\) pair"):
            HF.zo_sgd_update_(torch.randn(3), [(1, 0.1), 2], lr=0.1)
        with pytest.raises(TypeError, match="non-empty sequence of \\(seed, grad\\) pairs"):
            HF.zo_sgd_update_(torch.randn(3), 5, lr=0.1)

    def test_update_non_finite_grad(self):
        with pytest.raises(ValueError, match="grad must be finite"):
            HF.zo_sgd_update_(torch.randn(3), 1, float("nan"), lr=0.1)

    def test_adam_moments(self):
        p = torch.randn(3, 4)
        with pytest.raises(TypeError, match="exp_avg must be a float32 tensor"):
            HF.zo_adam_update_(p, torch.zeros(3, 4, dtype=torch.float16), torch.zeros(3, 4), 1, 0.1, lr=0.1, step=1)
        with pytest.raises(ValueError, match=r"exp_avg_sq must have shape \(3, 4\)"):
            HF.zo_adam_update_(p, torch.zeros(3, 4), torch.zeros(4, 3), 1, 0.1, lr=0.1, step=1)
        with pytest.raises(ValueError, match="step must be >= 1"):
            HF.zo_adam_update_(p, torch.zeros(3, 4), torch.zeros(3, 4), 1, 0.1, lr=0.1, step=0)

    def test_lowrank_update_needs_matrix(self):
        with pytest.raises(ValueError, match="needs a 2-D parameter"):
            HF.zo_sgd_update_(torch.randn(7), 1, 0.1, lr=0.1, rank=2)

    def test_bad_input_leaves_param_untouched(self):
        p = torch.randn(3, 4)
        before = p.clone()
        with pytest.raises(ValueError):
            HF.zo_sgd_update_(p, [(1, 0.1), (2, float("inf"))], lr=0.1)
        assert torch.equal(p, before)
