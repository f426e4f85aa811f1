"""A step that raises or is skipped changes nothing: every updater (ZOUpdater in both schedules,
FOUpdater, MeZOUpdater; SGD and Adam) is driven through each failure kind, and afterwards the
model's parameters and buffers and the updater's state are bit-identical to before. Arguments
that cannot work are refused when the updater is built."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from heron.zo.updaters import FOUpdater, MeZOUpdater, ZOUpdater

UPDATERS: dict[str, Callable[..., object]] = {
    "zo-dual": ZOUpdater, "zo-sequential": lambda *a, **k: ZOUpdater(*a, schedule="sequential", **k),
    "fo": FOUpdater, "mezo": MeZOUpdater,
}
LR = {"zo-dual": 1e-3, "zo-sequential": 1e-3, "fo": 0.05, "mezo": 1e-3}


def bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def batch(rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(rows, 6, generator=generator), torch.randint(0, 3, (rows,), generator=generator)


def snapshot(model: nn.Module, updater) -> tuple[dict, object, int]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(updater.state_dict()), updater.steps


def assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def trained_updater(kind: str, optimizer: str, loss_fn: Callable | None = None, model: nn.Module | None = None):
    """An updater on bn_mlp after one good step (so Adam moments and BatchNorm statistics are non-trivial),
    whose later steps use loss_fn."""
    model = bn_mlp() if model is None else model
    calls = {"n": 0}

    def loss(out, y):
        calls["n"] += 1
        return nn.functional.cross_entropy(out, y) if calls["n"] <= calls.get("good", 10**9) else loss_fn(out, y)

    updater = UPDATERS[kind](model, loss, lr=LR[kind], optimizer=optimizer, seed=3)
    updater.step(batch())
    calls["good"] = calls["n"]  # from now on, loss_fn
    return model, updater


def _nan_loss(out, y):
    return out.sum() * float("nan")


def _huge_loss(out, y):
    return nn.functional.cross_entropy(out, y).double() * 1e300


def _raising_loss(out, y):
    raise RuntimeError("the loss failed")


KINDS = list(UPDATERS)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", KINDS)
class TestFailedStepChangesNothing:
    def test_nan_loss(self, kind, optimizer):
        model, updater = trained_updater(kind, optimizer, _nan_loss)
        before = snapshot(model, updater)
        result = updater.step(batch())
        assert result.skipped and "non-finite" in result.reason
        assert_same(snapshot(model, updater), before)

    def test_exception_in_the_loss(self, kind, optimizer):
        model, updater = trained_updater(kind, optimizer, _raising_loss)
        before = snapshot(model, updater)
        with pytest.raises(RuntimeError, match="the loss failed"):
            updater.step(batch())
        assert_same(snapshot(model, updater), before)

    def test_estimate_beyond_float32(self, kind, optimizer):
        """Finite losses (float64) whose gradient or projected gradient is not finite in float32, the
        precision of the parameters and the update kernels: skipped, as a non-finite loss is."""
        model, updater = trained_updater(kind, optimizer, _huge_loss)
        before = snapshot(model, updater)
        result = updater.step(batch())
        assert result.skipped and "non-finite" in result.reason, result.reason
        assert_same(snapshot(model, updater), before)

    def test_batch_of_one_through_batchnorm(self, kind, optimizer):
        model, updater = trained_updater(kind, optimizer, nn.functional.cross_entropy)
        before = snapshot(model, updater)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            updater.step(batch(rows=1))
        assert_same(snapshot(model, updater), before)
        assert all(torch.isfinite(b).all() for b in model.buffers())

    @pytest.mark.parametrize("betas", [(1.5, 0.999), (0.9, -0.1), (float("nan"), 0.9)])
    def test_bad_betas_refused_when_built(self, kind, optimizer, betas):
        with pytest.raises(ValueError, match="betas"):
            UPDATERS[kind](bn_mlp(), nn.functional.cross_entropy, lr=LR[kind], optimizer=optimizer, betas=betas)

    @pytest.mark.parametrize("eps", [-1.0, float("inf")])
    def test_bad_eps_refused_when_built(self, kind, optimizer, eps):
        with pytest.raises(ValueError, match="eps"):
            UPDATERS[kind](bn_mlp(), nn.functional.cross_entropy, lr=LR[kind], optimizer=optimizer, eps=eps)


def _moment_edits():
    """(name, edit of one moment tensor) that make a loaded optimizer state unusable."""
    return [("wrong shape", lambda t: t.reshape(-1)[:-1].clone()),
            ("float64", lambda t: t.double()),
            ("transposed", lambda t: t.t()),  # the first parameter is an (8, 6) weight
            ("NaN", lambda t: t.clone().fill_(float("nan"))),
            ("negative second moment", None)]


def _edit_moments(kind: str, state: dict, edit: Callable, which: int) -> dict:
    """state with the first parameter's moment `which` (0: exp_avg, 1: exp_avg_sq) edited."""
    state = copy.deepcopy(state)
    if kind.startswith("zo"):
        name = next(iter(state["moments"]))
        moments = list(state["moments"][name])
        moments[which] = edit(moments[which])
        state["moments"][name] = tuple(moments)
    else:
        slot = state["optimizer"]["state"][0]
        key = ("exp_avg", "exp_avg_sq")[which]
        slot[key] = edit(slot[key])
    return state


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("edit_name", "edit"), _moment_edits())
def test_bad_moments_refused_by_load_state_dict(kind, edit_name, edit):
    model, updater = trained_updater(kind, "adam", nn.functional.cross_entropy)
    which = 1 if edit is None else 0
    edit = edit or (lambda t: t.clone().fill_(-1.0))
    bad = _edit_moments(kind, updater.state_dict(), edit, which)
    before = snapshot(model, updater)
    with pytest.raises(ValueError, match="exp_avg"):
        updater.load_state_dict(bad)
    assert_same(snapshot(model, updater), before)
    updater.step(batch())  # still usable


