"""Dual-stream execution of a traced model: the base and the perturbed forward run together.

The model is traced once with torch.fx; every module that owns parameters or buffers, or has
forward hooks, becomes a leaf. The graph is then interpreted on `Dual(base, pert)` values. The
executor runs a leaf by its own rules only where it owns the module's forward, i.e. the module's
class is the torch layer itself or keeps that layer's forward unchanged (`leaf_route` says which
rule and why):
- nn.Linear and heron's PerturbedLinear / LoRALinear compute both streams in one pass over their
  weights through the fused dual-stream kernels;
- BatchNorm runs the base stream with running-statistics updates and the perturbed stream without;
- Conv2d runs in bounded batch chunks (low-rank directions: the shared-input shortcut below);
- other torch.nn layers whose parameters are all their own are perturbed in place from the seeded
  stream for the perturbed forward and restored bit-exactly from a copy of that one layer's
  parameters.
Every other leaf (a subclass with its own forward, a module owning parameters and parametrised
children such as nn.MultiheadAttention or a layer-scale block, a user module, one with hooks)
runs through heron.zo.generic, which perturbs each parameter where its forward reads it: call by
call on both streams, or, where the leaf reads more input elements than it has trainable ones (an
activation-bound block), as two single-stream runs of its forward, so one stream's intermediate
activations are alive at a time. A
trainable parameter the traced code reads directly (a root-level `cls_token`) is perturbed
where read as well, and a tied parameter (one tensor under several names) takes one direction
wherever it is read. Calls without trainable parameters are applied to each stream (once while
the two streams are still identical), with the random generator rewound between the streams so
both draw the same numbers: dropout applies one mask to both, so the finite difference sees only
the parameter change.

Memory: the interpreter frees each activation after its last use, and an activation it allocated
itself that is used for the last time (no other live value shares its storage, it is neither a
model input nor the smashed data) is overwritten in place by ReLU, BatchNorm, and Conv2d layers
whose output has the input's shape. Convolutions run in bounded batch chunks, so none holds a
whole-batch transient beside its output: a conv-bn-relu stack holds one activation per stream.

Single-stream passes (Perturbation.stream "base" or "pert", the updaters' sequential schedule) run
the same graph on one stream: the perturbed pass with each trainable layer perturbed while it
runs (by alpha U V^T for a low-rank weight) and no statistics update, the base pass as the module
would run.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Container
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from heron.kernels import functional as HF
from heron.kernels.nn import LoRALinear, PerturbedLinear
from heron.zo.generic import (
    DualTensor,
    base_of,
    can_share_dropout,
    dropout_call,
    pert_of,
    random_fork,
    run_module,
    shared_dropout,
)
from heron.zo.perturbation import (
    Perturbation,
    PerturbedInPlace,
    dual_linear,
    fusable_linear,
    lowrank_factors,
    perturbed_copy,
    scaled_bias_direction,
)


@dataclass
class Dual:
    """A value in both streams; pert is None while the perturbed stream equals the base one."""

    base: Any
    pert: Any = None

    @property
    def pert_or_base(self) -> Any:
        return self.base if self.pert is None else self.pert


def has_hooks(module: nn.Module) -> bool:
    """Whether module(...) would run hooks besides its forward (a traced or fused call would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _LeafTracer(torch.fx.Tracer):
    """Every module that directly owns parameters or buffers or has hooks is a leaf, plus torch.nn's own."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (LoRALinear, PerturbedLinear)) or has_hooks(module):
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
            f"({type(error).__name__}: {error}); use executor='generic' (the default, 'auto', does so)"
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


# Functions and methods that write their first argument.
_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                       operator.irshift, operator.imatmul, operator.setitem}


def _apply_both(fn: Callable, args: tuple, kwargs: dict, pert: Perturbation | None = None,
                in_place: bool = False) -> Dual:
    """fn on each stream (once while no argument has a perturbed twin), the random generators
    rewound between the streams. An in-place fn writing a value both streams still share gets a
    copy of it for the perturbed stream first."""
    if not _has_pert((args, kwargs)):
        return Dual(fn(*_map(args, lambda d: d.base), **_map(kwargs, lambda d: d.base)))
    dropout = dropout_call(fn, args, kwargs)
    if (dropout is not None and isinstance(dropout[0], Dual) and can_share_dropout(dropout[0].base)
            and isinstance(dropout[0].pert, torch.Tensor)):
        x, p, inplace = dropout
        return Dual(*shared_dropout(x.base, x.pert, p, inplace))
    target = args[0] if in_place and args and isinstance(args[0], Dual) else None
    if target is not None and target.pert is None and isinstance(target.base, torch.Tensor):
        target.pert = target.base.clone()
    return _two_streams(fn, fn, args, kwargs, pert)


def _two_streams(base_fn: Callable, pert_fn: Callable, args: tuple, kwargs: dict, pert: Perturbation | None) -> Dual:
    """base_fn on the base stream, then pert_fn on the perturbed one, the random generators rewound
    between them (one dropout mask for both) and the base inputs released in between."""
    bases = (_map(args, lambda d: d.base), _map(kwargs, lambda d: d.base))
    fork = random_fork(*bases)
    base = base_fn(*bases[0], **bases[1])
    del bases
    fork.rewind()
    _release_bases((args, kwargs), pert)
    pert_out = pert_fn(*_map(args, lambda d: d.pert_or_base), **_map(kwargs, lambda d: d.pert_or_base))
    fork.resume()
    return Dual(base, pert_out)


class DualStreamInterpreter(torch.fx.Interpreter):
    """Runs a traced model on Dual values for one Perturbation; records the base output at `cut`."""

    def __init__(self, graph_module: torch.fx.GraphModule, perturbation: Perturbation, cut_node: str | None = None):
        super().__init__(graph_module, garbage_collect_values=True)
        self.perturbation = perturbation
        self.cut_node = cut_node
        self.smashed: Any = None
        # storages never written in place: the model's parameters and buffers, its inputs, the smashed data
        self._protected = {_storage(t) for t in (*graph_module.parameters(), *graph_module.buffers())}
        self._owned: dict[int, weakref.ref] = {}  # tensors this run allocated: id -> weak reference
        self._routes: dict[str, str] = {}  # leaf module name -> leaf_route

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
            self.smashed = detached(result.base if isinstance(result, Dual) else result)
            self._protected.update(_storage(t) for t in _tensors(self.smashed))
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
        """A tensor the traced code reads directly; a trainable parameter is perturbed where read."""
        value = super().get_attr(target, args, kwargs)
        pert = self.perturbation
        name = pert.name_of(value)
        if name is None or pert.stream == "base":
            return Dual(value)
        pert.record(name, "copy")
        copy = perturbed_copy(value, name, pert)
        return Dual(copy) if pert.stream == "pert" else Dual(value, copy)

    def call_function(self, target, args, kwargs):
        if target is operator.getitem and isinstance(args[0], Dual) and not isinstance(args[1], Dual):
            d = args[0]
            return Dual(d.base[args[1]], None if d.pert is None else d.pert[args[1]])
        if target in _RELU_FUNCTIONS and len(args) == 1 and isinstance(args[0], Dual) and not kwargs.get("inplace"):
            return _relu(args[0], self.perturbation)
        return _apply_both(target, args, kwargs, self.perturbation, in_place=target in _IN_PLACE_FUNCTIONS)

    def call_method(self, target, args, kwargs):
        if target == "relu" and len(args) == 1 and not kwargs and isinstance(args[0], Dual):
            return _relu(args[0], self.perturbation)
        in_place = target.endswith("_") and not target.startswith("__") or target in ("__setitem__", "__iadd__")
        return _apply_both(lambda obj, *a, **k: getattr(obj, target)(*a, **k), args, kwargs, self.perturbation,
                           in_place=in_place)

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if target not in self._routes:
            self._routes[target] = leaf_route(module, self.perturbation.names)[0]
        return dual_module_call(module, args, kwargs, self.perturbation, self._routes[target])

    def output(self, target, args, kwargs):
        return args[0]


def _trainable(module: nn.Module, pert: Perturbation) -> list[tuple[str, nn.Parameter]]:
    """(layout name, parameter) of the module's own trainable parameters."""
    return [(pert.names[id(p)], p) for p in module.parameters(recurse=False) if id(p) in pert.names]


# Routes of a leaf module (leaf_route); "generic" runs it through heron.zo.generic.
LORA, LINEAR, BATCH_NORM, CONV, RELU, IN_PLACE, STATELESS, GENERIC = (
    "fused LoRA", "fused linear", "batch norm", "conv", "relu", "in place", "per stream", "generic")


def _keeps_forward(module: nn.Module, layer: type) -> bool:
    return isinstance(module, layer) and type(module).forward is layer.forward


def _parametrised_children(module: nn.Module) -> bool:
    return any(True for child in module.children() for _ in child.parameters())


def leaf_route(module: nn.Module, trainable: Container[int]) -> tuple[str, str]:
    """How the fx executor runs a leaf module, and why: one of its own rules where it owns the
    module's forward (the class is the torch layer itself or keeps its forward), else GENERIC.
    trainable: ids of the trainable parameters."""
    owns_trainable = any(id(p) in trainable for p in module.parameters(recurse=False))
    subtree_trainable = any(id(p) in trainable for p in module.parameters())
    has_state = subtree_trainable or any(True for _ in module.buffers())
    kind = type(module).__name__
    if has_hooks(module):
        return (GENERIC, "has forward hooks, which only a call of the module runs") if has_state else \
            (STATELESS, "no trainable parameters or buffers; its hooks run in each stream")
    if _parametrised_children(module) and has_state:
        return GENERIC, f"{kind} owns parameters and has parametrised children (its forward combines them)"
    if _keeps_forward(module, LoRALinear):
        trained = {n for n, p in module.named_parameters() if id(p) in trainable}
        if trained == {"lora_a", "lora_b"}:
            return LORA, "heron LoRALinear: both streams in one pass (lora_perturbed_linear)"
        return IN_PLACE, "heron LoRALinear with other than its two adapters trainable: perturbed in place"
    if _keeps_forward(module, nn.Linear) and id(module.weight) in trainable:
        return LINEAR, (f"{kind} keeps nn.Linear's forward: both streams in one pass (perturbed_linear), or on a "
                        f"perturbed copy of the weight where the input has more rows than the layer outputs (CPU)")
    if _keeps_forward(module, nn.modules.batchnorm._BatchNorm):
        return BATCH_NORM, f"{kind}: statistics from the base stream, perturbed affine parameters"
    if _keeps_forward(module, nn.Conv2d) and type(module)._conv_forward is nn.Conv2d._conv_forward:
        return CONV, f"{kind}: batch-chunked convolution, perturbed in place"
    if _keeps_forward(module, nn.ReLU):
        return RELU, "ReLU, in place where the input is not used again"
    if not has_state:
        return STATELESS, f"{kind} has no trainable parameters or buffers: applied to each stream"
    if type(module).__module__.startswith("torch.nn.") or type(module) in (LoRALinear, PerturbedLinear):
        if not owns_trainable and any(True for _ in module.buffers()):
            return GENERIC, f"{kind} holds buffers its forward may update (kept to the base stream)"
        return IN_PLACE, f"{kind} (a torch.nn layer) reads only its own parameters: perturbed in place"
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
        return GENERIC, f"{kind} subclasses a torch layer with its own forward"
    return GENERIC, f"{kind} is not a torch.nn layer: its forward is run as written"


def dual_module_call(module: nn.Module, args: tuple, kwargs: dict, pert: Perturbation, route: str) -> Dual:
    """One leaf module on Dual inputs, by its leaf_route."""
    if route == GENERIC:
        return _generic(module, args, kwargs, pert)
    if pert.stream != "dual":
        return _single_stream_call(module, route, args, kwargs, pert)
    if route == RELU and not kwargs and len(args) == 1:
        return _relu(args[0], pert)
    if route == STATELESS:
        return _apply_both(module, args, kwargs, pert)
    trainable = _trainable(module, pert)
    if route == LORA and not kwargs:
        x = args[0]
        for name, _ in trainable:
            pert.record(name, LORA)
        y_base, y_pert = HF.lora_perturbed_linear(
            x.base, module.weight, module.bias, module.lora_a, module.lora_b, scale=module.scale, seed=pert.seed,
            mu=pert.scale, offset=pert.layout.offset(pert.names[id(module.lora_a)]),
            b_offset=pert.layout.offset(pert.names[id(module.lora_b)]), x_pert=x.pert, backend=pert.backend)
        return Dual(y_base, y_pert)
    if route == LINEAR and not kwargs and len(args) == 1 and fusable_linear(args[0].base, module.weight, module.bias):
        x = args[0]
        return Dual(*dual_linear(x.base, x.pert, module.weight, module.bias, pert))
    if route == BATCH_NORM and not kwargs and len(args) == 1:
        return _batch_norm(module, args[0], pert)
    if route == CONV and not kwargs and len(args) == 1 and _is_batch(args[0].base, 4):
        if pert.is_lowrank(pert.name_of(module.weight) or ""):
            return _lowrank_conv(module, trainable, args[0], pert)
        return _conv(module, trainable, args[0], pert)
    return _in_place(module, trainable, args, kwargs, pert)


def as_tensors(value: Any) -> Any:
    """An interpreter value (Duals, in containers or not) as heron.zo.generic takes it: each Dual as its
    base value where the streams are one, else its structure with DualTensors where they differ."""
    def tensors(d: Dual) -> Any:
        if d.pert is None:
            return d.base
        return pytree.tree_map(lambda b, p: DualTensor(b, p) if isinstance(b, torch.Tensor) and b is not p else b,
                               d.base, d.pert)

    return _map(value, tensors)


def _generic(module: nn.Module, args: tuple, kwargs: dict, pert: Perturbation) -> Dual:
    """The module's own forward through heron.zo.generic (DualTensors in, Dual out); an
    activation-bound module in the dual stream as two single-stream runs (`_activation_bound`)."""
    if pert.stream == "dual" and _activation_bound(module, (args, kwargs), pert):
        return _generic_one_stream_at_a_time(module, args, kwargs, pert)
    out = run_module(module, as_tensors(args), as_tensors(kwargs), pert)
    if not any(type(t) is DualTensor for t in pytree.tree_leaves(out)):
        return Dual(out)
    return Dual(base_of(out), pert_of(out))


def _activation_bound(module: nn.Module, inputs: Any, pert: Perturbation) -> bool:
    """Whether a generically run module reads more input elements than it has trainable ones, and
    has no nn.Dropout in training. Such a module gains nothing from running its two streams call by
    call (what that buys is one pass over each weight for both streams, through the fused linear
    kernels, and one dropout mask drawn for both: `shared_dropout`), and loses cache locality: both
    streams' intermediate activations are alive together (a ConvNeXt block's GELU took 40% longer per
    call than in a single-stream pass, measured on the 2-core CPU)."""
    if any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in module.modules()):
        return False
    trainable = sum(p.numel() for p in module.parameters() if id(p) in pert.names)
    return sum(t.numel() for t in _tensors(_map(inputs, lambda d: d.base))) > trainable


