"""The ServerApp's round loop and the ClientApp, wired through an in-process grid (no Ray): equality
with the engine for every supported method, and every way a client can drop out of a round."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from heron.flower.client import load_updater_state, run_client_round, save_updater_state  # noqa: E402
from heron.flower.client_app import make_client_app  # noqa: E402
from heron.flower.codec import encode_request  # noqa: E402
from heron.flower.config import FlowerSettings  # noqa: E402
from heron.flower.server_app import run_rounds  # noqa: E402
from heron.sfl.engine import Experiment, TrainConfig  # noqa: E402

CONFIG = TrainConfig(method="heron", model="cnn", dataset="digits", clients=3, rounds=2, local_steps=2,
                     upload_every=1, batch_size=8)


class InProcessGrid:
    """A Grid stand-in: node 100 + i is client i of `partitions`; messages run through the ClientApp right here.

    Like Flower, a node's context is only updated by a call that returns; a raising ClientApp
    becomes an error reply. silent: nodes that never answer (a timeout); tamper(node, reply):
    rewrites a node's reply before the server sees it.
    """

    def __init__(self, app, nodes: int, *, partitions: int | None = None, silent=(), tamper=None):
        self.app, self.silent, self.tamper = app, set(silent), tamper
        node_config = {"num-partitions": partitions or nodes}
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                                          node_config={**node_config, "partition-id": i})
                         for i in range(nodes)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            context = copy.deepcopy(self.contexts[node])
            try:
                reply = self.app(message, context)
                self.contexts[node] = context
            except Exception as error:  # noqa: BLE001 - what Flower's runtime does with a raising ClientApp
                reply = Message(Error(code=2, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            replies.append(self.tamper(node, reply) if self.tamper else reply)
        return replies


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages read the run and node ids of the current task, which Flower's runtime sets."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _equal_states(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["heron", "cse-fsl", "mezo"])
def test_flower_rounds_equal_the_engine(method):
    config = TrainConfig(**{**CONFIG.__dict__, "method": method})
    run = run_rounds(InProcessGrid(make_client_app(), config.clients), config, FlowerSettings())
    engine = Experiment(config)
    engine.run()
    assert _equal_states(run.client_state, engine.client_parameters())
    assert _equal_states(run.server_state, engine.server_model.state_dict())
    for got, want in zip(run.report.rounds, engine.history, strict=True):
        assert {**got.__dict__, "seconds": 0} == {**want.__dict__, "seconds": 0}
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1, 2]]
    assert not any(o.left_out for o in run.outcomes)


def _nan_weights(node, reply):
    if node == 102 and not reply.has_error():
        array = reply.content["heron.model"]["0.0.weight"].numpy().copy()
        array.flat[0] = math.nan
        reply.content["heron.model"]["0.0.weight"] = Array.from_numpy_ndarray(array)
    return reply


def test_failed_silent_and_malformed_clients_are_left_out(caplog):
    config = TrainConfig(**{**CONFIG.__dict__, "clients": 4})
    grid = InProcessGrid(make_client_app(fail_clients={1}), config.clients, silent={103}, tamper=_nan_weights)
    with caplog.at_level(logging.WARNING, logger="heron.flower"):
        run = run_rounds(grid, config, FlowerSettings(round_timeout=5.0))
    for outcome in run.outcomes:
        assert outcome.aggregated == [0]
        reasons = {entry.node_id: entry.reason for entry in outcome.left_out}
        assert "InjectedFailure: client 1: failure injected" in reasons[101]
        assert "heron.model/0.0.weight: contains NaN or infinite values" in reasons[102]
        assert reasons[103] == "no reply within round_timeout=5.0 s"
    assert "round 2: node 101 left out: client failed (error code 2): InjectedFailure" in caplog.text
    assert len(run.report.rounds) == 2 and all(bool(torch.isfinite(v).all()) for v in run.client_state.values())
    model_bytes = sum(v.numel() * v.element_size() for v in run.client_state.values())
    assert run.report.rounds[0].bytes_down == 4 * model_bytes  # sent to every node


def test_a_round_without_valid_replies_keeps_the_model(caplog):
    config = TrainConfig(**{**CONFIG.__dict__, "rounds": 1})
    initial = Experiment(config).client_parameters()
    grid = InProcessGrid(make_client_app(fail_clients={0, 1, 2}), config.clients)
    with caplog.at_level(logging.WARNING, logger="heron.flower"):
        run = run_rounds(grid, config, FlowerSettings())
    assert _equal_states(run.client_state, initial)
    assert run.outcomes[0].aggregated == [] and len(run.outcomes[0].left_out) == 3
    assert run.report.rounds[0].server_loss is None and run.report.rounds[0].bytes_up == 0
    assert "round 1: no valid client replies; the global client model is kept" in caplog.text


def test_a_node_cannot_speak_for_another_client():
    def impersonate(node, reply):
        if node == 102 and not reply.has_error():
            reply.content["heron.reply"]["client-id"] = 0
        return reply

    run = run_rounds(InProcessGrid(make_client_app(), 3, tamper=impersonate), CONFIG, FlowerSettings())
    for outcome in run.outcomes:
        assert outcome.aggregated == [0, 1]
        (entry,) = outcome.left_out
        assert entry.node_id == 102 and "client 0 is node 100; node 102 replied as client 0 too" in entry.reason


def test_client_state_survives_in_the_context_only():
    """Two rounds of client 1 through run_client_round with one context state equal the engine's client 1."""
    engine = Experiment(CONFIG)
    broadcast = engine.client_parameters()
    state = RecordDict()
    for round_index in range(2):
        reply = run_client_round(encode_request(CONFIG, round_index, broadcast), state, client_id=1,
                                 num_partitions=3)
        engine.clients[1].set_state(broadcast)
        want = engine.clients[1].run_round(round_index)
        got = reply["heron.model"]
        assert all(torch.equal(torch.from_numpy(got[k].numpy()), want.state[k]) for k in want.state)
    assert load_updater_state(state, 1, CONFIG)["steps"] == 2 * CONFIG.local_steps


