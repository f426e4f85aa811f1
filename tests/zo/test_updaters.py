"""Client updaters: the fused ZO step against a plain materialised-direction reference, the
estimator's statistics, training sanity, baselines and bad input (replay: tests/sfl/test_replay.py)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

import heron
from heron.zo.updaters import FOUpdater, MeZOUpdater, ZOUpdater
from tests.helpers import DEVICE_BACKENDS, assert_close_to_reference, rounding_tolerance, skip_unavailable
from tests.helpers import reference_direction as lowrank_reference_direction


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def small_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


def resnet_stem() -> nn.Module:
    """conv-bn-relu-conv-bn like the paper's ResNet-18 client: its second conv keeps the input's
    shape, so the executor computes it in place, in batch chunks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


def batch_for(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (16, 6) if isinstance(model[0], nn.Linear) else (16, 2, 5, 5)
    return torch.randn(shape, generator=generator), torch.randint(0, 3, (16,), generator=generator)


@dataclass
class ReferenceStep:
    """The plain step's outcome: the model after it, g, [L(theta), L(theta + mu u)] and the direction."""

    model: nn.Module
    g: float
    losses: list[float]
    direction: dict[str, torch.Tensor]


def reference_zo_sgd_step(model: nn.Module, batch, *, seed: int, mu: float, lr: float,
                           direction: dict[str, torch.Tensor] | None = None) -> ReferenceStep:
    """The estimator written plainly: materialise u over the layout (or take `direction`), two
    forwards, theta -= lr g u."""
    model = copy.deepcopy(model)
    layout = heron.ParameterLayout.from_module(model)
    if direction is None:
        direction = {e.name: layout.direction(e.name, seed) for e in layout}
    params = dict(model.named_parameters())
    x, y = batch
    with torch.no_grad():
        perturbed = {n: p + mu * direction[n] for n, p in params.items()}
        pert_model = copy.deepcopy(model)  # its statistics updates are discarded
        loss_pert = nn.functional.cross_entropy(functional_call(pert_model, perturbed, (x,)), y)
        loss_base = nn.functional.cross_entropy(model(x), y)  # base stream updates BN statistics
        g = (loss_pert - loss_base).item() / mu
        for n, p in params.items():
            p.sub_(lr * g * direction[n])
    return ReferenceStep(model, g, [loss_base.item(), loss_pert.item()], direction)


def step_matching_reference(updater: ZOUpdater, batch, reference: ReferenceStep, *, mu: float, lr: float):
    """updater's step on batch, applied and checked against the plain step (assert_step_matches_reference)."""
    model = updater.model
    before = {name: value.clone() for name, value in model.state_dict().items()}
    result = updater.step(batch)
    assert not result.skipped
    assert_step_matches_reference(model, before, result, reference, mu=mu, lr=lr)
    return result


def assert_step_matches_reference(model: nn.Module, before: dict[str, torch.Tensor], result, reference: ReferenceStep,
                                  *, mu: float, lr: float) -> None:
    """heron's step against the plain one, each part by what bounds it (nothing tuned to a CPU):
    - g: both sides take the same finite difference of the same function in float32, in different
      orders (fused or chunked layers), so they agree within rounding_tolerance: the losses' rounding
      divided by mu. Comparing the parameters after the step directly would multiply that by lr |z|.
    - the parameters: theta - lr g z for the step's own g, by the elementwise rule of the updates;
    - the buffers (the base stream's BatchNorm statistics, means of convolutions): the reduction rule."""
    tolerance = rounding_tolerance(model, reference.losses, mu)
    g = result.projected_grads[0]
    assert abs(g - reference.g) <= tolerance, (g, reference.g, tolerance)
    assert abs(reference.g) > 5 * tolerance, (reference.g, tolerance)  # the check can fail
    want_buffers = reference.model.state_dict()
    for name, value in model.state_dict().items():
        if name in reference.direction:
            want = before[name].double() - lr * g * reference.direction[name].double()
            assert_close_to_reference(value, want, elementwise=True, what=name)
        elif value.is_floating_point():
            assert_close_to_reference(value, want_buffers[name], what=name)
        else:
            assert torch.equal(value, want_buffers[name]), name


@pytest.fixture
def tiny_conv_chunks(monkeypatch):
    """Convolutions in chunks of a few samples even on test-sized batches."""
    monkeypatch.setattr(heron.zo.dual, "_CONV_CHUNK_BYTES", 4 * 4 * 5 * 5 * 3)


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
@pytest.mark.parametrize("make_model", [small_mlp, small_convnet, resnet_stem])
def test_fused_step_matches_reference_estimator(make_model, schedule, tiny_conv_chunks):
    model = make_model()
    batch = batch_for(model)
    updater = ZOUpdater(model, nn.functional.cross_entropy, mu=1e-3, lr=0.05, seed=3, schedule=schedule)
    expected = reference_zo_sgd_step(model, batch, seed=updater.direction_seeds(0)[0], mu=1e-3, lr=0.05)
    step_matching_reference(updater, batch, expected, mu=1e-3, lr=0.05)


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
def test_whole_batch_convolutions_are_one_call_per_stream(schedule, tiny_conv_chunks, monkeypatch):
    """conv_chunks=False: every convolution runs on the whole batch, one call per stream (no
    chunking: the fewest calls, for a caching allocator or a contended CPU), and the step is the
    reference estimator's, as the chunked one is."""
    calls = []
    conv_forward = nn.Conv2d._conv_forward

    def counted(module, x, weight, bias):  # (not a hook: a module with hooks takes the generic executor)
        calls.append(x.shape[0])
        return conv_forward(module, x, weight, bias)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", counted)
    counts = {}
    for chunks in (True, False):
        model = resnet_stem()
        batch = batch_for(model)
        updater = ZOUpdater(model, nn.functional.cross_entropy, mu=1e-3, lr=0.05, seed=3, schedule=schedule,
                            conv_chunks=chunks)
        expected = reference_zo_sgd_step(copy.deepcopy(model), batch, seed=updater.direction_seeds(0)[0], mu=1e-3,
                                         lr=0.05)
        calls.clear()  # the reference's own forwards
        step_matching_reference(updater, batch, expected, mu=1e-3, lr=0.05)
        counts[chunks] = list(calls)
    assert counts[False] == [16] * 4  # 2 convolutions x 2 streams, whole batch
    assert len(counts[True]) > 4 and max(counts[True]) < 16


def test_conv_chunks_must_be_a_bool():
    with pytest.raises(TypeError, match="conv_chunks must be True or False, got 'no'"):
        ZOUpdater(small_mlp(), nn.functional.cross_entropy, lr=1e-3, conv_chunks="no")


def test_estimate_approaches_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))  # 34 parameters
    x, y = torch.randn(32, 5), torch.randint(0, 2, (32,))
    loss = nn.functional.cross_entropy(model(x), y)
    true_grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    updater = ZOUpdater(model, nn.functional.cross_entropy, mu=1e-3, q=3000, lr=0.0, seed=11)
    result = updater.step((x, y))
    layout = updater.layout
    estimate = sum(g * heron.seeded_randn(layout.total, s, layout.base_offset)
                   for s, g in zip(result.seeds, result.projected_grads, strict=True))
    cosine = torch.nn.functional.cosine_similarity(estimate, true_grad, dim=0).item()
    assert cosine > 0.9, cosine


