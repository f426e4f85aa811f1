"""Seed-and-scalar uploads: `apply` replays `step` bit for bit, the server's replica rebuilds a
client's state exactly over rounds, the engine's seeds mode equals its parameters mode, resume,
and bad input."""

from __future__ import annotations

import copy
import inspect
import itertools
from dataclasses import replace

import pytest
import torch
from torch import nn

from heron.models import cnn_split
from heron.sfl import checkpoint as ckpt
from heron.sfl.config import TrainConfig
from heron.sfl.data import load_dataset
from heron.sfl.engine import Experiment
from heron.sfl.replay import (
    ClientReplica,
    SeedScalarUpload,
    check_client_upload,
    replica_arguments,
    seed_scalar_upload,
    state_keys,
)
from heron.sfl.roles import Client, ClientBatches, state_bytes
from heron.zo.updaters import MeZOUpdater, ZOUpdater
from tests.sfl.runs import assert_resume_equals_uninterrupted, run_parameters
from tests.zo.test_updaters import resnet_stem

SMALL = TrainConfig(model="cnn", dataset="digits", clients=3, rounds=2, local_steps=3, batch_size=32, seed=0)


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(100, 8), nn.Tanh(), nn.Linear(8, 3))


def nan_on_calls(*calls: int):
    """cross_entropy, except NaN on the given (1-based) calls: those steps are skipped."""
    count = {"n": 0}

    def loss_fn(out, target):
        count["n"] += 1
        loss = nn.functional.cross_entropy(out, target)
        return loss * float("nan") if count["n"] in calls else loss

    return loss_fn


VARIANTS = [dict(optimizer=o, q=q, weight_decay=wd)
            for o, q, wd in itertools.product(("sgd", "adam", "adamw"), (1, 3), (0.0, 0.01))]
VARIANTS += [dict(optimizer="adam", q=2, direction="sphere"),
             dict(optimizer="adam", q=2, perturbation="lowrank", rank=2, lazy_steps=2),
             dict(optimizer="sgd", q=1, perturbation="lowrank", rank=2, lazy_steps=3, weight_decay=0.01)]


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
@pytest.mark.parametrize("make_model", [bn_net, resnet_stem])
@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_apply_replays_step_bit_exactly(kwargs, make_model, schedule):
    """The one replay test: the client's steps (one skipped for a NaN loss), whatever its schedule, replayed
    by `apply` on a copy of the initial model: identical parameters, optimizer moments and step count.
    Models: conv-bn-relu-linear, and a conv-bn-relu-conv-bn stem whose second conv the executor computes
    in place in batch chunks; directions full, on the sphere and low-rank (a lazy subspace on the convs)."""
    model = make_model()
    copy_ = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 2, 5, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    q = kwargs["q"]
    client = ZOUpdater(model, nan_on_calls(2 * q + 1), mu=1e-3, lr=0.01, seed=7, schedule=schedule,
                       **kwargs)  # step 2 is NaN
    replayer = ZOUpdater(copy_, nn.functional.cross_entropy, mu=1e-3, lr=0.01, seed=7, **kwargs)
    skipped = 0
    for _ in range(5):
        result = client.step((x, y))
        if result.skipped:
            skipped += 1
            continue
        replayer.apply(result.step, result.seeds, result.projected_grads)
    assert skipped == 1 and client.steps == replayer.steps == 4
    for (name, p), r in zip(model.named_parameters(), copy_.parameters(), strict=True):
        assert torch.equal(p, r), name
    assert client.state.keys() == replayer.state.keys()
    for name, (m, v) in client.state.items():
        assert torch.equal(m, replayer.state[name][0]) and torch.equal(v, replayer.state[name][1]), name


