"""Which executor runs a model's ZO step, the proof that it perturbs every trainable parameter, and
the plan it reports (`ZOUpdater.plan()`).

Executors (heron.zo.dual, heron.zo.generic):
- "fx": the model traced by torch.fx and interpreted on two streams. It runs a leaf layer by its
  own rules (fused linear, LoRA, BatchNorm, chunked convolution, in place) only where it owns the
  layer's forward (`dual.leaf_route`); every other leaf runs its own forward through the generic
  path, and parameters the traced code reads directly are perturbed where read. So a traced
  model is covered whatever its modules are.
- "generic": the model's own forward, every parameter perturbed where it is read. Needs nothing
  but an nn.Module; the default for models torch.fx cannot trace (Hugging Face models, PEFT
  wrappers, forwards with data-dependent control flow).
- "in_place": MeZO's access pattern with heron's direction, estimate and update: for the perturbed
  pass every trainable parameter is written in place (theta + scale * z) and restored from a copy
  after it, and the model's own forward runs untouched, with no executor in it. Sequential
  schedule only (one stream at a time); it holds a copy of the trainable parameters during the
  perturbed pass, and it cannot tell which parameters the forward read (all are perturbed).
"auto" (the default) takes "fx" when the model traces, else "generic".

Either way a parameter is perturbed where a torch call reads it, which covers every parameter
read by Python code. What no executor can see is refused at construction, naming the parameter:
parameters inside TorchScript or torch.compile'd modules (read outside Python), parameters that
are tensor subclasses or uninitialised (lazy modules), and dtypes the kernels do not take.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from heron.kernels import functional as HF
from heron.zo.dual import GENERIC, leaf_route, trace

EXECUTORS = ("auto", "fx", "generic", "in_place")
_COMPILED = ("OptimizedModule",)  # torch.compile's wrapper (torch._dynamo.eval_frame), named to avoid importing dynamo


def trainable_ids(named: dict[str, nn.Parameter], param_names: list[str]) -> dict[int, str]:
    """id(parameter) -> name for the trainable parameters, from a model's named_parameters() (a
    tied parameter has the one name it gives)."""
    missing = [n for n in param_names if n not in named]
    if missing:
        raise KeyError(f"the model no longer has trainable parameter(s) {missing}; build a new updater after "
                       f"replacing parameters")
    return {id(named[n]): n for n in param_names}


def check_dtypes(named: dict[str, torch.Tensor], param_names: list[str]) -> None:
    """Raise, naming the parameter, if a trainable parameter's dtype is not one the ZO kernels take (also
    checked before each step: a model converted after the updater was built)."""
    for name in param_names:
        if named[name].dtype not in HF.FLOAT_DTYPES:
            raise TypeError(f"trainable parameter {name!r} has dtype {named[name].dtype}; ZO steps perturb float32, "
                            f"bfloat16 and float16 parameters (freeze it, or pass params= without it)")


def check_coverage(model: nn.Module, param_names: list[str]) -> None:
    """Raise, naming the parameter, if a trainable parameter is one no executor can perturb where it is read."""
    named = dict(model.named_parameters())
    for name in param_names:
        param = named[name]
        if isinstance(param, nn.parameter.UninitializedParameter):
            raise ValueError(f"trainable parameter {name!r} is uninitialised (a lazy module): run one forward "
                             f"before building the updater")
        if type(param) not in (nn.Parameter, torch.Tensor):
            raise TypeError(f"trainable parameter {name!r} is a {type(param).__name__}, a tensor subclass whose "
                            f"reads heron cannot perturb; ZO steps take plain nn.Parameter tensors")
    check_dtypes(named, param_names)
    for module_name, module in model.named_modules():
        kind = ("a TorchScript module" if isinstance(module, torch.jit.ScriptModule) else
                "a torch.compile'd module" if type(module).__name__ in _COMPILED else None)
        if kind is None:
            continue
        inside = {id(p) for p in module.parameters()}
        for name in param_names:
            if id(named[name]) in inside:
                raise TypeError(f"trainable parameter {name!r} is read by {module_name or 'the model'!r}, {kind}, "
                                f"whose forward runs outside Python where heron cannot perturb it; pass the "
                                f"plain (uncompiled, unscripted) module")


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_impl

    return bool(module_impl._global_forward_hooks or module_impl._global_forward_pre_hooks)


def choose_executor(model: nn.Module, requested: str) -> tuple[str, torch.fx.GraphModule | None, str]:
    """(executor, its traced graph or None, why) for `requested` in EXECUTORS. "fx" raises if the
    model cannot be traced; "auto" falls back to "generic"."""
    if requested not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {requested!r}")
    if requested == "generic":
        return "generic", None, "executor='generic' was asked for"
    if requested == "in_place":
        return "in_place", None, ("executor='in_place' was asked for: trainable parameters written in place for the "
                                  "perturbed pass and restored from a copy, the model's forward run as it is")
    if _global_hooks():
        if requested == "fx":
            raise TypeError("global module hooks are registered (torch.nn.modules.module.register_module_forward_"
                            "hook); a traced forward would skip them, so executor='fx' cannot run this model")
        return "generic", None, "global module hooks are registered, which a traced forward would skip"
    try:
        graph_module = trace(model)
    except TypeError as error:
        if requested == "fx":
            raise
        cause = error.__cause__ if error.__cause__ is not None else error
        message = (str(cause).splitlines() or [""])[0][:150]
        return "generic", None, f"torch.fx cannot trace {type(model).__name__} ({type(cause).__name__}: {message})"
    return "fx", graph_module, (f"{type(model).__name__} traced by torch.fx; layers it owns run by its rules, the "
                                f"others through the generic path")


@dataclass(frozen=True)
class PlanRow:
    """One module of the plan: how its trainable parameters are perturbed, and why."""

    module: str
    kind: str
    route: str
    params: tuple[str, ...]
    why: str


@dataclass
class Plan:
    """What a ZOUpdater runs: executor and why, one row per module that reads trainable parameters,
    and (after a step) how each parameter was read in the last step (`reads`) and which were not
    read at all (`unread`: their projected gradient is 0, so the update moves them by noise only)."""

    executor: str
    reason: str
    schedule: str
    perturbation: str
    rows: list[PlanRow]
    reads: dict[str, list[str]] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        """A summary: rows that share a module type, route and reason are listed once, with a count."""
        lines = [f"executor: {self.executor} ({self.reason})",
                 f"schedule: {self.schedule}; perturbation: {self.perturbation}"]
        groups: dict[tuple[str, str, str], list[PlanRow]] = {}
        for row in self.rows:
            groups.setdefault((row.kind, row.route, row.why), []).append(row)
        for (kind, route, why), rows in groups.items():
            seen = sorted({r for row in rows for p in row.params for r in self.reads.get(p, [])})
            modules = ", ".join(row.module or "(root)" for row in rows[:3]) + (", ..." if len(rows) > 3 else "")
            count = f" x{len(rows)}" if len(rows) > 1 else ""
            params = sum(len(row.params) for row in rows)
            last = f"; last step: {', '.join(seen)}" if seen else ""
            lines.append(f"  {kind or '-'}{count} ({modules}): {route}, {params} parameter(s) -- {why}{last}")
        if self.unread:
            lines.append(f"  not read in the last step (estimate 0, updated by noise): {', '.join(self.unread)}")
        return "\n".join(lines)


def plan_rows(model: nn.Module, ids: dict[int, str], executor: str, graph_module: torch.fx.GraphModule | None,
              schedule: str) -> list[PlanRow]:
    """The plan's rows: per fx leaf (its leaf_route) and per parameter the traced code reads
    directly; for the generic executor, per module owning trainable parameters."""
    modules = dict(model.named_modules())
    rows: list[PlanRow] = []
    covered: set[str] = set()

    def names_in(module: nn.Module, recurse: bool) -> tuple[str, ...]:
        return tuple(dict.fromkeys(ids[id(p)] for p in module.parameters(recurse=recurse) if id(p) in ids))

    if executor == "fx":
        for node in graph_module.graph.nodes:
            if node.op == "call_module" and node.target in modules and node.target not in {r.module for r in rows}:
                module = modules[node.target]
                params = names_in(module, True)
                if not params:
                    continue
                route, why = leaf_route(module, ids)
                if schedule == "sequential" and route != GENERIC:
                    route = "in place, one stream at a time"
                rows.append(PlanRow(node.target, type(module).__name__, route, params, why))
                covered.update(params)
            elif node.op == "get_attr":
                owner, _, attr = str(node.target).rpartition(".")
                value = getattr(modules.get(owner), attr, None)
                name = ids.get(id(value)) if isinstance(value, torch.Tensor) else None
                if name is not None and name not in covered:
                    rows.append(PlanRow(owner, type(modules[owner]).__name__, "copy where read", (name,),
                                        "read directly by the traced forward: perturbed where read"))
                    covered.add(name)
    elif executor == "in_place":
        for module_name, module in modules.items():
            params = tuple(n for n in names_in(module, False) if n not in covered)
            if params:
                covered.update(params)
                rows.append(PlanRow(module_name, type(module).__name__, "in place", params,
                                    "written in place for the perturbed pass, restored from a copy after it"))
    else:
        for module_name, module in modules.items():
            params = tuple(n for n in names_in(module, False) if n not in covered)
            if not params:
                continue
            covered.update(params)
            linear = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            why = ("read through F.linear: both streams in one pass (perturbed_linear), or on a perturbed copy where "
                   "the input has more rows than the layer outputs" if linear and schedule == "dual"
                   else f"read inside {type(module).__name__}.forward or wherever the model reads it: a perturbed "
                        f"copy per read")
            rows.append(PlanRow(module_name, type(module).__name__, "generic", params, why))
    rest = tuple(n for n in ids.values() if n not in covered)
    if rest:
        rows.append(PlanRow("", "", "where read", rest, "not read by the traced graph: perturbed wherever the step "
                                                        "reads it (e.g. in the loss); unread, its estimate is 0"))
    return rows