def test_directional_derivative_matches_jvp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    for mu in (1e-2, 1e-3):
        updater = ZOUpdater(model, nn.functional.cross_entropy, mu=mu, lr=0.0, seed=5)
        result = updater.step((x, y))
        layout = updater.layout
        tangent = {e.name: layout.direction(e.name, result.seeds[0]) for e in layout}
        _, exact = jvp(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y),
                       (params,), (tangent,))
        # one-sided difference: error O(mu) from curvature, plus float32 rounding of the losses / mu
        assert abs(result.projected_grads[0] - exact.item()) <= 5 * mu * (1 + abs(exact.item())) + 1e-7 / mu * 10


def test_sphere_direction_scales_by_dimension_over_norm():
    model = small_mlp()
    batch = batch_for(model)
    updater = ZOUpdater(model, nn.functional.cross_entropy, mu=1e-3, lr=0.0, direction="sphere", seed=2)
    result = updater.step(batch)
    seed = result.seeds[0]
    norm = heron.seeded_randn(updater.layout.total, seed).double().norm().item()
    gaussian = ZOUpdater(small_mlp(), nn.functional.cross_entropy, mu=1e-3 / norm, lr=0.0, seed=2)
    raw = gaussian.step(batch).projected_grads[0]  # (L(theta + mu u) - L) / (mu / |z|)
    expected = raw * (1e-3 / norm) / 1e-3 * updater.layout.total / norm
    assert math.isclose(result.projected_grads[0], expected, rel_tol=1e-3)


