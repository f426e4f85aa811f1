"""torch.library definitions of heron's ops: schema and fake impl once, one impl per device.

The op's default body is the plain-PyTorch reference (any device); the "cpu" and "cuda" kernels
registered below pick among the backends that run on that device. Each op takes a `backend`
string ("auto" or a name from heron.kernels.backends.BACKENDS) so a caller can pin an implementation and
still go through the dispatcher (and torch.compile). Inputs are validated by the public
functions (heron.kernels.stream, heron.kernels.functional) before they get here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from heron.kernels import backends, reference

Impl = Callable[[torch.Tensor, int, int], None]


def _randn_torch(out: torch.Tensor, seed: int, offset: int) -> None:
    out.copy_(reference.randn(seed, offset, out.numel(), out.device).view(out.shape))


def _words_torch(out: torch.Tensor, seed: int, offset: int) -> None:
    counters = offset + torch.arange(out.shape[0], dtype=torch.int64, device=out.device)
    words = reference.philox_words(seed, counters)
    out.copy_(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))


def _dispatch(impls: dict[str, Callable[[], Impl]], out: torch.Tensor, backend: str) -> Impl:
    return impls[backends.resolve(backend, out.device)]()


_RANDN = {
    "torch": lambda: _randn_torch,
    "triton": lambda: backends.triton_kernels().philox_randn,
    "cpu": lambda: backends.extension().philox_randn_cpu,
    "cuda": lambda: backends.extension().philox_randn_cuda,
}
_WORDS = {
    "torch": lambda: _words_torch,
    "triton": lambda: backends.triton_kernels().philox_words,
    "cpu": lambda: backends.extension().philox_words_cpu,
    "cuda": lambda: backends.extension().philox_words_cuda,
}


@torch.library.custom_op("heron::philox_randn_", mutates_args=("out",))
def philox_randn_(out: torch.Tensor, seed: int, offset: int, backend: str) -> None:
    """Fill contiguous `out` (float32/bfloat16/float16, any shape) with randn(seed, offset + i)."""
    _randn_torch(out, seed, offset)


@torch.library.custom_op("heron::philox_words_", mutates_args=("out",))
def philox_words_(out: torch.Tensor, seed: int, offset: int, backend: str) -> None:
    """Fill contiguous int32 `out` of shape (n, 4) with the Philox4x32-10 words at offset + i."""
    _words_torch(out, seed, offset)


for _device in ("cpu", "cuda"):

    @philox_randn_.register_kernel(_device)
    def _(out, seed, offset, backend):
        _dispatch(_RANDN, out, backend)(out, seed, offset)

    @philox_words_.register_kernel(_device)
    def _(out, seed, offset, backend):
        _dispatch(_WORDS, out, backend)(out, seed, offset)


@philox_randn_.register_fake
def _(out, seed, offset, backend):
    return None


@philox_words_.register_fake
def _(out, seed, offset, backend):
    return None


# ---------------------------------------------------------------------------------------------
# Fused ZO ops (launcher contract: docs/kernels.md). Inputs are 2-D / contiguous / validated.
# ---------------------------------------------------------------------------------------------

_LAUNCHER_SUFFIX = {"cpu": "_cpu", "cuda": "_cuda"}


def _launcher(name: str, tensor: torch.Tensor, backend: str) -> Callable:
    """The implementation of op `name` for `tensor`'s device under `backend`."""
    chosen = backends.resolve(backend, tensor.device)
    if chosen == "torch":
        return _TORCH_IMPLS[name]
    if chosen == "triton":
        return getattr(backends.triton_kernels(), name)
    return getattr(backends.extension(), name.rstrip("_") + _LAUNCHER_SUFFIX[chosen])


def _seeds_grads(seeds: torch.Tensor, grads: torch.Tensor) -> tuple[list[int], list[float]]:
    return seeds.tolist(), grads.tolist()


def _lowrank_spec(rank: int, u_seed: int, u_offset: int, v_offset: int) -> dict | None:
    return None if rank == 0 else {"rank": rank, "u_seed": u_seed, "u_offset": u_offset, "v_offset": v_offset}


