"""The Flower app under Flower's Ray simulation engine: equal to the single-machine engine (with
parameter and with seed-and-scalar uploads), and a failing client does not stop a round. One
simulation per fixture, shared by the module's tests."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from heron.flower.simulation import simulate  # noqa: E402
from heron.sfl.config import TrainConfig  # noqa: E402
from heron.sfl.engine import Experiment  # noqa: E402

pytestmark = pytest.mark.slow

CONFIG = TrainConfig(method="heron", model="cnn", dataset="mnist", clients=3, rounds=2, local_steps=3,
                     upload_every=1, batch_size=16)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the engine and the ServerApp (a thread of this process), as in the Ray
    actors (1 CPU each): first-order steps reduce in a thread-count-dependent order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flower_and_engine(one_thread):
    run = simulate(CONFIG, ray_cpus=2, client_cpus=1)
    engine = Experiment(CONFIG)
    engine.run()
    return run, engine


@pytest.fixture(scope="module")
def seeds_run(one_thread):
    return simulate(replace(CONFIG, client_upload="seeds"), ray_cpus=2, client_cpus=1)


@pytest.fixture(scope="module")
def run_with_failing_client(one_thread):
    return simulate(CONFIG, ray_cpus=2, client_cpus=1, fail_clients={1})


def _assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_client_parameters_equal_the_engine(flower_and_engine):
    run, engine = flower_and_engine
    _assert_equal(run.client_state, engine.client_parameters())


def test_server_parameters_equal_the_engine(flower_and_engine):
    run, engine = flower_and_engine
    _assert_equal(run.server_state, engine.server_model.state_dict())


def test_report_equals_the_engine(flower_and_engine):
    run, engine = flower_and_engine
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1, 2]]
    for got, want in zip(run.report.rounds, engine.history, strict=True):
        assert {**got.__dict__, "seconds": 0} == {**want.__dict__, "seconds": 0}


def test_seeds_run_equals_the_engine_with_fewer_bytes(seeds_run, flower_and_engine):
    """Seed-and-scalar uploads through Ray (client state carried in each node's context between rounds):
    the engine's parameters run bit for bit, all but bytes_up, which is smaller."""
    _, engine = flower_and_engine
    _assert_equal(seeds_run.client_state, engine.client_parameters())
    _assert_equal(seeds_run.server_state, engine.server_model.state_dict())
    assert [o.aggregated for o in seeds_run.outcomes] == [[0, 1, 2], [0, 1, 2]]
    for got, want in zip(seeds_run.report.rounds, engine.history, strict=True):
        assert {**got.__dict__, "seconds": 0, "bytes_up": 0} == {**want.__dict__, "seconds": 0, "bytes_up": 0}
        assert got.bytes_up < want.bytes_up


def test_failing_client_is_left_out_and_the_run_completes(run_with_failing_client):
    run = run_with_failing_client
    assert len(run.report.rounds) == CONFIG.rounds
    for outcome in run.outcomes:
        assert outcome.aggregated == [0, 2]
        client_entry, node_entry = outcome.left_out  # the node never identified itself: by client and by node
        assert client_entry.client_id == 1 and client_entry.reason.startswith("no reply as this client")
        assert node_entry.client_id is None and str(node_entry.node_id) in client_entry.reason
        assert "client failed" in node_entry.reason and "failure injected" in node_entry.reason
    assert all(bool(torch.isfinite(v).all()) for v in run.client_state.values())
    assert run.report.rounds[-1].server_loss is not None