def test_q_directions_average():
    model = small_mlp()
    batch = batch_for(model)
    many = ZOUpdater(copy.deepcopy(model), nn.functional.cross_entropy, q=3, lr=0.0, seed=9)
    result = many.step(batch)
    singles = []
    for seed in result.seeds:
        one = ZOUpdater(copy.deepcopy(model), nn.functional.cross_entropy, lr=0.0, seed=9)
        one.direction_seeds = lambda step, s=seed: [s]
        singles.append(one.step(batch).projected_grads[0] / 3)
    for got, want in zip(result.projected_grads, singles, strict=True):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6)


def test_batchnorm_statistics_updated_once_by_base_stream():
    model = small_convnet()
    batch = batch_for(model)
    twin = copy.deepcopy(model)
    ZOUpdater(model, nn.functional.cross_entropy, q=2, lr=0.0).step(batch)
    with torch.no_grad():
        twin(batch[0])  # one plain training-mode forward
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)
    assert model[1].num_batches_tracked.item() == 1


def test_smashed_is_base_stream_cut_output():
    model = small_convnet()
    batch = batch_for(model)
    with torch.no_grad():
        expected = copy.deepcopy(model)[:3](batch[0])
    result = ZOUpdater(model, nn.functional.cross_entropy, lr=0.0, cut="2").step(batch)
    torch.testing.assert_close(result.smashed, expected)
    assert not result.smashed.requires_grad


class PeftStyleLoRA(nn.Module):
    """The layout of a PEFT LoRA Linear: base_layer plus lora_A / lora_B Linear submodules."""

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.base_layer = nn.Linear(in_features, out_features)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, out_features, bias=False)})
        self.scaling = {"default": 2.0}
        self.base_layer.requires_grad_(False)
        nn.init.normal_(self.lora_B["default"].weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]


@pytest.mark.parametrize("make_layer", [lambda: heron.LoRALinear(6, 5, rank=2),
                                        lambda: PeftStyleLoRA(6, 5, 2)], ids=["heron-lora", "peft-style"])
def test_lora_only_training_leaves_base_frozen(make_layer):
    torch.manual_seed(0)
    model = nn.Sequential(make_layer(), nn.Tanh(), nn.Linear(5, 3))
    model[2].requires_grad_(False)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    updater = ZOUpdater(model, nn.functional.cross_entropy, lr=0.1, seed=1)
    assert set(updater.param_names) == set(trainable_before)
    updater.step((torch.randn(8, 6), torch.randint(0, 3, (8,))))
    named = dict(model.named_parameters())
    for n, p in frozen_before.items():
        assert torch.equal(named[n], p), n
    assert any(not torch.equal(named[n], p) for n, p in trainable_before.items())


