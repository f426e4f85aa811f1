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
from torch.utils._python_dispatch import TorchDispatchMode

import heron
from heron.zo.coverage import trainable_ids
from heron.zo.dual import Dual, DualStreamInterpreter, Perturbation, cut_node_name, trace
from heron.zo.generic import can_share_dropout, shared_dropout
from tests.helpers import gamma

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


def test_fused_lowrank_first_conv_is_the_in_place_perturbed_conv_within_its_rounding_bound():
    """The dual schedule's one evaluation order of its own (tests/sfl/test_engine.py): a low-rank
    direction on a convolution whose streams share their input gives the perturbed stream as
    conv(x, W) + b + alpha U conv(x, V) + scale z_b; the sequential schedule perturbs the layer in
    place and runs conv(x, W + alpha U V^T) + (b + scale z_b). Both approximate the same exact value
    y* (float32 U, V, z_b, alpha). Each output element sums at most K + r + 2 terms (K = C kh kw
    products, r low-rank products, the bias and its shift) through at most K + r + 4 roundings along
    any path (the perturbed weight's alpha, product and sum; the conv's products and sums; the final
    add), so |y - y*| <= gamma_(K+r+4) M with M = |x| * (|W| + |alpha| |U| |V|^T) + |b| + |scale z_b|
    (magnitudes, in float64) for either evaluation, whatever the CPU's summation order."""
    from heron.zo.dual import _lowrank_conv, _trainable
    from heron.zo.perturbation import PerturbedInPlace, lowrank_factors, scaled_bias_direction

    torch.manual_seed(0)
    conv, rank = nn.Conv2d(3, 32, 3, padding=1), 2
    model = nn.Sequential(conv)
    x = torch.randn(16, 3, 12, 12)
    pert = perturbation(model, lowrank_rank=rank, u_seed=2**41 + 9, lowrank_names=frozenset({"0.weight"}))
    trainable = _trainable(conv, pert)
    with torch.no_grad():
        fused = _lowrank_conv(conv, trainable, Dual(x), pert).pert
        with PerturbedInPlace(trainable, pert):
            in_place = conv(x)
        u, v, alpha = lowrank_factors(conv.weight, "0.weight", pert)
        bias_shift = scaled_bias_direction(conv.bias, "0.bias", pert)
        magnitude_weight = conv.weight.double().abs() + (abs(alpha) * u.double().abs() @ v.double().abs().t()).view(
            conv.weight.shape)
        magnitude = nn.functional.conv2d(x.double().abs(), magnitude_weight, padding=1) + \
            (conv.bias.double().abs() + bias_shift.double().abs()).view(1, -1, 1, 1)
    bound = 2 * gamma(conv.weight[0].numel() + rank + 4) * magnitude
    difference = (fused.double() - in_place.double()).abs()
    assert difference.max() > 0  # the two orders do differ: the bound is what the test checks
    excess = difference - bound
    assert excess.max() <= 0, f"|fused - in place| {difference.flatten()[excess.argmax()]:.3g} > bound " \
                              f"{bound.flatten()[excess.argmax()]:.3g}"


class _ScaledBlock(nn.Module):
    """A block run generically (it owns a parameter and has a parametrised child) that records what
    its forward is called with, and draws dropout and updates a BatchNorm inside."""

    def __init__(self, features: int):
        super().__init__()
        self.fc = nn.Linear(features, features)
        self.norm = nn.BatchNorm1d(features)
        self.gamma = nn.Parameter(torch.full((features,), 0.5))
        self.calls: list[str] = []

    def forward(self, x):
        self.calls.append(type(x).__name__)
        return x + nn.functional.dropout(self.norm(self.fc(x)), 0.5, self.training) * self.gamma


def _block_net(features: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, features), _ScaledBlock(features), nn.Linear(features, 3)).train()