def _generic_one_stream_at_a_time(module: nn.Module, args: tuple, kwargs: dict, pert: Perturbation) -> Dual:
    """Both streams of a generically run module, one after the other: its own forward on the base
    inputs (running statistics updated), then on the perturbed inputs with each trainable parameter
    perturbed where it is read (heron.zo.generic's "pert" stream: buffers restored after), the random
    generators rewound in between so both draw the same numbers. The same values as the call-by-call
    dual stream up to rounding (a linear layer's perturbed stream is a GEMM on a perturbed copy of its
    weight instead of the fused kernel); only one stream's intermediate activations are alive at a time."""
    single = replace(pert, stream="pert", reads=pert.reads)

    def perturbed(*pert_args: Any, **pert_kwargs: Any) -> Any:
        return run_module(module, pert_args, pert_kwargs, single)

    return _two_streams(module, perturbed, args, kwargs, pert)


def lowrank_eligible(module: nn.Module) -> bool:
    """Whether perturbation="lowrank" gives this module's weight a low-rank direction: Linear
    weights (out, in), transformers' Conv1D weights (in, out) (GPT-2's projections, y = x W + b),
    and ungrouped Conv2d weights (out, in, kh, kw) as (out, in*kh*kw) matrices. The direction is
    that of the weight's (rows, -1) matrix as stored."""
    if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
        return True
    return (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def _in_place(module: nn.Module, trainable, args, kwargs, pert: Perturbation) -> Dual:
    """The module on each stream, its own trainable parameters perturbed in place for the perturbed
    one; buffers it updates keep the base stream's values."""
    buffers = []

    def perturbed(*pert_args, **pert_kwargs):
        buffers.extend((b, b.detach().clone()) for b in module.buffers(recurse=False))  # the base stream's values
        with PerturbedInPlace(trainable, pert):
            return module(*pert_args, **pert_kwargs)

    out = _two_streams(module, perturbed, args, kwargs, pert)
    with torch.no_grad():
        for buffer, value in buffers:
            buffer.copy_(value)
    return out


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: Dual, pert: Perturbation) -> Dual:
    """Base stream: the module's normalisation with running-statistics updates; perturbed stream:
    the same normalisation (batch statistics in training, running ones in eval) with perturbed
    affine parameters and no statistics update. Both streams use the same arithmetic (so the finite
    difference sees only the parameter change), in place where the input may be overwritten."""
    trainable = _trainable(module, pert)
    if x.pert is None and not trainable:
        return Dual(_batch_norm_stream(module, x.base, update_stats=True, pert=pert))
    base = _batch_norm_stream(module, x.base, update_stats=True, pert=pert, may_overwrite=x.pert is not None)
    _release_bases(x, pert)
    with PerturbedInPlace(trainable, pert):
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
    if training and x.shape[0] * math.prod(x.shape[2:]) == 1:  # torch's nn.BatchNorm refuses it the same way
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
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


