"""Dual-stream execution of a whole model: the base and the perturbed forward run together.

The model is traced once with torch.fx; every module that owns parameters becomes a leaf. The
graph is then interpreted on `Dual(base, pert)` values: layers with a fused dual-stream kernel
(nn.Linear, heron.PerturbedLinear, heron.LoRALinear) compute both streams in one pass over their
weights; BatchNorm runs the base stream with running-statistics updates and the perturbed stream
without; other parametrised layers are perturbed in place from the seeded stream for the
perturbed forward and restored bit-exactly from a copy of that one layer's parameters; layers
and functions without trainable parameters are applied to each stream (once while the two
streams are still identical). Dropout draws one mask for both streams, so the finite difference
sees only the parameter change.

Memory: the interpreter frees each activation after its last use, and an activation it allocated
itself that is used for the last time (no other live value shares its storage, it is neither a
model input nor the smashed data) is overwritten in place by ReLU, BatchNorm, and Conv2d layers
whose output has the input's shape. Convolutions run in bounded batch chunks, so none holds a
whole-batch transient beside its output: a conv-bn-relu stack holds one activation per stream.

Single-stream passes (Perturbation.stream "base" or "pert", the updaters' sequential schedule) run
the same graph on one stream: the perturbed pass with each trainable layer perturbed in place
while it runs (by alpha U V^T for a low-rank weight) and no statistics update, the base pass as
the module would run.
"""

from __future__ import annotations

import math
import operator
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from heron.kernels import functional as HF
from heron.kernels.nn import LoRALinear, PerturbedLinear
from heron.kernels.stream import ParameterLayout, seeded_randn


@dataclass
class Dual:
    """A value in both streams; pert is None while the perturbed stream equals the base one."""

    base: Any
    pert: Any = None

    @property
    def pert_or_base(self) -> Any:
        return self.base if self.pert is None else self.pert