@pytest.mark.parametrize(("rows", "one_stream_at_a_time"), [(64, True), (2, False)])
def test_an_activation_bound_generic_block_runs_its_streams_one_at_a_time(rows, one_stream_at_a_time):
    """A generically run block whose input has more elements than its trainable parameters (64 rows x
    8 features against 80 parameters) runs its own forward once per stream on plain tensors, which
    keeps one stream's activations alive at a time; a weight-bound one (2 rows) runs both streams call
    by call on DualTensors. Either way the streams are the two plain forwards, with one dropout mask
    and statistics from the base stream."""
    model = _block_net(8)
    x = torch.randn(rows, 8, generator=torch.Generator().manual_seed(2))
    plain = copy.deepcopy(model)
    pert = perturbation(model)
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(3)
    out, _ = run(model, pert, x)
    assert model[1].calls == (["Tensor", "Tensor"] if one_stream_at_a_time else ["DualTensor"])
    with torch.no_grad():
        torch.manual_seed(3)
        want_base = plain(x)
        shifted = {name: p + MU * pert.layout.direction(name, SEED) for name, p in parameters.items()}
        reference = _block_net(8)
        torch.manual_seed(3)
        want_pert = functional_call(reference, shifted, (x,))
    torch.testing.assert_close(out.base, want_base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pert, want_pert, rtol=1e-4, atol=1e-5)
    for (name, b), (_, c) in zip(model.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=f"{name} is not the base stream's")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_shared_dropout_is_f_dropout_bit_for_bit(p, dtype, inplace):
    """One mask for both streams, drawn once: the base stream gets exactly F.dropout's output (and the
    perturbed one the same mask and scale), and the generator ends where one F.dropout leaves it."""
    base = torch.randn(64, 33, generator=torch.Generator().manual_seed(4)).to(dtype)
    pert = base + 0.25
    torch.manual_seed(9)
    want_base, want_pert = nn.functional.dropout(base, p, True), None
    state_after_one = torch.get_rng_state()
    torch.manual_seed(9)
    want_pert = nn.functional.dropout(pert, p, True)
    torch.manual_seed(9)
    got_base, got_pert = shared_dropout(base.clone(), pert.clone(), p, inplace)
    assert torch.equal(got_base, want_base) and torch.equal(got_pert, want_pert)
    assert torch.equal(torch.get_rng_state(), state_after_one)


class _Bernoullis(TorchDispatchMode):
    """Counts the random mask draws (aten.bernoulli_) of what runs inside."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket is torch.ops.aten.bernoulli_
        return func(*args, **(kwargs or {}))


class _FunctionalDropoutNet(nn.Module):
    """Functional dropout of a perturbed value in a module heron.zo.generic runs (a root parameter)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.out = nn.Linear(8, 64), nn.Linear(64, 3)
        self.scale = nn.Parameter(torch.ones(64))

    def forward(self, x):
        return self.out(nn.functional.dropout(self.fc(x) * self.scale, 0.5, self.training))


@pytest.mark.parametrize("executor", ["fx", "generic"])
@pytest.mark.parametrize("schedule", ["dual", "sequential"])
@pytest.mark.parametrize("model", ["module", "functional"])
def test_a_dual_forward_draws_each_dropout_mask_once(model, schedule, executor):
    """Dropout after a perturbed layer (nn.Dropout, F.dropout) draws one mask for both streams in the
    dual schedule (the sequential one draws it in each pass, as two plain forwards do), and the
    step's estimate is unchanged: the same as with the streams drawn separately."""
    net = with_dropout().train() if model == "module" else _FunctionalDropoutNet().train()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    loss_fn = lambda out, _: out.square().mean()  # noqa: E731
    updater = heron.ZOUpdater(net, loss_fn, lr=0.0, schedule=schedule, executor=executor)
    reference = heron.ZOUpdater(copy.deepcopy(net), loss_fn, lr=0.0, schedule="sequential", executor=executor)
    torch.manual_seed(7)
    with _Bernoullis() as counter:
        result = updater.step((x, None))
    assert counter.count == (1 if schedule == "dual" else 2)
    torch.manual_seed(7)
    assert result.projected_grads == pytest.approx(reference.step((x, None)).projected_grads, rel=1e-4, abs=1e-6)


def test_masks_are_shared_only_where_the_result_is_f_dropouts():
    """CPU tensors of any float dtype, and float32 elsewhere (CUDA's fused dropout scales in float32;
    for half precision there sharing would round the scale first)."""
    assert can_share_dropout(torch.empty(2, dtype=torch.bfloat16))
    assert can_share_dropout(torch.empty(2, device="meta"))
    assert not can_share_dropout(torch.empty(2, device="meta", dtype=torch.float16))
    assert not can_share_dropout(None)
