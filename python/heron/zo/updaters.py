"""Drop-in client updaters: one object, one `step(batch)`, zeroth- or first-order.

- ZOUpdater: the fused two-point zeroth-order step (one dual-stream forward per direction, no
  autograd, the seeded update regenerating the direction in place).
- FOUpdater: backprop + torch.optim, the first-order baseline (CSE-FSL's client).
- MeZOUpdater: the MeZO-style baseline: perturb in place (+mu), forward, (-2mu), forward, restore,
  update, the direction regenerated from a torch.Generator each time.

A batch is `(inputs, targets)`; `inputs` is a tensor or a tuple passed to the model positionally,
or a mapping passed as keyword arguments (a tokenizer's output, `{"input_ids": ..., "labels": ...}`).
`loss_fn(outputs, targets)` must return a scalar tensor; outputs may be any structure the model
returns (a tensor, a tuple, a dict, a Hugging Face ModelOutput). A model that computes its own loss
takes e.g. `loss_fn=lambda out, _: out.loss` with targets None.

Replaying a ZO run: direction j of step t has seed `derive_seed(seed, t, j)`; with
perturbation="lowrank" the U factors of step t use `derive_seed(seed, U_STREAM, t // lazy_steps)`.
The estimate of step t is `StepResult.projected_grads` (one scalar per direction), so the updater's
parameters after any number of steps are determined by (initial parameters, seed, the scalars).
Replaying a MeZO-style run: `MeZOUpdater.apply` repeats each step's in-place +mu / -2mu / +mu cycle
(whose float rounding leaves residue in the parameters) and its update, from the same seeds and
scalars, with the same torch.Generator on the same device: the parameters come out bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from heron.kernels import functional as HF
from heron.kernels.stream import ParameterLayout, check_int, derive_seed, seeded_randn
from heron.zo.coverage import Plan, check_coverage, check_dtypes, choose_executor, plan_rows, trainable_ids
from heron.zo.dual import DualStreamInterpreter, as_tensors, cut_node_name, detached, lowrank_eligible, trace
from heron.zo.generic import DualTensor, StreamError, base_of, run_in_stream, run_module
from heron.zo.perturbation import Perturbation, PerturbedInPlace

U_STREAM = 2**62  # index that separates the low-rank U seeds from the per-direction seeds
OPTIMIZERS = ("sgd", "adam", "adamw")
DIRECTIONS = ("gaussian", "sphere")
PERTURBATIONS = ("full", "lowrank")
SCHEDULES = ("dual", "sequential")
_NORM_CHUNK = 1 << 20


@dataclass
class StepResult:
    """What one client step produced.

    loss: L(theta) on the batch (base stream); smashed: the base stream's output at the cut
    module (a tensor or the structure the module returns), detached (None without a cut);
    skipped: True when the step was not applied (reason says why; parameters untouched). ZO only:
    seeds and projected_grads per direction (the scalars the update used) and losses_perturbed.
    """

    loss: float
    smashed: Any = None
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


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _finite_in_float32(values: list[float]) -> bool:
    """Whether every scalar is finite in float32, the precision of the update kernels (NaN fails too)."""
    return all(abs(v) <= HF.FLOAT32_MAX for v in values)


def _split_batch(batch: Any) -> tuple[tuple, dict, Any]:
    """(positional inputs, keyword inputs, targets) of a batch (inputs, targets)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be a pair (inputs, targets), got {type(batch).__name__}")
    inputs, targets = batch
    if isinstance(inputs, Mapping):
        return (), dict(inputs), targets
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}, targets


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

    def __init__(self, buffers: nn.Module | list[torch.Tensor]):
        """buffers: a model (its buffers) or the list of them."""
        buffers = list(buffers.buffers()) if isinstance(buffers, nn.Module) else buffers
        self.pairs = [(b, b.detach().clone()) for b in buffers]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, saved in self.pairs:
                buffer.copy_(saved)


