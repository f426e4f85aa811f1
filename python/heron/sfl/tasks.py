"""What a run optimises and how its test set is scored, by the dataset's task.

- classification: cross-entropy on logits (B, C) and labels (B,); metric: accuracy.
- language-modelling: next-token cross-entropy on logits (B, T, V) and tokens (B, T) (position t
  predicts token t + 1); metric: next-token accuracy, with the per-token loss and perplexity.

Loss functions are module-level functions so updaters holding them can be copied and pickled.
Padded token ids (a dataset with a pad_id) are cut to each batch's longest sequence, in training
(`PaddedBatches`) and evaluation (`evaluation_batches`, which also takes the test set shortest first):
the models mask padding, so only the cost and the size of the smashed data change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from heron.models.gpt2 import lm_loss
from heron.sfl.roles import ClientBatches
from heron.sfl.text import CLASSIFICATION, LANGUAGE_MODELLING


@dataclass(frozen=True)
class Evaluation:
    """metric: accuracy (classification) or next-token accuracy; loss: mean test cross-entropy per
    prediction; perplexity: exp(loss) for language modelling, None otherwise."""

    metric: float
    loss: float
    perplexity: float | None = None


def trim_padding(x: Tensor, pad_id: int) -> Tensor:
    """x (b, T) token ids padded at the end with pad_id -> x[:, :L], L the longest sequence (at least 1)."""
    return x[:, :max(int((x != pad_id).sum(1).max()), 1)]


class PaddedBatches(ClientBatches):
    """ClientBatches whose token-id batches are cut to their longest sequence (dynamic padding)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int, client_id: int, *, pad_id: int):
        super().__init__(x, y, batch_size, seed, client_id)
        self.pad_id = pad_id

    def batch(self, round_index: int, step: int) -> tuple[Tensor, Tensor]:
        x, y = super().batch(round_index, step)
        return trim_padding(x, self.pad_id), y


def evaluation_batches(x: Tensor, y: Tensor, batch_size: int,
                       pad_id: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) in batches of batch_size; with pad_id, x (N, T) token ids with trailing padding are
    taken shortest first and each batch is cut to its longest sequence."""
    if pad_id is None:
        for start in range(0, len(y), batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    order = torch.argsort((x != pad_id).sum(1), stable=True)
    for start in range(0, len(y), batch_size):
        index = order[start:start + batch_size]
        yield trim_padding(x[index], pad_id), y[index]


class ClassificationTask:
    name = CLASSIFICATION
    metric_name = "accuracy"
    loss_fn = staticmethod(nn.functional.cross_entropy)

    @torch.no_grad()
    def evaluate(self, predict: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, batch_size: int,
                 device: torch.device, pad_id: int | None = None) -> Evaluation:
        """predict: inputs (b, ...) -> logits (b, C); x (N, ...), y (N,) int64; pad_id: see evaluation_batches."""
        correct, loss = 0, 0.0
        for inputs, labels in evaluation_batches(x, y, batch_size, pad_id):
            logits = predict(inputs.to(device)).float()
            target = labels.to(device)
            correct += int((logits.argmax(1) == target).sum())
            loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        return Evaluation(metric=correct / len(y), loss=loss / len(y))


class LanguageModellingTask:
    name = LANGUAGE_MODELLING
    metric_name = "next-token accuracy"
    loss_fn = staticmethod(lm_loss)

    @torch.no_grad()
    def evaluate(self, predict: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *, batch_size: int,
                 device: torch.device, pad_id: int | None = None) -> Evaluation:
        """predict: tokens (b, T) -> logits (b, T, V); x (N, T) inputs, y (N, T) the same tokens
        (unpadded windows: pad_id must be None)."""
        if pad_id is not None:
            raise ValueError("language-modelling evaluation takes unpadded token windows (pad_id=None)")
        correct, loss, count = 0, 0.0, 0
        for inputs, tokens in evaluation_batches(x, y, batch_size):
            logits = predict(inputs.to(device))[:, :-1].float()
            target = tokens[:, 1:].to(device)
            correct += int((logits.argmax(-1) == target).sum())
            loss += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                      reduction="sum"))
            count += target.numel()
        mean = loss / count
        return Evaluation(metric=correct / count, loss=mean, perplexity=math.exp(min(mean, 700.0)))


Task = ClassificationTask | LanguageModellingTask
TASKS: dict[str, Task] = {CLASSIFICATION: ClassificationTask(), LANGUAGE_MODELLING: LanguageModellingTask()}


def client_batches(dataset, x: Tensor, y: Tensor, batch_size: int, seed: int, client_id: int) -> ClientBatches:
    """A client's batches: PaddedBatches for padded token ids (the dataset has a pad_id), else ClientBatches."""
    pad_id = getattr(dataset, "pad_id", None)
    if pad_id is None:
        return ClientBatches(x, y, batch_size, seed, client_id)
    return PaddedBatches(x, y, batch_size, seed, client_id, pad_id=pad_id)


def task_of(dataset) -> Task:
    """The task of a dataset (its `task` attribute; "classification" when it has none)."""
    name = getattr(dataset, "task", CLASSIFICATION)
    if name not in TASKS:
        raise ValueError(f"dataset {getattr(dataset, 'name', '?')!r} has unknown task {name!r}; "
                         f"valid tasks: {', '.join(TASKS)}")
    return TASKS[name]
