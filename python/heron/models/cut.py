"""Any model split for HERON-SFL at a module named by the user (e.g. a Hugging Face model after block k).

`split_at(model, cut, example)` runs the model once on an example batch, recording which modules
run before module `cut` has finished, and returns a SplitModel:
- client (`UpToCut`): the model's own forward, stopped as soon as `cut` has run; its output is the
  smashed data. Modules that never run before the cut are removed from the client's copy.
- server (`FromCut`): the model's own forward resumed at the cut. The forward's code before the cut
  (embedding sums, position ids, causal masks) still runs, on placeholder inputs the server builds
  from the smashed data's shape (`server_inputs`), so the raw inputs never reach the server; the
  modules before the cut whose output has their input's shape (transformer blocks) are replaced by
  pass-throughs, the others (embeddings) kept frozen, and the cut module returns the smashed data.
- aux: a copy of the server part, the client's auxiliary head (or the module given).
The split is checked on the example: server(client(x)) must equal model(x), which fails if the
computation after the cut depends on more than the cut's output and the inputs' shapes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from heron.models.split import SplitModel


class _CutReached(Exception):
    def __init__(self, output: Any):
        super().__init__("cut reached")
        self.output = output


def _call(model: nn.Module, inputs: Any) -> Any:
    """model on inputs: a tensor, a tuple of positional arguments, or a dict of keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


class _Removed(nn.Module):
    """Stands for a module this part never runs."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"module {self.name!r} was removed from this part of the split model")


class _PassThrough(nn.Module):
    """Stands for a module before the cut whose output has its input's shape: returns its input."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


class _Smashed(nn.Module):
    """Stands for the cut module on the server: returns the smashed data it is given."""

    def __init__(self):
        super().__init__()
        self.value: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.value


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


class UpToCut(nn.Module):
    """The client part: `model`'s forward until module `cut` has run; returns the cut's output."""

    def __init__(self, model: nn.Module, cut: str):
        super().__init__()
        self.model, self.cut = model, cut

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        handle = self.model.get_submodule(self.cut).register_forward_hook(_stop)
        try:
            self.model(*args, **kwargs)
        except _CutReached as reached:
            return reached.output
        finally:
            handle.remove()
        raise RuntimeError(f"module {self.cut!r} did not run in {type(self.model).__name__}.forward")


def _stop(module: nn.Module, args: Any, output: Any) -> None:
    raise _CutReached(output)


def token_placeholder(smashed: torch.Tensor) -> tuple[torch.Tensor]:
    """Server inputs for a token model: token ids (its first argument) of zeros shaped like the
    smashed data's (B, T)."""
    return (torch.zeros(smashed.shape[:2], dtype=torch.long, device=smashed.device),)


def logits_of(output: Any) -> Any:
    """A model output's logits: `.logits` of a Hugging Face ModelOutput, the first element of a tuple."""
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


class FromCut(nn.Module):
    """The server part: `model`'s forward resumed at module `cut` (see the module docstring).

    server_inputs: smashed -> the placeholder inputs of the model's forward (a tensor, tuple or
    dict); output: the model's output -> what the part returns (its logits by default)."""

    def __init__(self, model: nn.Module, cut: str, server_inputs: Callable[[Any], Any],
                 output: Callable[[Any], Any] = logits_of):
        super().__init__()
        self.model, self.cut = model, cut
        self.server_inputs, self.output = server_inputs, output
        self.smashed = _Smashed()
        _replace(self.model, cut, self.smashed)

    def forward(self, smashed: Any) -> Any:
        self.smashed.value = smashed
        try:
            return self.output(_call(self.model, self.server_inputs(_first_tensor(smashed))))
        finally:
            self.smashed.value = None


def _first_tensor(value: Any) -> torch.Tensor:
    return next(t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))