def test_lowrank_perturbation_and_lazy_subspace():
    model = small_mlp()
    batch = batch_for(model)
    updater = ZOUpdater(model, nn.functional.cross_entropy, lr=0.01, perturbation="lowrank", rank=2,
                        lazy_steps=2, seed=4)
    assert updater.lowrank_names == {"0.weight", "2.weight"}
    assert updater.u_seed(0) == updater.u_seed(1) != updater.u_seed(2)
    before = model[0].weight.clone()
    result = updater.step(batch)
    delta = (model[0].weight - before).detach()
    singular = torch.linalg.svdvals(delta.double())
    assert singular[2] < 1e-3 * singular[0]  # rank 2 up to the float32 rounding of W - lr g U V^T
    assert not result.skipped


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
@pytest.mark.parametrize("rows", [16, 2], ids=["wide_batch", "narrow_batch"])
@pytest.mark.parametrize("make_model", [small_mlp, small_convnet, resnet_stem])
def test_lowrank_step_matches_reference_estimator(make_model, rows, schedule, tiny_conv_chunks):
    """Low-rank directions on Linear and Conv2d weights against the estimator with U V^T
    materialised. Dual schedule: the first conv's perturbed stream reuses the base conv and adds
    mu/sqrt(r) U conv(x, V); with 16 rows a later Linear forms W + alpha U V^T (cheaper there), with
    2 rows it runs the fused (x_pert V) U^T kernel. Sequential schedule: each weight is perturbed in
    place by alpha U V^T while its layer runs."""
    model = make_model()
    x, y = batch_for(model)
    batch = (x[:rows], y[:rows])
    updater = ZOUpdater(model, nn.functional.cross_entropy, mu=1e-3, lr=0.05, seed=3, perturbation="lowrank", rank=2,
                        schedule=schedule)
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs <= updater.lowrank_names
    expected = reference_zo_sgd_step(model, batch, seed=updater.direction_seeds(0)[0], mu=1e-3, lr=0.05,
                                     direction=lowrank_reference_direction(updater, 0))
    step_matching_reference(updater, batch, expected, mu=1e-3, lr=0.05)


@pytest.mark.parametrize(("device", "backend"), DEVICE_BACKENDS)
@pytest.mark.parametrize("perturbation", ["full", "lowrank"])
@pytest.mark.parametrize("schedule", ["dual", "sequential"])
def test_step_on_every_device_and_backend_matches_reference(device, backend, perturbation, schedule):
    """The fused step of a conv-bn-relu-conv-bn + FC client on each device and kernel backend (the
    same launchers a GPU client runs; Triton on CPU through the interpreter) against the plain
    estimator on that device."""
    skip_unavailable(device, backend)
    model = resnet_stem().to(device)
    x, y = batch_for(model)
    batch = (x.to(device), y.to(device))
    lowrank = {"perturbation": "lowrank", "rank": 2} if perturbation == "lowrank" else {}
    updater = ZOUpdater(model, nn.functional.cross_entropy, mu=1e-3, lr=0.05, seed=3, backend=backend,
                        schedule=schedule, **lowrank)
    if lowrank:
        direction = {n: d.to(device) for n, d in lowrank_reference_direction(updater, 0).items()}
    else:
        seed = updater.direction_seeds(0)[0]
        direction = {e.name: updater.layout.direction(e.name, seed, device="cpu").to(device) for e in updater.layout}
    expected = reference_zo_sgd_step(model, batch, seed=0, mu=1e-3, lr=0.05, direction=direction)
    result = step_matching_reference(updater, batch, expected, mu=1e-3, lr=0.05)
    assert result.smashed is None
    assert all(value.device.type == device for value in model.state_dict().values())