def test_saved_state_belongs_to_one_client_and_run():
    state = RecordDict()
    save_updater_state(state, 1, CONFIG, {"steps": 3, "moments": {}})
    assert load_updater_state(state, 1, TrainConfig(**{**CONFIG.__dict__, "rounds": 9}))["steps"] == 3
    with pytest.raises(ValueError, match="belongs to client 1 of another run configuration"):
        load_updater_state(state, 2, CONFIG)
    with pytest.raises(ValueError, match="belongs to client 1 of another run configuration"):
        load_updater_state(state, 1, TrainConfig(**{**CONFIG.__dict__, "seed": 1}))


def test_node_outside_the_run_is_refused():
    content = encode_request(CONFIG, 0, Experiment(CONFIG).client_parameters())
    with pytest.raises(ValueError, match="this node is partition 3, but the run has 3 clients"):
        run_client_round(content, RecordDict(), client_id=3)
    with pytest.raises(ValueError, match="num-partitions=5, but the run has 3 clients"):
        run_client_round(content, RecordDict(), client_id=0, num_partitions=5)


def test_missing_nodes_do_not_stop_the_run(caplog):
    with caplog.at_level(logging.WARNING, logger="heron.flower"):
        run = run_rounds(InProcessGrid(make_client_app(), 2, partitions=3), CONFIG, FlowerSettings(node_wait=0.0))
    assert [o.aggregated for o in run.outcomes] == [[0, 1], [0, 1]]
    assert "round 1: only 2 of 3 nodes connected; running with them" in caplog.text


def test_a_restarted_node_takes_over_its_client():
    """Node 102 goes away after round 1; node 200 comes back as partition 2 (a restarted SuperNode)."""

    class RestartingGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            if 102 in self.contexts:
                context = self.contexts.pop(102)
                self.contexts[200] = Context(run_id=1, node_id=200, state=RecordDict(), run_config={},
                                             node_config=context.node_config)
            return replies

    run = run_rounds(RestartingGrid(make_client_app(), 3), CONFIG, FlowerSettings())
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1, 2]]
