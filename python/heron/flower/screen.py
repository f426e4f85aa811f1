"""Bounds on what one client's reply can do to a Flower run, beyond the codec's checks of its form.

The codec (heron.flower.codec) rejects replies that are malformed or hold NaN/inf. A reply can still
be well formed, finite and hostile: smashed data or a client model with values of 1e30 would
overflow the server part's optimizer state, or the global model, and ruin every round after it.
The server therefore also bounds each reply by references the sending client cannot influence:

- smashed data: its largest magnitude may be at most `max_smashed_ratio` times the largest
  magnitude the round's broadcast client part produces on a batch of the server's own images
  (`smashed_reference`). One round of honest local steps moves the client part only a little from
  the broadcast, so its outputs stay of the same order (measured as above: at most 1.21 x; the
  default bound is 100).
- client update (its state minus the broadcast, every floating-point entry: parameters and
  BatchNorm statistics): its L2 norm may be at most `max_update_ratio` times the broadcast
  model's norm. An honest round moves a model by a fraction of its norm (measured, 10 local steps,
  3 clients, cnn and resnet18, heron / cse-fsl, Adam and SGD: at most 0.43 in round 1, where the
  BatchNorm statistics move most from their initial values; 0.07-0.15 by round 3; the default
  bound is 10).
- a reply within both bounds is clipped: its update's norm to `clip_ratio` times the median update
  norm of the round's accepted replies (with 3 or more replies, an honest majority sets the median;
  a reply within the clip is used exactly as sent, so honest runs are unchanged).

The server part is further guarded by `heron.flower.server.SplitServer.finish_round`: training on
a client's uploads that leaves a non-finite loss, parameter or optimizer state is undone. FedAvg
weights are the shard sizes the server assigned, not counts a client declares.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Iterable, Mapping

import torch

from heron.flower.codec import MessageRejected
from heron.sfl.roles import Upload


def largest_magnitude(tensors: Iterable[torch.Tensor]) -> float:
    """max |x| over the tensors (0.0 when they are empty)."""
    return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)


def smashed_reference(client_part: torch.nn.Module, images: torch.Tensor) -> float:
    """The largest |output| of `client_part` on `images` (N, C, H, W), in training mode (BatchNorm on the
    batch's statistics, as during a client's local steps), run on a copy so the model is not touched."""
    part = copy.deepcopy(client_part).train()
    with torch.no_grad():
        return largest_magnitude([part(images)])


def check_smashed(uploads: list[Upload], reference: float, ratio: float) -> None:
    """Raises MessageRejected when an upload's smashed data exceed ratio x reference in magnitude."""
    limit = ratio * reference
    for i, upload in enumerate(uploads):
        largest = largest_magnitude([upload.smashed])
        if largest > limit:
            raise MessageRejected(f"smashed/{i}: largest magnitude {largest:.4g} exceeds {limit:.4g} "
                                  f"(max_smashed_ratio={ratio:g} x {reference:.4g}, the broadcast client part's "
                                  f"largest output on the server's images)")


def update_norm(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of state - base over the floating-point entries (accumulated in float64)."""
    total = sum(float(torch.sum((state[k].double() - base[k].double()) ** 2)) for k in base
                if base[k].is_floating_point())
    return math.sqrt(total)


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a state's floating-point entries (float64)."""
    return math.sqrt(sum(float(torch.sum(v.double() ** 2)) for v in state.values() if v.is_floating_point()))


def check_update(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], ratio: float) -> None:
    """Raises MessageRejected when ||state - base|| > ratio x ||base||."""
    norm, limit = update_norm(state, base), ratio * state_norm(base)
    if norm > limit:
        raise MessageRejected(f"client update: norm {norm:.4g} exceeds {limit:.4g} (max_update_ratio={ratio:g} x "
                              f"the broadcast model's norm {state_norm(base):.4g})")


def clip_updates(states: list[dict[str, torch.Tensor]], base: Mapping[str, torch.Tensor],
                 ratio: float) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Each state's update clipped to ratio x the median update norm; returns the states (a state within
    the clip is returned as it is, the same object) and the indices of those clipped."""
    norms = [update_norm(state, base) for state in states]
    if not norms:
        return states, []
    limit = ratio * statistics.median(norms)
    clipped, which = [], []
    for i, (state, norm) in enumerate(zip(states, norms, strict=True)):
        if norm <= limit:
            clipped.append(state)
            continue
        scale = limit / norm
        clipped.append({k: (base[k] + (v - base[k]) * scale).to(v.dtype) if v.is_floating_point() else v
                        for k, v in state.items()})
        which.append(i)
    return clipped, which


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of an optimizer's state (e.g. Adam's moments)."""
    return [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