@pytest.mark.gpu
def test_profile_step_on_cuda_reads_the_allocator():
    model = resnet_stem().cuda()
    x, y = batch_for(model)
    batch = (x.cuda(), y.cuda())
    updaters = {"zo": ZOUpdater(model, nn.functional.cross_entropy, lr=1e-3),
                "fo": FOUpdater(copy.deepcopy(model), nn.functional.cross_entropy, lr=1e-3)}
    profiles = heron.profile_steps(updaters, batch, warmup=1, repeats=1)
    for name, profile in profiles.items():
        assert profile.step_peak_bytes > 0 and profile.flops > 0 and profile.time_s > 0, name
    assert profiles["zo"].step_peak_bytes < profiles["fo"].step_peak_bytes


def test_lowrank_conv_update_has_the_rank():
    model = resnet_stem()
    updater = ZOUpdater(model, nn.functional.cross_entropy, lr=0.01, perturbation="lowrank", rank=2, seed=4)
    before = model[3].weight.detach().clone()
    updater.step(batch_for(model))
    delta = (model[3].weight - before).detach().reshape(4, -1)
    singular = torch.linalg.svdvals(delta.double())
    assert singular[2] < 1e-3 * singular[0]  # rank 2 up to the float32 rounding of W - lr g U V^T


def test_lowrank_adam_moments_keep_the_conv_weight_shape():
    model = resnet_stem()
    updater = ZOUpdater(model, nn.functional.cross_entropy, lr=0.01, perturbation="lowrank", rank=2, seed=4,
                        optimizer="adam")
    updater.step(batch_for(model))
    exp_avg, exp_avg_sq = updater.state_dict()["moments"]["3.weight"]
    assert exp_avg.shape == exp_avg_sq.shape == model[3].weight.shape
    assert exp_avg.abs().sum() > 0


def test_lowrank_rejects_non_contiguous_conv_weight():
    model = resnet_stem().to(memory_format=torch.channels_last)
    updater = ZOUpdater(model, nn.functional.cross_entropy, lr=0.01, perturbation="lowrank", rank=2, seed=4)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"'0.weight'.*contiguous"):
        updater.step(batch_for(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_zo_training_on_digits_beats_chance_quickly():
    from heron.sfl.data import load_dataset

    digits = load_dataset("digits", seed=0)
    x_train, y_train = digits.x_train.flatten(1), digits.y_train
    x_test, y_test = digits.x_test.flatten(1), digits.y_test
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    updater = ZOUpdater(model, nn.functional.cross_entropy, mu=1e-3, lr=3e-3, optimizer="adam", seed=0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        index = torch.randint(len(y_train), (128,), generator=generator)
        updater.step((x_train[index], y_train[index]))
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.75, accuracy  # chance is 0.10


@pytest.mark.parametrize("cls", [FOUpdater, MeZOUpdater, ZOUpdater])
def test_same_interface_and_loss_decreases(cls):
    model = small_convnet()
    batch = batch_for(model)
    lr = 0.05 if cls is FOUpdater else 2e-3  # ZO estimates carry ~d times the gradient's variance
    updater = cls(model, nn.functional.cross_entropy, lr=lr, optimizer="sgd", seed=0, cut="2")
    first = updater.step(batch)
    assert first.smashed.shape == (16, 4, 5, 5)
    losses = [updater.step(batch).loss for _ in range(60 if cls is FOUpdater else 300)]
    assert min(losses[-5:]) < first.loss


class TestBadInput:
    def test_batch_the_model_rejects(self):
        model = small_mlp()
        updater = ZOUpdater(model, nn.functional.cross_entropy, lr=0.1)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=r"the model rejected the batch \(inputs \(4, 7\) torch.float32\)"):
            updater.step((torch.randn(4, 7), torch.zeros(4, dtype=torch.long)))
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k])

    def test_non_scalar_loss(self):
        updater = ZOUpdater(small_mlp(), lambda out, y: out, lr=0.1)
        with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got \(16, 3\)"):
            updater.step(batch_for(small_mlp()))

    @pytest.mark.parametrize("cls", [ZOUpdater, FOUpdater, MeZOUpdater])
    def test_nan_loss_skips_step_and_leaves_model_untouched(self, cls):
        model = small_convnet()
        before = copy.deepcopy(model.state_dict())
        updater = cls(model, lambda out, y: out.sum() * float("nan"), lr=0.1)
        result = updater.step(batch_for(model))
        assert result.skipped and "non-finite" in result.reason
        for k, v in model.state_dict().items():  # MeZO too: its step restores its copy, not the in-place round trip
            assert torch.equal(v, before[k]), k
        assert updater.steps == 0

    def test_unknown_cut(self):
        with pytest.raises(KeyError, match="cut module 'encoder' does not exist"):
            ZOUpdater(small_mlp(), nn.functional.cross_entropy, lr=0.1, cut="encoder")

    def test_mixed_devices(self):
        model = small_mlp()
        model[2].to("meta")
        with pytest.raises(ValueError, match="mixed devices"):
            ZOUpdater(model, nn.functional.cross_entropy, lr=0.1)

    def test_bad_batch_structure(self):
        with pytest.raises(TypeError, match=r"batch must be a pair \(inputs, targets\)"):
            ZOUpdater(small_mlp(), nn.functional.cross_entropy, lr=0.1).step(torch.randn(3, 6))

    @pytest.mark.parametrize(("kwargs", "message"), [
        ({"mu": 0.0}, "mu must be non-zero"), ({"q": 0}, "q must be a positive int"),
        ({"optimizer": "lion"}, "optimizer must be one of"), ({"direction": "cube"}, "direction must be one of"),
        ({"perturbation": "lowrank"}, "needs rank >= 1"), ({"params": ["nope"]}, "params names 'nope'"),
    ])
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises((ValueError, KeyError), match=message):
            ZOUpdater(small_mlp(), nn.functional.cross_entropy, **{"lr": 0.1, **kwargs})


