"""Which function runs each op on each backend: the {op: {backend: launcher}} table.

A launcher takes its op's arguments (heron.kernels.ops) by keyword, less `backend`, and may assume
the launcher contract of docs/kernels.md (validated, contiguous, 2-D where the op says so). The
Triton launchers live in heron_kernels and the C++ ones in heron._C, both imported on first use
(either may be missing: heron.kernels.backends says why); the "torch" launchers below adapt the
contract to heron.kernels.reference (plain PyTorch, any device, the last fallback).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from heron.kernels import backends, chunked, reference


class Launcher:
    """Function `name` of a backend module that is imported on first use (`module()` returns it, or None)."""

    def __init__(self, module: Callable[[], ModuleType | None], name: str):
        self.module, self.name = module, name

    def function(self) -> Callable | None:
        """The launcher, or None when its module is missing or lacks it."""
        return getattr(self.module(), self.name, None)

    def __call__(self, **arguments):
        return getattr(self.module(), self.name)(**arguments)

    def __repr__(self) -> str:
        return f"Launcher({self.module.__name__}, {self.name!r})"


class Routed:
    """A compiled backend's launcher of a linear op: `route(fused, backend, **arguments)` picks the backend's
    fused launcher or the chunked path; it exists where the fused launcher does."""

    def __init__(self, route: Callable, backend: str, fused: Launcher):
        self.route, self.backend, self.fused = route, backend, fused

    def function(self) -> Callable | None:
        return None if self.fused.function() is None else functools.partial(self.route, self.fused, self.backend)

    def __call__(self, **arguments):
        return self.route(self.fused, self.backend, **arguments)

    def __repr__(self) -> str:
        return f"Routed({self.route.__name__}, {self.backend!r}, {self.fused!r})"


def generator(backend: str) -> chunked.Generator:
    """`backend`'s generator launchers, for heron.kernels.chunked."""
    return chunked.Generator(LAUNCHERS["philox_randn_"][backend], LAUNCHERS["perturb_"][backend])


def _on_gpu(x: Tensor) -> bool:
    return x.device.type == "cuda"


def perturbed_linear_route(fused: Launcher, backend: str, x_base: Tensor, x_pert: Tensor | None, weight: Tensor,
                           bias: Tensor | None, *, seed: int, weight_offset: int, bias_offset: int, mu: float,
                           scratch_budget: int | None) -> tuple[Tensor, Tensor]:
    budget = chunked.get_scratch_budget() if scratch_budget is None else chunked.check_budget(scratch_budget)
    chunks = chunked.row_chunks(*weight.shape, weight.dtype, budget) if _on_gpu(x_base) else None
    keys = {"seed": seed, "weight_offset": weight_offset, "bias_offset": bias_offset, "mu": mu}
    if chunks is None:
        return fused(x_base=x_base, x_pert=x_pert, weight=weight, bias=bias, **keys)
    return chunked.perturbed_linear(x_base, x_pert, weight, bias, **keys, chunks=chunks, generator=generator(backend))


def lowrank_perturbed_linear_route(fused: Launcher, backend: str, x_base: Tensor, x_pert: Tensor | None,
                                   weight: Tensor, bias: Tensor | None, *, seed: int, bias_offset: int, mu: float,
                                   rank: int, u_seed: int, u_offset: int, v_offset: int) -> tuple[Tensor, Tensor]:
    keys = {"seed": seed, "bias_offset": bias_offset, "mu": mu, "rank": rank, "u_seed": u_seed, "u_offset": u_offset,
            "v_offset": v_offset}
    if not _on_gpu(x_base):
        return fused(x_base=x_base, x_pert=x_pert, weight=weight, bias=bias, **keys)
    return chunked.lowrank_perturbed_linear(x_base, x_pert, weight, bias, **keys, generator=generator(backend))


