"""FLOP formulas for heron's ops, registered with torch.utils.flop_counter.

Counted as torch counts matmuls: 2 * M * N * K per (M x K) @ (K x N) product. Generating the
direction and the elementwise updates are not matmuls and are not counted (as torch does not
count elementwise ops), except the low-rank U @ V_j.T products that an update forms tile by tile.

torch's own table leaves out the CPU flash-attention kernel that scaled_dot_product_attention
dispatches to on CPU; it is registered here with torch's formulas for the other SDPA kernels
(Q K^T and P V products, forward; their gradients, backward), so CPU and GPU counts agree.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from heron.kernels import ops as _ops  # noqa: F401 - the ops must exist before formulas are registered


def perturbed_linear_flops(x_shape, x_pert_shape, weight_shape, bias_shape, seed, weight_offset, bias_offset, mu,
                           rank, *args, out_shape=None, **kwargs) -> int:
    """Two (M x K) @ (K x N) products (base stream, and either x_pert @ (W + mu Z).T or, with a
    shared input, x @ Z.T); low rank: base, x_pert @ W.T unless the input is shared (the base
    product serves both streams), and (x_pert @ V) @ U.T."""
    m, k = x_shape
    n = weight_shape[0]
    if rank == 0:
        return 2 * (2 * m * n * k)
    frozen = 2 * m * n * k * (1 if x_pert_shape is None else 2)
    return frozen + 2 * m * k * rank + 2 * m * rank * n


def lora_perturbed_linear_flops(x_shape, x_pert_shape, weight_shape, bias_shape, a_shape, b_shape, *args,
                                out_shape=None, **kwargs) -> int:
    """Frozen x @ W.T once per distinct input, plus the rank-r projections of both streams."""
    m, k = x_shape
    n = weight_shape[0]
    r = a_shape[0]
    frozen = 2 * m * n * k * (1 if x_pert_shape is None else 2)
    adapters = 2 * (2 * m * k * r + 2 * m * r * n)
    return frozen + adapters


def _lowrank_update_flops(param_shape, seeds_shape, rank) -> int:
    if rank == 0:
        return 0
    out_features, in_features = param_shape
    return seeds_shape[0] * 2 * out_features * in_features * rank


def zo_sgd_update_flops(param_shape, seeds_shape, grads_shape, offset, lr, weight_decay, rank, *args,
                        out_shape=None, **kwargs) -> int:
    return _lowrank_update_flops(param_shape, seeds_shape, rank)


def zo_adam_update_flops(param_shape, exp_avg_shape, exp_avg_sq_shape, seeds_shape, grads_shape, offset, lr, beta1,
                         beta2, eps, weight_decay, step, decoupled, rank, *args, out_shape=None, **kwargs) -> int:
    return _lowrank_update_flops(param_shape, seeds_shape, rank)


register_flop_formula(torch.ops.heron.perturbed_linear)(perturbed_linear_flops)
register_flop_formula(torch.ops.heron.lora_perturbed_linear)(lora_perturbed_linear_flops)
register_flop_formula(torch.ops.heron.zo_sgd_update_)(zo_sgd_update_flops)
register_flop_formula(torch.ops.heron.zo_adam_update_)(zo_adam_update_flops)


def cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


for _op, _formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, cpu_sdpa_flops),
                      (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, cpu_sdpa_backward_flops)):
    if _op not in flop_registry:  # a later torch may count it itself
        register_flop_formula(_op)(_formula)