def test_state_keys_split_trained_frozen_and_buffers():
    model = bn_net()
    model[4].requires_grad_(False)
    updater = ZOUpdater(model, nn.functional.cross_entropy, lr=0.1)
    keys = state_keys(model, updater.param_names)
    assert keys.trained == ("0.weight", "0.bias", "1.weight", "1.bias", "6.weight", "6.bias")
    assert keys.frozen == ("4.weight", "4.bias")
    assert keys.buffers == ("1.running_mean", "1.running_var", "1.num_batches_tracked")


def test_replica_arguments_cover_the_updater_constructor():
    """A new ZOUpdater argument must be mirrored by replicas (or the replay could silently differ)."""
    updater = ZOUpdater(bn_net(), nn.functional.cross_entropy, lr=0.1)
    constructor = set(inspect.signature(ZOUpdater).parameters) - {"model", "loss_fn", "cut"}
    assert set(replica_arguments(updater)) == constructor


def _digits_client(optimizer: str, q: int, updater_class: type = ZOUpdater) -> Client:
    digits = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = cnn_split(1, 10, 8, width=8).client_with_aux()
    updater = updater_class(model, nn.functional.cross_entropy, mu=1e-3, q=q, optimizer=optimizer, lr=1e-3, seed=11,
                            cut="0")
    batches = ClientBatches(digits.x_train[:300], digits.y_train[:300], 32, seed=0, client_id=2)
    return Client(2, model, updater, batches, local_steps=4, upload_every=2)


@pytest.mark.parametrize("optimizer,q", [("sgd", 1), ("sgd", 3), ("adam", 1), ("adam", 3)])
def test_replica_rebuilds_client_state_bit_for_bit_over_rounds(optimizer, q):
    client = _digits_client(optimizer, q)
    replica = ClientReplica.from_updater(client.updater, client_id=2)
    broadcast = {k: v.clone() for k, v in client.model.state_dict().items()}
    for round_index in range(3):
        client.set_state(broadcast)
        result = client.run_round(round_index)
        wire = seed_scalar_upload(client, result).to_tensors()
        assert set(wire) == {"client_id", "stream_version", "step", "seeds", "projected_grads",
                             "buffer/0.1.running_mean", "buffer/0.1.running_var", "buffer/0.1.num_batches_tracked",
                             "buffer/0.4.running_mean", "buffer/0.4.running_var", "buffer/0.4.num_batches_tracked"}
        upload = SeedScalarUpload.from_tensors(wire, expected_buffers=replica.expected_buffers)
        rebuilt = replica.rebuild(broadcast, upload)
        assert rebuilt.keys() == result.state.keys()
        for key, value in result.state.items():
            assert torch.equal(rebuilt[key], value), (round_index, key)
        assert replica.updater.steps == client.updater.steps == 4 * (round_index + 1)
        for name, (m, v) in client.updater.state.items():
            assert torch.equal(replica.updater.state[name][0], m) and torch.equal(replica.updater.state[name][1], v)
        # the next broadcast, as FedAvg would make it: not the client's own end state
        broadcast = {k: (0.5 * (v + broadcast[k]) if v.is_floating_point() else v) for k, v in result.state.items()}


def test_replica_state_dict_round_trip_keeps_it_in_sync():
    client = _digits_client("adam", 1)
    replica = ClientReplica.from_updater(client.updater)
    broadcast = {k: v.clone() for k, v in client.model.state_dict().items()}
    replica.rebuild(broadcast, seed_scalar_upload(client, client.run_round(0)))
    restored = ClientReplica.from_updater(copy.deepcopy(client.updater))  # fresh arguments, then the saved state
    restored.load_state_dict(replica.state_dict())
    client.set_state(broadcast)
    result = client.run_round(1)
    rebuilt = restored.rebuild(broadcast, seed_scalar_upload(client, result))
    assert all(torch.equal(rebuilt[k], v) for k, v in result.state.items())