class _Updater:
    """Shared pieces: parameter selection, cut capture, batch checks."""

    def __init__(self, model: nn.Module, loss_fn: Callable, *, lr: float, weight_decay: float, seed: int,
                 params: Iterable | None, cut: str | None, betas: tuple[float, float], eps: float):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model, self.loss_fn = model, loss_fn
        self.lr = HF.check_scalar(lr, "lr")
        self.weight_decay = HF.check_scalar(weight_decay, "weight_decay", non_negative=True)
        self.betas = HF.check_betas(betas)  # checked whatever the optimizer: bad input is refused, not ignored
        self.eps = HF.check_scalar(eps, "eps", non_negative=True)
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

    def _forward(self, args: tuple, kwargs: dict) -> Any:
        return _run_on_batch(self.model, args, kwargs)


def _run_on_batch(forward: Callable, args: tuple, kwargs: dict) -> Any:
    """forward(*args, **kwargs); any failure becomes a ValueError naming the batch's shapes (a
    StreamError, which says what the dual stream cannot run, passes as it is)."""
    try:
        return forward(*args, **kwargs)
    except StreamError:
        raise
    except Exception as error:  # noqa: BLE001 - reported with the batch's shapes
        raise ValueError(f"the model rejected the batch (inputs {_describe_inputs(args, kwargs)}): "
                         f"{type(error).__name__}: {error}") from error


def _describe(x: Any) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    return ", ".join([_describe(x) for x in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()])