def _perturbed_linear_torch(x_base, x_pert, weight, bias, *, seed, weight_offset, bias_offset, mu, rank=0,
                            u_seed=0, u_offset=0, v_offset=0):
    if rank == 0:
        return reference.perturbed_linear(x_base, weight, bias, seed=seed, offset=weight_offset,
                                          bias_offset=bias_offset, mu=mu, x_pert=x_pert)
    return reference.lowrank_perturbed_linear(x_base, weight, bias, seed=seed, u_seed=u_seed, rank=rank,
                                              u_offset=u_offset, v_offset=v_offset, bias_offset=bias_offset,
                                              mu=mu, x_pert=x_pert)


def _lora_perturbed_linear_torch(x_base, x_pert, weight, bias, lora_a, lora_b, *, scale, seed, a_offset, b_offset,
                                 mu):
    return reference.lora_perturbed_linear(x_base, weight, bias, lora_a, lora_b, scale=scale, seed=seed,
                                           a_offset=a_offset, b_offset=b_offset, mu=mu, x_pert=x_pert)


def _zo_sgd_update_torch(param, seeds, grads, *, offset, lr, weight_decay, rank=0, u_seed=0, u_offset=0,
                         v_offset=0):
    seed_list, grad_list = _seeds_grads(seeds, grads)
    param.copy_(reference.zo_sgd_update(param, seed_list, grad_list, offset=offset, lr=lr, weight_decay=weight_decay,
                                        lowrank=_lowrank_spec(rank, u_seed, u_offset, v_offset)))


def _zo_adam_update_torch(param, exp_avg, exp_avg_sq, seeds, grads, *, offset, lr, beta1, beta2, eps, weight_decay,
                          step, decoupled_weight_decay, rank=0, u_seed=0, u_offset=0, v_offset=0):
    seed_list, grad_list = _seeds_grads(seeds, grads)
    p, m, v = reference.zo_adam_update(
        param, exp_avg, exp_avg_sq, seed_list, grad_list, offset=offset, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, decoupled_weight_decay=decoupled_weight_decay,
        lowrank=_lowrank_spec(rank, u_seed, u_offset, v_offset))
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def _perturb_torch(param, seed, offset, alpha):
    param.copy_(reference.perturb(param, seed, offset, alpha))


_TORCH_IMPLS: dict[str, Callable] = {
    "perturbed_linear": _perturbed_linear_torch,
    "lora_perturbed_linear": _lora_perturbed_linear_torch,
    "zo_sgd_update_": _zo_sgd_update_torch,
    "zo_adam_update_": _zo_adam_update_torch,
    "perturb_": _perturb_torch,
}


@torch.library.custom_op("heron::perturbed_linear", mutates_args=())
def perturbed_linear(
    x: torch.Tensor, x_pert: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, seed: int,
    weight_offset: int, bias_offset: int, mu: float, rank: int, u_seed: int, u_offset: int, v_offset: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_base, y_pert) of a dual-stream linear layer; x (M, K), weight (N, K) -> (M, N) each."""
    return _perturbed_linear_torch(x, x_pert, weight, bias, seed=seed, weight_offset=weight_offset,
                                   bias_offset=bias_offset, mu=mu, rank=rank, u_seed=u_seed, u_offset=u_offset,
                                   v_offset=v_offset)


@torch.library.custom_op("heron::lora_perturbed_linear", mutates_args=())
def lora_perturbed_linear(
    x: torch.Tensor, x_pert: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, seed: int, a_offset: int, b_offset: int, mu: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_base, y_pert) of a LoRA linear whose adapters A (r, K), B (N, r) are perturbed."""
    return _lora_perturbed_linear_torch(x, x_pert, weight, bias, lora_a, lora_b, scale=scale, seed=seed,
                                        a_offset=a_offset, b_offset=b_offset, mu=mu)


@torch.library.custom_op("heron::zo_sgd_update_", mutates_args=("param",))
def zo_sgd_update_(
    param: torch.Tensor, seeds: torch.Tensor, grads: torch.Tensor, offset: int, lr: float, weight_decay: float,
    rank: int, u_seed: int, u_offset: int, v_offset: int, backend: str,
) -> None:
    """param -= lr * (sum_j grads[j] z_j + weight_decay * param), z_j regenerated from (seeds[j], offset)."""
    _zo_sgd_update_torch(param, seeds, grads, offset=offset, lr=lr, weight_decay=weight_decay, rank=rank,
                         u_seed=u_seed, u_offset=u_offset, v_offset=v_offset)