def test_replica_on_another_backend_agrees_within_float_tolerance():
    """The stream is the same on every backend, so a server whose kernels differ from the client's
    (here the PyTorch reference vs the C++ CPU kernels) rebuilds the state up to float rounding."""
    client = _digits_client("adam", 2)
    replica = ClientReplica.from_updater(client.updater, backend="torch")
    broadcast = {k: v.clone() for k, v in client.model.state_dict().items()}
    result = client.run_round(0)
    rebuilt = replica.rebuild(broadcast, seed_scalar_upload(client, result))
    for key, value in result.state.items():
        torch.testing.assert_close(rebuilt[key], value, rtol=1e-5, atol=1e-6)


def test_engine_seeds_mode_equals_parameters_mode_with_fewer_bytes():
    params = Experiment(replace(SMALL, q=2))
    seeds = Experiment(replace(SMALL, q=2, client_upload="seeds"))
    report_params, report_seeds = params.run(), seeds.run()
    for key, value in run_parameters(params).items():
        assert torch.equal(value, run_parameters(seeds)[key]), key
    assert [r.test_accuracy for r in report_params.rounds] == [r.test_accuracy for r in report_seeds.rounds]
    state = params.global_model.state_dict()
    buffers = sum(v.numel() * v.element_size() for k, v in state.items() if "running" in k or "num_batches" in k)
    steps = SMALL.local_steps  # digits never gives a NaN loss here: every step is applied
    # client_id, stream_version, step, seeds + float64 scalars (q=2)
    seed_upload = 8 + 8 + 8 * steps + 2 * (8 + 8) * steps + buffers
    for a, b in zip(report_params.rounds, report_seeds.rounds, strict=True):
        assert a.skipped_steps == b.skipped_steps == 0
        assert a.bytes_up - b.bytes_up == SMALL.clients * (state_bytes(state) - seed_upload)
        assert a.bytes_down == b.bytes_down
    assert report_seeds.bytes_up < report_params.bytes_up


def test_lowrank_run_in_seeds_mode_equals_parameters_mode():
    """zo_rank > 0: the clients' conv and Linear weights take rank-r directions; the server's
    replicas replay them exactly."""
    params = Experiment(replace(SMALL, zo_rank=2))
    seeds = Experiment(replace(SMALL, zo_rank=2, client_upload="seeds"))
    params.run(), seeds.run()
    updater = params.clients[0].updater
    assert updater.perturbation == "lowrank" and updater.rank == 2
    assert {"0.0.weight"} <= updater.lowrank_names  # the first conv
    for key, value in run_parameters(params).items():
        assert torch.equal(value, run_parameters(seeds)[key]), key
    full = Experiment(SMALL)
    full.run()
    assert not torch.equal(run_parameters(full)["client.0.0.weight"], run_parameters(params)["client.0.0.weight"])


def test_resume_in_seeds_mode_equals_uninterrupted(tmp_path):
    config = replace(SMALL, rounds=3, client_upload="seeds")
    full, resumed = assert_resume_equals_uninterrupted(config, tmp_path)
    for a, b in zip(full.replicas, resumed.replicas, strict=True):
        assert a.updater.steps == b.updater.steps
        assert all(torch.equal(x, y) for name in a.updater.state
                   for x, y in zip(a.updater.state[name], b.updater.state[name], strict=True))
    # a parameters-mode checkpoint has no replica states: resuming it in seeds mode is refused
    Experiment(replace(SMALL, rounds=1), checkpoint_dir=tmp_path / "params").run()
    with pytest.raises(ckpt.CheckpointError, match="client_upload"):
        Experiment(replace(SMALL, client_upload="seeds"), checkpoint_dir=tmp_path / "params", resume=True).run()


