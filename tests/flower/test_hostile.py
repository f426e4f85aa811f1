"""A hostile node: well-formed, finite, poisoned replies (heron.flower.screen and SplitServer's guards).

Each test runs the round loop through the in-process grid; a hostile reply is left out with its
reason and changes nothing the server keeps (global model, server part, replicas, step counts).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array  # noqa: E402

from heron.flower.client_app import make_client_app  # noqa: E402
from heron.flower.codec import ClientSync  # noqa: E402
from heron.flower.config import FlowerSettings  # noqa: E402
from heron.flower.server_app import run_rounds  # noqa: E402
from heron.sfl.config import TrainConfig  # noqa: E402
from tests.flower.inprocess import CONFIG, SEEDS, InProcessGrid, equal_states, set_task_identity  # noqa: E402


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    set_task_identity(monkeypatch)


def _records(run):
    return [{**r.__dict__, "seconds": 0} for r in run.report.rounds]


def _reasons(run, client_id: int) -> list[str]:
    return [e.reason for o in run.outcomes for e in o.left_out if e.client_id == client_id or
            (e.client_id is None and e.node_id == 100 + client_id)]


@pytest.mark.parametrize("config", [CONFIG, SEEDS], ids=["parameters", "seeds"])
def test_a_hostile_client_changes_nothing(config, servers):
    """Client 2 replies with every float 1e30 in every round: it is left out each round, and the run equals
    one in which client 2 fails outright (every tensor, every round record), in both upload modes."""
    hostile = run_rounds(InProcessGrid(make_client_app(hostile_clients={2}), 3), config, FlowerSettings())
    failing = run_rounds(InProcessGrid(make_client_app(fail_clients={2}), 3), config, FlowerSettings())
    assert [o.aggregated for o in hostile.outcomes] == [[0, 1], [0, 1]]
    for reason in _reasons(hostile, 2)[1:]:
        assert reason.startswith("reply rejected: smashed/0: largest magnitude 1e+30 exceeds")
    assert equal_states(hostile.client_state, failing.client_state)
    assert equal_states(hostile.server_state, failing.server_state)
    assert _records(hostile) == _records(failing)
    assert servers[0].sync[2] == ClientSync()  # nothing of client 2 was taken


def _scaled_model(node: int, factor: float):
    """A tamper: `node`'s client model moved `factor` x its update away from the broadcast (smashed data honest)."""
    def tamper(at, reply):
        if at == node and not reply.has_error():
            model = reply.content["heron.model"]
            for key in list(model.keys()):
                array = model[key].numpy()
                if np.issubdtype(array.dtype, np.floating):
                    model[key] = Array.from_numpy_ndarray((array * factor).astype(array.dtype))
        return reply

    return tamper


def test_an_update_far_beyond_the_model_is_rejected():
    run = run_rounds(InProcessGrid(make_client_app(), 3, tamper=_scaled_model(102, 1e6)), CONFIG, FlowerSettings())
    assert [o.aggregated for o in run.outcomes] == [[0, 1], [0, 1]]
    assert "client update: norm" in _reasons(run, 2)[-1] and "max_update_ratio=10 x" in _reasons(run, 2)[-1]


def test_a_seeds_upload_beyond_the_bound_leaves_the_replica_as_it_was(servers):
    """Client 2's projected gradients are 1e30 (its smashed data honest): the replica replays them, the
    rebuilt update is out of bounds, and the replica is restored; client 2's node undoes its round. (With
    SGD: Adam would normalise the scalars to steps of about lr, a bounded update.)"""
    def huge_scalars(node, reply):
        if node == 102 and not reply.has_error() and reply.content["heron.reply"]["round"] == 0:
            seeds = reply.content["heron.seeds"]
            seeds["projected_grads"] = Array.from_numpy_ndarray(np.full_like(seeds["projected_grads"].numpy(), 1e30))
        return reply

    config = TrainConfig(**{**SEEDS.__dict__, "client_optimizer": "sgd"})
    run = run_rounds(InProcessGrid(make_client_app(), 3, tamper=huge_scalars), config, FlowerSettings())
    (server,) = servers
    assert [o.aggregated for o in run.outcomes] == [[0, 1], [0, 1, 2]]
    assert "client update: norm" in _reasons(run, 2)[0]
    steps = config.local_steps
    assert server.sync[2] == ClientSync(0, steps) and server.replicas[2].updater.steps == steps