def test_schedules_agree_and_update_statistics_like_the_module(tiny_conv_chunks):
    """dual and sequential compute the same estimate; both leave BatchNorm statistics as one plain
    forward of the module does (equal up to the rounding of batch-chunked convolutions)."""
    model = resnet_stem()
    batch = batch_for(model)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        plain(batch[0])
    results = {}
    for schedule in ("dual", "sequential"):
        work = copy.deepcopy(model)
        updater = ZOUpdater(work, nn.functional.cross_entropy, mu=1e-3, q=2, lr=0.0, seed=4, schedule=schedule)
        results[schedule] = updater.step(batch)
        for name in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var", "4.num_batches_tracked"):
            torch.testing.assert_close(work.state_dict()[name], plain.state_dict()[name], rtol=1e-5, atol=1e-6,
                                       msg=f"{schedule} {name}")
    dual, sequential = results["dual"], results["sequential"]
    assert math.isclose(dual.loss, sequential.loss, rel_tol=1e-6)
    for a, b in zip(dual.projected_grads, sequential.projected_grads, strict=True):
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)


def test_in_place_execution_leaves_inputs_and_smashed_data_intact(tiny_conv_chunks):
    model = resnet_stem()
    x, y = batch_for(model)
    x_before = x.clone()
    for schedule in ("dual", "sequential"):
        updater = ZOUpdater(copy.deepcopy(model), nn.functional.cross_entropy, mu=1e-3, lr=0.0, seed=4,
                            cut="4", schedule=schedule)
        result = updater.step((x, y))
        assert torch.equal(x, x_before), schedule
        with torch.no_grad():
            expected = copy.deepcopy(model)[:5](x)  # base stream up to the cut, before the step's update
        torch.testing.assert_close(result.smashed, expected, msg=schedule)


