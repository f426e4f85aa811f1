"""Drop-in client updaters: one object, one `step(batch)`, zeroth- or first-order.

- ZOUpdater: the fused two-point zeroth-order step (one dual-stream forward per direction, no
  autograd, the seeded update regenerating the direction in place).
- FOUpdater: backprop + torch.optim, the first-order baseline (CSE-FSL's client).
- MeZOUpdater: the MeZO-style baseline: perturb in place (+mu), forward, (-2mu), forward, restore,
  update, the direction regenerated from a torch.Generator each time.

A batch is `(inputs, targets)`; `inputs` is a tensor or a tuple of tensors passed to the model,
and `loss_fn(outputs, targets)` must return a scalar tensor.

Replaying a ZO run: direction j of step t has seed `derive_seed(seed, t, j)`; with
perturbation="lowrank" the U factors of step t use `derive_seed(seed, U_STREAM, t // lazy_steps)`.
The estimate of step t is `StepResult.projected_grads` (one scalar per direction), so the updater's
parameters after any number of steps are determined by (initial parameters, seed, the scalars).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from heron.kernels import functional as HF
from heron.kernels.stream import ParameterLayout, derive_seed, seeded_randn
from heron.zo.dual import Dual, DualStreamInterpreter, Perturbation, cut_node_name, lowrank_eligible, trace

U_STREAM = 2**62  # index that separates the low-rank U seeds from the per-direction seeds
OPTIMIZERS = ("sgd", "adam", "adamw")
DIRECTIONS = ("gaussian", "sphere")
PERTURBATIONS = ("full", "lowrank")
SCHEDULES = ("dual", "sequential")
DROPOUT_STREAM = 2**62 + 1  # index of the per-step dropout seeds of the sequential schedule
_NORM_CHUNK = 1 << 20


@dataclass
class StepResult:
    """What one client step produced.

    loss: L(theta) on the batch (base stream); smashed: the base stream's output at the cut
    module, detached (None without a cut); skipped: True when the step was not applied (reason
    says why; parameters untouched). ZO only: seeds and projected_grads per direction (the
    scalars the update used) and losses_perturbed.
    """

    loss: float
    smashed: torch.Tensor | None = None
    skipped: bool = False
    reason: str = ""
    step: int = 0
    seeds: list[int] = field(default_factory=list)
    projected_grads: list[float] = field(default_factory=list)
    losses_perturbed: list[float] = field(default_factory=list)


def _choice(value: str, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _split_batch(batch: Any) -> tuple[tuple, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be a pair (inputs, targets), got {type(batch).__name__}")
    inputs, targets = batch
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), targets


def _scalar_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    return loss.reshape(())


def _select_params(model: nn.Module, params: Iterable | None) -> list[str]:
    """Names of the parameters an updater trains: requires_grad ones, or those given (names or Parameters)."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        by_id = {id(p): n for n, p in named.items()}
        names = []
        for item in params:
            if isinstance(item, str):
                if item not in named:
                    raise KeyError(f"params names {item!r}, which the model does not have")
                names.append(item)
            elif isinstance(item, torch.Tensor) and id(item) in by_id:
                names.append(by_id[id(item)])
            else:
                raise TypeError(f"params must hold parameter names or the model's own Parameters, got {item!r}")
    if not names:
        raise ValueError("the updater has no parameters to train (none require grad, or params is empty)")
    devices = {named[n].device for n in names}
    if len(devices) > 1:
        raise ValueError(f"parameters to train are on mixed devices {sorted(map(str, devices))}; "
                         f"move the model to one device")
    return names


