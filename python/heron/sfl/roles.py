"""The three HERON-SFL roles. They know nothing about transport: the single-machine loop and the
Flower app move the same inputs and outputs between them.

- Client: client part + auxiliary head (or the client part alone for SFL-V1/V2) and an updater;
  h local steps per round; smashed data + labels uploaded every k steps.
- MainServer: the server part, trained first-order on uploaded smashed data, client by client.
- FedServer: FedAvg of the client models, weighted by sample count (or uniform).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from heron.kernels.stream import derive_seed


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return tensor_bytes(state.values())


@dataclass
class Upload:
    """One upload: the base stream's cut-layer output and the labels of that batch."""

    smashed: torch.Tensor
    labels: torch.Tensor

    @property
    def nbytes(self) -> int:
        return tensor_bytes((self.smashed, self.labels))


@dataclass
class ClientRoundResult:
    """What a client sends back after a round."""

    client_id: int
    state: dict[str, torch.Tensor]
    num_samples: int
    uploads: list[Upload] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    # ZO clients: per step (step index, seeds, projected-gradient scalars) - enough to replay the update
    zo_steps: list[tuple[int, list[int], list[float]]] = field(default_factory=list)


class ClientBatches:
    """Deterministic batches: batch (round, step) of a client depends on (seed, client, round, step) only,
    so a resumed run draws the same batches as an uninterrupted one."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, client_id: int):
        if len(y) == 0:
            raise ValueError(f"client {client_id} has no samples")
        self.x, self.y, self.batch_size, self.seed, self.client_id = x, y, batch_size, seed, client_id

    def batch(self, round_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.client_id, round_index, step))
        index = torch.randint(len(self.y), (min(self.batch_size, len(self.y)),), generator=generator)
        return self.x[index], self.y[index]


class Client:
    """A client of an auxiliary-head method (HERON, CSE-FSL, MeZO-client).

    model: nn.Sequential(client_part, aux_head) trained by `updater` (any heron updater built with
    cut="0", so each step returns the client part's output as smashed data).
    """

    def __init__(self, client_id: int, model: nn.Module, updater: Any, batches: ClientBatches, *,
                 local_steps: int, upload_every: int, device: torch.device | str = "cpu"):
        if local_steps < 1 or upload_every < 1:
            raise ValueError(f"local_steps and upload_every must be >= 1, got {local_steps}, {upload_every}")
        self.client_id, self.model, self.updater, self.batches = client_id, model, updater, batches
        self.local_steps, self.upload_every, self.device = local_steps, upload_every, torch.device(device)

    @property
    def num_samples(self) -> int:
        return len(self.batches.y)

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def run_round(self, round_index: int) -> ClientRoundResult:
        result = ClientRoundResult(self.client_id, {}, self.num_samples)
        self.model.train()
        for step in range(self.local_steps):
            x, y = self.batches.batch(round_index, step)
            x, y = x.to(self.device), y.to(self.device)
            out = self.updater.step((x, y))
            result.losses.append(out.loss)
            if out.skipped:
                result.skipped_steps += 1
            elif out.seeds and out.projected_grads is not None and hasattr(self.updater, "apply"):
                result.zo_steps.append((out.step, list(out.seeds), list(out.projected_grads)))
            if (step + 1) % self.upload_every == 0 and out.smashed is not None:
                result.uploads.append(Upload(out.smashed.detach(), y))
        result.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return result


class SplitClient:
    """A client of SFL-V1/V2: the client part alone, trained with the server's cut-layer gradient."""

    def __init__(self, client_id: int, model: nn.Module, optimizer: torch.optim.Optimizer, batches: ClientBatches,
                 *, local_steps: int, device: torch.device | str = "cpu"):
        self.client_id, self.model, self.optimizer, self.batches = client_id, model, optimizer, batches
        self.local_steps, self.device = local_steps, torch.device(device)
        self._pending: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return len(self.batches.y)

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def forward(self, round_index: int, step: int) -> Upload:
        """Client forward of batch (round, step); keeps the graph until `backward`."""
        self.model.train()
        x, y = self.batches.batch(round_index, step)
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = self.model(x.to(self.device))
        return Upload(self._pending.detach(), y.to(self.device))

    def backward(self, grad: torch.Tensor) -> None:
        """Finish the step with the server's gradient of the loss w.r.t. the smashed data."""
        if self._pending is None:
            raise RuntimeError("backward called without a pending forward")
        if grad.shape != self._pending.shape:
            raise ValueError(f"server gradient has shape {tuple(grad.shape)}, "
                             f"smashed data {tuple(self._pending.shape)}")
        self._pending.backward(grad)
        self.optimizer.step()
        self._pending = None

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


class MainServer:
    """The server part, trained first-order on smashed data."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn

    def train_on(self, upload: Upload) -> float:
        """One first-order step on an upload (HERON / CSE-FSL: no gradient goes back)."""
        loss, _ = self._step(upload.smashed, upload.labels, need_input_grad=False)
        return loss

    def forward_backward(self, upload: Upload) -> tuple[float, torch.Tensor]:
        """SFL-V1/V2: one step; returns (loss, d loss / d smashed) for the client."""
        loss, grad = self._step(upload.smashed, upload.labels, need_input_grad=True)
        return loss, grad

    def _step(self, smashed: torch.Tensor, labels: torch.Tensor, *, need_input_grad: bool):
        self.model.train()
        smashed = smashed.detach().requires_grad_(need_input_grad)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(smashed), labels)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), (smashed.grad if need_input_grad else None)


class FedServer:
    """FedAvg over client models: floating-point entries averaged (weighted by samples or
    uniformly), integer buffers (BatchNorm's num_batches_tracked) taken from the first client."""

    WEIGHTINGS = ("samples", "uniform")

    def __init__(self, weighting: str = "samples"):
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {self.WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting

    def aggregate(self, states: list[dict[str, torch.Tensor]], num_samples: list[int]) -> dict[str, torch.Tensor]:
        if not states:
            raise ValueError("aggregate needs at least one client state")
        if len(states) != len(num_samples):
            raise ValueError(f"{len(states)} states but {len(num_samples)} sample counts")
        keys = states[0].keys()
        for i, state in enumerate(states[1:], start=1):
            if state.keys() != keys:
                raise ValueError(f"client state {i} has keys {sorted(set(state) ^ set(keys))} that differ from "
                                 f"client 0's")
        weights = ([n / sum(num_samples) for n in num_samples] if self.weighting == "samples"
                   else [1.0 / len(states)] * len(states))
        averaged = {}
        for key in keys:
            first = states[0][key]
            if not first.is_floating_point():
                averaged[key] = first.clone()
                continue
            total = torch.zeros_like(first, dtype=torch.float32)
            for state, weight in zip(states, weights, strict=True):
                total.add_(state[key].float(), alpha=weight)
            averaged[key] = total.to(first.dtype)
        return averaged
