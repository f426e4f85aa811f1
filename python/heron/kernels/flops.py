"""FLOP formulas for heron's ops, registered with torch.utils.flop_counter.

Counted as torch counts matmuls: 2 * M * N * K per (M x K) @ (K x N) product. Generating the
direction and the elementwise updates are not matmuls and are not counted (as torch does not
count elementwise ops), except the low-rank U @ V_j.T products that an update forms tile by tile.
Formulas read the op's arguments by name (heron.kernels.ops), so they ignore arguments they do not
need.

torch's own table leaves out the CPU flash-attention kernel that scaled_dot_product_attention
dispatches to on CPU; it is registered here with torch's formulas for the other SDPA kernels
(Q K^T and P V products, forward; their gradients, backward), so CPU and GPU counts agree.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from heron.kernels.ops import OPS


def perturbed_linear_flops(*, x_base, x_pert, weight, **_) -> int:
    """Two (M x K) @ (K x N) products: the base stream, and either x_pert @ (W + mu Z).T or, with a
    shared input, x @ Z.T."""
    m, k = x_base
    return 2 * (2 * m * weight[0] * k)


def lowrank_perturbed_linear_flops(*, x_base, x_pert, weight, rank, **_) -> int:
    """The frozen product once per distinct input (the base product serves both streams of a shared
    input), and (x_pert @ V) @ U.T."""
    m, k = x_base
    n = weight[0]
    frozen = 2 * m * n * k * (1 if x_pert is None else 2)
    return frozen + 2 * m * k * rank + 2 * m * rank * n


def lora_perturbed_linear_flops(*, x_base, x_pert, weight, lora_a, **_) -> int:
    """Frozen x @ W.T once per distinct input, plus the rank-r projections of both streams."""
    m, k = x_base
    n, r = weight[0], lora_a[0]
    frozen = 2 * m * n * k * (1 if x_pert is None else 2)
    return frozen + 2 * (2 * m * k * r + 2 * m * r * n)


def lowrank_update_flops(*, param, seeds, rank, **_) -> int:
    """The U @ V_j.T products a low-rank update forms tile by tile, one per direction."""
    out_features, in_features = param
    return seeds[0] * 2 * out_features * in_features * rank


def _register(op: str, count) -> None:
    """count(**arguments by name, tensors replaced by their shapes) is op's FLOP formula."""
    definition = OPS[op]

    def formula(*args, out_shape=None, **kwargs) -> int:
        return count(**definition.bind(args, kwargs))

    register_flop_formula(getattr(torch.ops.heron, op))(formula)


_register("perturbed_linear", perturbed_linear_flops)
_register("lowrank_perturbed_linear", lowrank_perturbed_linear_flops)
_register("lora_perturbed_linear", lora_perturbed_linear_flops)
_register("lowrank_zo_sgd_update_", lowrank_update_flops)
_register("lowrank_zo_adam_update_", lowrank_update_flops)


def cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


for _op, _formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, cpu_sdpa_flops),
                      (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, cpu_sdpa_backward_flops)):
    if _op not in flop_registry:  # a later torch may count it itself
        register_flop_formula(_op)(_formula)
