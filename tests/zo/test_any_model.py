"""The ZO step on any nn.Module: the layer patterns of third-party vision code (timm's, written out
in tests/zo/third_party.py), Hugging Face models from small configs, bare and under PEFT LoRA, and the
pretrained MiniLM.

Each projected gradient is checked against the estimator written plainly: the step's direction
materialised, L(theta + mu u) and L(theta) evaluated through torch.func.functional_call from the
step's random-generator state (so dropout draws the same masks), g = (difference) / mu. The two
sides compute the same finite difference of the same function; they differ only by float32
rounding, bounded in `rounding_tolerance`.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from heron.zo.generic import StreamError
from heron.zo.updaters import FOUpdater, MeZOUpdater, ZOUpdater
from tests.helpers import reference_direction, rounding_tolerance
from tests.zo import third_party as tp

MU = 1e-2


# The parameter(s) each pattern is about.
PATTERN_PARAMS = {
    "vit-root-tokens": ["cls_token", "pos_embed"],
    "layer-scale": ["stages.0.gamma", "stages.0.fc1.weight"],
    "batchnorm-act": ["features.1.weight", "features.3.bias"],
    "linear-subclass": ["net.2.weight"],
    "multihead-attention": ["attn.out_proj.weight", "attn.in_proj_weight"],
    "tied-head": ["embed.weight"],
    "root-parameter": ["scale"],
}


# -- the reference ----------------------------------------------------------------------------------

def split(batch):
    inputs, targets = batch
    if isinstance(inputs, dict):
        return (), inputs, targets
    return (inputs if isinstance(inputs, tuple) else (inputs,)), {}, targets


def reference_gradient(model: nn.Module, loss_fn, batch, direction: dict[str, torch.Tensor], mu: float,
                       rng_state: torch.Tensor) -> tuple[float, list[float]]:
    """(L(theta + mu u) - L(theta)) / mu written plainly, each loss of a copy of the model through
    torch.func.functional_call from the generator state `rng_state`. Returns (g, [L(theta), L(theta + mu u)])."""
    args, kwargs, targets = split(batch)
    losses = []
    for scale in (0.0, mu):
        work = copy.deepcopy(model)
        params = {n: p.detach() + scale * direction[n] if n in direction else p.detach()
                  for n, p in work.named_parameters()}
        torch.set_rng_state(rng_state)
        with torch.no_grad():
            losses.append(float(loss_fn(functional_call(work, params, args, kwargs), targets)))
    return (losses[1] - losses[0]) / mu, losses


def check_step_against_reference(model: nn.Module, loss_fn, batch, mu: float = MU, seed: int = 5,
                                 **kwargs) -> ZOUpdater:
    """One step with lr 0: g equals the reference within rounding_tolerance (and is not buried in
    it), and the parameters come back bit for bit."""
    updater = ZOUpdater(model, loss_fn, mu=mu, lr=0.0, seed=seed, **kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    direction = reference_direction(updater)
    state = torch.get_rng_state()
    expected, losses = reference_gradient(model, loss_fn, batch, direction, mu, state)
    torch.set_rng_state(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unread-parameter warnings are tested on their own
        result = updater.step(batch)
    assert not result.skipped, result.reason
    tolerance = rounding_tolerance(model, losses, mu)
    assert abs(expected) > 5 * tolerance, (expected, tolerance)  # the check can fail
    assert abs(result.projected_grads[0] - expected) <= tolerance, (result.projected_grads[0], expected, tolerance)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    return updater


@pytest.mark.parametrize("perturbation", ["full", "lowrank"])
@pytest.mark.parametrize("schedule", ["dual", "sequential"])
@pytest.mark.parametrize("executor", ["auto", "generic"])
@pytest.mark.parametrize("pattern", tp.PATTERNS)
def test_pattern_gradient_matches_functional_call(pattern, executor, schedule, perturbation):
    work = tp.pattern(pattern)
    lowrank = {"perturbation": "lowrank", "rank": 2} if perturbation == "lowrank" else {}
    check_step_against_reference(work.model, work.loss_fn, work.batch, schedule=schedule, executor=executor, **lowrank)


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
@pytest.mark.parametrize("pattern", tp.PATTERNS)
def test_pattern_parameter_alone_is_perturbed(pattern, schedule):
    """Training only the pattern's own parameters (a root-level cls_token, a layer-scale gamma and
    its block's children, MultiheadAttention's out_proj, a tied embedding, ...): the estimate is
    theirs, not 0 and not another layer's. A few parameters move the loss little, so mu is larger
    (the comparison is of the same finite difference for any mu)."""
    work = tp.pattern(pattern)
    check_step_against_reference(work.model, work.loss_fn, work.batch, mu=0.3, params=PATTERN_PARAMS[pattern],
                                 schedule=schedule)


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
@pytest.mark.parametrize("pattern", ["vit-root-tokens", "batchnorm-act", "tied-head", "multihead-attention"])
def test_pattern_replay_is_bit_identical(pattern, schedule):
    check_replay(tp.pattern(pattern), schedule, perturbation="lowrank", rank=2)


def check_replay(work: tp.Workload, schedule: str, **kwargs) -> None:
    """Two Adam steps of a client; a replica replays them from (step, seeds, scalars): bit-identical."""
    replica = copy.deepcopy(work.model)
    client = ZOUpdater(work.model, work.loss_fn, lr=1e-3, optimizer="adam", seed=7, schedule=schedule, **kwargs)
    replayer = ZOUpdater(replica, work.loss_fn, lr=1e-3, optimizer="adam", seed=7, schedule=schedule, **kwargs)
    for _ in range(2):
        result = client.step(work.batch)
        replayer.apply(result.step, result.seeds, result.projected_grads)
    for (name, p), (_, r) in zip(work.model.named_parameters(), replica.named_parameters(), strict=True):
        assert torch.equal(p, r), name


def test_batchnorm_subclass_statistics_follow_the_base_stream():
    """A BatchNorm subclass run by its own forward: after a step (dual or sequential, two
    directions) its running statistics equal those of one plain forward, bit for bit."""
    work = tp.pattern("batchnorm-act")
    plain = copy.deepcopy(work.model)
    state = torch.get_rng_state()
    with torch.no_grad():
        plain(work.batch[0])
    for schedule in ("dual", "sequential"):
        model = copy.deepcopy(work.model)
        torch.set_rng_state(state)
        ZOUpdater(model, work.loss_fn, lr=0.0, q=2, schedule=schedule).step(work.batch)
        for key, value in plain.state_dict().items():
            if "running" in key or "num_batches" in key:
                assert torch.equal(model.state_dict()[key], value), (schedule, key)


def test_step_leaves_the_generator_where_one_forward_does():
    work = tp.pattern("vit-root-tokens")
    state = torch.get_rng_state()
    with torch.no_grad():
        copy.deepcopy(work.model)(work.batch[0])
    after_one_forward = torch.get_rng_state()
    for schedule in ("dual", "sequential"):
        torch.set_rng_state(state)
        ZOUpdater(copy.deepcopy(work.model), work.loss_fn, lr=0.0, q=2, schedule=schedule).step(work.batch)
        assert torch.equal(torch.get_rng_state(), after_one_forward), schedule


# -- Hugging Face and PEFT ------------------------------------------------------------------------

pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.mark.parametrize("perturbation", ["full", "lowrank"])
@pytest.mark.parametrize("schedule", ["dual", "sequential"])
@pytest.mark.parametrize("lora", [False, True], ids=["bare", "peft-lora"])
@pytest.mark.parametrize("name", tp.HF_MODELS)
def test_hugging_face_gradient_matches_functional_call(name, lora, schedule, perturbation):
    work = tp.hugging_face(name, lora)
    lowrank = {"perturbation": "lowrank", "rank": 2} if perturbation == "lowrank" else {}
    # Seed 6: under stream version 2, seed 5's full direction is nearly orthogonal to the PEFT LoRA
    # models' gradient (|g| only 2-4x the rounding bound, too close to it for the check to mean much).
    updater = check_step_against_reference(work.model, work.loss_fn, work.batch, mu=0.1, seed=6,
                                           schedule=schedule, **lowrank)
    assert updater.executor == "generic"
    if lora:
        assert updater.param_names and all("lora_" in n or "classifier.modules_to_save" in n
                                           for n in updater.param_names)


@pytest.mark.parametrize("name", tp.HF_MODELS)
def test_hugging_face_replay_is_bit_identical(name):
    check_replay(tp.hugging_face(name, lora=True), "dual")


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
@pytest.mark.parametrize("lora", [False, True], ids=["bare", "peft-lora"])
def test_pretrained_minilm_gradient_matches_functional_call(lora, schedule):
    work = tp.minilm(lora)
    check_step_against_reference(work.model, work.loss_fn, work.batch, mu=0.1, schedule=schedule)


def test_hugging_face_fine_tuning_lowers_the_loss():
    """The README's example: a PEFT LoRA GPT-2 (small config) trained with ZOUpdater on one batch."""
    work = tp.hugging_face("gpt2", lora=True)
    updater = ZOUpdater(work.model, work.loss_fn, mu=1e-3, lr=1e-2, optimizer="adam", seed=0)
    work.model.eval()  # deterministic losses to compare
    first = updater.step(work.batch).loss
    losses = [updater.step(work.batch).loss for _ in range(30)]
    assert min(losses[-5:]) < first - 0.01, (first, losses[-5:])