@dataclass
class Perturbation:
    """One direction: the stream (seed) and scale of theta + scale * z over the layout."""

    layout: ParameterLayout
    seed: int
    scale: float
    lowrank_rank: int = 0
    u_seed: int = 0
    backend: str | None = None
    # ids of the Dual inputs whose last use is the node being run (set by the interpreter): their
    # base tensor is dropped as soon as the base stream has been computed, before the perturbed one.
    consumable: frozenset[int] = frozenset()
    # ids of the input tensors the node being run may overwrite in place (set by the interpreter).
    reusable: frozenset[int] = frozenset()
    # "dual": both streams together; "base" / "pert": one stream alone (the sequential schedule),
    # the perturbed one with each trainable layer perturbed in place while it runs.
    stream: str = "dual"
    # single-stream passes draw dropout masks from this seed (per layer), so both passes share them
    dropout_seed: int = 0

    def can_reuse(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and id(tensor) in self.reusable


class _LeafTracer(torch.fx.Tracer):
    """Every module that directly owns parameters or buffers is a leaf, plus torch.nn's own."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (LoRALinear, PerturbedLinear)):
            return True
        own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        return own or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """The fx graph of `model` with parametrised modules as leaves; a clear error if untraceable."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure becomes one clear message
        raise TypeError(
            f"model {type(model).__name__} cannot be traced by torch.fx for the fused dual-stream step "
            f"({type(error).__name__}: {error}); use MeZOUpdater, or write the forward without data-dependent "
            f"Python control flow"
        ) from error
    return torch.fx.GraphModule(model, graph)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors held by an environment value (a Dual, a tensor or a container of them).

    Iterative: a recursive closure would form a reference cycle that keeps the tensors alive
    until the cyclic garbage collector runs."""
    found: list[torch.Tensor] = []
    pending = [value]
    while pending:
        v = pending.pop()
        if isinstance(v, Dual):
            pending.extend((v.base, v.pert))
        elif isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            pending.extend(v)
        elif isinstance(v, dict):
            pending.extend(v.values())
    return found


def _map(value: Any, fn: Callable[[Dual], Any]) -> Any:
    return torch.fx.node.map_aggregate(value, lambda v: fn(v) if isinstance(v, Dual) else v)


def _has_pert(value: Any) -> bool:
    found = []
    _map(value, lambda d: found.append(d.pert is not None))
    return any(found)


def _release_bases(args: Any, pert: Perturbation | None) -> None:
    """Drop the base tensors of inputs used for the last time (their perturbed twin stays)."""
    if pert is None or not pert.consumable:
        return

    def release(d: Dual) -> None:
        if id(d) in pert.consumable and d.pert is not None:
            d.base = None

    _map(args, release)


def _apply_both(fn: Callable, args: tuple, kwargs: dict, pert: Perturbation | None = None) -> Dual:
    base = fn(*_map(args, lambda d: d.base), **_map(kwargs, lambda d: d.base))
    if not _has_pert((args, kwargs)):
        return Dual(base)
    _release_bases((args, kwargs), pert)
    pert = fn(*_map(args, lambda d: d.pert_or_base), **_map(kwargs, lambda d: d.pert_or_base))
    return Dual(base, pert)


class DualStreamInterpreter(torch.fx.Interpreter):
    """Runs a traced model on Dual values for one Perturbation; records the base output at `cut`."""

    def __init__(self, graph_module: torch.fx.GraphModule, perturbation: Perturbation, cut_node: str | None = None):
        super().__init__(graph_module, garbage_collect_values=True)
        self.perturbation = perturbation
        self.cut_node = cut_node
        self.smashed: torch.Tensor | None = None
        # storages never written in place: the model's parameters and buffers, its inputs, the smashed data
        self._protected = {_storage(t) for t in (*graph_module.parameters(), *graph_module.buffers())}
        self._owned: dict[int, weakref.ref] = {}  # tensors this run allocated: id -> weak reference

    def run_node(self, node: torch.fx.Node) -> Any:
        last_uses = self.user_to_last_uses.get(node, [])
        consumed = [self.env[n] for n in last_uses if isinstance(self.env.get(n), Dual)]
        self.perturbation.consumable = frozenset(id(d) for d in consumed)
        self.perturbation.reusable = self._reusable(consumed)
        result = super().run_node(node)
        self.perturbation.reusable = frozenset()
        if node.op == "placeholder":
            self._protected.update(_storage(t) for t in _tensors(result))
        elif isinstance(result, Dual):
            self._register_owned(result)
        if node.name == self.cut_node:
            self.smashed = result.base.detach() if isinstance(result, Dual) else result
            if isinstance(self.smashed, torch.Tensor):
                self._protected.add(_storage(self.smashed))
        return result

    def _live_storages(self, exclude: set[int]) -> dict[int, int]:
        """storage -> number of live tensors using it, over the environment's values not in `exclude` (ids)."""
        counts: dict[int, int] = {}
        for value in self.env.values():
            if id(value) in exclude:
                continue
            for t in _tensors(value):
                key = _storage(t)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def _reusable(self, consumed: list[Dual]) -> frozenset[int]:
        candidates = [t for d in consumed for t in (d.base, d.pert)
                      if isinstance(t, torch.Tensor) and self._is_owned(t) and _storage(t) not in self._protected]
        if not candidates:
            return frozenset()
        live = self._live_storages({id(d) for d in consumed})
        keys = [_storage(t) for t in candidates]
        return frozenset(id(t) for t, key in zip(candidates, keys, strict=True)
                         if key not in live and keys.count(key) == 1)

    def _is_owned(self, tensor: torch.Tensor) -> bool:
        ref = self._owned.get(id(tensor))
        return ref is not None and ref() is tensor

    def _register_owned(self, result: Dual) -> None:
        fresh = [t for t in (result.base, result.pert) if isinstance(t, torch.Tensor)]
        if not fresh:
            return
        live = self._live_storages({id(result)})
        for t in fresh:
            key = _storage(t)
            if key not in live and key not in self._protected and t._base is None:
                self._owned[id(t)] = weakref.ref(t)

    def placeholder(self, target, args, kwargs):
        return Dual(super().placeholder(target, args, kwargs))

    def get_attr(self, target, args, kwargs):
        return Dual(super().get_attr(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        if target is operator.getitem and isinstance(args[0], Dual) and not isinstance(args[1], Dual):
            d = args[0]
            return Dual(d.base[args[1]], None if d.pert is None else d.pert[args[1]])
        if target in _RELU_FUNCTIONS and len(args) == 1 and isinstance(args[0], Dual) and not kwargs.get("inplace"):
            return _relu(args[0], self.perturbation)
        return _apply_both(target, args, kwargs, self.perturbation)

    def call_method(self, target, args, kwargs):
        if target == "relu" and len(args) == 1 and not kwargs and isinstance(args[0], Dual):
            return _relu(args[0], self.perturbation)
        return _apply_both(lambda obj, *a, **k: getattr(obj, target)(*a, **k), args, kwargs, self.perturbation)

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        return dual_module_call(module, target, args, kwargs, self.perturbation)

    def output(self, target, args, kwargs):
        return args[0]


def _trainable(module: nn.Module, prefix: str, layout: ParameterLayout) -> list[tuple[str, nn.Parameter]]:
    return [(f"{prefix}.{name}" if prefix else name, p) for name, p in module.named_parameters(recurse=False)
            if (f"{prefix}.{name}" if prefix else name) in layout]


def dual_module_call(module: nn.Module, name: str, args: tuple, kwargs: dict, pert: Perturbation) -> Dual:
    """One leaf module on Dual inputs."""
    if pert.stream != "dual":
        return _single_stream_call(module, name, args, kwargs, pert)
    layout = pert.layout
    trainable = _trainable(module, name, layout)
    if isinstance(module, nn.Dropout) and module.training:
        return _dropout(module, args[0])
    if isinstance(module, nn.ReLU) and not kwargs and len(args) == 1:
        return _relu(args[0], pert)
    if not trainable and not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _apply_both(module, args, kwargs, pert)
    if isinstance(module, LoRALinear) and len(trainable) == 2 and not kwargs:
        x = args[0]
        y_base, y_pert = HF.lora_perturbed_linear(
            x.base, module.weight, module.bias, module.lora_a, module.lora_b, scale=module.scale, seed=pert.seed,
            mu=pert.scale, offset=layout.offset(f"{name}.lora_a"), b_offset=layout.offset(f"{name}.lora_b"),
            x_pert=x.pert, backend=pert.backend)
        return Dual(y_base, y_pert)
    if isinstance(module, nn.Linear) and f"{name}.weight" in layout and not kwargs:
        return _linear(module, name, args[0], pert)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not kwargs:
        return _batch_norm(module, name, args[0], pert)
    if isinstance(module, nn.Conv2d) and not kwargs and len(args) == 1 and _is_batch(args[0].base, 4):
        if pert.lowrank_rank and lowrank_eligible(module) and f"{name}.weight" in layout:
            return _lowrank_conv(module, name, trainable, args[0], pert)
        return _conv(module, trainable, args[0], pert)
    return _in_place(module, trainable, args, kwargs, pert)


def lowrank_eligible(module: nn.Module) -> bool:
    """Whether perturbation="lowrank" gives this module's weight a low-rank direction: Linear
    weights (out, in), and ungrouped Conv2d weights (out, in, kh, kw) as (out, in*kh*kw) matrices."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _weight_route_cheaper(x_pert: torch.Tensor, weight: torch.Tensor) -> bool:
    """For a low-rank direction with x_pert (..., K) (M rows) and W (N, K): whether W + alpha U V^T
    (2 N K r FLOPs) costs less than (x_pert V) U^T (2 M r (K + N))."""
    n, k = weight.shape
    m = x_pert.numel() // max(k, 1)
    return n * k < m * (k + n)


def _scaled_bias_direction(bias: torch.Tensor, offset: int, pert: Perturbation) -> torch.Tensor:
    """scale * z_b for a bias (out,) whose direction is keyed (seed, offset): a bias keeps its full
    direction under low-rank perturbations."""
    return seeded_randn(bias.shape[0], pert.seed, offset, device=bias.device, dtype=bias.dtype).mul_(pert.scale)


def _lowrank_factors(weight: torch.Tensor, name: str, pert: Perturbation) -> tuple[torch.Tensor, torch.Tensor, float]:
    """U (out, r), V (fan_in, r) of the low-rank direction of `weight` (its (out, fan_in) matrix
    view) keyed as functional.lowrank_perturbed_linear keys them, in the weight's dtype, and
    alpha = scale / sqrt(r): the perturbation is alpha * U @ V.T."""
    out_features, fan_in = weight.shape[0], weight[0].numel()
    rank = min(pert.lowrank_rank, out_features, fan_in)
    u_offset, v_offset = HF.lowrank_offsets(pert.layout.offset(f"{name}.weight"), out_features, rank)
    u = seeded_randn((out_features, rank), pert.u_seed, u_offset, device=weight.device, dtype=weight.dtype)
    v = seeded_randn((fan_in, rank), pert.seed, v_offset, device=weight.device, dtype=weight.dtype)
    return u, v, pert.scale / math.sqrt(rank)


def _linear(module: nn.Linear, name: str, x: Dual, pert: Perturbation) -> Dual:
    layout = pert.layout
    bias_trainable = module.bias is not None and f"{name}.bias" in layout
    bias = module.bias if bias_trainable else None
    weight_offset = layout.offset(f"{name}.weight")
    bias_offset = layout.offset(f"{name}.bias") if bias_trainable else None
    if pert.lowrank_rank and x.pert is not None and _weight_route_cheaper(x.pert, module.weight):
        # x_pert @ (W + alpha U V^T).T: forming the perturbed weight (2 N K r FLOPs) costs less than
        # the fused kernel's (x_pert V) U^T (2 M r (K + N)) when the batch is wide and the layer narrow
        u, v, alpha = _lowrank_factors(module.weight, name, pert)
        w_pert = torch.addmm(module.weight, u, v.t(), alpha=alpha)
        b_pert = module.bias
        if bias_trainable:
            b_pert = module.bias + _scaled_bias_direction(module.bias, bias_offset, pert)
        return Dual(nn.functional.linear(x.base, module.weight, module.bias),
                    nn.functional.linear(x.pert, w_pert, b_pert))
    if pert.lowrank_rank:
        rank = min(pert.lowrank_rank, *module.weight.shape)
        y_base, y_pert = HF.lowrank_perturbed_linear(
            x.base, module.weight, bias, seed=pert.seed, rank=rank, mu=pert.scale, offset=weight_offset,
            u_seed=pert.u_seed, x_pert=x.pert, bias_offset=bias_offset, backend=pert.backend)
    else:
        y_base, y_pert = HF.perturbed_linear(x.base, module.weight, bias, seed=pert.seed, offset=weight_offset,
                                             mu=pert.scale, x_pert=x.pert, bias_offset=bias_offset,
                                             backend=pert.backend)
    if module.bias is not None and not bias_trainable:
        y_base, y_pert = y_base + module.bias, y_pert + module.bias
    return Dual(y_base, y_pert)


class _PerturbedInPlace:
    """Context: the listed parameters hold theta + scale * z inside, their exact old values after."""

    def __init__(self, trainable: list[tuple[str, nn.Parameter]], pert: Perturbation,
                 lowrank: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None):
        """lowrank: name -> (U, V, alpha) for weights perturbed by alpha * U V^T on their
        (out, -1) matrix view instead of their full direction."""
        self.trainable, self.pert, self.lowrank = trainable, pert, lowrank or {}
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        for name, p in self.trainable:
            self.saved.append(p.detach().clone())
            if name in self.lowrank:
                u, v, alpha = self.lowrank[name]
                p.data.view(p.shape[0], -1).addmm_(u, v.t(), alpha=alpha)
            else:
                HF.perturb_(p.data, self.pert.seed, alpha=self.pert.scale, offset=self.pert.layout.offset(name),
                            backend=self.pert.backend)
        return self

    def __exit__(self, *exc):
        for (_, p), old in zip(self.trainable, self.saved, strict=True):
            p.data.copy_(old)
        self.saved.clear()
        return False


def _in_place(module: nn.Module, trainable, args, kwargs, pert: Perturbation) -> Dual:
    base = module(*_map(args, lambda d: d.base), **_map(kwargs, lambda d: d.base))
    _release_bases((args, kwargs), pert)
    with _PerturbedInPlace(trainable, pert):
        pert_out = module(*_map(args, lambda d: d.pert_or_base), **_map(kwargs, lambda d: d.pert_or_base))
    return Dual(base, pert_out)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, name: str, x: Dual, pert: Perturbation) -> Dual:
    """Base stream: the module's normalisation with running-statistics updates; perturbed stream:
    the same normalisation (batch statistics in training, running ones in eval) with perturbed
    affine parameters and no statistics update. Both streams use the same arithmetic (so the finite
    difference sees only the parameter change), in place where the input may be overwritten."""
    trainable = _trainable(module, name, pert.layout)
    if x.pert is None and not trainable:
        return Dual(_batch_norm_stream(module, x.base, update_stats=True, pert=pert))
    base = _batch_norm_stream(module, x.base, update_stats=True, pert=pert, may_overwrite=x.pert is not None)
    _release_bases(x, pert)
    with _PerturbedInPlace(trainable, pert):
        pert_out = _batch_norm_stream(module, x.pert_or_base, update_stats=False, pert=pert)
    return Dual(base, pert_out)


def _batch_norm_stream(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, *, update_stats: bool,
                       pert: Perturbation, may_overwrite: bool = True) -> torch.Tensor:
    """One stream through the module's normalisation, with or without the statistics update: the
    module's ATen kernel, written over x where the node may overwrite it; other inputs (e.g. a
    SyncBatchNorm, a dtype differing from the parameters') go through the module or F.batch_norm."""
    if _fast_batch_norm_ok(module, x):
        out = _reuse_or_none(x, pert) if may_overwrite else None
        return _normalise(module, x, update_stats=update_stats, out=out)
    if update_stats:
        return module(x)
    use_batch_stats = module.training or module.running_mean is None
    return nn.functional.batch_norm(
        x, None if use_batch_stats else module.running_mean, None if use_batch_stats else module.running_var,
        module.weight, module.bias, training=use_batch_stats, momentum=0.0, eps=module.eps)


def _fast_batch_norm_ok(module: nn.modules.batchnorm._BatchNorm, x: Any) -> bool:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != module.num_features or not x.is_contiguous():
        return False
    params = [t for t in (module.weight, module.bias, module.running_mean) if t is not None]
    same_dtype = all(t.dtype == x.dtype for t in params)
    return x.is_floating_point() and same_dtype and not isinstance(module, nn.SyncBatchNorm)


def _reuse_or_none(x: torch.Tensor, pert: Perturbation) -> torch.Tensor | None:
    return x if pert.can_reuse(x) else None


def _normalise(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, *, update_stats: bool,
               out: torch.Tensor | None) -> torch.Tensor:
    """The module's batch normalisation of x (N, C, *), written into `out` (which may be x) if given.

    The same ATen kernel as nn.BatchNorm's forward, so the result is bit-identical to it: batch
    statistics when training or untracked, running ones otherwise; with update_stats the running
    statistics and num_batches_tracked are updated exactly as the module updates them.
    """
    training = module.training or module.running_mean is None
    factor = 0.0
    running_mean = running_var = None
    if module.running_mean is not None and (update_stats or not module.training):
        running_mean, running_var = module.running_mean, module.running_var
    if update_stats and module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
    out = torch.empty_like(x) if out is None else out
    stats = x.new_empty((0,), dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    torch.ops.aten.native_batch_norm.out(x, module.weight, module.bias, running_mean, running_var, training, factor,
                                         module.eps, out=out, save_mean=stats, save_invstd=stats.clone())
    return out


_RELU_FUNCTIONS = (torch.relu, nn.functional.relu)


def _relu(x: Dual, pert: Perturbation) -> Dual:
    """ReLU on each stream, in place on inputs the node may overwrite."""
    def one(t: Any) -> Any:
        if pert.can_reuse(t):
            return t.relu_()
        return torch.relu(t)

    if x.pert is None:
        return Dual(one(x.base))
    return Dual(one(x.base), one(x.pert))


# Bytes per chunk of a chunked convolution's larger side (input or output; its workspace is alike in size).
_CONV_CHUNK_BYTES = 2 << 20


def _is_batch(x: Any, dim: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == dim


def _same_shape_conv(module: nn.Conv2d, x: Any) -> bool:
    """Whether the convolution maps x (N, C, H, W) to an output of the same shape (zero padding)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or module.padding_mode != "zeros":
        return False
    if module.in_channels != module.out_channels or x.shape[1] != module.in_channels:
        return False
    if module.padding == "same":
        return True
    if isinstance(module.padding, str):
        return False
    for size, kernel, stride, padding, dilation in zip(x.shape[2:], module.kernel_size, module.stride,
                                                       module.padding, module.dilation, strict=True):
        if (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 != size:
            return False
    return True


def _chunk_samples(module: nn.Conv2d, x: torch.Tensor) -> int:
    """Samples per chunk of a chunked convolution of x (N, C, H, W): _CONV_CHUNK_BYTES of its larger side."""
    per_sample_in = x[0].numel() * x.element_size()
    per_sample = max(1, per_sample_in, per_sample_in * module.out_channels // max(module.in_channels, 1))
    return max(1, _CONV_CHUNK_BYTES // per_sample)


def _conv_chunked(module: nn.Conv2d, x: torch.Tensor, *, overwrite: bool) -> torch.Tensor:
    """module(x) for x (N, C, H, W), a batch chunk at a time: written over x when `overwrite` (the
    output has x's shape; samples are independent, so each chunk is read in full before it is
    overwritten), else into one output tensor. A whole-batch convolution would hold a transient
    the size of its output besides the output itself."""
    chunk = _chunk_samples(module, x)
    if chunk >= x.shape[0]:
        return module(x)
    out = x if overwrite else None
    for start in range(0, x.shape[0], chunk):
        part = module(x[start:start + chunk])
        if out is None:
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out[start:start + chunk].copy_(part)
    return out


def _conv(module: nn.Conv2d, trainable, x: Dual, pert: Perturbation) -> Dual:
    """A 2-D convolution on both streams (_conv_stream); the perturbed stream with the layer's
    parameters perturbed in place."""
    if not trainable:
        return Dual(_conv_stream(module, x.base, pert)) if x.pert is None else \
            Dual(_conv_stream(module, x.base, pert), _conv_stream(module, x.pert, pert))
    base = _conv_stream(module, x.base, pert, may_overwrite=x.pert is not None)
    _release_bases(x, pert)
    with _PerturbedInPlace(trainable, pert):
        pert_out = _conv_stream(module, x.pert_or_base, pert)
    return Dual(base, pert_out)


def _lowrank_conv(module: nn.Conv2d, name: str, trainable, x: Dual, pert: Perturbation) -> Dual:
    """A convolution whose weight has the low-rank direction Z = U V^T / sqrt(r) of its
    (out, in*kh*kw) matrix view, U keyed (u_seed, u_offset), V (seed, v_offset) as for Linear
    weights (functional.lowrank_offsets); the bias keeps its full direction.

    Two inputs: the weight is perturbed in place by the (out x r)(r x in*kh*kw) product and the
    module's convolution runs once more. Shared input (the first layer): conv(x, W) is the base
    stream's, so the perturbed stream is that plus mu / sqrt(r) * U @ conv(x, V's r filters) (+ mu z_b):
    r / out of a convolution and an r-deep channel mix instead of a whole convolution."""
    weight = module.weight
    u, v, alpha = _lowrank_factors(weight, name, pert)
    out_channels, rank = u.shape
    weight_name = f"{name}.weight"
    if x.pert is not None:
        base = _conv_stream(module, x.base, pert)
        _release_bases(x, pert)
        with _PerturbedInPlace(trainable, pert, lowrank={weight_name: (u, v, alpha)}):
            pert_out = _conv_stream(module, x.pert, pert)
        return Dual(base, pert_out)
    base = _conv_stream(module, x.base, pert, may_overwrite=False)
    filters, mix = v.t().reshape(rank, *weight.shape[1:]), u.mul_(alpha).view(out_channels, rank, 1, 1)
    bias_name = f"{name}.bias"
    bias_shift = None
    if module.bias is not None and bias_name in pert.layout:
        bias_shift = _scaled_bias_direction(module.bias, pert.layout.offset(bias_name), pert)
    pert_out = torch.empty_like(base)
    chunk = _chunk_samples(module, x.base)  # no whole-batch transient, as for the module's own convolution
    for start in range(0, x.base.shape[0], chunk):
        projected = module._conv_forward(x.base[start:start + chunk], filters, None)  # (n, r, H', W')
        torch.add(nn.functional.conv2d(projected, mix, bias_shift), base[start:start + chunk],
                  out=pert_out[start:start + chunk])
    return Dual(base, pert_out)


def _conv_stream(module: nn.Conv2d, x: torch.Tensor, pert: Perturbation, may_overwrite: bool = True) -> torch.Tensor:
    """One stream through the convolution in batch chunks, written over x when the output has x's
    shape and the node may overwrite x."""
    overwrite = may_overwrite and _same_shape_conv(module, x) and pert.can_reuse(x) and x.is_contiguous()
    return _conv_chunked(module, x, overwrite=overwrite)


def _single_stream_call(module: nn.Module, name: str, args: tuple, kwargs: dict, pert: Perturbation) -> Dual:
    """One leaf module in a single-stream pass: plain values (Dual with pert None); in the "pert"
    pass the module's trainable parameters hold theta + scale * z while it runs; BatchNorm
    statistics are updated by the "base" pass only."""
    trainable = _trainable(module, name, pert.layout) if pert.stream == "pert" else []
    x = args[0] if args else None
    if isinstance(module, nn.Dropout) and module.training:
        return Dual(_seeded_dropout(module, x.base, pert.dropout_seed, name))
    if isinstance(module, nn.ReLU) and not kwargs and len(args) == 1:
        return _relu(x, pert)
    with _PerturbedInPlace(trainable, pert, lowrank=_lowrank_weight(module, name, trainable, pert)):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not kwargs:
            return Dual(_batch_norm_stream(module, x.base, update_stats=pert.stream == "base", pert=pert))
        if isinstance(module, nn.Conv2d) and not kwargs and len(args) == 1 and _is_batch(x.base, 4):
            return Dual(_conv_stream(module, x.base, pert))
        return Dual(module(*_map(args, lambda d: d.base), **_map(kwargs, lambda d: d.base)))


def _lowrank_weight(module: nn.Module, name: str, trainable: list[tuple[str, nn.Parameter]],
                    pert: Perturbation) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{weight name: (U, V, alpha)} when the module's trainable weight takes a low-rank direction
    (pert.lowrank_rank > 0 and lowrank_eligible), else {}: the in-place perturbation of a
    single-stream pass then adds alpha U V^T, the same direction as the dual-stream layers'."""
    weight_name = f"{name}.weight"
    if not pert.lowrank_rank or not lowrank_eligible(module) or weight_name not in dict(trainable):
        return {}
    return {weight_name: _lowrank_factors(module.weight, name, pert)}


def _seeded_dropout(module: nn.Dropout, x: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """Dropout with a mask drawn from (seed, layer name): the same mask in the base and the perturbed pass."""
    generator = torch.Generator(device=x.device).manual_seed((seed ^ zlib.crc32(name.encode())) % (1 << 63))
    keep = 1.0 - module.p
    mask = torch.empty_like(x).bernoulli_(keep, generator=generator).div_(keep)
    return x * mask


def _dropout(module: nn.Dropout, x: Dual) -> Dual:
    keep = 1.0 - module.p
    mask = torch.empty_like(x.base).bernoulli_(keep).div_(keep)
    return Dual(x.base * mask, None if x.pert is None else x.pert * mask)


def cut_node_name(graph_module: torch.fx.GraphModule, model: nn.Module, cut: str) -> str:
    """The last graph node computed inside module `cut` (a name from model.named_modules())."""
    modules = dict(model.named_modules())
    if cut not in modules or cut == "":
        valid = [n for n in modules if n]
        raise KeyError(f"cut module {cut!r} does not exist in {type(model).__name__}; modules are: {valid}")
    last = None
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and (node.target == cut or str(node.target).startswith(cut + ".")):
            last = node
        stack = node.meta.get("nn_module_stack") or {}
        if any(path == cut or str(path).startswith(cut + ".") for path, _ in stack.values()):
            last = node
    if last is None:
        raise KeyError(f"cut module {cut!r} is never called in {type(model).__name__}.forward")
    return last.name
