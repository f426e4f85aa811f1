"""Seed-and-scalar uploads: a ZO client sends how it moved, not where it ended up.

A ZO client's local update is determined by its steps' (step index, seeds, projected-gradient
scalars) plus the optimizer's rule and state (heron.zo.updaters module docstring). So instead of its
parameters a client can upload those records and the state entries ZO does not train (BatchNorm
running statistics, num_batches_tracked); the server's ClientReplica, a mirror of the client's
updater, replays them from the broadcast state with the updater's own `apply`.

- ZOUpdater (method "heron"): `apply` is the function the client's own step calls. The rebuilt
  parameters equal the client's bit for bit on the same backend and device, and agree within float
  tolerance across backends (the perturbation stream is the same everywhere).
- MeZOUpdater (method "mezo"): `apply` repeats the step's in-place +mu / -2mu / +mu cycle (its
  float rounding residue included) and its update: bit for bit on the same device type, since the
  directions are torch.Generator normals (which differ between CPU and CUDA). A skipped step
  changed nothing (the step restores its copy of the parameters) and is not uploaded.

Scalars travel as float64, the exact Python floats the client passed to `apply` (the kernels round
them to float32 themselves), so replay is exact without depending on that rounding. An upload
carries the client's perturbation stream version (heron.kernels.stream.STREAM_VERSION): seeds only mean
something under the stream that regenerates them, so an upload of another version is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from heron.kernels import functional as HF
from heron.kernels.stream import STREAM_VERSION, check_stream_version
from heron.sfl.roles import Client, ClientRoundResult, tensor_bytes
from heron.zo.updaters import MeZOUpdater, ZOUpdater

CLIENT_UPLOADS = ("parameters", "seeds")
SEED_UPLOAD_METHODS = ("heron", "mezo")  # methods whose client updater replays (a ZOUpdater, a MeZOUpdater)
REPLAYABLE = (ZOUpdater, MeZOUpdater)
BUFFER_PREFIX = "buffer/"

ZOStep = tuple[int, list[int], list[float]]


def check_client_upload(method: str, client_upload: str) -> str:
    """Validate TrainConfig.client_upload for `method`; returns it."""
    if client_upload not in CLIENT_UPLOADS:
        raise ValueError(f"client_upload must be one of {', '.join(CLIENT_UPLOADS)}, got {client_upload!r}")
    if client_upload == "seeds" and method not in SEED_UPLOAD_METHODS:
        raise ValueError(f"client_upload='seeds' needs a zeroth-order client that replays exactly; method {method!r} "
                         f"cannot use it. Valid choices for {method!r}: 'parameters'; methods that accept 'seeds': "
                         f"{', '.join(SEED_UPLOAD_METHODS)}")
    return client_upload


# -- which state entries travel ---------------------------------------------------------------

@dataclass(frozen=True)
class StateKeys:
    """A client model's state_dict keys by how the server gets them in seeds mode.

    trained: the updater's parameters (every state key that aliases one): rebuilt by replay.
    frozen: the other parameters: a ZO step never writes them, so they are the broadcast's.
    buffers: everything else in the state_dict (BatchNorm running statistics, num_batches_tracked,
        any other persistent buffer): uploaded as they are.
    """

    trained: tuple[str, ...]
    frozen: tuple[str, ...]
    buffers: tuple[str, ...]


def state_keys(model: nn.Module, param_names: list[str]) -> StateKeys:
    """Split model.state_dict()'s keys given the names of the parameters an updater trains."""
    named = dict(model.named_parameters(remove_duplicate=False))
    trained_ids = {id(named[name]) for name in param_names}
    trained, frozen, buffers = [], [], []
    for key in model.state_dict():
        if key not in named:
            buffers.append(key)
        elif id(named[key]) in trained_ids:
            trained.append(key)
        else:
            frozen.append(key)
    return StateKeys(tuple(trained), tuple(frozen), tuple(buffers))


# -- the upload ------------------------------------------------------------------------------

def _fail(key: str, expected: str, tensor: torch.Tensor) -> ValueError:
    return ValueError(f"seed-and-scalar upload: {key!r} must be {expected}, got shape {tuple(tensor.shape)} "
                      f"dtype {tensor.dtype}")