@pytest.mark.parametrize("kind", KINDS)
def test_moments_with_other_strides_load_as_their_values(kind):
    """A moment of the right shape in another memory layout is the same state: it loads, contiguously."""
    model, updater = trained_updater(kind, "adam", nn.functional.cross_entropy)
    state = updater.state_dict()
    strided = _edit_moments(kind, state, lambda t: t.t().contiguous().t(), 0)
    twin_model, twin = trained_updater(kind, "adam", nn.functional.cross_entropy)
    twin.load_state_dict(strided)
    assert_same(twin.state_dict(), state)
    assert_same(twin_model.state_dict(), model.state_dict())


@pytest.mark.parametrize("kind", ["zo-dual", "zo-sequential"])
def test_mixed_precision_parameters_refused_before_anything_changes(kind):
    """The ZO kernels take float32/bfloat16/float16 parameters: a float64 one is refused when the updater is
    built, and if a parameter becomes float64 later, at the next step before the forward."""
    model = bn_mlp()
    model[3].double()
    with pytest.raises(TypeError, match=r"parameter '3.weight' has dtype torch.float64"):
        UPDATERS[kind](model, nn.functional.cross_entropy, lr=1e-3)
    model, updater = trained_updater(kind, "adam", nn.functional.cross_entropy)
    model[3].double()
    before = snapshot(model, updater)
    with pytest.raises(TypeError, match=r"parameter '3.weight' has dtype torch.float64"):
        updater.step(batch())
    assert_same(snapshot(model, updater), before)


@pytest.mark.parametrize("kind", ["fo", "mezo"])
def test_mixed_precision_parameters_train_with_torch_optimizers(kind):
    """FO and MeZO update each parameter with torch in its own dtype: a float64 layer is valid input there."""
    model = bn_mlp()
    model[3].double()
    model[3].register_forward_pre_hook(lambda module, args: (args[0].double(),))
    before = copy.deepcopy(model.state_dict())
    updater = UPDATERS[kind](model, lambda out, y: nn.functional.cross_entropy(out.float(), y), lr=LR[kind])
    result = updater.step(batch())
    assert not result.skipped and model[3].weight.dtype == torch.float64
    assert not torch.equal(model[3].weight, before["3.weight"])


@pytest.mark.parametrize("kind", ["fo", "mezo"])
def test_unknown_keyword_arguments_refused(kind):
    with pytest.raises(TypeError, match="unexpected keyword argument 'lazy_step'"):
        UPDATERS[kind](bn_mlp(), nn.functional.cross_entropy, lr=0.1, lazy_step=3)


@pytest.mark.parametrize("lazy_steps", [0, -7, 1.5, True])
def test_lazy_steps_must_be_a_positive_int(lazy_steps):
    with pytest.raises((ValueError, TypeError), match="lazy_steps must be a positive int"):
        ZOUpdater(bn_mlp(), nn.functional.cross_entropy, lr=0.1, perturbation="lowrank", rank=2, lazy_steps=lazy_steps)


@pytest.mark.parametrize("q", [0, -1, 1.0, True])
def test_mezo_q_must_be_a_positive_int(q):
    with pytest.raises(ValueError, match="q must be a positive int"):
        MeZOUpdater(bn_mlp(), nn.functional.cross_entropy, lr=0.1, q=q)
