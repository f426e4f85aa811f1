"""What a run records: each round's record, the tally a round gathers from its clients, and a
method's report (the rows of heron train's table and JSON report)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from heron.sfl.roles import ClientRoundResult, MainServer


@dataclass
class RoundRecord:
    round: int
    test_accuracy: float
    client_loss: float
    server_loss: float | None
    bytes_up: int
    bytes_down: int
    seconds: float
    skipped_steps: int = 0
    test_loss: float | None = None  # mean cross-entropy per prediction (per token for language modelling)
    test_perplexity: float | None = None  # language modelling only


@dataclass
class RoundTally:
    """What a round gathers from its clients, in client order: the states FedAvg averages, their
    sample counts, the losses, the bytes uploaded and the skipped steps."""

    states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    client_losses: list[float] = field(default_factory=list)
    server_losses: list[float] = field(default_factory=list)
    up: int = 0
    skipped: int = 0

    def absorb(self, server: MainServer, result: ClientRoundResult, state: dict[str, torch.Tensor],
               model_bytes: int) -> None:
        """An auxiliary-head client's round: the main server trains on its uploads, in order; `state`
        (its parameters, or their rebuild from seeds) joins FedAvg; model_bytes is what its model upload cost."""
        for upload in result.uploads:
            self.server_losses.append(server.train_on(upload))
            self.up += upload.nbytes
        self.up += model_bytes
        self.states.append(state)
        self.counts.append(result.num_samples)
        self.client_losses.extend(result.losses)
        self.skipped += result.skipped_steps


@dataclass
class MethodReport:
    method: str
    final_accuracy: float
    client_peak_memory_bytes: int
    client_flops_per_step: int
    client_step_time_s: float
    bytes_up: int
    bytes_down: int
    rounds: list[RoundRecord] = field(default_factory=list)
    metric: str = "accuracy"  # what final_accuracy measures: "accuracy" or "next-token accuracy"
    final_test_loss: float | None = None
    final_perplexity: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
