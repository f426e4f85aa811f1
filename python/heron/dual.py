"""Dual-stream execution of a whole model: the base and the perturbed forward run together.

The model is traced once with torch.fx; every module that owns parameters becomes a leaf. The
graph is then interpreted on `Dual(base, pert)` values: layers with a fused dual-stream kernel
(nn.Linear, heron.PerturbedLinear, heron.LoRALinear) compute both streams in one pass over their
weights; BatchNorm runs the base stream with running-statistics updates and the perturbed stream
without; other parametrised layers are perturbed in place from the seeded stream for the
perturbed forward and restored bit-exactly from a copy of that one layer's parameters; layers
and functions without trainable parameters are applied to each stream (once while the two
streams are still identical). Dropout draws one mask for both streams, so the finite difference
sees only the parameter change. The interpreter frees each activation after its last use.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from heron import functional as HF
from heron.nn import LoRALinear, PerturbedLinear
from heron.stream import ParameterLayout


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

    def run_node(self, node: torch.fx.Node) -> Any:
        last_uses = self.user_to_last_uses.get(node, [])
        self.perturbation.consumable = frozenset(
            id(self.env[n]) for n in last_uses if isinstance(self.env.get(n), Dual))
        result = super().run_node(node)
        if node.name == self.cut_node:
            self.smashed = result.base.detach() if isinstance(result, Dual) else result
        return result

    def placeholder(self, target, args, kwargs):
        return Dual(super().placeholder(target, args, kwargs))

    def get_attr(self, target, args, kwargs):
        return Dual(super().get_attr(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        if target is operator.getitem and isinstance(args[0], Dual) and not isinstance(args[1], Dual):
            d = args[0]
            return Dual(d.base[args[1]], None if d.pert is None else d.pert[args[1]])
        return _apply_both(target, args, kwargs, self.perturbation)

    def call_method(self, target, args, kwargs):
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
    layout = pert.layout
    trainable = _trainable(module, name, layout)
    if isinstance(module, nn.Dropout) and module.training:
        return _dropout(module, args[0])
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
    return _in_place(module, trainable, args, kwargs, pert)


def _linear(module: nn.Linear, name: str, x: Dual, pert: Perturbation) -> Dual:
    layout = pert.layout
    bias_trainable = module.bias is not None and f"{name}.bias" in layout
    bias = module.bias if bias_trainable else None
    weight_offset = layout.offset(f"{name}.weight")
    bias_offset = layout.offset(f"{name}.bias") if bias_trainable else None
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

    def __init__(self, trainable: list[tuple[str, nn.Parameter]], pert: Perturbation):
        self.trainable, self.pert = trainable, pert
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        for name, p in self.trainable:
            self.saved.append(p.detach().clone())
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
    """Base stream: the module as is (running statistics updated); perturbed stream: the same
    normalisation (batch statistics in training, running ones in eval) with perturbed affine
    parameters and no statistics update."""
    base = module(x.base)
    _release_bases(x, pert)
    trainable = _trainable(module, name, pert.layout)
    use_batch_stats = module.training or module.running_mean is None
    with _PerturbedInPlace(trainable, pert):
        pert_out = nn.functional.batch_norm(
            x.pert_or_base, None if use_batch_stats else module.running_mean,
            None if use_batch_stats else module.running_var, module.weight, module.bias,
            training=use_batch_stats, momentum=0.0, eps=module.eps)
    return Dual(base, pert_out)


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