def _positional(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """args and kwargs bound to model.forward's parameters, as positional arguments (a traced
    graph's placeholders take its inputs in order)."""
    if not kwargs:
        return args
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as error:
        raise ValueError(f"the model rejected the batch (inputs {_describe_inputs(args, kwargs)}): {error}") from error
    bound.apply_defaults()
    return tuple(bound.arguments.values())


class _RandomState:
    """The random generators' state at the start of a step (the CPU one, and the model's CUDA
    device's): every forward of the step starts from it, so all of them (both streams, every
    direction, both schedules) draw the same dropout masks, the ones a plain forward of the
    model would draw; after the step the generators are where one forward leaves them."""

    def __init__(self, device: torch.device):
        self.generators = [torch.default_generator]
        if device.type == "cuda":
            self.generators.append(torch.cuda.default_generators[device.index or torch.cuda.current_device()])
        self.states = [g.get_state() for g in self.generators]

    def restore(self) -> None:
        for generator, state in zip(self.generators, self.states, strict=True):
            generator.set_state(state)


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
        model: any nn.Module (client part + auxiliary head, a whole model, a Hugging Face or PEFT
            model): every trainable parameter is perturbed where the forward (or the loss) reads it.
        loss_fn: (outputs, targets) -> scalar tensor; it may read trainable parameters too.
        mu: perturbation scale; q: directions per step (their estimates are averaged).
        direction: "gaussian" (u ~ N(0, I); g = dL/mu * u) or "sphere" (u = z/|z|; g = d * dL/mu * u).
        optimizer: "sgd", "adam" or "adamw", fed the estimate through heron's fused seeded updates.
        params: parameters to train (names or Parameters); default all with requires_grad.
        perturbation: "full", or "lowrank": Linear weights, transformers' Conv1D weights (in, out),
            and ungrouped Conv2d weights as (out, in*kh*kw) matrices, get Z = U V.T / sqrt(rank)
            directions, U held for `lazy_steps` steps; other parameters keep full directions.
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
        executor: "auto" (torch.fx's dual-stream executor when the model traces, else the generic
            one), "fx", "generic", or "in_place" (sequential schedule only: each trainable parameter
            written in place for the perturbed pass and restored from a copy, the model's forward run
            as it is: the least work per pass on small activation-bound models, a copy of the
            trainable parameters held during the pass); see heron.zo.coverage and `plan()`.
        conv_chunks: True (default) runs a Conv2d whose input or output exceeds a few MiB in batch
            chunks of 2 MiB (heron.zo.dual), so it holds no whole-batch transient beside its output:
            the memory the dual schedule's 2 activations and the sequential one's 1 need. False runs
            every convolution on the whole batch, one call per stream: a transient of about twice
            its output, but 1 call instead of dozens, which is what is fast under a caching allocator
            (jemalloc, a GPU's) and on a contended CPU, where every parallel call waits for all threads.

    Dropout: every forward of a step starts from the random generators' state at the step's start,
    and both streams of a call draw the same numbers, so module and functional dropout apply the
    masks one plain forward would draw, to both streams and in both schedules. In the dual schedule
    nn.Dropout and F.dropout draw each mask once for both streams (half the random-number work).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, mu: float = 1e-3, q: int = 1,
                 direction: str = "gaussian", optimizer: str = "sgd", lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, seed: int = 0,
                 params: Iterable | None = None, perturbation: str = "full", rank: int | None = None,
                 lazy_steps: int = 1, cut: str | None = None, backend: str | None = None,
                 schedule: str = "dual", executor: str = "auto", conv_chunks: bool = True):
        super().__init__(model, loss_fn, lr=lr, weight_decay=weight_decay, seed=seed, params=params, cut=cut,
                         betas=betas, eps=eps)
        self.schedule = _choice(schedule, "schedule", SCHEDULES)
        if executor == "in_place" and self.schedule != "sequential":
            raise ValueError(f"executor='in_place' runs one stream at a time: pass schedule='sequential' (got "
                             f"schedule={schedule!r})")
        if not isinstance(conv_chunks, bool):
            raise TypeError(f"conv_chunks must be True or False, got {conv_chunks!r}")
        self.conv_chunks = conv_chunks
        self.mu = HF.check_scalar(mu, "mu", nonzero=True)
        self.q = _positive_int(q, "q")
        self.direction = _choice(direction, "direction", DIRECTIONS)
        self.optimizer = _choice(optimizer, "optimizer", OPTIMIZERS)
        self.perturbation = _choice(perturbation, "perturbation", PERTURBATIONS)
        if self.perturbation == "lowrank":
            if rank is None or rank < 1:
                raise ValueError(f"perturbation='lowrank' needs rank >= 1, got rank={rank!r}")
            if self.direction == "sphere":
                raise ValueError("direction='sphere' is defined for full directions; use perturbation='full'")
        self.rank = rank if self.perturbation == "lowrank" else 0
        self.lazy_steps = _positive_int(lazy_steps, "lazy_steps")
        self.backend = backend
        check_coverage(model, self.param_names)
        self.layout = ParameterLayout.from_module(model, names=self.param_names)
        ids = trainable_ids(dict(model.named_parameters()), self.param_names)
        self.lowrank_names = self._lowrank_weight_names(ids) if self.rank else set()
        self.requested_executor = executor
        self.executor, self.graph_module, self.executor_reason = choose_executor(model, executor)
        self._traced_modes = _training_modes(model)
        self.cut_node = None if cut is None or self.graph_module is None else \
            cut_node_name(self.graph_module, model, cut)
        self.state: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_reads: dict[str, set[str]] | None = None  # how the last step read each parameter
        self._reads: dict[str, set[str]] = {}  # how the running step reads each parameter
        self._buffers: list[torch.Tensor] = []  # the model's buffers during a step
        self._warned_unread = False

    def _lowrank_weight_names(self, ids: dict[int, str]) -> set[str]:
        """Layout names of the weights of Linear and ungrouped Conv2d modules (one name per tied weight)."""
        return {ids[id(module.weight)] for module in self.model.modules()
                if lowrank_eligible(module) and id(module.weight) in ids}

    def plan(self) -> Plan:
        """Which executor runs the step and why; per module, how its trainable parameters are
        perturbed (fused, in place, generically) and why; after a step, how each parameter was read."""
        rows = plan_rows(self.model, trainable_ids(dict(self.model.named_parameters()), self.param_names),
                         self.executor, self._graph(),
                         self.schedule)
        perturbation = (f"low-rank (rank {self.rank}) on {len(self.lowrank_names)} Linear/Conv1D/Conv2d weights, full "
                        f"elsewhere" if self.rank else "full")
        reads = {} if self.last_reads is None else {n: sorted(r) for n, r in self.last_reads.items()}
        unread = [] if self.last_reads is None else [n for n in self.param_names if n not in self.last_reads]
        return Plan(self.executor, self.executor_reason, self.schedule, perturbation, rows, reads, unread)

    def _graph(self):
        """The traced graph (None for the generic executor), traced again if a module's training
        flag changed since (tracing fixes what `self.training` selects in traced code)."""
        if self.graph_module is not None and _training_modes(self.model) != self._traced_modes:
            self.graph_module = trace(self.model)
            self._traced_modes = _training_modes(self.model)
            if self.cut is not None:
                self.cut_node = cut_node_name(self.graph_module, self.model, self.cut)
        return self.graph_module

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

    def _perturbation(self, ids: dict[int, str], seed: int, scale: float, u_seed: int, stream: str) -> Perturbation:
        return Perturbation(self.layout, seed, scale, self.rank, u_seed, self.backend, stream=stream, names=ids,
                            lowrank_names=frozenset(self.lowrank_names), conv_chunks=self.conv_chunks)

    def _run(self, args: tuple, kwargs: dict, targets: Any, pert: Perturbation, keep_cut: bool):
        """One forward of the model on the batch in pert's stream, and its loss in the same stream:
        (base loss, perturbed loss (the base one in a single-stream pass), the base stream's
        output at the cut module or None)."""
        if self.executor == "in_place":
            return self._run_in_place(args, kwargs, targets, pert, keep_cut)
        if self.executor == "fx":
            interpreter = DualStreamInterpreter(self._graph(), pert, self.cut_node if keep_cut else None)
            out = as_tensors(_run_on_batch(interpreter.run, _positional(self.model, args, kwargs), {}))
            smashed = interpreter.smashed
        else:
            capture = _CutCapture(self.model, self.cut if keep_cut else None)
            try:
                out = _run_on_batch(lambda *a, **k: run_module(self.model, a, k, pert, self._buffers), args, kwargs)
            finally:
                capture.close()
            smashed = capture.value
        loss = run_in_stream(functools.partial(self.loss_fn, out, targets), pert)
        del out  # the next pass must not overlap this one's activations
        for name, routes in pert.reads.items():
            self._reads.setdefault(name, set()).update(routes)
        base, perturbed = (loss.base, loss.pert) if type(loss) is DualTensor else (loss, loss)
        return float(_scalar_loss(base)), float(_scalar_loss(perturbed)), smashed

    def _run_in_place(self, args: tuple, kwargs: dict, targets: Any, pert: Perturbation, keep_cut: bool):
        """_run for executor="in_place": the model's own forward and the loss, with every trainable
        parameter holding theta + scale * z in the perturbed pass (restored bit for bit from a copy
        after it, and the buffers it updated restored too: statistics follow the base pass)."""
        capture = _CutCapture(self.model, self.cut if keep_cut else None)
        snapshot = _BufferSnapshot(self._buffers) if pert.stream == "pert" else None
        named = dict(self.model.named_parameters())
        perturbed = (PerturbedInPlace([(entry.name, named[entry.name]) for entry in self.layout], pert)
                     if pert.stream == "pert" else contextlib.nullcontext())
        try:
            with perturbed:
                out = _run_on_batch(self.model, args, kwargs)
                loss = float(_scalar_loss(self.loss_fn(out, targets)))
                del out
        finally:
            capture.close()
            if snapshot is not None:
                snapshot.restore()
        for name, routes in pert.reads.items():
            self._reads.setdefault(name, set()).update(routes)
        return loss, loss, capture.value

    def _sequential_losses(self, args: tuple, kwargs: dict, targets: Any, step: int, seeds: list[int],
                           norms: list[float], ids: dict[int, str], rng: _RandomState):
        """Perturbed passes first (nothing of them outlives its loss), then the base pass, whose
        smashed output is the one activation the step returns. Returns (base losses (one per
        direction, all the base pass's), perturbed losses, smashed)."""
        u_seed = self.u_seed(step) if self.rank else 0
        losses_pert = []
        for seed, norm in zip(seeds, norms, strict=True):
            rng.restore()
            pert = self._perturbation(ids, seed, self.mu / norm, u_seed, "pert")
            losses_pert.append(self._run(args, kwargs, targets, pert, keep_cut=False)[1])
        rng.restore()
        loss_base, _, smashed = self._run(args, kwargs, targets, self._perturbation(ids, 0, 0.0, 0, "base"),
                                          keep_cut=True)
        return [loss_base] * len(seeds), losses_pert, smashed

    def _dual_losses(self, args: tuple, kwargs: dict, targets: Any, step: int, seeds: list[int],
                     norms: list[float], ids: dict[int, str], rng: _RandomState):
        """One dual-stream forward per direction; BatchNorm statistics are updated once, by the first
        base stream. Returns (base losses, perturbed losses, smashed), one loss per direction."""
        u_seed = self.u_seed(step) if self.rank else 0
        losses_base, losses_pert, smashed = [], [], None
        for j, (seed, norm) in enumerate(zip(seeds, norms, strict=True)):
            rng.restore()
            loss_base, loss_pert, cut_value = self._run(
                args, kwargs, targets, self._perturbation(ids, seed, self.mu / norm, u_seed, "dual"), keep_cut=True)
            losses_base.append(loss_base)
            losses_pert.append(loss_pert)
            if j == 0:
                smashed = cut_value
                if self.q > 1:  # later directions must not update the statistics again
                    snapshot_after_base = _BufferSnapshot(self._buffers)
            else:
                snapshot_after_base.restore()  # statistics updated once per step, by the first base stream
        return losses_base, losses_pert, smashed

    @torch.no_grad()
    def step(self, batch: Any) -> StepResult:
        args, kwargs, targets = _split_batch(batch)
        named = dict(self.model.named_parameters())
        ids = trainable_ids(named, self.param_names)
        updates = self._update_targets(named)  # a parameter the update cannot take fails here, before any change
        step = self.steps
        seeds = self.direction_seeds(step)
        device = named[self.param_names[0]].device
        norms = [self._direction_norm(seed, device) if self.direction == "sphere" else 1.0 for seed in seeds]
        losses = self._sequential_losses if self.schedule == "sequential" else self._dual_losses
        self._buffers = list(self.model.buffers())
        snapshot = _BufferSnapshot(self._buffers)
        rng = _RandomState(device)
        self._reads = {}
        try:
            losses_base, losses_pert, smashed = losses(args, kwargs, targets, step, seeds, norms, ids, rng)
        except Exception:
            snapshot.restore()
            rng.restore()
            raise
        self._note_reads()
        loss_base = losses_base[0]
        grads = [(pert - base) / self.mu * (self.layout.total / norm if self.direction == "sphere" else 1.0) / self.q
                 for base, pert, norm in zip(losses_base, losses_pert, norms, strict=True)]
        result = StepResult(loss=loss_base, smashed=smashed, step=step, seeds=seeds, projected_grads=grads,
                            losses_perturbed=losses_pert)
        if not all(math.isfinite(v) for v in (loss_base, *losses_pert)):
            snapshot.restore()
            result.skipped, result.reason = True, f"non-finite loss (base {loss_base}, perturbed {losses_pert})"
            return result
        if not _finite_in_float32(grads):
            snapshot.restore()
            result.skipped, result.reason = True, f"non-finite projected gradients in float32 {grads}"
            return result
        try:
            self._apply(step, seeds, grads, updates)
        except Exception:
            snapshot.restore()
            raise
        return result

    def _note_reads(self) -> None:
        """Keep how this step read each parameter (plan()); warn once about trainable parameters it never read."""
        self.last_reads = self._reads
        unread = [n for n in self.param_names if n not in self._reads]
        if unread and not self._warned_unread:
            self._warned_unread = True
            warnings.warn(f"ZOUpdater: the forward and the loss did not read trainable parameter(s) "
                          f"{unread[:8]}{' ...' if len(unread) > 8 else ''}: their projected gradient is 0 and the "
                          f"update moves them by noise only; leave them out with params=", stacklevel=3)

    def apply(self, step: int, seeds: list[int], grads: list[float]) -> None:
        """Apply step `step`'s update from its seeds and projected-gradient scalars (also the replay entry point)."""
        self._apply(step, seeds, grads, self._update_targets(dict(self.model.named_parameters())))

    def _apply(self, step: int, seeds: list[int], grads: list[float], targets: list) -> None:
        pairs = list(zip(seeds, grads, strict=True))
        u_seed = self.u_seed(step) if self.rank else None
        full = [(entry, stored, param) for entry, stored, param, rank in targets if not rank]
        if full:  # one call for every full-direction parameter: the checks and dispatch paid once
            params, offsets = [param for _, _, param in full], [entry.offset for entry, _, _ in full]
            if self.optimizer == "sgd":
                HF.zo_sgd_update_many_(params, pairs, lr=self.lr, offsets=offsets, weight_decay=self.weight_decay,
                                       backend=self.backend)
            else:
                moments = [self._moment_views(entry.name, stored, param) for entry, stored, param in full]
                HF.zo_adam_update_many_(params, [m for m, _ in moments], [v for _, v in moments], pairs,
                                        lr=self.lr, step=step + 1, offsets=offsets, betas=self.betas, eps=self.eps,
                                        weight_decay=self.weight_decay,
                                        decoupled_weight_decay=self.optimizer == "adamw", backend=self.backend)
        for entry, stored, param, rank in targets:
            if not rank:
                continue
            lowrank = {"rank": rank, "u_seed": u_seed}
            if self.optimizer == "sgd":
                HF.zo_sgd_update_(param, pairs, lr=self.lr, offset=entry.offset, weight_decay=self.weight_decay,
                                  backend=self.backend, **lowrank)
            else:
                exp_avg, exp_avg_sq = self._moment_views(entry.name, stored, param)
                HF.zo_adam_update_(param, exp_avg, exp_avg_sq, pairs, lr=self.lr, step=step + 1,
                                   offset=entry.offset, betas=self.betas, eps=self.eps,
                                   weight_decay=self.weight_decay, decoupled_weight_decay=self.optimizer == "adamw",
                                   backend=self.backend, **lowrank)
        self.steps = step + 1

    def _update_targets(self, named: dict[str, nn.Parameter]) -> list[tuple[Any, torch.Tensor, torch.Tensor, int]]:
        """(layout entry, parameter, the tensor its update writes, rank) per trainable parameter
        (named: the model's named_parameters()): a low-rank weight is written through its
        (out, in*kh*kw) matrix view, with rank at most min(out, in*kh*kw). Raises before any
        parameter is touched."""
        check_dtypes(named, self.param_names)
        targets = []
        for entry in self.layout:
            stored = named[entry.name].data
            if entry.name in self.lowrank_names:
                param = _matrix_view(entry.name, stored)
                targets.append((entry, stored, param, min(self.rank, *param.shape)))
            else:
                targets.append((entry, stored, stored, 0))
        return targets

    def _moment_views(self, name: str, stored: torch.Tensor, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameter `name`'s Adam moments (kept in the stored parameter's shape) viewed as the
        tensor its update writes (`param`: the parameter, or a low-rank weight's matrix view)."""
        exp_avg, exp_avg_sq = self._moments(name, stored)
        return exp_avg.view(param.shape), exp_avg_sq.view(param.shape)

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
        steps = _checked_steps(state["steps"])
        moments = {}
        for name, pair in state["moments"].items():
            param = named[name]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"updater state: moments of {name!r} must be a pair (exp_avg, exp_avg_sq), got "
                                 f"{type(pair).__name__}")
            moments[name] = tuple(_checked_moment(t, f"moments of {name!r}: {which}", param, torch.float32,
                                                  non_negative=which == "exp_avg_sq")
                                  for t, which in zip(pair, ("exp_avg", "exp_avg_sq"), strict=True))
        self.steps, self.state = steps, moments


class _CutCapture:
    """A forward hook storing a module's output (detached) for StepResult.smashed."""

    def __init__(self, model: nn.Module, cut: str | None):
        self.value = None
        self.handle = None if cut is None else dict(model.named_modules())[cut].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = detached(base_of(output))

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _training_modes(model: nn.Module) -> tuple[bool, ...]:
    return tuple(m.training for m in model.modules())


def _torch_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float, betas, eps):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class FOUpdater(_Updater):
    """First-order baseline with ZOUpdater's interface: backprop + torch.optim (SGD/Adam/AdamW)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, *, optimizer: str = "sgd", lr: float,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 seed: int = 0, params: Iterable | None = None, cut: str | None = None):
        super().__init__(model, loss_fn, lr=lr, weight_decay=weight_decay, seed=seed, params=params, cut=cut,
                         betas=betas, eps=eps)
        self.optimizer_name = _choice(optimizer, "optimizer", OPTIMIZERS)
        self.optimizer = _torch_optimizer(optimizer, self.parameters(), self.lr, self.weight_decay, self.betas,
                                          self.eps)

    def step(self, batch: Any) -> StepResult:
        args, kwargs, targets = _split_batch(batch)
        capture = _CutCapture(self.model, self.cut)
        snapshot = _BufferSnapshot(self.model)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = _scalar_loss(self.loss_fn(self._forward(args, kwargs), targets))
                value = float(loss.detach())
                if not math.isfinite(value):
                    snapshot.restore()
                    return StepResult(loss=value, smashed=capture.value, skipped=True, step=self.steps,
                                      reason=f"non-finite loss {value}")
                loss.backward()
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                snapshot.restore()
                self.optimizer.zero_grad(set_to_none=True)
                return StepResult(loss=value, smashed=capture.value, skipped=True, step=self.steps,
                                  reason="non-finite gradient (the loss is finite)")
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
        steps = _checked_steps(state["steps"])
        _check_optimizer_state(self.optimizer, state["optimizer"], self.param_names)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = steps


def _checked_steps(steps: object) -> int:
    return check_int(steps, "updater state: steps", limit=2**62)


def _checked_moment(t: object, name: str, param: torch.Tensor, dtype: torch.dtype, *,
                    non_negative: bool) -> torch.Tensor:
    """An optimizer moment of `param` from a saved state, checked (a tensor of param's shape, `dtype`, finite,
    and >= 0 for a second moment) and copied contiguously to param's device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(param.shape) or t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} of shape {tuple(param.shape)} (its parameter's), got {t.dtype} "
                         f"of shape {tuple(t.shape)}")
    HF.check_finite_float32(t, name)
    if non_negative and bool((t < 0).any()):
        raise ValueError(f"{name} must be non-negative (a second moment), got minimum {t.min().item()}")
    return t.to(param.device, memory_format=torch.contiguous_format, copy=True)