def test_activation_memory_per_schedule(monkeypatch):
    """Peak step memory in units of one activation map A = (N, C, H, W): the dual schedule holds
    one map per stream (2A), the sequential one a single stream's (1A), plus bounded chunks."""
    monkeypatch.setattr(heron.zo.dual, "_CONV_CHUNK_BYTES", 1 << 16)  # A is 1 MiB here
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Flatten(),
                          nn.Linear(16 * 16 * 16, 10))
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    activation = 64 * 16 * 16 * 16 * 4
    peaks = {}
    for schedule in ("dual", "sequential"):
        updater = ZOUpdater(model, nn.functional.cross_entropy, mu=1e-3, lr=1e-3, seed=0, cut="4", schedule=schedule)
        updater.step((x, y))
        peaks[schedule] = heron.profile_step(updater, (x, y), warmup=0, repeats=1).step_peak_bytes / activation
    assert peaks["dual"] < 2.3, peaks
    assert peaks["sequential"] < 1.3, peaks


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        ZOUpdater(small_mlp(), nn.functional.cross_entropy, lr=1e-3, schedule="interleaved")


def test_schedules_agree_on_lowrank_directions(tiny_conv_chunks):
    """The two schedules take the same low-rank directions (same U subspace, same V) for q = 2."""
    model = resnet_stem()
    batch = batch_for(model)
    results = {}
    for schedule in ("dual", "sequential"):
        updater = ZOUpdater(copy.deepcopy(model), nn.functional.cross_entropy, mu=1e-3, q=2, lr=0.0, seed=4,
                            perturbation="lowrank", rank=2, schedule=schedule)
        results[schedule] = updater.step(batch)
    dual, sequential = results["dual"], results["sequential"]
    assert dual.seeds == sequential.seeds
    assert math.isclose(dual.loss, sequential.loss, rel_tol=1e-6)
    for a, b in zip(dual.projected_grads, sequential.projected_grads, strict=True):
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4)


def test_zo_state_dict_round_trip_and_unknown_parameters():
    model = small_mlp()
    batch = batch_for(model)
    updater = ZOUpdater(model, nn.functional.cross_entropy, lr=1e-3, optimizer="adam", seed=1)
    updater.step(batch)
    state = updater.state_dict()
    other = ZOUpdater(copy.deepcopy(model), nn.functional.cross_entropy, lr=1e-3, optimizer="adam", seed=1)
    other.load_state_dict(state)
    assert other.steps == 1
    for name, (m, v) in updater.state.items():
        assert torch.equal(other.state[name][0], m) and torch.equal(other.state[name][1], v)
    bad = {"steps": 1, "moments": {"9.weight": (torch.zeros(1), torch.zeros(1))}}
    with pytest.raises(ValueError, match="9.weight"):
        other.load_state_dict(bad)


def test_same_shape_convolution_is_written_over_its_input_below_four_chunks():
    """The main job's client (cnn, batch 64: 6.4 MB activations, under 4 chunks of _CONV_CHUNK_BYTES):
    its second convolution keeps its input's shape, so each stream's output is written over that
    stream's input in chunks. The dual step then peaks at its first convolution: the two streams'
    outputs of a shared input plus the convolution's own output-sized transient, three activations;
    a second convolution computed whole would add a fourth."""
    from heron.profiling.memory import peak_memory
    from heron.sfl.config import TrainConfig
    from heron.sfl.engine import Experiment

    config = TrainConfig(model="cnn", dataset="digits", clients=2, rounds=1, local_steps=1, batch_size=64, seed=0,
                         method="heron")
    updater = Experiment(config).clients[0].updater
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(64, 1, 28, 28, generator=generator), torch.randint(0, 10, (64,), generator=generator)
    conv = updater.model[0][3]
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == conv.out_channels
    activation = 64 * conv.out_channels * 28 * 28 * 4
    assert activation <= 4 * heron.zo.dual._CONV_CHUNK_BYTES
    updater.step(batch)
    _, peak = peak_memory(lambda: updater.step(batch))
    assert peak < 3.5 * activation, (peak, activation)
