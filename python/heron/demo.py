"""`heron run` until the SFL engine lands: a real, small zeroth-order training demonstration.

A 64-32-10 MLP learns scikit-learn's 8x8 digits (shipped inside the scikit-learn package, no
download) twice from the same initial weights: with the two-point zeroth-order estimator driven
by heron's seeded perturbation stream (one base and one perturbed forward per step, no backward,
the direction regenerated from (seed, offset) for the update), and with first-order backprop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from heron.stream import ParameterLayout, derive_seed


@dataclass
class DemoResult:
    method: str
    test_accuracy: float
    final_loss: float
    seconds: float


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn digits as (x_train (N, 64) float32 in [0, 1], y_train (N,), x_test, y_test); 80/20."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


@torch.no_grad()
def _perturb(model: nn.Module, layout: ParameterLayout, seed: int, scale: float) -> None:
    for name, param in model.named_parameters():
        param.add_(layout.direction(name, seed), alpha=scale)


def train_zo(model: nn.Module, data, *, steps: int, lr: float, mu: float, batch: int, seed: int,
             log=print) -> DemoResult:
    """Two-point ZO with Adam on g = (L(theta + mu u) - L(theta)) / mu * u, u ~ N(0, I)."""
    x_train, y_train, x_test, y_test = data
    layout = ParameterLayout.from_module(model)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    loss = float("nan")
    with torch.no_grad():
        for step in range(steps):
            index = torch.randint(len(y_train), (batch,), generator=generator)
            xb, yb = x_train[index], y_train[index]
            direction_seed = derive_seed(seed, step)
            loss = loss_fn(model(xb), yb).item()
            _perturb(model, layout, direction_seed, mu)
            loss_pert = loss_fn(model(xb), yb).item()
            _perturb(model, layout, direction_seed, -mu)
            projected = (loss_pert - loss) / mu
            for name, param in model.named_parameters():
                param.grad = projected * layout.direction(name, direction_seed)
            optimizer.step()
            if (step + 1) % max(1, steps // 5) == 0:
                test_acc = accuracy(model, x_test, y_test)
                log(f"  zo  step {step + 1:5d}/{steps}  loss {loss:.3f}  test acc {test_acc:.3f}")
    return DemoResult("zo (heron stream)", accuracy(model, x_test, y_test), loss, time.perf_counter() - start)


def train_fo(model: nn.Module, data, *, steps: int, lr: float, batch: int, seed: int, log=print) -> DemoResult:
    x_train, y_train, x_test, y_test = data
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    loss = float("nan")
    for step in range(steps):
        index = torch.randint(len(y_train), (batch,), generator=generator)
        optimizer.zero_grad()
        loss_t = loss_fn(model(x_train[index]), y_train[index])
        loss_t.backward()
        optimizer.step()
        loss = loss_t.item()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  fo  step {step + 1:5d}/{steps}  loss {loss:.3f}  test acc {accuracy(model, x_test, y_test):.3f}")
    return DemoResult("fo (backprop)", accuracy(model, x_test, y_test), loss, time.perf_counter() - start)


def run_demo(*, zo_steps: int = 3000, fo_steps: int = 300, seed: int = 0, log=print) -> list[DemoResult]:
    data = load_digits_split(seed)
    log(f"digits: {len(data[1])} train / {len(data[3])} test samples, MLP 64-32-10")
    results = [
        train_zo(make_model(seed), data, steps=zo_steps, lr=3e-3, mu=1e-3, batch=128, seed=seed, log=log),
        train_fo(make_model(seed), data, steps=fo_steps, lr=3e-3, batch=128, seed=seed, log=log),
    ]
    log(f"{'method':<20} {'test acc':>8} {'loss':>7} {'time s':>7}")
    for r in results:
        log(f"{r.method:<20} {r.test_accuracy:8.3f} {r.final_loss:7.3f} {r.seconds:7.2f}")
    return results