# -- outputs, dropout, what the dual stream refuses --------------------------------------------------

class BranchOnValue(nn.Module):
    """Python control flow on a value computed from parameters."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if float(y.sum()) > 0 else y


class WritesIntoBuffer(nn.Module):
    """An in-place write of a parameter-dependent value into a tensor made outside the computation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        out = torch.zeros(x.shape[0], 5)
        out[:, :] = self.fc(x)
        return out


@pytest.mark.parametrize("make", [BranchOnValue, WritesIntoBuffer])
def test_what_one_dual_forward_cannot_run_is_refused_and_sequential_runs_it(make):
    torch.manual_seed(0)
    model = make()
    batch = (tp.vectors(6, 12), tp.labels(6))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(StreamError, match="schedule='sequential'"):
        ZOUpdater(model, tp.logits_loss, lr=0.1, executor="generic").step(batch)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    check_step_against_reference(model, tp.logits_loss, batch, schedule="sequential", executor="generic")


class KeepsActivation(nn.Module):
    """Stores an activation on itself during the forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)
        self.last = None

    def forward(self, x):
        self.last = self.fc(x)
        return self.last


def test_a_perturbed_value_kept_past_the_step_fails_loudly():
    torch.manual_seed(0)
    model = KeepsActivation()
    ZOUpdater(model, tp.logits_loss, lr=0.1, executor="generic").step((tp.vectors(6, 12), tp.labels(6)))
    with pytest.raises(StreamError, match="kept beyond the step's forward"):
        model.last + 1


# -- coverage and the plan ---------------------------------------------------------------------------

def test_coverage_refuses_parameters_no_executor_sees():
    model = nn.Sequential(nn.Linear(12, 8), torch.jit.script(nn.Linear(8, 5)))
    with pytest.raises(TypeError, match=r"'1.weight'.*TorchScript"):
        ZOUpdater(model, tp.logits_loss, lr=0.1)
    model = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 5).double())
    with pytest.raises(TypeError, match=r"'1.weight' has dtype torch.float64"):
        ZOUpdater(model, tp.logits_loss, lr=0.1)
    with pytest.raises(ValueError, match=r"'0.weight' is uninitialised"):
        ZOUpdater(nn.Sequential(nn.LazyLinear(5)), tp.logits_loss, lr=0.1)


def test_plan_says_which_layers_run_fused_and_which_generically():
    work = tp.pattern("batchnorm-act")
    updater = ZOUpdater(work.model, work.loss_fn, lr=0.1)
    plan = updater.plan()
    assert plan.executor == "fx"
    rows = {row.module: row for row in plan.rows}
    assert rows["head"].route == "fused linear"
    assert rows["features.0"].route == "conv"
    assert rows["features.1"].route == "generic" and "own forward" in rows["features.1"].why
    updater.step(work.batch)
    plan = updater.plan()
    assert plan.reads["head.weight"] == ["linear on a perturbed copy"]  # 6 rows, 5 outputs: copy_cheaper
    assert plan.reads["features.1.weight"] == ["copy"]
    assert not plan.unread
    assert "BatchNormAct2d x2 (features.1, features.3): generic, 4 parameter(s)" in str(plan)


def test_plan_of_a_model_fx_cannot_trace():
    work = tp.hugging_face("gpt2", lora=True)
    updater = ZOUpdater(work.model, work.loss_fn, lr=0.1)
    plan = updater.plan()
    assert plan.executor == "generic" and "torch.fx cannot trace" in plan.reason
    updater.step(work.batch)
    reads = updater.plan().reads
    # lora_A (8 outputs) runs on a copy for the 32 input rows, lora_B (96 outputs) through the fused kernel
    assert {tuple(r) for n, r in reads.items() if "lora_A" in n} == {("linear on a perturbed copy",)}, reads
    assert {tuple(r) for n, r in reads.items() if "lora_B" in n} == {("fused linear",)}, reads


def test_unread_trainable_parameter_is_reported():
    work = tp.pattern("root-parameter")
    work.model.unused = nn.Linear(3, 3)
    updater = ZOUpdater(work.model, work.loss_fn, lr=0.1)
    with pytest.warns(UserWarning, match=r"did not read trainable parameter\(s\) \['unused.weight', 'unused.bias'\]"):
        updater.step(work.batch)
    assert updater.plan().unread == ["unused.weight", "unused.bias"]


def test_executor_fx_refuses_an_untraceable_model():
    with pytest.raises(TypeError, match="cannot be traced by torch.fx"):
        ZOUpdater(BranchOnValue(), tp.logits_loss, lr=0.1, executor="fx")


def test_baselines_take_keyword_inputs_and_structured_outputs():
    for cls in (FOUpdater, MeZOUpdater):
        work = tp.hugging_face("bert", lora=True)
        result = cls(work.model, work.loss_fn, lr=1e-3, cut="base_model.model.bert.encoder.layer.0").step(work.batch)
        assert math.isfinite(result.loss)
        assert isinstance(result.smashed, torch.Tensor) and result.smashed.shape[-1] == 32


def test_smashed_data_of_a_structured_cut_output_is_the_base_stream():
    work = tp.hugging_face("llama", lora=True)
    model = work.model
    cut = "base_model.model.model.layers.0"
    captured = {}
    handle = dict(model.named_modules())[cut].register_forward_hook(
        lambda module, args, out: captured.setdefault("out", out))
    model.eval()
    with torch.no_grad():
        model(**work.batch[0])
    handle.remove()
    result = ZOUpdater(model, work.loss_fn, lr=0.0, cut=cut).step(work.batch)
    torch.testing.assert_close(result.smashed, captured["out"])


def test_gpt2_conv1d_weights_take_low_rank_directions():
    """Hugging Face GPT-2's projections are transformers' Conv1D (weight (in, out), y = x W + b):
    with perturbation="lowrank" they take low-rank directions on their stored (in, out) matrix like
    Linear weights on theirs (the gradient checks above follow updater.lowrank_names), and the plan
    says so."""
    work = tp.hugging_face("gpt2", False)
    updater = ZOUpdater(work.model, work.loss_fn, lr=0.0, perturbation="lowrank", rank=2)
    conv1d = {n for n, m in work.model.named_modules() if type(m).__name__ == "Conv1D"}
    assert conv1d and {f"{n}.weight" for n in conv1d} <= updater.lowrank_names
    assert f"{len(updater.lowrank_names)} Linear/Conv1D/Conv2d weights" in updater.plan().perturbation


# -- executor="in_place": MeZO's access pattern (every trainable parameter written in place for the
# perturbed pass, restored from a copy), with heron's direction, estimate and fused update --------

@pytest.mark.parametrize("perturbation", ["full", "lowrank"])
@pytest.mark.parametrize("pattern", tp.PATTERNS)
def test_in_place_executor_gradient_matches_functional_call(pattern, perturbation):
    work = tp.pattern(pattern)
    lowrank = {"perturbation": "lowrank", "rank": 2} if perturbation == "lowrank" else {}
    updater = check_step_against_reference(work.model, work.loss_fn, work.batch, schedule="sequential",
                                           executor="in_place", **lowrank)
    assert updater.executor == "in_place"
    assert {name for name, routes in updater.plan().reads.items() if "in place" in routes} == set(updater.param_names)


@pytest.mark.parametrize("lora", [False, True], ids=["bare", "peft-lora"])
@pytest.mark.parametrize("name", tp.HF_MODELS)
def test_in_place_executor_on_hugging_face_matches_functional_call(name, lora):
    pytest.importorskip("peft")
    work = tp.hugging_face(name, lora)
    check_step_against_reference(work.model, work.loss_fn, work.batch, mu=0.1, seed=6, schedule="sequential",
                                 executor="in_place")


@pytest.mark.parametrize("pattern", ["batchnorm-act", "tied-head", "root-parameter"])
def test_in_place_executor_replay_is_bit_identical(pattern):
    check_replay(tp.pattern(pattern), "sequential", executor="in_place")


def test_in_place_executor_statistics_follow_the_base_stream():
    work = tp.pattern("batchnorm-act")
    plain = copy.deepcopy(work.model)
    state = torch.get_rng_state()
    with torch.no_grad():
        plain(work.batch[0])
    torch.set_rng_state(state)
    model = copy.deepcopy(work.model)
    ZOUpdater(model, work.loss_fn, lr=0.0, q=2, schedule="sequential", executor="in_place").step(work.batch)
    for key, value in plain.state_dict().items():
        if "running" in key or "num_batches" in key:
            assert torch.equal(model.state_dict()[key], value), key


def test_in_place_executor_takes_the_sequential_schedule_only():
    work = tp.pattern("layer-scale")
    before = {n: p.detach().clone() for n, p in work.model.named_parameters()}
    with pytest.raises(ValueError, match="executor='in_place' runs one stream at a time: pass schedule='sequential'"):
        ZOUpdater(work.model, work.loss_fn, lr=0.1, executor="in_place")
    assert all(torch.equal(p, before[n]) for n, p in work.model.named_parameters())


def test_in_place_executor_restores_the_parameters_when_the_forward_fails():
    """A forward that raises inside the perturbed pass leaves every parameter as it was, bit for bit."""
    work = tp.pattern("root-parameter")
    before = {n: p.detach().clone() for n, p in work.model.named_parameters()}
    calls = []

    def failing_loss(out, y):
        calls.append(1)
        if len(calls) == 1:  # the perturbed pass runs first
            raise RuntimeError("boom")
        return work.loss_fn(out, y)

    updater = ZOUpdater(work.model, failing_loss, lr=0.1, schedule="sequential", executor="in_place")
    with pytest.raises(RuntimeError, match="boom"):
        updater.step(work.batch)
    assert all(torch.equal(p, before[n]) for n, p in work.model.named_parameters())