class TestBadInput:
    @staticmethod
    def wire() -> dict[str, torch.Tensor]:
        upload = SeedScalarUpload(0, [(0, [5, 6], [0.5, -1.0]), (1, [7, 8], [2.0, 0.25])],
                                  {"1.running_mean": torch.zeros(4), "1.num_batches_tracked": torch.tensor(2)})
        return upload.to_tensors()

    def test_round_trip(self):
        upload = SeedScalarUpload.from_tensors(self.wire())
        assert upload.client_id == 0 and upload.q == 2
        assert upload.zo_steps == [(0, [5, 6], [0.5, -1.0]), (1, [7, 8], [2.0, 0.25])]
        assert upload.nbytes == 8 + 8 + 2 * 8 + 2 * 2 * 8 * 2 + 4 * 4 + 8
        empty = SeedScalarUpload.from_tensors(SeedScalarUpload(3).to_tensors())
        assert empty.client_id == 3 and empty.zo_steps == [] and empty.buffers == {}

    @pytest.mark.parametrize("key,value,match", [
        ("seeds", torch.zeros(2, 2, dtype=torch.float32), r"'seeds' must be int64 of shape \(2, q\)"),
        ("seeds", torch.zeros(3, 2, dtype=torch.int64), r"'seeds' must be int64 of shape \(2, q\)"),
        ("projected_grads", torch.zeros(2, 2, dtype=torch.float32), r"'projected_grads' must be float64"),
        ("projected_grads", torch.zeros(2, 3, dtype=torch.float64), r"'projected_grads' must be float64 of the shape"),
        ("projected_grads", torch.tensor([[0.0, float("nan")], [1.0, 1.0]], dtype=torch.float64), "non-finite"),
        ("step", torch.zeros(2, dtype=torch.int32), r"'step' must be int64 of shape \(steps,\)"),
        ("client_id", torch.tensor([0]), r"'client_id' must be an int64 scalar"),
        ("extra", torch.zeros(1), r"unexpected key 'extra'"),
        ("seeds", [[5, 6], [7, 8]], r"'seeds' must be a torch.Tensor, got list"),
    ])
    def test_bad_tensor(self, key, value, match):
        wire = self.wire()
        wire[key] = value
        with pytest.raises(ValueError, match=match):
            SeedScalarUpload.from_tensors(wire)

    @pytest.mark.parametrize("key", ["client_id", "step", "seeds", "projected_grads"])
    def test_missing_key(self, key):
        wire = self.wire()
        del wire[key]
        with pytest.raises(ValueError, match=f"missing key '{key}'"):
            SeedScalarUpload.from_tensors(wire)

    def test_buffers_checked_against_the_expected_ones(self):
        expected = {"1.running_mean": torch.zeros(4), "1.num_batches_tracked": torch.tensor(0)}
        SeedScalarUpload.from_tensors(self.wire(), expected_buffers=expected)
        with pytest.raises(ValueError, match=r"missing key 'buffer/1.running_var'"):
            SeedScalarUpload.from_tensors(self.wire(), expected_buffers={**expected, "1.running_var": torch.ones(4)})
        with pytest.raises(ValueError, match=r"unexpected key 'buffer/1.num_batches_tracked'"):
            SeedScalarUpload.from_tensors(self.wire(), expected_buffers={"1.running_mean": torch.zeros(4)})
        wire = self.wire()
        wire["buffer/1.running_mean"] = torch.zeros(5)
        with pytest.raises(ValueError, match=r"'buffer/1.running_mean' must be torch.float32 of shape \(4,\), "
                                             r"got shape \(5,\)"):
            SeedScalarUpload.from_tensors(wire, expected_buffers=expected)

    def test_ragged_steps_rejected_before_sending(self):
        with pytest.raises(ValueError, match=r"zo_steps\[1\] \(step 1\) has 1 seeds"):
            SeedScalarUpload(0, [(0, [1, 2], [0.1, 0.2]), (1, [3], [0.3])]).to_tensors()

    def test_replica_rejects_uploads_it_cannot_replay(self):
        client = _digits_client("adam", 1)
        replica = ClientReplica.from_updater(client.updater, client_id=2)
        broadcast = {k: v.clone() for k, v in client.model.state_dict().items()}
        upload = seed_scalar_upload(client, client.run_round(0))
        before = {k: v.clone() for k, v in replica.model.state_dict().items()}
        out_of_sync = replace(upload, zo_steps=upload.zo_steps[1:])
        with pytest.raises(ValueError, match="expected step 0, got step 1: the replica is out of sync"):
            replica.rebuild(broadcast, out_of_sync)
        step, seeds, grads = upload.zo_steps[0]
        wrong_seed = replace(upload, zo_steps=[(step, [seeds[0] + 1], grads)])
        with pytest.raises(ValueError, match="different updater seed"):
            replica.rebuild(broadcast, wrong_seed)
        with pytest.raises(ValueError, match="upload from client 0 sent to client 2's replica"):
            replica.rebuild(broadcast, replace(upload, client_id=0))
        with pytest.raises(ValueError, match=r"missing key 'buffer/0.1.running_mean'"):
            replica.rebuild(broadcast, replace(upload, buffers={}))
        assert replica.updater.steps == 0  # nothing was applied
        assert all(torch.equal(v, before[k]) for k, v in replica.model.state_dict().items())

    def test_seeds_only_for_zo_methods(self):
        with pytest.raises(ValueError, match="method 'cse-fsl' cannot use it. Valid choices for 'cse-fsl': "
                                             "'parameters'; methods that accept 'seeds': heron, mezo"):
            Experiment(replace(SMALL, method="cse-fsl", client_upload="seeds"))
        for method in ("sflv1", "sflv2"):
            with pytest.raises(ValueError, match=f"method '{method}' cannot use it"):
                check_client_upload(method, "seeds")
        assert check_client_upload("mezo", "seeds") == "seeds"
        with pytest.raises(ValueError, match="client_upload must be one of parameters, seeds, got 'gradients'"):
            replace(SMALL, client_upload="gradients").validate()

    def test_cli_applies_seeds_to_the_zo_methods_of_a_comparison(self, capsys):
        from heron.cli.main import build_parser
        from heron.cli.train import client_uploads

        args = build_parser().parse_args(["train", "--client-upload", "seeds"])
        assert args.client_upload == "seeds"
        assert build_parser().parse_args(["run"]).client_upload == "parameters"
        assert client_uploads(["heron", "cse-fsl"], "seeds", True) == {"heron": "seeds", "cse-fsl": "parameters"}
        assert "cse-fsl upload parameters" in capsys.readouterr().out
        assert client_uploads(["cse-fsl"], "seeds", False) == {"cse-fsl": "seeds"}  # rejected by validate


