"""heron's ops, each defined once: a signature below is the op.

Each definition is a Python signature (its docstring says what the op computes, with shapes);
`define_op` turns it into a `torch.library` custom op: the schema is inferred from the signature,
and every other layer reads the arguments by name:
- heron.kernels.functional calls the op by keyword (after validating user input);
- the op runs `LAUNCHERS[op][backend](**arguments)` (heron.kernels.launchers) for the backend
  `backends.resolve(backend, device)` picks on the device of the op's first tensor (CPU and CUDA
  tensors; any other device runs the plain-PyTorch "torch" launcher);
- the fake impl (`shapes=`) checks shapes and dtypes with torch._check and returns the outputs'
  metadata; heron.kernels.flops counts FLOPs from the arguments by name.
So a new argument of an op is written here once, plus in each backend's launcher.

The ops come in full and low-rank variants (`lowrank_*`: the direction of a 2-D weight is
U @ V.T / sqrt(rank), docs/kernels.md) and take a `backend` string ("auto" or a name from
heron.kernels.backends.BACKENDS), so a caller can pin an implementation and still go through the
dispatcher (and torch.compile). Their inputs follow the launcher contract of docs/kernels.md.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from heron.kernels import backends
from heron.kernels.launchers import LAUNCHERS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the float ops take


@dataclass(frozen=True)
class OpDefinition:
    """An op as defined here: its name, signature, mutated arguments and the torch.library op."""

    name: str
    signature: inspect.Signature
    mutates: tuple[str, ...]
    op: Callable

    @functools.cached_property
    def device_argument(self) -> str:
        """The first tensor argument: its device picks the backend."""
        return next(name for name, p in self.signature.parameters.items() if p.annotation in ("Tensor", Tensor))

    @functools.cached_property
    def _positional_names(self) -> tuple[str, ...]:
        return tuple(name for name, p in self.signature.parameters.items() if p.kind is not p.KEYWORD_ONLY)

    @functools.cached_property
    def _defaults(self) -> dict[str, Any]:
        return {name: p.default for name, p in self.signature.parameters.items() if p.default is not p.empty}

    def bind(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """{argument name: value} of a call (defaults filled in), however the dispatcher split it into args
        and kwargs (the dispatcher has checked the call against the schema; this runs on every call, so it
        maps names directly instead of through inspect.Signature.bind)."""
        if len(args) > len(self._positional_names):
            raise TypeError(f"heron::{self.name} takes {len(self._positional_names)} positional arguments, got "
                            f"{len(args)}")
        arguments = dict(self._defaults)
        arguments.update(zip(self._positional_names, args, strict=False))
        arguments.update(kwargs)
        return arguments


OPS: dict[str, OpDefinition] = {}

# The ops are registered through the low-level torch.library.Library API, not torch.library.custom_op:
# custom_op runs every call through Python autograd and ADInplaceOrView wrappers and fills defaults
# with inspect (about 22 us per call on the 2-core CPU against 3 us here), which a ZO step pays once
# per parameter and stream. What the wrappers did is done here: mutated tensors' version counters are
# bumped (so autograd still sees the writes), and the ops have no autograd formula (forward only:
# inputs that require grad get the autograd fallback's warning on backward).
_LIBRARY = torch.library.Library("heron", "DEF")


def _run(name: str, args: Sequence[Any], kwargs: dict[str, Any], *, dispatch: bool) -> Any:
    definition = OPS[name]
    arguments = definition.bind(args, kwargs)
    backend = arguments.pop("backend")
    chosen = backends.resolve(backend, arguments[definition.device_argument].device) if dispatch else "torch"
    result = LAUNCHERS[name][chosen](**arguments)
    if definition.mutates:
        torch.autograd.graph.increment_version([arguments[m] for m in definition.mutates])
    return result


def _fake(name: str, shapes: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    arguments = OPS[name].bind(args, kwargs)
    del arguments["backend"]
    return shapes(**arguments)


def define_op(*, mutates: tuple[str, ...] = (), shapes: Callable[..., Any]) -> Callable[[Callable], Callable]:
    """Register the decorated signature as torch.ops.heron.<its name>.

    mutates: the tensor arguments written in place. shapes: the fake impl, called with the
    arguments by keyword (less `backend`); it checks them with torch._check and returns empty
    outputs (None for an op without outputs)."""

    def define(signature_of: Callable) -> Callable:
        name = signature_of.__name__
        _LIBRARY.define(name + torch.library.infer_schema(signature_of, mutates_args=mutates))
        # CPU and CUDA tensors run the backend `backend` resolves to; any other device the torch launcher.
        _LIBRARY.impl(name, _kernel(name, dispatch=False), "CompositeExplicitAutograd")
        for key in ("CPU", "CUDA"):
            _LIBRARY.impl(name, _kernel(name, dispatch=True), key)
        torch.library.register_fake(f"heron::{name}", functools.partial(_fake, name, shapes), lib=_LIBRARY)
        op = getattr(torch.ops.heron, name)
        OPS[name] = OpDefinition(name, inspect.signature(signature_of), mutates, op)
        return op

    return define


def _kernel(name: str, *, dispatch: bool) -> Callable[..., Any]:
    """The kernel the dispatcher calls for op `name`: the resolved backend's launcher (dispatch=True)
    or the torch launcher."""
    def kernel(*args: Any, **kwargs: Any) -> Any:
        return _run(name, args, kwargs, dispatch=dispatch)
    return kernel


# ---------------------------------------------------------------------------------------------
# Fake impls: shape and dtype checks, outputs' metadata
# ---------------------------------------------------------------------------------------------

def _check_float(t: Tensor, name: str) -> None:
    torch._check(t.dtype in FLOAT_DTYPES, lambda: f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_like(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    torch._check(t.dtype == ref.dtype, lambda: f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    torch._check(t.device == ref.device, lambda: f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _check_shape(t: Tensor, name: str, shape: Sequence[Any], meaning: str) -> None:
    torch._check(t.dim() == len(shape), lambda: f"{name} must be {len(shape)}-D {meaning}, got shape {tuple(t.shape)}")
    for dim, size in enumerate(shape):
        torch._check(t.shape[dim] == size, lambda: f"{name} must have shape {tuple(shape)} {meaning}, got "
                                                   f"{tuple(t.shape)}")


def _linear_shapes(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None,
                   **_: Any) -> tuple[Tensor, Tensor]:
    """x_base (M, K), x_pert like it or None, weight (N, K), bias (N,) or None -> (y_base, y_pert), (M, N) each."""
    _check_float(x_base, "x_base")
    torch._check(x_base.dim() == 2, lambda: f"x_base must be 2-D (M, K), got shape {tuple(x_base.shape)}")
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    (m, k), n = x_base.shape, weight.shape[0]
    _check_like(weight, "weight", x_base, "x_base")
    _check_shape(weight, "weight", (n, k), "(N, K) with K = x_base.shape[1]")
    if x_pert is not None:
        _check_like(x_pert, "x_pert", x_base, "x_base")
        _check_shape(x_pert, "x_pert", (m, k), "(M, K) like x_base")
    if bias is not None:
        _check_like(bias, "bias", x_base, "x_base")
        _check_shape(bias, "bias", (n,), "(N,)")
    return x_base.new_empty((m, n)), x_base.new_empty((m, n))


def _lowrank_linear_shapes(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None, *,
                           rank: int, **_: Any) -> tuple[Tensor, Tensor]:
    torch._check(rank >= 1, lambda: f"rank must be >= 1, got {rank}")
    return _linear_shapes(x_base, x_pert, weight, bias)


def _lora_linear_shapes(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None,
                        lora_a: Tensor, lora_b: Tensor, **_: Any) -> tuple[Tensor, Tensor]:
    outputs = _linear_shapes(x_base, x_pert, weight, bias)
    torch._check(lora_a.dim() == 2, lambda: f"lora_a must be 2-D (r, K), got shape {tuple(lora_a.shape)}")
    rank, (n, k) = lora_a.shape[0], weight.shape
    _check_like(lora_a, "lora_a", x_base, "x_base")
    _check_shape(lora_a, "lora_a", (rank, k), "(r, K)")
    _check_like(lora_b, "lora_b", x_base, "x_base")
    _check_shape(lora_b, "lora_b", (n, rank), "(N, r) with r = lora_a.shape[0]")
    return outputs


def _check_directions(param: Tensor, seeds: Tensor, grads: Tensor) -> None:
    _check_float(param, "param")
    torch._check(seeds.dtype == torch.int64 and seeds.dim() == 1,
                 lambda: f"seeds must be an int64 (q,) tensor, got {seeds.dtype} of shape {tuple(seeds.shape)}")
    torch._check(grads.dtype == torch.float32, lambda: f"grads must be float32, got {grads.dtype}")
    _check_shape(grads, "grads", (seeds.shape[0],), "(q,) like seeds")


def _check_lowrank_param(param: Tensor, rank: int) -> None:
    torch._check(rank >= 1, lambda: f"rank must be >= 1, got {rank}")
    torch._check(param.dim() == 2, lambda: f"low-rank updates need a 2-D param, got shape {tuple(param.shape)}")


def _check_moments(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    for moment, name in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
        torch._check(moment.dtype == torch.float32, lambda name=name, moment=moment: f"{name} must be float32, got "
                                                                                     f"{moment.dtype}")
        _check_shape(moment, name, tuple(param.shape), "(param's shape)")


def _sgd_shapes(param: Tensor, seeds: Tensor, grads: Tensor, **_: Any) -> None:
    _check_directions(param, seeds, grads)


def _lowrank_sgd_shapes(param: Tensor, seeds: Tensor, grads: Tensor, *, rank: int, **_: Any) -> None:
    _check_directions(param, seeds, grads)
    _check_lowrank_param(param, rank)


def _adam_shapes(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, seeds: Tensor, grads: Tensor, **_: Any) -> None:
    _check_directions(param, seeds, grads)
    _check_moments(param, exp_avg, exp_avg_sq)


def _lowrank_adam_shapes(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, seeds: Tensor, grads: Tensor, *,
                         rank: int, **_: Any) -> None:
    _adam_shapes(param, exp_avg, exp_avg_sq, seeds, grads)
    _check_lowrank_param(param, rank)


def _perturb_shapes(param: Tensor, **_: Any) -> None:
    _check_float(param, "param")


def _randn_shapes(out: Tensor, **_: Any) -> None:
    _check_float(out, "out")


def _words_shapes(out: Tensor, **_: Any) -> None:
    torch._check(out.dtype == torch.int32, lambda: f"out must be int32, got {out.dtype}")
    torch._check(out.dim() == 2 and out.shape[1] == 4, lambda: f"out must have shape (n, 4), got {tuple(out.shape)}")


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

@define_op(mutates=("out",), shapes=_randn_shapes)
def philox_randn_(out: Tensor, *, seed: int, offset: int, backend: str) -> None:
    """Fill contiguous `out` (float32/bfloat16/float16, any shape) with randn(seed, offset + i)."""


@define_op(mutates=("out",), shapes=_words_shapes)
def philox_words_(out: Tensor, *, seed: int, offset: int, backend: str) -> None:
    """Fill contiguous int32 `out` of shape (n, 4) with the Philox4x32-10 words at offset + i."""


@define_op(shapes=_linear_shapes)
def perturbed_linear(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None, *, seed: int,
                     weight_offset: int, bias_offset: int, mu: float, backend: str,
                     scratch_budget: int | None = None) -> tuple[Tensor, Tensor]:
    """(y_base, y_pert), (M, N) each, for x_base (M, K), x_pert like it or None (shared), weight (N, K), bias (N,):
    y_base = x_base @ W.T + b;  y_pert = x_pert @ (W + mu Z).T + b + mu z_b, Z keyed (seed, weight_offset).
    scratch_budget: bytes of perturbation scratch the GPU route may take (heron.kernels.chunked; None: the
    global budget, 0: the fused kernel); CPU tensors ignore it."""


@define_op(shapes=_lowrank_linear_shapes)
def lowrank_perturbed_linear(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None, *,
                             seed: int, bias_offset: int, mu: float, rank: int, u_seed: int, u_offset: int,
                             v_offset: int, backend: str) -> tuple[Tensor, Tensor]:
    """perturbed_linear with Z = U @ V.T / sqrt(rank): U (N, rank) keyed (u_seed, u_offset), V (K, rank) keyed
    (seed, v_offset); the bias direction z_b keyed (seed, bias_offset)."""


@define_op(shapes=_lora_linear_shapes)
def lora_perturbed_linear(x_base: Tensor, x_pert: Tensor | None, weight: Tensor, bias: Tensor | None,
                          lora_a: Tensor, lora_b: Tensor, *, scale: float, seed: int, a_offset: int, b_offset: int,
                          mu: float, backend: str) -> tuple[Tensor, Tensor]:
    """(y_base, y_pert) of a frozen linear layer W (N, K), b with LoRA adapters A (r, K), B (N, r) perturbed by
    Z_A keyed (seed, a_offset) and Z_B keyed (seed, b_offset)."""


@define_op(mutates=("param",), shapes=_sgd_shapes)
def zo_sgd_update_(param: Tensor, seeds: Tensor, grads: Tensor, *, offset: int, lr: float, weight_decay: float,
                   backend: str) -> None:
    """param -= lr * (sum_j grads[j] z_j + weight_decay * param), z_j keyed (seeds[j], offset); seeds int64 (q,),
    grads float32 (q,)."""


@define_op(mutates=("param",), shapes=_lowrank_sgd_shapes)
def lowrank_zo_sgd_update_(param: Tensor, seeds: Tensor, grads: Tensor, *, lr: float, weight_decay: float,
                           rank: int, u_seed: int, u_offset: int, v_offset: int, backend: str) -> None:
    """zo_sgd_update_ of a 2-D param (N, K) with z_j = U @ V_j.T / sqrt(rank), U keyed (u_seed, u_offset),
    V_j keyed (seeds[j], v_offset)."""


@define_op(mutates=("param", "exp_avg", "exp_avg_sq"), shapes=_adam_shapes)
def zo_adam_update_(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, seeds: Tensor, grads: Tensor, *,
                    offset: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                    decoupled_weight_decay: bool, backend: str) -> None:
    """Adam / AdamW step (1-based `step`) with gradient sum_j grads[j] z_j, z_j keyed (seeds[j], offset); the
    float32 moments (param's shape) are updated in place."""


@define_op(mutates=("param", "exp_avg", "exp_avg_sq"), shapes=_lowrank_adam_shapes)
def lowrank_zo_adam_update_(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, seeds: Tensor, grads: Tensor, *,
                            lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                            decoupled_weight_decay: bool, rank: int, u_seed: int, u_offset: int, v_offset: int,
                            backend: str) -> None:
    """zo_adam_update_ of a 2-D param with low-rank directions as in lowrank_zo_sgd_update_."""


@define_op(mutates=("param",), shapes=_perturb_shapes)
def perturb_(param: Tensor, *, seed: int, offset: int, alpha: float, backend: str) -> None:
    """param += alpha * z, z keyed (seed, offset) over param's flat index."""