def _trial(model: nn.Module, cut: str, example: Any) -> tuple[list[str], dict[str, bool]]:
    """Run the model on `example` until `cut` has run: (modules that started, in order; for each
    module that finished, whether its output has the shape of its first tensor input)."""
    started: list[str] = []
    same_shape: dict[str, bool] = {}
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: started.append(name)))
        handles.append(module.register_forward_hook(
            lambda m, a, out, name=name: same_shape.__setitem__(name, _keeps_shape(a, out))))
    handles.append(model.get_submodule(cut).register_forward_hook(_stop))
    try:
        with torch.no_grad():
            _call(model, example)
    except _CutReached:
        return started, same_shape
    finally:
        for handle in handles:
            handle.remove()
    raise ValueError(f"module {cut!r} did not run in {type(model).__name__}.forward on the example")


def _keeps_shape(args: tuple, output: Any) -> bool:
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(inputs) and isinstance(output, torch.Tensor) and output.shape == inputs[0].shape \
        and output.dtype == inputs[0].dtype


def split_at(model: nn.Module, cut: str, example: Any, *, aux: nn.Module | None = None,
             server_inputs: Callable[[Any], Any] = token_placeholder, output: Callable[[Any], Any] = logits_of,
             atol: float = 1e-5) -> SplitModel:
    """`model` split after module `cut` (a name from model.named_modules()), checked on `example`
    (the model's input: a tensor, a tuple of positional arguments or a dict of keyword ones).

    The client and the server are copies (the model is not changed); the server's frozen modules
    before the cut are copies of the model's at the split. aux defaults to a copy of the server
    part. Raises ValueError if server(client(example)) differs from the model's output by more than atol.
    """
    modules = dict(model.named_modules())
    if cut not in modules or cut == "":
        raise KeyError(f"cut module {cut!r} does not exist in {type(model).__name__}; modules are: "
                       f"{[n for n in modules if n][:40]}")
    training = model.training
    model.eval()  # the check compares deterministic outputs
    try:
        started, same_shape = _trial(model, cut, example)
        ancestors = {cut.rpartition(".")[0]} | {n for n in modules if cut.startswith(n + ".")} | {""}
        used = {prefix for name in started for prefix in _prefixes(name)}  # modules run, and their containers
        client_model = copy.deepcopy(model)
        for name, module in modules.items():
            if name not in used and any(True for _ in module.parameters()) and not _inside_replaced(client_model, name):
                _replace(client_model, name, _Removed(name))
        server_model = copy.deepcopy(model)
        after_cut = {id(p) for n, m in server_model.named_modules() if n not in started for p in m.parameters()}
        for name in started:
            if name in ancestors or name == cut or name.startswith(cut + ".") or _inside_replaced(server_model, name):
                continue
            if same_shape.get(name) and any(True for _ in modules[name].parameters()):
                _replace(server_model, name, _PassThrough())
            else:  # kept to run on the placeholder inputs; trained only through a tie to a module after the cut
                for param in server_model.get_submodule(name).parameters(recurse=False):
                    if id(param) not in after_cut:
                        param.requires_grad_(False)
        client, server = UpToCut(client_model, cut), FromCut(server_model, cut, server_inputs, output)
        with torch.no_grad():
            expected = output(_call(model, example))
            try:
                got = server(_call(client, example))
            except Exception as error:  # noqa: BLE001 - reported as a failed split
                raise ValueError(f"the server part of {type(model).__name__} split at {cut!r} fails on the example's "
                                 f"placeholder inputs ({type(error).__name__}: {error}); see server_inputs") from error
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape or \
                not torch.allclose(got, expected, atol=atol, rtol=1e-4):
            raise ValueError(f"server(client(x)) differs from {type(model).__name__}(x) when split at {cut!r}: the "
                             f"computation after the cut depends on more than the cut's output and the inputs' shape")
    finally:
        model.train(training)
    for part in (client, server):
        part.train(training)
    return SplitModel(client, copy.deepcopy(server) if aux is None else aux, server)


def _prefixes(name: str) -> list[str]:
    """'a.b.c' -> ['', 'a', 'a.b', 'a.b.c']."""
    parts = name.split(".") if name else []
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _inside_replaced(model: nn.Module, name: str) -> bool:
    """Whether `name` lies inside a module already replaced in `model` (or is no longer there)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return True
    return isinstance(module, (_PassThrough, _Removed, _Smashed))