def test_replay_that_would_make_the_model_non_finite_is_refused_and_changes_nothing():
    """Scalars finite in float32 can still overflow the update (q = 2 directions of 3e38 each with lr 1):
    the replica refuses the upload, its model and optimizer state as before."""
    client = _digits_client("sgd", 2)
    replica = ClientReplica.from_updater(client.updater, client_id=2)
    broadcast = {k: v.clone() for k, v in client.model.state_dict().items()}
    upload = seed_scalar_upload(client, client.run_round(0))
    step, seeds, _ = upload.zo_steps[0]
    replica.updater.lr = 1.0
    before_model = {k: v.clone() for k, v in replica.model.state_dict().items()}
    before_state = replica.state_dict()
    huge = replace(upload, zo_steps=[(step, seeds, [3e38, 3e38])])
    with pytest.raises(ValueError, match=r"replaying step 0 of client 2 makes parameter '.*' non-finite"):
        replica.rebuild(broadcast, huge)
    assert replica.updater.steps == before_state["steps"] == 0
    assert all(torch.equal(v, before_model[k]) for k, v in replica.model.state_dict().items())


MEZO_VARIANTS = VARIANTS[:12]  # every optimizer, q and weight decay; MeZO has no direction options


@pytest.mark.parametrize("kwargs", MEZO_VARIANTS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_mezo_apply_replays_perturbation_cycle_bit_exactly(kwargs):
    """MeZO's +mu / -2mu / +mu cycle leaves rounding residue in the parameters; replaying the cycle
    and the update from the seeds and scalars reproduces it bit for bit, optimizer state included.
    Replaying the updates alone does not (the residue is real). A skipped step changed nothing (the
    step restores its copy of the parameters), so there is nothing of it to replay."""
    model = bn_net()
    copies = copy.deepcopy(model), copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 2, 5, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    q = kwargs["q"]
    client = MeZOUpdater(model, nan_on_calls(4 * q + 1), mu=1e-3, lr=0.01, seed=7, **kwargs)  # step 2 is NaN
    replayer = MeZOUpdater(copies[0], nn.functional.cross_entropy, mu=1e-3, lr=0.01, seed=7, **kwargs)
    updates_only = MeZOUpdater(copies[1], nn.functional.cross_entropy, mu=1e-3, lr=0.01, seed=7, **kwargs)
    skipped = 0
    for _ in range(5):
        result = client.step((x, y))
        assert result.seeds == replayer.direction_seeds(result.step)
        if result.skipped:
            skipped += 1
            continue
        replayer.apply(result.step, result.seeds, result.projected_grads)
        updates_only._update(result.seeds, result.projected_grads)
    assert skipped == 1 and client.steps == replayer.steps == 4
    for (name, p), r in zip(model.named_parameters(), copies[0].parameters(), strict=True):
        assert torch.equal(p, r), name
    assert not all(torch.equal(p, r) for p, r in zip(model.parameters(), copies[1].parameters(), strict=True))
    state, replayed = client.state_dict()["optimizer"], replayer.state_dict()["optimizer"]
    if state is not None:
        assert state["state"].keys() == replayed["state"].keys()
        for index, entry in state["state"].items():
            for key, value in entry.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(replayed["state"][index][key])), key