def lora_perturbed_linear_route(fused: Launcher, backend: str, x_base: Tensor, x_pert: Tensor | None, weight: Tensor,
                                bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, *, scale: float, seed: int,
                                a_offset: int, b_offset: int, mu: float) -> tuple[Tensor, Tensor]:
    keys = {"scale": scale, "seed": seed, "a_offset": a_offset, "b_offset": b_offset, "mu": mu}
    if not _on_gpu(x_base):
        return fused(x_base=x_base, x_pert=x_pert, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, **keys)
    return chunked.lora_perturbed_linear(x_base, x_pert, weight, bias, lora_a, lora_b, **keys,
                                         generator=generator(backend))


def _routed(route: Callable, launchers: dict[str, Launcher]) -> dict[str, Routed]:
    return {backend: Routed(route, backend, fused) for backend, fused in launchers.items()}


def _triton(name: str) -> Launcher:
    return Launcher(backends.triton_kernels, name)


def _compiled(name: str) -> Launcher:
    return Launcher(backends.extension, name)


# -- the "torch" backend: heron.kernels.reference behind the launcher contract -------------------

def philox_randn_torch(out: Tensor, *, seed: int, offset: int) -> None:
    out.copy_(reference.randn(seed, offset, out.numel(), out.device).view(out.shape))


def philox_words_torch(out: Tensor, *, seed: int, offset: int) -> None:
    counters = offset + torch.arange(out.shape[0], dtype=torch.int64, device=out.device)
    words = reference.philox_words(seed, counters)
    out.copy_(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))


def perturbed_linear_torch(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None, *, seed: int,
                           weight_offset: int, bias_offset: int, mu: float,
                           scratch_budget: int | None) -> tuple[Tensor, Tensor]:
    return reference.perturbed_linear(x_base, weight, bias, seed=seed, offset=weight_offset, bias_offset=bias_offset,
                                      mu=mu, x_pert=x_pert)


def lowrank_perturbed_linear_torch(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None, *,
                                   seed: int, bias_offset: int, mu: float, rank: int, u_seed: int, u_offset: int,
                                   v_offset: int) -> tuple[Tensor, Tensor]:
    return reference.lowrank_perturbed_linear(x_base, weight, bias, seed=seed, u_seed=u_seed, rank=rank,
                                              u_offset=u_offset, v_offset=v_offset, bias_offset=bias_offset, mu=mu,
                                              x_pert=x_pert)


def lora_perturbed_linear_torch(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None,
                                lora_a: Tensor, lora_b: Tensor, *, scale: float, seed: int, a_offset: int,
                                b_offset: int, mu: float) -> tuple[Tensor, Tensor]:
    return reference.lora_perturbed_linear(x_base, weight, bias, lora_a, lora_b, scale=scale, seed=seed,
                                           a_offset=a_offset, b_offset=b_offset, mu=mu, x_pert=x_pert)


def zo_sgd_update_torch(param: Tensor, seeds: Tensor, grads: Tensor, *, offset: int, lr: float,
                        weight_decay: float) -> None:
    param.copy_(reference.zo_sgd_update(param, seeds.tolist(), grads.tolist(), offset=offset, lr=lr,
                                        weight_decay=weight_decay))


def lowrank_zo_sgd_update_torch(param: Tensor, seeds: Tensor, grads: Tensor, *, lr: float, weight_decay: float,
                                rank: int, u_seed: int, u_offset: int, v_offset: int) -> None:
    lowrank = {"rank": rank, "u_seed": u_seed, "u_offset": u_offset, "v_offset": v_offset}
    param.copy_(reference.zo_sgd_update(param, seeds.tolist(), grads.tolist(), offset=0, lr=lr,
                                        weight_decay=weight_decay, lowrank=lowrank))


def zo_adam_update_torch(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, seeds: Tensor, grads: Tensor, *,
                         offset: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                         step: int, decoupled_weight_decay: bool) -> None:
    _adam_torch(param, exp_avg, exp_avg_sq, seeds, grads, offset=offset, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, step=step, decoupled_weight_decay=decoupled_weight_decay, lowrank=None)