@dataclass
class SeedScalarUpload:
    """What a ZO client uploads instead of its state in seeds mode.

    client_id: the sender. zo_steps: per applied step (step index, q seeds, q projected-gradient
    scalars), in order; skipped steps are absent. buffers: the state entries not trained by the
    updater that can change during a round (StateKeys.buffers), by state_dict key.

    As tensors (`to_tensors`): "client_id" int64 (), "stream_version" int64 () (STREAM_VERSION),
    "step" int64 (n,), "seeds" int64 (n, q), "projected_grads" float64 (n, q), and
    "buffer/<state key>" for each buffer.
    """

    client_id: int
    zo_steps: list[ZOStep] = field(default_factory=list)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def q(self) -> int:
        """Directions per step (0 when no step was applied)."""
        return len(self.zo_steps[0][1]) if self.zo_steps else 0

    @property
    def nbytes(self) -> int:
        """Bytes that travel: every tensor of `to_tensors()`."""
        return tensor_bytes(self.to_tensors().values())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The flat tensor dict carried over the wire (no pickle); see the class docstring."""
        n, q = len(self.zo_steps), self.q
        for index, (step, seeds, grads) in enumerate(self.zo_steps):
            if len(seeds) != q or len(grads) != q:
                raise ValueError(f"zo_steps[{index}] (step {step}) has {len(seeds)} seeds and {len(grads)} scalars; "
                                 f"zo_steps[0] has {q} of each")
        tensors = {
            "client_id": torch.tensor(self.client_id, dtype=torch.int64),
            "stream_version": torch.tensor(STREAM_VERSION, dtype=torch.int64),
            "step": torch.tensor([s for s, _, _ in self.zo_steps], dtype=torch.int64).reshape(n),
            "seeds": torch.tensor([list(s) for _, s, _ in self.zo_steps], dtype=torch.int64).reshape(n, q),
            "projected_grads": torch.tensor([list(g) for _, _, g in self.zo_steps],
                                            dtype=torch.float64).reshape(n, q),
        }
        for key, value in self.buffers.items():
            tensors[BUFFER_PREFIX + key] = value.detach()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], *,
                     expected_buffers: Mapping[str, torch.Tensor] | None = None) -> SeedScalarUpload:
        """Inverse of to_tensors, validating every key, dtype and shape (ValueError naming the key).

        expected_buffers: {state key: tensor of the expected shape and dtype} (e.g.
        ClientReplica.expected_buffers); when given, the buffers must be exactly these.
        """
        if not isinstance(tensors, Mapping):
            raise TypeError(f"seed-and-scalar upload must be a dict of tensors, got {type(tensors).__name__}")
        required = ("client_id", "step", "seeds", "projected_grads")
        for key, value in tensors.items():
            if not isinstance(key, str):
                raise ValueError(f"seed-and-scalar upload: keys must be str, got {type(key).__name__} {key!r}")
            if key not in required and key != "stream_version" and not key.startswith(BUFFER_PREFIX):
                raise ValueError(f"seed-and-scalar upload: unexpected key {key!r}; keys are {', '.join(required)} "
                                 f"and {BUFFER_PREFIX}<state key>")
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"seed-and-scalar upload: {key!r} must be a torch.Tensor, got {type(value).__name__}")
        _check_upload_version(tensors.get("stream_version"))
        missing = [key for key in required if key not in tensors]
        if missing:
            raise ValueError(f"seed-and-scalar upload: missing key {missing[0]!r} (required: {', '.join(required)})")
        client_id, step, seeds, grads = (tensors[key] for key in required)
        if client_id.dtype != torch.int64 or client_id.dim() != 0:
            raise _fail("client_id", "an int64 scalar (shape ())", client_id)
        if int(client_id) < 0:
            raise ValueError(f"seed-and-scalar upload: 'client_id' must be non-negative, got {int(client_id)}")
        if step.dtype != torch.int64 or step.dim() != 1:
            raise _fail("step", "int64 of shape (steps,)", step)
        n = step.shape[0]
        if seeds.dtype != torch.int64 or seeds.dim() != 2 or seeds.shape[0] != n:
            raise _fail("seeds", f"int64 of shape ({n}, q), one row per entry of 'step'", seeds)
        if grads.dtype != torch.float64 or grads.shape != seeds.shape:
            raise _fail("projected_grads", f"float64 of the shape of 'seeds' {tuple(seeds.shape)}", grads)
        if n and seeds.shape[1] == 0:
            raise _fail("seeds", f"int64 of shape ({n}, q) with q >= 1", seeds)
        if bool((step < 0).any()) or bool((seeds < 0).any()):
            raise ValueError("seed-and-scalar upload: 'step' and 'seeds' must be non-negative")
        if not bool(torch.isfinite(grads).all()):
            raise ValueError("seed-and-scalar upload: 'projected_grads' holds non-finite values")
        try:  # the update kernels compute in float32: 1e300 would become inf there
            HF.check_finite_float32(grads, "'projected_grads'")
        except ValueError as error:
            raise ValueError(f"seed-and-scalar upload: {error}") from None
        buffers = {key[len(BUFFER_PREFIX):]: value for key, value in tensors.items() if key.startswith(BUFFER_PREFIX)}
        if expected_buffers is not None:
            _check_buffers(buffers, expected_buffers)
        steps = step.tolist()
        records = [(int(s), [int(v) for v in row_s], [float(v) for v in row_g])
                   for s, row_s, row_g in zip(steps, seeds.tolist(), grads.tolist(), strict=True)]
        return cls(int(client_id), records, buffers)


def _check_upload_version(version: torch.Tensor | None) -> None:
    """An upload's "stream_version" (None: absent) must be this heron's STREAM_VERSION."""
    if version is not None and (version.dtype != torch.int64 or version.dim() != 0):
        raise _fail("stream_version", "an int64 scalar (shape ())", version)
    check_stream_version(None if version is None else int(version), "seed-and-scalar upload")


def _check_buffers(buffers: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    missing = [key for key in expected if key not in buffers]
    if missing:
        raise ValueError(f"seed-and-scalar upload: missing key {BUFFER_PREFIX + missing[0]!r} "
                         f"(buffers expected: {', '.join(expected)})")
    extra = [key for key in buffers if key not in expected]
    if extra:
        raise ValueError(f"seed-and-scalar upload: unexpected key {BUFFER_PREFIX + extra[0]!r} "
                         f"(buffers expected: {', '.join(expected) or 'none'})")
    for key, template in expected.items():
        value = buffers[key]
        if value.dtype != template.dtype or value.shape != template.shape:
            raise _fail(BUFFER_PREFIX + key, f"{template.dtype} of shape {tuple(template.shape)}", value)


# -- client side -------------------------------------------------------------------------------

def seed_scalar_upload(client: Client, result: ClientRoundResult) -> SeedScalarUpload:
    """The seed-and-scalar upload of `client`'s round `result` (from Client.run_round)."""
    if not isinstance(client.updater, REPLAYABLE):
        raise TypeError(f"client {client.client_id} trains with {type(client.updater).__name__}; seed-and-scalar "
                        f"uploads need a ZOUpdater or a MeZOUpdater")
    keys = state_keys(client.model, client.updater.param_names)
    buffers = {key: result.state[key] for key in keys.buffers}
    zo_steps = [(int(step), list(seeds), list(grads)) for step, seeds, grads in result.zo_steps]
    return SeedScalarUpload(result.client_id, zo_steps, buffers)


