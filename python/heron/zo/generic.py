"""The generic executor: a zeroth-order forward of any nn.Module, perturbed where parameters are read.

Nothing is asked of the model but that it is an nn.Module whose forward computes with torch. While
a forward (and the loss) runs, `StreamMode`, a TorchFunctionMode, sees every torch call and its
arguments, so it sees every read of every trainable parameter by identity: a root-level
`nn.Parameter`, a tied weight read by two modules, a parameter read inside any subclass's own
forward. Each read in the perturbed stream takes theta + scale * z of that parameter, the same
value at every read (heron.zo.perturbation); the parameters themselves are never written, so nothing
needs restoring.

Streams:
- "pert" (the sequential schedule's perturbed pass): each call that reads a trainable parameter
  gets a perturbed copy of it, made for that call and dropped after it (a bounded transient: the
  parameters of one call at a time).
- "dual" (both streams in one forward): values computed from perturbed parameters are
  `DualTensor`s holding a base and a perturbed tensor; a call on them runs once per stream.
  `F.linear` of a trainable weight runs through the fused dual-stream kernels (one pass over the
  weight serves both streams; the perturbed weight is never formed); every other read of a
  trainable parameter takes a perturbed copy for the perturbed stream's call. Random calls draw
  the same numbers in both streams (the generator is rewound between them), so module and
  functional dropout (`F.dropout`, SDPA's `dropout_p`, ...) apply one mask to both; `F.dropout`
  and nn.Dropout draw it once and apply it to both (`shared_dropout`). Model buffers
  passed to a perturbed-stream call are copies, so BatchNorm statistics (and any buffer a call
  updates) follow the base stream only.

What the dual stream cannot represent is refused with a clear error instead of computed wrongly:
control flow on a value whose streams differ (`if x.sum() > 0` on a perturbed x), and an in-place
write of a perturbed value into a tensor created outside the perturbed computation. The
sequential schedule (one stream at a time) has neither limit.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from heron.zo.perturbation import Perturbation, dual_linear, fusable_linear, perturbed_copy


class StreamError(RuntimeError):
    """The dual stream cannot represent what the forward does (see the module docstring)."""


class DualTensor(torch.Tensor):
    """A value in both streams: `base` (theta) and `pert` (theta + scale * z), same shape, dtype
    and device. A wrapper without storage of its own: it only lives inside a StreamMode, and any
    use outside one fails loudly rather than computing on one stream."""

    base: torch.Tensor
    pert: torch.Tensor

    @staticmethod
    def __new__(cls, base: torch.Tensor, pert: torch.Tensor) -> DualTensor:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, base.size(), strides=base.stride(), storage_offset=base.storage_offset(), dtype=base.dtype,
            device=base.device, layout=base.layout, requires_grad=False)
        wrapper.base, wrapper.pert = base, pert
        return wrapper

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise StreamError(f"{func} received a value of heron's dual stream without passing through its StreamMode: a "
                          f"perturbed value kept beyond the step's forward and loss (e.g. stored on a module), or "
                          f"code that bypasses __torch_function__")

    def __repr__(self) -> str:
        return f"DualTensor(base={self.base!r}, pert={self.pert!r})"


def base_of(value: Any) -> Any:
    """The base stream of a value (a DualTensor, or any pytree holding them)."""
    return pytree.tree_map_only(DualTensor, lambda d: d.base, value)


def pert_of(value: Any) -> Any:
    """The perturbed stream of a value (plain tensors are shared by both streams)."""
    return pytree.tree_map_only(DualTensor, lambda d: d.pert, value)


def _leaves(args: tuple, kwargs: dict) -> list[Any]:
    """The values inside args and kwargs, through tuples, lists and dicts."""
    found: list[Any] = []
    pending: list[Any] = [args, kwargs] if kwargs else [args]
    while pending:
        value = pending.pop()
        if isinstance(value, (tuple, list)):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
        else:
            found.append(value)
    return found


def _map(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """value with fn applied to each tensor inside tuples, lists and dicts (other objects kept)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [_map(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [_map(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


# Calls that read a tensor's metadata only: the same for both streams and for a parameter's copy.
_METADATA = {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride, torch.Tensor.is_contiguous,
    torch.Tensor.storage_offset, torch.Tensor.element_size, torch.Tensor.nelement, torch.Tensor.ndimension,
    torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.get_device, torch.Tensor.__len__,
    torch.Tensor.is_signed, torch.Tensor.is_inference, torch.Tensor.data_ptr, torch.Tensor.untyped_storage,
    torch.Tensor.is_pinned, torch.Tensor.is_shared, torch.is_floating_point, torch.is_complex, torch.numel,
}
_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                     "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}
_WRITES_FIRST: dict[Any, bool] = {}  # func -> whether it writes its first argument (by its name; cached)


def _name(func: Callable) -> str:
    return getattr(func, "__name__", None) or str(func)


def _writes_first(func: Callable) -> bool:
    if func not in _WRITES_FIRST:
        name = _name(func)
        _WRITES_FIRST[func] = name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))
    return _WRITES_FIRST[func]


def _in_place_targets(func: Callable, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors a call writes: its first argument for an in-place method (add_, __setitem__, ...), its out=."""
    targets = [args[0]] if args and isinstance(args[0], torch.Tensor) and _writes_first(func) else []
    out = kwargs.get("out") if kwargs else None
    if out is not None:
        targets.extend(t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor))
    return targets


def _generators(leaves: list[Any], kwargs: dict) -> list[torch.Generator]:
    """The random generators a call may draw from: an explicit generator=, else the default one of
    each device its tensors are on."""
    if kwargs and isinstance(kwargs.get("generator"), torch.Generator):
        return [kwargs["generator"]]
    if not torch.cuda.is_initialized():  # no tensor is on a CUDA device
        return [torch.default_generator]
    generators = [torch.default_generator]
    for device in {t.device for t in leaves if isinstance(t, torch.Tensor) and t.is_cuda}:
        generators.append(torch.cuda.default_generators[device.index or 0])
    return generators


def random_fork(args: tuple, kwargs: dict) -> _RandomFork:
    """A _RandomFork of the generators a call on (args, kwargs) would draw from."""
    return _RandomFork(_generators(_leaves(args, kwargs), kwargs))


class _RandomFork:
    """Draws of the perturbed stream's call equal the base stream's: the generators are rewound to
    where the base call started, and left where it ended."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators
        self.start = [g.get_state() for g in generators]
        self.end: list[torch.Tensor] = []

    def rewind(self) -> None:
        self.end = [g.get_state() for g in self.generators]
        for g, state in zip(self.generators, self.start, strict=True):
            g.set_state(state)

    def resume(self) -> None:
        for g, state in zip(self.generators, self.end, strict=True):
            g.set_state(state)


def dropout_call(fn: Callable, args: tuple, kwargs: dict) -> tuple[Any, float, bool] | None:
    """(input, p, inplace) of a call that is dropout in training (`F.dropout`, or an nn.Dropout module
    keeping its forward) with 0 < p < 1, else None."""
    if isinstance(fn, nn.Dropout) and type(fn).forward is nn.Dropout.forward:
        if kwargs or len(args) != 1 or not fn.training:
            return None
        input, p, inplace = args[0], fn.p, fn.inplace  # noqa: A001 - F.dropout's argument name
    elif fn is nn.functional.dropout:
        try:
            bound = _DROPOUT_SIGNATURE.bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        if not bound.arguments["training"]:
            return None
        input, p, inplace = bound.arguments["input"], bound.arguments["p"], bound.arguments["inplace"]  # noqa: A001
    else:
        return None
    return (input, float(p), bool(inplace)) if isinstance(p, (int, float)) and 0.0 < p < 1.0 else None


_DROPOUT_SIGNATURE = inspect.signature(nn.functional.dropout)


def can_share_dropout(base: object) -> bool:
    """Whether shared_dropout reproduces F.dropout on this tensor bit for bit: on the CPU (ATen
    scales its mask in the tensor's dtype, as shared_dropout does) and for float32 on CUDA (the fused
    kernel scales in float32); half-precision CUDA tensors draw per stream instead."""
    return isinstance(base, torch.Tensor) and (base.device.type == "cpu" or base.dtype == torch.float32)


def shared_dropout(base: torch.Tensor, pert: torch.Tensor, p: float,
                   inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout of both streams with one mask, drawn once: F.dropout of a tensor of ones is the mask
    F.dropout(base) would apply, scaled (0 or 1 / (1 - p)), from the same draws, so base * noise is
    F.dropout(base) bit for bit (where can_share_dropout) and the generator ends where one dropout
    leaves it. The perturbed stream multiplies by the same noise instead of drawing it again (half
    the random-number work of dropout in a dual-stream forward)."""
    noise = nn.functional.dropout(torch.ones_like(base), p, True)
    if inplace:
        return base.mul_(noise), pert.mul_(noise)
    return base * noise, pert * noise


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects count as different
        return False


class StreamMode(TorchFunctionMode):
    """The perturbation of one forward, applied where parameters are read (module docstring).

    pert: the direction and stream ("dual" or "pert"; a "base" forward needs no mode).
    buffers: ids of the model's buffers (copied for perturbed-stream calls in the dual stream).
    """

    def __init__(self, pert: Perturbation, buffers: frozenset[int] = frozenset()):
        super().__init__()
        if pert.stream not in ("dual", "pert"):
            raise ValueError(f"StreamMode runs the 'dual' or 'pert' stream, got {pert.stream!r}")
        self.pert = pert
        self.buffers = buffers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        names = self.pert.names
        leaves = _leaves(args, kwargs)
        dual = reads = False
        for value in leaves:
            if type(value) is DualTensor:
                dual = True
            elif isinstance(value, torch.Tensor) and id(value) in names:
                reads = True
        if not (dual or reads):
            return func(*args, **kwargs)
        if func in _METADATA:
            return func(*_map(args, _base), **_map(kwargs, _base))
        if _name(func) == "__get__":  # a property: metadata (shape, dtype) unless it returns a tensor (.T, .data)
            value = func(*_map(args, _base), **_map(kwargs, _base))
            if not isinstance(value, torch.Tensor):
                return value
        targets = _in_place_targets(func, args, kwargs)
        for target in targets:
            name = self.pert.name_of(target)
            if name is not None:
                raise StreamError(f"the forward writes trainable parameter {name!r} in place ({_name(func)}); heron "
                                  f"perturbs parameters where they are read and cannot train one the forward rewrites")
        if self.pert.stream == "pert":
            return func(*_map(args, self._perturbed), **_map(kwargs, self._perturbed))
        if func is nn.functional.linear:
            fused = self._linear(*args, **kwargs)
            if fused is not None:
                return fused
        return self._both(func, args, kwargs, leaves, targets)

    def _perturbed(self, tensor: torch.Tensor) -> torch.Tensor:
        """The perturbed stream's view of an argument: a DualTensor's pert, a trainable parameter's copy."""
        if type(tensor) is DualTensor:
            return tensor.pert
        name = self.pert.names.get(id(tensor))
        if name is None:
            return tensor
        self.pert.record(name, "copy")
        return perturbed_copy(tensor, name, self.pert)

    def _perturbed_or_copied_buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) in self.buffers:
            return tensor.clone()
        return self._perturbed(tensor)

    def _linear(self, input: torch.Tensor, weight: torch.Tensor,  # noqa: A002 - F.linear's argument names
                bias: torch.Tensor | None = None) -> DualTensor | None:
        """F.linear of a trainable weight through the fused dual-stream kernels; None when it does not apply."""
        if self.pert.name_of(weight) is None or type(bias) is DualTensor or type(weight) is DualTensor:
            return None
        x_base, x_pert = (input.base, input.pert) if type(input) is DualTensor else (input, None)
        if not fusable_linear(x_base, weight, bias):
            return None
        return DualTensor(*dual_linear(x_base, x_pert, weight, bias, self.pert))

    def _both(self, func: Callable, args: tuple, kwargs: dict, leaves: list[Any], targets: list[torch.Tensor]) -> Any:
        """func once per stream; the generators rewound between the two calls."""
        for target in targets:
            if type(target) is DualTensor:
                continue
            if id(target) in self.buffers:  # a buffer follows the base stream
                return func(*_map(args, _base), **_map(kwargs, _base))
            raise StreamError(
                f"{_name(func)} writes a value computed from perturbed parameters into a tensor of shape "
                f"{tuple(target.shape)} created outside the perturbed computation; the dual schedule cannot hold two "
                f"streams in it. Use schedule='sequential', or write the forward out of place")
        dropout = dropout_call(func, args, kwargs)
        if dropout is not None and type(dropout[0]) is DualTensor and can_share_dropout(dropout[0].base):
            x, p, inplace = dropout
            base, pert = shared_dropout(x.base, x.pert, p, inplace)
            return x if inplace else DualTensor(base, pert)
        fork = _RandomFork(_generators(leaves, kwargs))
        base = func(*_map(args, _base), **_map(kwargs, _base))
        fork.rewind()
        watched = [(t, t._version) for t in leaves
                   if isinstance(t, torch.Tensor) and type(t) is not DualTensor and id(t) not in self.buffers]
        pert = func(*_map(args, self._perturbed_or_copied_buffer), **_map(kwargs, self._perturbed_or_copied_buffer))
        fork.resume()
        for tensor, version in watched:
            if tensor._version != version:
                raise StreamError(f"{_name(func)} wrote one of its tensor arguments (shape {tuple(tensor.shape)}) in "
                                  f"the perturbed stream's call; the dual schedule cannot tell which stream owns it. "
                                  f"Use schedule='sequential'")
        return _combine(func, base, pert, leaves)


def _base(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.base if type(tensor) is DualTensor else tensor


def _combine(func: Callable, base: Any, pert: Any, leaves: list[Any]) -> Any:
    """The two streams' results as one value: tensors that differ become DualTensors (an in-place
    call returns its DualTensor argument), equal non-tensors are returned once, and differing
    non-tensors mean the forward's control flow would differ between the streams."""
    if isinstance(base, torch.Tensor):
        if base is pert:
            return base
        for value in leaves:
            if type(value) is DualTensor and value.base is base and value.pert is pert:
                return value
        return DualTensor(base, pert)
    if isinstance(base, (tuple, list, dict)) and type(base) is type(pert):
        base_leaves, spec = pytree.tree_flatten(base)
        pert_leaves, pert_spec = pytree.tree_flatten(pert)
        if spec == pert_spec:
            return pytree.tree_unflatten([_combine(func, b, p, leaves)
                                          for b, p in zip(base_leaves, pert_leaves, strict=True)], spec)
    if _same(base, pert):
        return base
    raise StreamError(f"{_name(func)} gives {base!r} on the base stream and {pert!r} on the perturbed one: the forward "
                      f"depends on a value computed from perturbed parameters through Python (control flow, .item(), "
                      f"...), so one forward cannot serve both streams. Use schedule='sequential'")


def run_in_stream(fn: Callable[[], Any], pert: Perturbation, buffers: list[torch.Tensor] | None = None) -> Any:
    """fn() in `pert`'s stream ("base": as it is). `buffers` (a model's): copied for the perturbed
    stream's calls in the dual stream, restored after a "pert" stream (statistics follow the base stream)."""
    if pert.stream == "base":
        return fn()
    buffers = buffers or []
    saved = [b.detach().clone() for b in buffers] if pert.stream == "pert" else []
    try:
        with StreamMode(pert, frozenset(id(b) for b in buffers)):
            return fn()
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=False):
                buffer.copy_(value)


def run_module(module: nn.Module, args: tuple, kwargs: dict, pert: Perturbation,
               buffers: list[torch.Tensor] | None = None) -> Any:
    """module(*args, **kwargs) in `pert`'s stream (run_in_stream with the module's buffers, which
    the caller may pass if it has them)."""
    return run_in_stream(lambda: module(*args, **kwargs), pert, list(module.buffers()) if buffers is None else buffers)