def lowrank_zo_adam_update_torch(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, seeds: Tensor, grads: Tensor, *,
                                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                                 decoupled_weight_decay: bool, rank: int, u_seed: int, u_offset: int,
                                 v_offset: int) -> None:
    lowrank = {"rank": rank, "u_seed": u_seed, "u_offset": u_offset, "v_offset": v_offset}
    _adam_torch(param, exp_avg, exp_avg_sq, seeds, grads, offset=0, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, step=step, decoupled_weight_decay=decoupled_weight_decay, lowrank=lowrank)


def _adam_torch(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, seeds: Tensor, grads: Tensor, *,
                lowrank: dict | None, **hyper) -> None:
    p, m, v = reference.zo_adam_update(param, exp_avg, exp_avg_sq, seeds.tolist(), grads.tolist(), lowrank=lowrank,
                                       **hyper)
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def perturb_torch(param: Tensor, *, seed: int, offset: int, alpha: float) -> None:
    param.copy_(reference.perturb(param, seed, offset, alpha))


# -- the table -----------------------------------------------------------------------------------

LAUNCHERS: dict[str, dict[str, Callable]] = {
    "philox_randn_": {"triton": _triton("philox_randn"), "cuda": _compiled("philox_randn_cuda"),
                      "cpu": _compiled("philox_randn_cpu"), "torch": philox_randn_torch},
    "philox_words_": {"triton": _triton("philox_words"), "cuda": _compiled("philox_words_cuda"),
                      "cpu": _compiled("philox_words_cpu"), "torch": philox_words_torch},
    "perturbed_linear": {**_routed(perturbed_linear_route, {
        "triton": _triton("perturbed_linear"), "cuda": _compiled("perturbed_linear_cuda"),
        "cpu": _compiled("perturbed_linear_cpu")}), "torch": perturbed_linear_torch},
    "lowrank_perturbed_linear": {**_routed(lowrank_perturbed_linear_route, {
        "triton": _triton("lowrank_perturbed_linear"), "cuda": _compiled("lowrank_perturbed_linear_cuda"),
        "cpu": _compiled("lowrank_perturbed_linear_cpu")}), "torch": lowrank_perturbed_linear_torch},
    "lora_perturbed_linear": {**_routed(lora_perturbed_linear_route, {
        "triton": _triton("lora_perturbed_linear"), "cuda": _compiled("lora_perturbed_linear_cuda"),
        "cpu": _compiled("lora_perturbed_linear_cpu")}), "torch": lora_perturbed_linear_torch},
    "zo_sgd_update_": {"triton": _triton("zo_sgd_update_"), "cuda": _compiled("zo_sgd_update_cuda"),
                       "cpu": _compiled("zo_sgd_update_cpu"), "torch": zo_sgd_update_torch},
    "lowrank_zo_sgd_update_": {"triton": _triton("lowrank_zo_sgd_update_"),
                               "cuda": _compiled("lowrank_zo_sgd_update_cuda"),
                               "cpu": _compiled("lowrank_zo_sgd_update_cpu"), "torch": lowrank_zo_sgd_update_torch},
    "zo_adam_update_": {"triton": _triton("zo_adam_update_"), "cuda": _compiled("zo_adam_update_cuda"),
                        "cpu": _compiled("zo_adam_update_cpu"), "torch": zo_adam_update_torch},
    "lowrank_zo_adam_update_": {"triton": _triton("lowrank_zo_adam_update_"),
                                "cuda": _compiled("lowrank_zo_adam_update_cuda"),
                                "cpu": _compiled("lowrank_zo_adam_update_cpu"),
                                "torch": lowrank_zo_adam_update_torch},
    "perturb_": {"triton": _triton("perturb_"), "cuda": _compiled("perturb_cuda"), "cpu": _compiled("perturb_cpu"),
                 "torch": perturb_torch},
}


def launcher_function(op: str, backend: str) -> Callable | None:
    """The function that runs `op` on `backend`, or None when that backend's module is missing or lacks it."""
    launcher = LAUNCHERS[op][backend]
    return launcher.function() if isinstance(launcher, (Launcher, Routed)) else launcher