def test_a_declared_sample_count_other_than_the_assigned_shard_is_rejected(servers):
    def inflate(node, reply):
        if node == 102 and not reply.has_error():
            reply.content["heron.reply"]["num-samples"] = 1000
        return reply

    run = run_rounds(InProcessGrid(make_client_app(), 3, tamper=inflate), CONFIG, FlowerSettings())
    assigned = servers[0].shard_sizes[2]
    assert assigned != 1000 and [o.aggregated for o in run.outcomes] == [[0, 1], [0, 1]]
    assert _reasons(run, 2)[-1] == (f"reply rejected: heron.reply/num-samples: expected {assigned} (the shard the "
                                    f"server assigned client 2), got 1000")


def test_an_update_within_the_bounds_is_clipped_to_the_median():
    """Client 2 sends 2.5 x its model (an update far larger than the others', but under max_update_ratio):
    FedAvg uses it clipped to clip_ratio x the round's median update norm."""
    settings = FlowerSettings()
    run = run_rounds(InProcessGrid(make_client_app(), 3, tamper=_scaled_model(102, 2.5)), CONFIG, settings)
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1, 2]]
    assert [o.clipped for o in run.outcomes] == [[2], [2]]
    honest = run_rounds(InProcessGrid(make_client_app(), 3), CONFIG, FlowerSettings())
    assert [o.clipped for o in honest.outcomes] == [[], []]


def test_server_training_that_turns_non_finite_is_undone(servers):
    """With the smashed and update bounds lifted, the 1e30 smashed data reach the server part: its Adam
    state overflows, and that client's training is undone and the client left out."""
    settings = FlowerSettings(max_smashed_ratio=1e38, max_update_ratio=1e38)
    hostile = run_rounds(InProcessGrid(make_client_app(hostile_clients={2}), 3), CONFIG, settings)
    failing = run_rounds(InProcessGrid(make_client_app(fail_clients={2}), 3), CONFIG, FlowerSettings())
    assert [o.aggregated for o in hostile.outcomes] == [[0, 1], [0, 1]]
    assert _reasons(hostile, 2)[-1] == ("reply rejected: training the server part on its smashed data gave "
                                        "non-finite values (undone)")
    assert equal_states(hostile.server_state, failing.server_state)
    assert equal_states(hostile.client_state, failing.client_state)


@pytest.mark.slow
def test_a_run_with_a_hostile_node_ends_within_2_points_of_the_clean_run():
    """Client 2 sends 1e30-valued smashed data and model in all 5 rounds: the run finishes, never uses
    them, and its final accuracy is within 2 points of the same run with client 2 honest (measured:
    0.9805 clean, 0.9694 hostile)."""
    config = TrainConfig(method="heron", model="cnn", dataset="digits", clients=3, rounds=5, local_steps=10,
                         batch_size=32)
    clean = run_rounds(InProcessGrid(make_client_app(), 3), config, FlowerSettings())
    hostile = run_rounds(InProcessGrid(make_client_app(hostile_clients={2}), 3), config, FlowerSettings())
    assert [o.aggregated for o in hostile.outcomes] == [[0, 1]] * 5
    assert len(hostile.report.rounds) == 5 and all(torch.isfinite(v).all() for v in hostile.client_state.values())
    assert abs(hostile.report.final_accuracy - clean.report.final_accuracy) <= 0.02