def _output_size(module: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    """(H', W') of the convolution of x (N, C, H, W)."""
    if module.padding == "same":
        return tuple(x.shape[2:])
    padding = (0, 0) if module.padding == "valid" else module.padding
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in zip(
        x.shape[2:], padding, module.dilation, module.kernel_size, module.stride, strict=True))


def _chunk_samples(module: nn.Conv2d, x: torch.Tensor, pert: Perturbation, *, overwrite: bool = False) -> int:
    """Samples per chunk of a chunked convolution of x (N, C, H, W): _CONV_CHUNK_BYTES of its larger
    side (input or output). The whole batch when pert.conv_chunks is False, or when that side is at
    most 4 chunks and the output is not written over x (a transient that small is not worth the
    chunks' extra calls and copies; written over x, the chunks save a whole output)."""
    if not pert.conv_chunks:
        return x.shape[0]
    height, width = _output_size(module, x)
    per_sample = max(1, x[0].numel(), module.out_channels * height * width) * x.element_size()
    if not overwrite and per_sample * x.shape[0] <= 4 * _CONV_CHUNK_BYTES:
        return x.shape[0]
    return max(1, _CONV_CHUNK_BYTES // per_sample)


def _conv_chunked(module: nn.Conv2d, x: torch.Tensor, pert: Perturbation, *, overwrite: bool) -> torch.Tensor:
    """module(x) for x (N, C, H, W), a batch chunk at a time: written over x when `overwrite` (the
    output has x's shape; samples are independent, so each chunk is read in full before it is
    overwritten), else into one output tensor. A whole-batch convolution would hold a transient
    the size of its output besides the output itself."""
    chunk = _chunk_samples(module, x, pert, overwrite=overwrite)
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
    with PerturbedInPlace(trainable, pert):
        pert_out = _conv_stream(module, x.pert_or_base, pert)
    return Dual(base, pert_out)


def _lowrank_conv(module: nn.Conv2d, trainable, x: Dual, pert: Perturbation) -> Dual:
    """A convolution whose weight has the low-rank direction Z = U V^T / sqrt(r) of its
    (out, in*kh*kw) matrix view, U keyed (u_seed, u_offset), V (seed, v_offset) as for Linear
    weights (functional.lowrank_offsets); the bias keeps its full direction.

    Two inputs: the weight is perturbed in place by the (out x r)(r x in*kh*kw) product and the
    module's convolution runs once more. Shared input (the first layer): conv(x, W) is the base
    stream's, so the perturbed stream is that plus mu / sqrt(r) * U @ conv(x, V's r filters) (+ mu z_b):
    r / out of a convolution and an r-deep channel mix instead of a whole convolution."""
    weight = module.weight
    weight_name = pert.names[id(weight)]
    u, v, alpha = lowrank_factors(weight, weight_name, pert)
    out_channels, rank = u.shape
    if x.pert is not None:
        base = _conv_stream(module, x.base, pert)
        _release_bases(x, pert)
        with PerturbedInPlace(trainable, pert, lowrank={weight_name: (u, v, alpha)}):
            pert_out = _conv_stream(module, x.pert, pert)
        return Dual(base, pert_out)
    base = _conv_stream(module, x.base, pert, may_overwrite=False)
    pert.record(weight_name, "fused low-rank conv")
    filters, mix = v.t().reshape(rank, *weight.shape[1:]), u.mul_(alpha).view(out_channels, rank, 1, 1)
    bias_name = pert.name_of(module.bias)
    bias_shift = None
    if bias_name is not None:
        pert.record(bias_name, "fused low-rank conv")
        bias_shift = scaled_bias_direction(module.bias, bias_name, pert)
    pert_out = torch.empty_like(base)
    chunk = _chunk_samples(module, x.base, pert)  # no whole-batch transient, as for the module's own convolution
    for start in range(0, x.base.shape[0], chunk):
        projected = module._conv_forward(x.base[start:start + chunk], filters, None)  # (n, r, H', W')
        torch.add(nn.functional.conv2d(projected, mix, bias_shift), base[start:start + chunk],
                  out=pert_out[start:start + chunk])
    return Dual(base, pert_out)


def _conv_stream(module: nn.Conv2d, x: torch.Tensor, pert: Perturbation, may_overwrite: bool = True) -> torch.Tensor:
    """One stream through the convolution in batch chunks, written over x when the output has x's
    shape and the node may overwrite x."""
    overwrite = may_overwrite and _same_shape_conv(module, x) and pert.can_reuse(x) and x.is_contiguous()
    return _conv_chunked(module, x, pert, overwrite=overwrite)


def _single_stream_call(module: nn.Module, route: str, args: tuple, kwargs: dict, pert: Perturbation) -> Dual:
    """One leaf module the executor owns, in a single-stream pass: plain values (Dual with pert
    None); in the "pert" pass the module's trainable parameters hold theta + scale * z while it
    runs; BatchNorm statistics are updated by the "base" pass only."""
    trainable = _trainable(module, pert) if pert.stream == "pert" else []
    x = args[0] if args else None
    if route == RELU and not kwargs and len(args) == 1:
        return _relu(x, pert)
    buffers = [(b, b.detach().clone()) for b in module.buffers(recurse=False)] \
        if pert.stream == "pert" and route == IN_PLACE else []
    with PerturbedInPlace(trainable, pert, lowrank=_lowrank_weight(module, trainable, pert)):
        if route == BATCH_NORM and not kwargs:
            return Dual(_batch_norm_stream(module, x.base, update_stats=pert.stream == "base", pert=pert))
        if route == CONV and not kwargs and len(args) == 1 and _is_batch(x.base, 4):
            return Dual(_conv_stream(module, x.base, pert))
        out = Dual(module(*_map(args, lambda d: d.base), **_map(kwargs, lambda d: d.base)))
    with torch.no_grad():
        for buffer, value in buffers:
            buffer.copy_(value)
    return out


def _lowrank_weight(module: nn.Module, trainable: list[tuple[str, nn.Parameter]],
                    pert: Perturbation) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{weight name: (U, V, alpha)} when the module's trainable weight takes a low-rank direction,
    else {}: the in-place perturbation of a single-stream pass then adds alpha U V^T, the same
    direction as the dual-stream layers'."""
    name = pert.name_of(getattr(module, "weight", None))
    if name is None or not pert.is_lowrank(name) or name not in dict(trainable):
        return {}
    return {name: lowrank_factors(module.weight, name, pert)}


def detached(value: Any) -> Any:
    """value with every tensor detached (a tensor or any pytree of them)."""
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, value)


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
