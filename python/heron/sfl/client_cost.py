"""The client-cost columns of a report: one client step profiled (peak memory, FLOPs, time) on a copy,
so the run is not touched."""

from __future__ import annotations

import torch

from heron.profiling.profile import StepProfile, profile_step
from heron.sfl.roles import Client, SplitClient


class SplitClientStep:
    """An SFL-V1/V2 client step to profile: forward, and backward with a server-shaped gradient."""

    def __init__(self, client: SplitClient):
        self.model, self.client = client.model, client

    def step(self, batch):
        x, _ = batch
        out = self.client.model(x)
        out.backward(torch.ones_like(out) / out.numel())
        self.client.optimizer.step()
        self.client.optimizer.zero_grad(set_to_none=True)

    def state_dict(self):
        return self.client.optimizer.state_dict()


def profile_client(client: Client | SplitClient, device: torch.device) -> StepProfile:
    """Peak memory / FLOPs / time of one step of `client` on its first batch, on a copy."""
    batch = tuple(t.to(device) for t in client.batches.batch(0, 0))
    stepper = client.updater if isinstance(client, Client) else SplitClientStep(client)
    return profile_step(stepper, batch, warmup=1, repeats=1)
