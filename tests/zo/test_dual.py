"""The dual-stream executor (heron.zo.dual) on its own: one run computes the model at theta (base) and at
theta + scale * z (perturbed) as two plain forwards would, updates BatchNorm statistics from the base
stream only, leaves the model's parameters as it found them, draws one dropout mask for both streams
(and, in single-stream passes, the mask the random generator's state gives, as a plain forward would),
and names what it cannot run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import heron
from heron.zo.coverage import trainable_ids
from heron.zo.dual import Dual, DualStreamInterpreter, Perturbation, cut_node_name, trace

MU = 1e-2
SEED = 2**40 + 5


def conv_net() -> nn.Module:
    """Conv (in place: same shape), BatchNorm, ReLU, a LoRA layer and a Linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                         heron.LoRALinear(2 * 5 * 5, 12, rank=2), nn.Tanh(), nn.Linear(12, 3))


def with_dropout() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5), nn.Linear(64, 64))


def batch(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (6, 8) if isinstance(model[0], nn.Linear) else (6, 2, 5, 5)
    return torch.randn(shape, generator=generator)


def run(model: nn.Module, perturbation: Perturbation, x: torch.Tensor, cut: str | None = None):
    graph = trace(model)
    interpreter = DualStreamInterpreter(graph, perturbation, None if cut is None else cut_node_name(graph, model, cut))
    with torch.no_grad():
        return interpreter.run(x), interpreter.smashed


def perturbation(model: nn.Module, seed: int = SEED, scale: float = MU, **kwargs) -> Perturbation:
    """theta + scale * z over `model`'s trainable parameters, each known by its id as the updaters do."""
    layout = heron.ParameterLayout.from_module(model)
    return Perturbation(layout, seed, scale, names=trainable_ids(dict(model.named_parameters()),
                                                                 [entry.name for entry in layout]), **kwargs)


def test_dual_run_equals_two_forwards():
    model = conv_net().train()
    x = batch(model)
    plain = copy.deepcopy(model)
    pert = perturbation(model)
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    out, smashed = run(model, pert, x, cut="2")
    assert isinstance(out, Dual) and out.pert is not None
    with torch.no_grad():
        want_smashed = copy.deepcopy(plain)[:3](x)
        want_base = plain(x)  # also updates plain's statistics, as the base stream must
        shifted = {name: p + MU * pert.layout.direction(name, SEED) if name in pert.layout else p
                   for name, p in parameters.items()}
        want_pert = functional_call(copy.deepcopy(conv_net().train()), shifted, (x,))
    torch.testing.assert_close(out.base, want_base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pert, want_pert, rtol=1e-4, atol=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(p, q), f"{name} was left perturbed"
    for (name, b), (_, c) in zip(model.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=f"{name} is not the base stream's")
    torch.testing.assert_close(smashed, want_smashed, rtol=1e-5, atol=1e-6)


def test_streams_stay_one_while_nothing_is_perturbed():
    """Layers and functions without trainable parameters run once while the streams are identical."""
    model = nn.Sequential(nn.ReLU(), nn.Linear(8, 3)).requires_grad_(False)
    out, _ = run(model, perturbation(model), torch.randn(6, 8))
    assert out.pert is None


def test_dropout_draws_one_mask_for_both_streams():
    """The finite difference must see only the parameter change: the perturbed stream is dropped where
    the base stream is."""
    model = with_dropout()[:2].train()
    out, _ = run(model, perturbation(model), batch(model))
    assert out.pert is not None and not torch.equal(out.base, out.pert)
    assert torch.equal(out.base == 0, out.pert == 0), "the streams were dropped with different masks"
    assert 0.3 < (out.base == 0).float().mean() < 0.7


def test_dropout_in_eval_mode_is_the_identity():
    model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5)).eval()
    x = batch(model)
    out, _ = run(model, perturbation(model), x)
    with torch.no_grad():
        torch.testing.assert_close(out.base, model(x))


@pytest.mark.parametrize("stream", ["base", "pert"])
def test_single_stream_passes_draw_the_mask_of_the_generator_state(stream):
    """The sequential schedule runs the perturbed and the base pass apart, each from the step's starting
    generator state: a pass started from one state draws that state's mask, as a plain forward does (and
    another state draws another mask)."""
    model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5)).train()
    x = batch(model)
    torch.manual_seed(11)
    with torch.no_grad():
        plain = model(x)
    torch.manual_seed(11)
    same = run(model, perturbation(model, stream=stream), x)[0].base
    torch.manual_seed(12)
    other = run(model, perturbation(model, stream=stream), x)[0].base
    assert torch.equal(plain == 0, same == 0)
    assert not torch.equal(plain == 0, other == 0)


def test_single_stream_perturbed_pass_equals_the_dual_runs_perturbed_stream():
    model = conv_net().eval()  # eval: BatchNorm uses its running statistics in both runs
    x = batch(model)
    dual, _ = run(model, perturbation(model), x)
    alone, _ = run(model, perturbation(model, stream="pert"), x)
    assert alone.pert is None
    torch.testing.assert_close(alone.base, dual.pert, rtol=1e-5, atol=1e-6)


def test_cut_must_name_a_module_that_runs():
    model = conv_net()
    graph = trace(model)
    with pytest.raises(KeyError, match="cut module '9' does not exist.*modules are"):
        cut_node_name(graph, model, "9")
    assert cut_node_name(graph, model, "2") == "_2"


def test_untraceable_model_is_named_with_the_way_out():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(x) if x.sum() > 0 else -self.linear(x)

    with pytest.raises(TypeError, match="DataDependent cannot be traced by torch.fx.*executor=.generic."):
        trace(DataDependent())