_TORCH_MOMENTS = {"exp_avg": False, "exp_avg_sq": True, "max_exp_avg_sq": True, "momentum_buffer": False}


def _check_optimizer_state(optimizer: torch.optim.Optimizer, state: object, names: list[str]) -> None:
    """Check a torch.optim state_dict before the optimizer loads it (torch casts and loads what it gets):
    each moment must have its parameter's shape and dtype and be finite. names: the parameters' names."""
    if not isinstance(state, Mapping) or not isinstance(state.get("state"), Mapping):
        raise ValueError(f"updater state: optimizer must be a torch.optim state_dict, got {type(state).__name__}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, slot in state["state"].items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params):
            raise ValueError(f"updater state: optimizer state for parameter index {index!r}, which is not in "
                             f"[0, {len(params)})")
        for key, value in slot.items():
            if key in _TORCH_MOMENTS:
                _checked_moment(value, f"optimizer state of {names[index]!r}: {key}", params[index],
                                params[index].dtype, non_negative=_TORCH_MOMENTS[key])


class MeZOUpdater(_Updater):
    """MeZO-style baseline: in-place +mu / -2mu / +mu perturbations with a symmetric difference,
    each direction regenerated parameter by parameter from a torch.Generator.

    The smashed data is the cut output of the theta + mu z forward (MeZO has no unperturbed one).
    optimizer "sgd" updates in place; "adam"/"adamw" materialise each parameter's g * z as .grad
    for torch.optim. A step keeps a copy of the trained parameters while it runs, so a step that
    raises or is skipped leaves them bit-identical (the in-place round trip restores them only up to
    rounding).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, *, mu: float = 1e-3, q: int = 1,
                 optimizer: str = "sgd", lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, seed: int = 0,
                 params: Iterable | None = None, cut: str | None = None):
        super().__init__(model, loss_fn, lr=lr, weight_decay=weight_decay, seed=seed, params=params, cut=cut,
                         betas=betas, eps=eps)
        self.mu = HF.check_scalar(mu, "mu", nonzero=True)
        self.q = _positive_int(q, "q")
        self.optimizer_name = _choice(optimizer, "optimizer", OPTIMIZERS)
        self.optimizer = (None if optimizer == "sgd" else
                          _torch_optimizer(optimizer, self.parameters(), self.lr, self.weight_decay, self.betas,
                                           self.eps))

    def _perturb(self, seed: int, scale: float) -> None:
        generator = torch.Generator(device=self.parameters()[0].device).manual_seed(seed)
        for p in self.parameters():
            z = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, batch: Any) -> StepResult:
        args, kwargs, targets = _split_batch(batch)
        capture = _CutCapture(self.model, self.cut)
        snapshot = _BufferSnapshot([*self.model.buffers(), *self.parameters()])
        seeds = self.direction_seeds(self.steps)
        grads, losses, smashed = [], [], None
        try:
            for seed in seeds:
                self._perturb(seed, self.mu)
                loss_plus = float(_scalar_loss(self.loss_fn(self._forward(args, kwargs), targets)))
                smashed = smashed if smashed is not None else capture.value
                self._perturb(seed, -2 * self.mu)
                loss_minus = float(_scalar_loss(self.loss_fn(self._forward(args, kwargs), targets)))
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
        if not all(math.isfinite(v) for v in flat) or not _finite_in_float32(grads):
            snapshot.restore()
            result.skipped, result.reason = True, f"non-finite loss {flat} or projected gradients {grads}"
            return result
        self._update(seeds, grads)
        self.steps += 1
        return result

    def direction_seeds(self, step: int) -> list[int]:
        """The torch.Generator seeds of step `step`'s q directions."""
        return [derive_seed(self.seed, step, j) for j in range(self.q)]

    @torch.no_grad()
    def apply(self, step: int, seeds: list[int], grads: list[float]) -> None:
        """Replay applied step `step` from its seeds and projected-gradient scalars (StepResult.seeds,
        .projected_grads): each direction's +mu / -2mu / +mu cycle, as `step` ran it between its
        forwards, then the update. A skipped step changed nothing and has nothing to replay."""
        for seed in seeds:
            self._perturb(seed, self.mu)
            self._perturb(seed, -2 * self.mu)
            self._perturb(seed, self.mu)
        self._update(seeds, grads)
        self.steps = step + 1

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
        steps = _checked_steps(state["steps"])
        if self.optimizer is not None:
            _check_optimizer_state(self.optimizer, state["optimizer"], self.param_names)
            self.optimizer.load_state_dict(state["optimizer"])
        self.steps = steps



# The updaters by kind (heron.sfl's methods and the profiling presets name them so).
UPDATERS = {"zo": ZOUpdater, "fo": FOUpdater, "mezo": MeZOUpdater}