@torch.library.custom_op("heron::zo_adam_update_", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def zo_adam_update_(
    param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, seeds: torch.Tensor, grads: torch.Tensor,
    offset: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
    decoupled_weight_decay: bool, rank: int, u_seed: int, u_offset: int, v_offset: int, backend: str,
) -> None:
    """Adam/AdamW step with gradient sum_j grads[j] z_j, moments updated in place."""
    _zo_adam_update_torch(param, exp_avg, exp_avg_sq, seeds, grads, offset=offset, lr=lr, beta1=beta1, beta2=beta2,
                          eps=eps, weight_decay=weight_decay, step=step,
                          decoupled_weight_decay=decoupled_weight_decay, rank=rank, u_seed=u_seed,
                          u_offset=u_offset, v_offset=v_offset)


@torch.library.custom_op("heron::perturb_", mutates_args=("param",))
def perturb_(param: torch.Tensor, seed: int, offset: int, alpha: float, backend: str) -> None:
    """param += alpha * z, z regenerated from (seed, offset)."""
    _perturb_torch(param, seed, offset, alpha)


for _device in ("cpu", "cuda"):

    @perturbed_linear.register_kernel(_device)
    def _(x, x_pert, weight, bias, seed, weight_offset, bias_offset, mu, rank, u_seed, u_offset, v_offset, backend):
        return _launcher("perturbed_linear", x, backend)(
            x, x_pert, weight, bias, seed=seed, weight_offset=weight_offset, bias_offset=bias_offset, mu=mu,
            rank=rank, u_seed=u_seed, u_offset=u_offset, v_offset=v_offset)

    @lora_perturbed_linear.register_kernel(_device)
    def _(x, x_pert, weight, bias, lora_a, lora_b, scale, seed, a_offset, b_offset, mu, backend):
        return _launcher("lora_perturbed_linear", x, backend)(
            x, x_pert, weight, bias, lora_a, lora_b, scale=scale, seed=seed, a_offset=a_offset, b_offset=b_offset,
            mu=mu)

    @zo_sgd_update_.register_kernel(_device)
    def _(param, seeds, grads, offset, lr, weight_decay, rank, u_seed, u_offset, v_offset, backend):
        _launcher("zo_sgd_update_", param, backend)(
            param, seeds, grads, offset=offset, lr=lr, weight_decay=weight_decay, rank=rank, u_seed=u_seed,
            u_offset=u_offset, v_offset=v_offset)

    @zo_adam_update_.register_kernel(_device)
    def _(param, exp_avg, exp_avg_sq, seeds, grads, offset, lr, beta1, beta2, eps, weight_decay, step,
          decoupled_weight_decay, rank, u_seed, u_offset, v_offset, backend):
        _launcher("zo_adam_update_", param, backend)(
            param, exp_avg, exp_avg_sq, seeds, grads, offset=offset, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, step=step, decoupled_weight_decay=decoupled_weight_decay, rank=rank,
            u_seed=u_seed, u_offset=u_offset, v_offset=v_offset)

    @perturb_.register_kernel(_device)
    def _(param, seed, offset, alpha, backend):
        _launcher("perturb_", param, backend)(param, seed, offset, alpha)


@perturbed_linear.register_fake
def _(x, x_pert, weight, bias, seed, weight_offset, bias_offset, mu, rank, u_seed, u_offset, v_offset, backend):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@lora_perturbed_linear.register_fake
def _(x, x_pert, weight, bias, lora_a, lora_b, scale, seed, a_offset, b_offset, mu, backend):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@zo_sgd_update_.register_fake
def _(param, seeds, grads, offset, lr, weight_decay, rank, u_seed, u_offset, v_offset, backend):
    return None


@zo_adam_update_.register_fake
def _(param, exp_avg, exp_avg_sq, seeds, grads, offset, lr, beta1, beta2, eps, weight_decay, step,
      decoupled_weight_decay, rank, u_seed, u_offset, v_offset, backend):
    return None


@perturb_.register_fake
def _(param, seed, offset, alpha, backend):
    return None