class _BufferSnapshot:
    """Copies of a model's buffers (BatchNorm statistics), restored when a step is abandoned."""

    def __init__(self, model: nn.Module):
        self.pairs = [(b, b.detach().clone()) for b in model.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in self.pairs:
                buffer.copy_(saved)


class _Updater:
    """Shared pieces: parameter selection, cut capture, batch checks."""

    def __init__(self, model: nn.Module, loss_fn: Callable, *, lr: float, weight_decay: float, seed: int,
                 params: Iterable | None, cut: str | None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model, self.loss_fn = model, loss_fn
        self.lr = HF.check_scalar(lr, "lr")
        self.weight_decay = HF.check_scalar(weight_decay, "weight_decay", non_negative=True)
        self.seed = seed
        self.cut = cut
        self.param_names = _select_params(model, params)
        if cut is not None and cut not in dict(model.named_modules()):
            valid = [n for n, _ in model.named_modules() if n]
            raise KeyError(f"cut module {cut!r} does not exist in {type(model).__name__}; modules are: {valid}")
        self.steps = 0

    def parameters(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.param_names]

    def _forward(self, inputs: tuple) -> Any:
        return _run_on_batch(self.model, inputs)


def _run_on_batch(forward: Callable, inputs: tuple) -> Any:
    """forward(*inputs); any failure becomes a ValueError naming the batch's shapes."""
    try:
        return forward(*inputs)
    except Exception as error:  # noqa: BLE001 - reported with the batch's shapes
        raise ValueError(f"the model rejected the batch (inputs {_describe_inputs(inputs)}): "
                         f"{type(error).__name__}: {error}") from error


def _describe_inputs(inputs: tuple) -> str:
    return ", ".join(f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                     for x in inputs)


def _matrix_view(name: str, param: torch.Tensor) -> torch.Tensor:
    """The (out, in*kh*kw) view of a low-rank-perturbed weight (a conv weight's direction is that of
    this matrix), updated in place through the view."""
    if not param.is_contiguous():
        raise ValueError(f"perturbation='lowrank' updates {name!r} in place through its (out, -1) matrix view, "
                         f"which needs a contiguous tensor; got shape {tuple(param.shape)} with strides "
                         f"{param.stride()} (e.g. channels_last): make the weight contiguous")
    return param.view(param.shape[0], -1)


class ZOUpdater(_Updater):
    """The fused zeroth-order client step (see the module docstring).

    Args:
        model: any nn.Module traceable by torch.fx (client part + auxiliary head, or a whole model).
        loss_fn: (outputs, targets) -> scalar tensor.
        mu: perturbation scale; q: directions per step (their estimates are averaged).
        direction: "gaussian" (u ~ N(0, I); g = dL/mu * u) or "sphere" (u = z/|z|; g = d * dL/mu * u).
        optimizer: "sgd", "adam" or "adamw", fed the estimate through heron's fused seeded updates.
        params: parameters to train (names or Parameters); default all with requires_grad.
        perturbation: "full", or "lowrank": Linear weights, and ungrouped Conv2d weights as
            (out, in*kh*kw) matrices, get Z = U V.T / sqrt(rank) directions, U held for `lazy_steps`
            steps; other parameters keep full directions.
        cut: name of the module whose base-stream output is returned as StepResult.smashed.
        backend: pin a kernel backend ("cpu", "triton", "cuda", "torch"); default the best.
        schedule: "dual" runs the base and perturbed streams together, every Linear/LoRA layer
            through the fused dual-stream kernels (one pass over the weights serves both
            streams); "sequential" runs the perturbed forward(s) and then the base forward, each
            trainable layer perturbed in place while it runs (a low-rank weight by alpha U V^T),
            so only one stream's activations are alive at a time: about half the activation
            memory, for activation-bound models (conv nets at large batch), at the cost of reading
            the weights once per stream. The two schedules compute the same estimate (same
            directions, full or low-rank; same losses up to rounding).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, mu: float = 1e-3, q: int = 1,
                 direction: str = "gaussian", optimizer: str = "sgd", lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, seed: int = 0,
                 params: Iterable | None = None, perturbation: str = "full", rank: int | None = None,
                 lazy_steps: int = 1, cut: str | None = None, backend: str | None = None,
                 schedule: str = "dual"):
        super().__init__(model, loss_fn, lr=lr, weight_decay=weight_decay, seed=seed, params=params, cut=cut)
        self.schedule = _choice(schedule, "schedule", SCHEDULES)
        self.mu = HF.check_scalar(mu, "mu", nonzero=True)
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"q must be a positive int, got {q!r}")
        self.q = q
        self.direction = _choice(direction, "direction", DIRECTIONS)
        self.optimizer = _choice(optimizer, "optimizer", OPTIMIZERS)
        self.perturbation = _choice(perturbation, "perturbation", PERTURBATIONS)
        if self.perturbation == "lowrank":
            if rank is None or rank < 1:
                raise ValueError(f"perturbation='lowrank' needs rank >= 1, got rank={rank!r}")
            if self.direction == "sphere":
                raise ValueError("direction='sphere' is defined for full directions; use perturbation='full'")
        self.rank = rank if self.perturbation == "lowrank" else 0
        self.lazy_steps = max(1, int(lazy_steps))
        self.betas, self.eps, self.backend = betas, eps, backend
        self.layout = ParameterLayout.from_module(model, names=self.param_names)
        self.graph_module = trace(model)
        self.cut_node = None if cut is None else cut_node_name(self.graph_module, model, cut)
        self.lowrank_names = self._lowrank_weight_names() if self.rank else set()
        self.state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _lowrank_weight_names(self) -> set[str]:
        names = set()
        for module_name, module in self.model.named_modules():
            if lowrank_eligible(module):
                weight = f"{module_name}.weight" if module_name else "weight"
                if weight in self.layout:
                    names.add(weight)
        return names

    def direction_seeds(self, step: int) -> list[int]:
        """The seeds of step `step`'s q directions."""
        return [derive_seed(self.seed, step, j) for j in range(self.q)]

    def u_seed(self, step: int) -> int:
        return derive_seed(self.seed, U_STREAM, step // self.lazy_steps)

    def _direction_norm(self, seed: int, device: torch.device) -> float:
        """|z| over the whole layout, generated in bounded chunks."""
        total, start = 0.0, self.layout.base_offset
        end = start + self.layout.total
        while start < end:
            count = min(_NORM_CHUNK, end - start)
            chunk = seeded_randn(count, seed, start, device=device, backend=self.backend)
            total += float(chunk.double().square().sum())
            start += count
        return math.sqrt(total)

    def _forward(self, inputs: tuple, perturbation: Perturbation, cut: str | None) -> tuple[Dual, torch.Tensor | None]:
        """One interpreter run of the model on the batch: its output (a Dual; pert is None in a
        single-stream pass) and the base stream's output at `cut` (None: not kept)."""
        interpreter = DualStreamInterpreter(self.graph_module, perturbation, cut)
        out = _run_on_batch(interpreter.run, inputs)
        if not isinstance(out, Dual):
            raise TypeError(f"the model's output must be computed from its inputs, got {type(out).__name__}")
        return out, interpreter.smashed

    def _sequential_losses(self, inputs: tuple, targets: Any, step: int, seeds: list[int], norms: list[float]):
        """Perturbed passes first (nothing of them outlives its loss), then the base pass, whose
        smashed output is the one activation the step returns. Returns (base losses (one per
        direction, all the base pass's), perturbed losses, smashed)."""
        dropout_seed = derive_seed(self.seed, DROPOUT_STREAM, step)
        u_seed = self.u_seed(step) if self.rank else 0
        losses_pert = []
        for seed, norm in zip(seeds, norms, strict=True):
            perturbation = Perturbation(self.layout, seed, self.mu / norm, self.rank, u_seed, self.backend,
                                        stream="pert", dropout_seed=dropout_seed)
            out, _ = self._forward(inputs, perturbation, None)  # only the base pass keeps its smashed output
            losses_pert.append(float(_scalar_loss(self.loss_fn(out.base, targets))))
            del out  # the next pass must not overlap this one's output
        base_pass = Perturbation(self.layout, 0, 0.0, backend=self.backend, stream="base", dropout_seed=dropout_seed)
        out, smashed = self._forward(inputs, base_pass, self.cut_node)
        loss_base = float(_scalar_loss(self.loss_fn(out.base, targets)))
        return [loss_base] * len(seeds), losses_pert, smashed

    def _dual_losses(self, inputs: tuple, targets: Any, step: int, seeds: list[int], norms: list[float]):
        """One dual-stream forward per direction; BatchNorm statistics are updated once, by the first
        base stream. Returns (base losses, perturbed losses, smashed), one loss per direction."""
        u_seed = self.u_seed(step) if self.rank else 0
        losses_base, losses_pert, smashed = [], [], None
        for j, (seed, norm) in enumerate(zip(seeds, norms, strict=True)):
            perturbation = Perturbation(self.layout, seed, self.mu / norm, self.rank, u_seed, self.backend)
            out, cut_value = self._forward(inputs, perturbation, self.cut_node)
            losses_base.append(float(_scalar_loss(self.loss_fn(out.base, targets))))
            losses_pert.append(float(_scalar_loss(self.loss_fn(out.pert_or_base, targets))))
            if j == 0:
                smashed = cut_value
                if self.q > 1:  # later directions must not update the statistics again
                    snapshot_after_base = _BufferSnapshot(self.model)
            else:
                snapshot_after_base.restore()  # statistics updated once per step, by the first base stream
        return losses_base, losses_pert, smashed

    @torch.no_grad()
    def step(self, batch: Any) -> StepResult:
        inputs, targets = _split_batch(batch)
        self._update_targets()  # a parameter the update cannot take fails here, before the model is touched
        step = self.steps
        seeds = self.direction_seeds(step)
        device = self.parameters()[0].device
        norms = [self._direction_norm(seed, device) if self.direction == "sphere" else 1.0 for seed in seeds]
        losses = self._sequential_losses if self.schedule == "sequential" else self._dual_losses
        snapshot = _BufferSnapshot(self.model)
        try:
            losses_base, losses_pert, smashed = losses(inputs, targets, step, seeds, norms)
        except Exception:
            snapshot.restore()
            raise
        loss_base = losses_base[0]
        grads = [(pert - base) / self.mu * (self.layout.total / norm if self.direction == "sphere" else 1.0) / self.q
                 for base, pert, norm in zip(losses_base, losses_pert, norms, strict=True)]
        result = StepResult(loss=loss_base, smashed=smashed, step=step, seeds=seeds, projected_grads=grads,
                            losses_perturbed=losses_pert)
        if not all(math.isfinite(v) for v in (loss_base, *losses_pert)):
            snapshot.restore()
            result.skipped, result.reason = True, f"non-finite loss (base {loss_base}, perturbed {losses_pert})"
            return result
        self.apply(step, seeds, grads)
        return result

    def apply(self, step: int, seeds: list[int], grads: list[float]) -> None:
        """Apply step `step`'s update from its seeds and projected-gradient scalars (also the replay entry point)."""
        pairs = list(zip(seeds, grads, strict=True))
        u_seed = self.u_seed(step) if self.rank else None
        for entry, stored, param, rank in self._update_targets():
            lowrank = {"rank": rank, "u_seed": u_seed if rank else None}
            if self.optimizer == "sgd":
                HF.zo_sgd_update_(param, pairs, lr=self.lr, offset=entry.offset, weight_decay=self.weight_decay,
                                  backend=self.backend, **lowrank)
            else:
                exp_avg, exp_avg_sq = (m.view(param.shape) for m in self._moments(entry.name, stored))
                HF.zo_adam_update_(param, exp_avg, exp_avg_sq, pairs, lr=self.lr, step=step + 1,
                                   offset=entry.offset, betas=self.betas, eps=self.eps,
                                   weight_decay=self.weight_decay, decoupled_weight_decay=self.optimizer == "adamw",
                                   backend=self.backend, **lowrank)
        self.steps = step + 1

    def _update_targets(self) -> list[tuple[Any, torch.Tensor, torch.Tensor, int]]:
        """(layout entry, parameter, the tensor its update writes, rank) per trainable parameter:
        a low-rank weight is written through its (out, in*kh*kw) matrix view, with rank at most
        min(out, in*kh*kw). Raises before any parameter is touched."""
        named = dict(self.model.named_parameters())
        targets = []
        for entry in self.layout:
            stored = named[entry.name].data
            if entry.name in self.lowrank_names:
                param = _matrix_view(entry.name, stored)
                targets.append((entry, stored, param, min(self.rank, *param.shape)))
            else:
                targets.append((entry, stored, stored, 0))
        return targets

    def _moments(self, name: str, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.state:
            zeros = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            self.state[name] = (zeros, zeros.clone())
        return self.state[name]

    def state_dict(self) -> dict[str, Any]:
        """Step count and optimizer moments (parameters live in the model's own state_dict)."""
        return {"steps": self.steps, "moments": {n: (m.clone(), v.clone()) for n, (m, v) in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore steps and Adam moments; the moments move to their parameter's device (a state
        saved on one device, e.g. a CPU checkpoint, loads onto a model on another)."""
        named = dict(self.model.named_parameters())
        unknown = sorted(set(state["moments"]) - set(named))
        if unknown:
            raise ValueError(f"updater state has moments for parameters this model does not have: {unknown}")
        self.steps = int(state["steps"])
        self.state = {n: (m.to(named[n].device, copy=True), v.to(named[n].device, copy=True))
                      for n, (m, v) in state["moments"].items()}


class _CutCapture:
    """A forward hook storing a module's output (detached) for StepResult.smashed."""

    def __init__(self, model: nn.Module, cut: str | None):
        self.value = None
        self.handle = None if cut is None else dict(model.named_modules())[cut].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = output.detach() if isinstance(output, torch.Tensor) else output

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _torch_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float, betas, eps):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class FOUpdater(_Updater):
    """First-order baseline with ZOUpdater's interface: backprop + torch.optim (SGD/Adam/AdamW)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, *, optimizer: str = "sgd", lr: float,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 seed: int = 0, params: Iterable | None = None, cut: str | None = None, **unused: Any):
        super().__init__(model, loss_fn, lr=lr, weight_decay=weight_decay, seed=seed, params=params, cut=cut)
        self.optimizer_name = _choice(optimizer, "optimizer", OPTIMIZERS)
        self.optimizer = _torch_optimizer(optimizer, self.parameters(), self.lr, self.weight_decay, betas, eps)

    def step(self, batch: Any) -> StepResult:
        inputs, targets = _split_batch(batch)
        capture = _CutCapture(self.model, self.cut)
        snapshot = _BufferSnapshot(self.model)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = _scalar_loss(self.loss_fn(self._forward(inputs), targets))
                value = float(loss.detach())
                if not math.isfinite(value):
                    snapshot.restore()
                    return StepResult(loss=value, smashed=capture.value, skipped=True, step=self.steps,
                                      reason=f"non-finite loss {value}")
                loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        except Exception:
            snapshot.restore()
            raise
        finally:
            capture.close()
        self.steps += 1
        return StepResult(loss=value, smashed=capture.value, step=self.steps - 1)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.optimizer.load_state_dict(state["optimizer"])


class MeZOUpdater(_Updater):
    """MeZO-style baseline: in-place +mu / -2mu / +mu perturbations with a symmetric difference,
    each direction regenerated parameter by parameter from a torch.Generator.

    The smashed data is the cut output of the theta + mu z forward (MeZO has no unperturbed one).
    optimizer "sgd" updates in place; "adam"/"adamw" materialise each parameter's g * z as .grad
    for torch.optim.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, mu: float = 1e-3, q: int = 1,
                 optimizer: str = "sgd", lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, seed: int = 0,
                 params: Iterable | None = None, cut: str | None = None, **unused: Any):
        super().__init__(model, loss_fn, lr=lr, weight_decay=weight_decay, seed=seed, params=params, cut=cut)
        self.mu = HF.check_scalar(mu, "mu", nonzero=True)
        self.q = q
        self.optimizer_name = _choice(optimizer, "optimizer", OPTIMIZERS)
        self.optimizer = (None if optimizer == "sgd" else
                          _torch_optimizer(optimizer, self.parameters(), self.lr, self.weight_decay, betas, eps))

    def _perturb(self, seed: int, scale: float) -> None:
        generator = torch.Generator(device=self.parameters()[0].device).manual_seed(seed)
        for p in self.parameters():
            z = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, batch: Any) -> StepResult:
        inputs, targets = _split_batch(batch)
        capture = _CutCapture(self.model, self.cut)
        snapshot = _BufferSnapshot(self.model)
        seeds = [derive_seed(self.seed, self.steps, j) for j in range(self.q)]
        grads, losses, smashed = [], [], None
        try:
            for seed in seeds:
                self._perturb(seed, self.mu)
                loss_plus = float(_scalar_loss(self.loss_fn(self._forward(inputs), targets)))
                smashed = smashed if smashed is not None else capture.value
                self._perturb(seed, -2 * self.mu)
                loss_minus = float(_scalar_loss(self.loss_fn(self._forward(inputs), targets)))
                self._perturb(seed, self.mu)
                losses.append((loss_plus, loss_minus))
                grads.append((loss_plus - loss_minus) / (2 * self.mu) / self.q)
        except Exception:
            snapshot.restore()
            raise
        finally:
            capture.close()
        flat = [v for pair in losses for v in pair]
        result = StepResult(loss=sum(flat) / len(flat), smashed=smashed, step=self.steps, seeds=seeds,
                            projected_grads=grads, losses_perturbed=flat)
        if not all(math.isfinite(v) for v in flat):
            snapshot.restore()
            result.skipped, result.reason = True, f"non-finite loss {flat}"
            return result
        self._update(seeds, grads)
        self.steps += 1
        return result

    def _update(self, seeds: list[int], grads: list[float]) -> None:
        params = self.parameters()
        if self.optimizer is None:
            for seed, g in zip(seeds, grads, strict=True):
                generator = torch.Generator(device=params[0].device).manual_seed(seed)
                for p in params:
                    z = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
                    p.data.add_(z, alpha=-self.lr * g)
            if self.weight_decay:
                for p in params:
                    p.data.mul_(1 - self.lr * self.weight_decay)
            return
        for p in params:
            p.grad = torch.zeros_like(p)
        for seed, g in zip(seeds, grads, strict=True):
            generator = torch.Generator(device=params[0].device).manual_seed(seed)
            for p in params:
                p.grad.add_(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype), alpha=g)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])



# The updaters by kind (heron.sfl's methods and the profiling presets name them so).
UPDATERS = {"zo": ZOUpdater, "fo": FOUpdater, "mezo": MeZOUpdater}