@pytest.mark.parametrize("optimizer,q", [("sgd", 1), ("adam", 2)])
def test_mezo_replica_rebuilds_client_state_bit_for_bit_over_rounds(optimizer, q):
    client = _digits_client(optimizer, q, MeZOUpdater)
    replica = ClientReplica.from_updater(client.updater, client_id=2)
    assert isinstance(replica.updater, MeZOUpdater)
    broadcast = {k: v.clone() for k, v in client.model.state_dict().items()}
    for round_index in range(3):
        client.set_state(broadcast)
        result = client.run_round(round_index)
        assert result.skipped_steps == 0 and len(result.zo_steps) == 4
        upload = SeedScalarUpload.from_tensors(seed_scalar_upload(client, result).to_tensors(),
                                               expected_buffers=replica.expected_buffers)
        rebuilt = replica.rebuild(broadcast, upload)
        for key, value in result.state.items():
            assert torch.equal(rebuilt[key], value), (round_index, key)
        assert replica.updater.steps == client.updater.steps == 4 * (round_index + 1)
        broadcast = {k: (0.5 * (v + broadcast[k]) if v.is_floating_point() else v) for k, v in result.state.items()}
    restored = ClientReplica.from_updater(copy.deepcopy(client.updater))
    restored.load_state_dict(replica.state_dict())
    assert restored.updater.steps == replica.updater.steps


def test_mezo_replica_arguments_cover_the_updater_constructor():
    updater = MeZOUpdater(bn_net(), nn.functional.cross_entropy, lr=0.1)
    constructor = set(inspect.signature(MeZOUpdater).parameters) - {"model", "loss_fn", "cut", "unused"}
    assert set(replica_arguments(updater)) == constructor


def test_engine_mezo_seeds_mode_equals_parameters_mode():
    params = Experiment(replace(SMALL, method="mezo"))
    seeds = Experiment(replace(SMALL, method="mezo", client_upload="seeds"))
    report_params, report_seeds = params.run(), seeds.run()
    for key, value in run_parameters(params).items():
        assert torch.equal(value, run_parameters(seeds)[key]), key
    assert [r.test_accuracy for r in report_params.rounds] == [r.test_accuracy for r in report_seeds.rounds]
    assert report_seeds.bytes_up < report_params.bytes_up