# -- server side -------------------------------------------------------------------------------

def replica_arguments(updater: ZOUpdater | MeZOUpdater) -> dict[str, Any]:
    """The updater's constructor arguments that determine `apply` (all but model, loss_fn and cut)."""
    if isinstance(updater, MeZOUpdater):
        return {"mu": updater.mu, "q": updater.q, "optimizer": updater.optimizer_name, "lr": updater.lr,
                "weight_decay": updater.weight_decay, "betas": updater.betas, "eps": updater.eps,
                "seed": updater.seed, "params": list(updater.param_names)}
    return {"mu": updater.mu, "q": updater.q, "direction": updater.direction, "optimizer": updater.optimizer,
            "lr": updater.lr, "weight_decay": updater.weight_decay, "betas": updater.betas, "eps": updater.eps,
            "seed": updater.seed, "params": list(updater.param_names), "perturbation": updater.perturbation,
            "rank": updater.rank or None, "lazy_steps": updater.lazy_steps, "backend": updater.backend,
            "schedule": updater.schedule, "executor": updater.requested_executor, "conv_chunks": updater.conv_chunks}


def _no_loss(*args: Any) -> torch.Tensor:
    raise RuntimeError("a ClientReplica only replays updates; it never evaluates a loss")


class ClientReplica:
    """The server's mirror of one ZO client's updater, on its own copy of the model.

    Build it with the client's updater class (updater_class: ZOUpdater or MeZOUpdater) and arguments
    (same seed, optimizer, lr, q, backend, ...);
    `rebuild` replays each round's upload, so its optimizer state (Adam moments, step count)
    evolves exactly like the client's and stays in sync across rounds. Save it with state_dict().
    """

    def __init__(self, model: nn.Module, loss_fn: Callable | None = None, *, client_id: int | None = None,
                 device: torch.device | str | None = None, updater_class: type = ZOUpdater, **updater_kwargs: Any):
        if updater_class not in REPLAYABLE:
            raise TypeError(f"updater_class must be one of {[c.__name__ for c in REPLAYABLE]}, got {updater_class!r}")
        self.client_id = client_id
        self.model = copy.deepcopy(model)
        if device is not None:
            self.model.to(device)
        self.updater = updater_class(self.model, loss_fn or _no_loss, **updater_kwargs)
        self.keys = state_keys(self.model, self.updater.param_names)

    @classmethod
    def from_updater(cls, updater: ZOUpdater | MeZOUpdater, *, client_id: int | None = None,
                     device: torch.device | str | None = None, **overrides: Any) -> ClientReplica:
        """A replica of `updater` as it is now: its constructor arguments (`overrides` replace some, e.g.
        backend for a replica on another device) and its optimizer state."""
        if not isinstance(updater, REPLAYABLE):
            raise TypeError(f"a ClientReplica mirrors a ZOUpdater or a MeZOUpdater, got {type(updater).__name__}")
        replica = cls(updater.model, client_id=client_id, device=device, updater_class=type(updater),
                      **{**replica_arguments(updater), **overrides})
        replica.load_state_dict(updater.state_dict())
        return replica

    @property
    def expected_buffers(self) -> dict[str, torch.Tensor]:
        """{state key: the model's tensor} for each buffer an upload must carry (shape and dtype matter)."""
        state = self.model.state_dict()
        return {key: state[key] for key in self.keys.buffers}

    def rebuild(self, broadcast_state: Mapping[str, torch.Tensor], upload: SeedScalarUpload) -> dict[str, torch.Tensor]:
        """The client's state after the round: broadcast_state (the round's start), the upload's steps
        replayed with the client's kernels, then its buffers. Returns clones on the replica's device."""
        self._check(upload)
        model_before, updater_before = self.model.state_dict(keep_vars=False), self.updater.state_dict()
        model_before = {key: value.clone() for key, value in model_before.items()}
        self.model.load_state_dict(broadcast_state)
        for step, seeds, grads in upload.zo_steps:
            self.updater.apply(step, seeds, grads)
            bad = next((name for name in self.updater.param_names
                        if not bool(torch.isfinite(self.model.get_parameter(name)).all())), None)
            if bad is not None:  # finite scalars can still overflow an update: refuse the upload, undo the replay
                self.model.load_state_dict(model_before)
                self.updater.load_state_dict(updater_before)
                raise ValueError(f"replaying step {step} of client {upload.client_id} makes parameter {bad!r} "
                                 f"non-finite: its projected gradients {list(grads)} are too large")
        with torch.no_grad():
            state = self.model.state_dict()
            for key, value in upload.buffers.items():
                state[key].copy_(value)
        return {key: value.detach().clone() for key, value in self.model.state_dict().items()}

    def _check(self, upload: SeedScalarUpload) -> None:
        """Everything that can be wrong with an upload, before the model is touched."""
        if self.client_id is not None and upload.client_id != self.client_id:
            raise ValueError(f"upload from client {upload.client_id} sent to client {self.client_id}'s replica")
        _check_buffers(upload.buffers, self.expected_buffers)
        expected_step = self.updater.steps
        for step, seeds, grads in upload.zo_steps:
            if step != expected_step:
                raise ValueError(f"client {upload.client_id}'s replica expected step {expected_step}, got step {step}: "
                                 f"the replica is out of sync with the client's updater")
            if list(seeds) != self.updater.direction_seeds(step):
                raise ValueError(f"step {step} of client {upload.client_id} has seeds {list(seeds)}, the replica "
                                 f"derives {self.updater.direction_seeds(step)}: different updater seed or q")
            if len(grads) != len(seeds) or not all(abs(g) <= HF.FLOAT32_MAX for g in grads):
                raise ValueError(f"step {step} of client {upload.client_id} needs {len(seeds)} scalars finite in "
                                 f"float32, got {list(grads)}")
            expected_step += 1

    def state_dict(self) -> dict[str, Any]:
        """The mirrored updater's step count and optimizer moments (the model is rebuilt from each broadcast)."""
        return self.updater.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.updater, MeZOUpdater):  # torch.optim moves its state to the parameters' device
            self.updater.load_state_dict(state)
            return
        device = self.updater.parameters()[0].device
        self.updater.load_state_dict({"steps": state["steps"], "moments": {
            name: (m.to(device), v.to(device)) for name, (m, v) in state["moments"].items()}})
