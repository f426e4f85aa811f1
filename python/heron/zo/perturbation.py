"""One direction of a zeroth-order step, and how a parameter takes it (both executors use this).

`Perturbation` says, for one forward, which stream runs ("dual": base and perturbed together;
"base" or "pert": one alone), the direction's seed and scale (theta + scale * z), its low-rank
settings, and which tensors are the trainable parameters: `names` maps a parameter's identity to
its layout name, so a tied parameter (one tensor under several module names) has one name and one
direction wherever it is read. Every function that perturbs a parameter records how it did so in
`reads` (name -> routes), which `ZOUpdater.plan()` reports.

The perturbed value of a parameter is always computed the same way: `perturb_` (theta + scale * z,
the fused kernel) for a full direction, `addmm_` of alpha U V^T on its (out, -1) matrix view for a
low-rank one. `perturbed_copy` returns it as a new tensor (the generic executor's bounded
transient: one parameter at a time); `PerturbedInPlace` writes it over the parameter and restores
the exact old values afterwards (the fx executor's in-place layers); `dual_linear` computes both
streams of a linear layer through the fused ops without forming it at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from heron.kernels import backends
from heron.kernels import functional as HF
from heron.kernels.stream import ParameterLayout, seeded_randn

STREAMS = ("dual", "base", "pert")


@dataclass
class Perturbation:
    """One direction: the stream (seed) and scale of theta + scale * z over the layout."""

    layout: ParameterLayout
    seed: int
    scale: float
    lowrank_rank: int = 0
    u_seed: int = 0
    backend: str | None = None
    # ids of the Dual inputs whose last use is the node being run (set by the fx interpreter): their
    # base tensor is dropped as soon as the base stream has been computed, before the perturbed one.
    consumable: frozenset[int] = frozenset()
    # ids of the input tensors the node being run may overwrite in place (set by the fx interpreter).
    reusable: frozenset[int] = frozenset()
    # "dual": both streams together; "base" / "pert": one stream alone (the sequential schedule),
    # the perturbed one with each trainable parameter perturbed where it is read.
    stream: str = "dual"
    # id(parameter) -> layout name, for every trainable parameter (see the module docstring)
    names: Mapping[int, str] = field(default_factory=dict)
    # layout names of the weights that take low-rank directions (when lowrank_rank > 0)
    lowrank_names: frozenset[str] = frozenset()
    # layout name -> how the forward read it ("fused linear", "in place", "copy", ...), filled as it runs
    reads: dict[str, set[str]] = field(default_factory=dict)
    # False: convolutions run on the whole batch (ZOUpdater's conv_chunks)
    conv_chunks: bool = True

    def can_reuse(self, tensor: object) -> bool:
        return isinstance(tensor, torch.Tensor) and id(tensor) in self.reusable

    def name_of(self, tensor: object) -> str | None:
        """The layout name of `tensor` if it is a trainable parameter, else None."""
        return self.names.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None

    def is_lowrank(self, name: str) -> bool:
        return bool(self.lowrank_rank) and name in self.lowrank_names

    def record(self, name: str, route: str) -> None:
        self.reads.setdefault(name, set()).add(route)

    def backend_for(self, device: torch.device) -> str:
        """The kernel backend this perturbation's ops run with on `device` (`backend` resolved)."""
        return backends.resolve(self.backend, device)


def lowrank_factors(weight: torch.Tensor, name: str, pert: Perturbation) -> tuple[torch.Tensor, torch.Tensor, float]:
    """U (out, r), V (fan_in, r) of the low-rank direction of `weight` (its (out, fan_in) matrix
    view) keyed as functional.lowrank_perturbed_linear keys them, in the weight's dtype, and
    alpha = scale / sqrt(r): the perturbation is alpha * U @ V.T."""
    out_features, fan_in = weight.shape[0], weight[0].numel()
    rank = min(pert.lowrank_rank, out_features, fan_in)
    u_offset, v_offset = HF.lowrank_offsets(pert.layout.offset(name), out_features, rank)
    u = seeded_randn((out_features, rank), pert.u_seed, u_offset, device=weight.device, dtype=weight.dtype)
    v = seeded_randn((fan_in, rank), pert.seed, v_offset, device=weight.device, dtype=weight.dtype)
    return u, v, pert.scale / math.sqrt(rank)


