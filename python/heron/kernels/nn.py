"""nn.Module wrappers around the dual-stream ops.

Each module behaves as its torch counterpart in `forward` and adds `dual_forward`, which runs the
base and the perturbed stream together (both outputs from one pass over the weights). Offsets
are the module's parameters' offsets in a heron.ParameterLayout of the whole model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from heron.kernels import functional as HF


class PerturbedLinear(nn.Linear):
    """nn.Linear with a dual-stream forward (full or low-rank weight directions)."""

    def dual_forward(
        self, x: torch.Tensor, x_pert: torch.Tensor | None = None, *, seed: int, mu: float, offset: int = 0,
        bias_offset: int | None = None, rank: int = 0, u_seed: int | None = None, backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_base, y_pert), each (..., out_features); x, x_pert (..., in_features).

        offset / bias_offset: the weight's and bias's first counters (bias defaults to right after
        the weight). rank > 0 uses the low-rank direction U V.T / sqrt(rank).
        """
        if rank:
            return HF.lowrank_perturbed_linear(x, self.weight, self.bias, seed=seed, rank=rank, mu=mu, offset=offset,
                                               u_seed=u_seed, x_pert=x_pert, bias_offset=bias_offset, backend=backend)
        return HF.perturbed_linear(x, self.weight, self.bias, seed=seed, offset=offset, mu=mu, x_pert=x_pert,
                                   bias_offset=bias_offset, backend=backend)


class LoRALinear(nn.Module):
    """A frozen linear layer plus trainable low-rank adapters: y = x W.T + b + (alpha/r) (x A.T) B.T.

    Parameters (registration order): weight (out, in) and bias (out,) frozen; lora_a (r, in),
    lora_b (out, r) trainable. lora_a starts Kaiming-uniform and lora_b at zero, so a fresh
    adapter leaves the layer's output unchanged. A ParameterLayout of trainable parameters
    places lora_b right after lora_a, which is the default b_offset of dual_forward.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16.0, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if rank < 1 or rank > min(in_features, out_features):
            raise ValueError(f"rank must be in [1, min(in_features, out_features) = "
                             f"{min(in_features, out_features)}], got {rank}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, alpha
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, alpha: float = 16.0) -> LoRALinear:
        """Wrap an existing nn.Linear: its weight and bias are copied and frozen."""
        module = cls(linear.in_features, linear.out_features, rank, alpha, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(linear.weight)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        y = nn.functional.linear(x, self.weight, self.bias)
        return y + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)

    def dual_forward(
        self, x: torch.Tensor, x_pert: torch.Tensor | None = None, *, seed: int, mu: float, offset: int = 0,
        b_offset: int | None = None, backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_base, y_pert); only lora_a (keyed at offset) and lora_b (at b_offset) are perturbed."""
        return HF.lora_perturbed_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, scale=self.scale,
                                        seed=seed, mu=mu, offset=offset, b_offset=b_offset, x_pert=x_pert,
                                        backend=backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, bias={self.bias is not None}")