def _perturb(target: torch.Tensor, name: str, pert: Perturbation,
             lowrank: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> None:
    """target (a parameter's values, contiguous or not) += its direction, in place."""
    if pert.is_lowrank(name):
        u, v, alpha = lowrank if lowrank is not None else lowrank_factors(target, name, pert)
        target.view(target.shape[0], -1).addmm_(u, v.t(), alpha=alpha)
    elif target.is_contiguous():
        # the op itself: seed, scale and the layout's offsets were checked when the updater was built,
        # and this runs once per parameter and pass (the functional's checks cost twice the op's call)
        torch.ops.heron.perturb_(param=target, seed=pert.seed, offset=pert.layout.offset(name), alpha=pert.scale,
                                 backend=pert.backend_for(target.device))
    else:
        HF.perturb_(target, pert.seed, alpha=pert.scale, offset=pert.layout.offset(name), backend=pert.backend)


def perturbed_copy(param: torch.Tensor, name: str, pert: Perturbation) -> torch.Tensor:
    """theta + scale * z of parameter `name` as a new contiguous tensor (the parameter is untouched);
    bit-identical to what PerturbedInPlace writes over the parameter."""
    copy = param.detach().clone(memory_format=torch.contiguous_format)
    _perturb(copy, name, pert)
    return copy


class PerturbedInPlace:
    """Context: the listed parameters hold theta + scale * z inside, their exact old values after."""

    def __init__(self, trainable: list[tuple[str, nn.Parameter]], pert: Perturbation,
                 lowrank: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None):
        """lowrank: name -> (U, V, alpha) for weights whose factors the caller already drew."""
        self.trainable, self.pert, self.lowrank = trainable, pert, lowrank or {}
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        try:
            for name, p in self.trainable:
                self.saved.append(p.detach().clone())
                self.pert.record(name, "in place")
                _perturb(p.data, name, self.pert, self.lowrank.get(name))
        except BaseException:
            self.__exit__()  # what was written so far is restored before the error propagates
            raise
        return self

    def __exit__(self, *exc):
        for (_, p), old in zip(self.trainable, self.saved, strict=False):  # strict=False: a partial __enter__
            p.data.copy_(old)
        self.saved.clear()
        return False


def scaled_bias_direction(bias: torch.Tensor, name: str, pert: Perturbation) -> torch.Tensor:
    """scale * z_b for a bias (out,): a bias keeps its full direction under low-rank perturbations."""
    offset = pert.layout.offset(name)
    return seeded_randn(bias.shape[0], pert.seed, offset, device=bias.device, dtype=bias.dtype).mul_(pert.scale)


def weight_route_cheaper(x_pert: torch.Tensor, weight: torch.Tensor) -> bool:
    """For a low-rank direction with x_pert (..., K) (M rows) and W (N, K): whether W + alpha U V^T
    (2 N K r FLOPs) costs less than (x_pert V) U^T (2 M r (K + N))."""
    n, k = weight.shape
    m = x_pert.numel() // max(k, 1)
    return n * k < m * (k + n)


def copy_cheaper(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """For a full direction, whether the perturbed stream is faster as F.linear on a perturbed copy of
    W (N, K) than through the fused kernel: on CPU when the input has more rows M than the layer has
    outputs N. The fused kernel reads W once for both streams and never forms W + mu Z, which pays
    where the weight dominates the work; its tiled GEMMs run below one whole-matrix GEMM, which
    costs more where the activations dominate (measured on the 2-core CPU, one thread: the fused
    kernel 7-14% slower at M >= 1024 rows and N <= 768, 6% faster at M = 16). The copy is one
    weight, dropped after the call."""
    rows = x.numel() // max(x.shape[-1], 1)
    return x.device.type == "cpu" and rows > weight.shape[0]


def fusable_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the fused dual-stream linear ops take these operands (float dtypes, one dtype and device)."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    return (weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and all(t.dtype in HF.FLOAT_DTYPES and t.dtype == x.dtype and t.device == x.device for t in tensors)
            and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0])))


def dual_linear(x_base: torch.Tensor, x_pert: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                pert: Perturbation) -> tuple[torch.Tensor, torch.Tensor]:
    """Both streams of x W^T + b with a trainable W: y_base = x_base W^T + b, y_pert = x_pert (W +
    scale Z)^T + (b + scale z_b) (z_b only when b is trainable; W takes its low-rank direction when
    it has one), through the fused ops, or on a perturbed copy of W where that is faster
    (`copy_cheaper`). x_pert None: both streams share x (the first perturbed layer), which the
    fused kernel then reads once. Operands must pass `fusable_linear`."""
    weight_name = pert.names[id(weight)]
    bias_name = pert.name_of(bias)
    trained_bias = bias if bias_name is not None else None
    bias_offset = None if bias_name is None else pert.layout.offset(bias_name)
    copy_route = not pert.is_lowrank(weight_name) and copy_cheaper(x_base, weight)
    route = ("linear on a perturbed copy" if copy_route else
             "fused low-rank linear" if pert.is_lowrank(weight_name) else "fused linear")
    for name in (weight_name, bias_name):
        if name is not None:
            pert.record(name, route)
    if copy_route:
        b_pert = bias if bias_name is None else perturbed_copy(bias, bias_name, pert)
        return (nn.functional.linear(x_base, weight, bias),
                nn.functional.linear(x_base if x_pert is None else x_pert, perturbed_copy(weight, weight_name, pert),
                                     b_pert))
    if pert.is_lowrank(weight_name):
        if x_pert is not None and weight_route_cheaper(x_pert, weight):
            # x_pert @ (W + alpha U V^T).T: forming the perturbed weight (2 N K r FLOPs) costs less than
            # the fused kernel's (x_pert V) U^T (2 M r (K + N)) when the batch is wide and the layer narrow
            u, v, alpha = lowrank_factors(weight, weight_name, pert)
            w_pert = torch.addmm(weight.detach(), u, v.t(), alpha=alpha)
            b_pert = bias if bias_name is None else bias + scaled_bias_direction(bias, bias_name, pert)
            return nn.functional.linear(x_base, weight, bias), nn.functional.linear(x_pert, w_pert, b_pert)
        rank = min(pert.lowrank_rank, *weight.shape)
        y_base, y_pert = HF.lowrank_perturbed_linear(
            x_base, weight, trained_bias, seed=pert.seed, rank=rank, mu=pert.scale,
            offset=pert.layout.offset(weight_name), u_seed=pert.u_seed, x_pert=x_pert, bias_offset=bias_offset,
            backend=pert.backend)
    else:
        y_base, y_pert = HF.perturbed_linear(x_base, weight, trained_bias, seed=pert.seed,
                                             offset=pert.layout.offset(weight_name), mu=pert.scale, x_pert=x_pert,
                                             bias_offset=bias_offset, backend=pert.backend)
    if bias is not None and bias_name is None:
        y_base, y_pert = y_base + bias, y_pert + bias
    return y_base, y_pert
