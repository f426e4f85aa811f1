"""The ServerApp's round loop and the ClientApp, wired through an in-process grid (no Ray): equality
with the engine for every supported method, and every way a client can drop out of a round."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, Context, RecordDict  # noqa: E402

from heron.flower import server_app  # noqa: E402
from heron.flower.client import BASE, load_updater_state, run_client_round, save_updater_state  # noqa: E402
from heron.flower.client_app import make_client_app  # noqa: E402
from heron.flower.codec import ClientSync, encode_request  # noqa: E402
from heron.flower.config import FlowerSettings  # noqa: E402
from heron.flower.server_app import run_rounds  # noqa: E402
from heron.sfl.config import TrainConfig  # noqa: E402
from heron.sfl.engine import Experiment  # noqa: E402
from tests.flower.inprocess import CONFIG, SEEDS, InProcessGrid, equal_states, set_task_identity  # noqa: E402


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    set_task_identity(monkeypatch)


@pytest.mark.parametrize("method", ["heron", "cse-fsl", "mezo"])
def test_flower_rounds_equal_the_engine(method):
    config = TrainConfig(**{**CONFIG.__dict__, "method": method})
    run = run_rounds(InProcessGrid(make_client_app(), config.clients), config, FlowerSettings())
    engine = Experiment(config)
    engine.run()
    assert equal_states(run.client_state, engine.client_parameters())
    assert equal_states(run.server_state, engine.server_model.state_dict())
    for got, want in zip(run.report.rounds, engine.history, strict=True):
        assert {**got.__dict__, "seconds": 0} == {**want.__dict__, "seconds": 0}
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1, 2]]
    assert not any(o.left_out for o in run.outcomes)


@pytest.mark.parametrize("schedule", ["dual", "sequential"])
@pytest.mark.parametrize("upload", ["parameters", "seeds"])
def test_flower_lowrank_rounds_equal_the_engine(upload, schedule):
    """Low-rank ZO directions (zo_rank) through the Flower app, in both upload modes and schedules."""
    config = TrainConfig(**{**CONFIG.__dict__, "method": "heron", "zo_rank": 2, "client_upload": upload,
                            "zo_schedule": schedule})
    run = run_rounds(InProcessGrid(make_client_app(), config.clients), config, FlowerSettings())
    engine = Experiment(config)
    engine.run()
    assert equal_states(run.client_state, engine.client_parameters())
    assert equal_states(run.server_state, engine.server_model.state_dict())


def _nan_weights(node, reply):
    if node == 102 and not reply.has_error():
        array = reply.content["heron.model"]["0.0.weight"].numpy().copy()
        array.flat[0] = math.nan
        reply.content["heron.model"]["0.0.weight"] = Array.from_numpy_ndarray(array)
    return reply


def _left_out(outcome) -> list[tuple[int | None, int | None, str]]:
    return [(entry.client_id, entry.node_id, entry.reason) for entry in outcome.left_out]


def test_failed_silent_and_malformed_clients_are_left_out(caplog):
    """Nodes 101-103 never deliver a usable reply, so the server never learns which clients they are:
    each of them is left out by node, and each client the round misses by client."""
    config = TrainConfig(**{**CONFIG.__dict__, "clients": 4})
    grid = InProcessGrid(make_client_app(fail_clients={1}), config.clients, silent={103}, tamper=_nan_weights)
    with caplog.at_level(logging.WARNING, logger="heron.flower"):
        run = run_rounds(grid, config, FlowerSettings(round_timeout=5.0))
    for outcome in run.outcomes:
        assert outcome.aggregated == [0]
        (c1, r1), (c2, r2), (c3, r3), (n1, f1), (n2, f2), (n3, f3) = [(e[0], e[2]) if e[0] is not None
                                                                       else (e[1], e[2]) for e in _left_out(outcome)]
        unidentified = "(nodes left out this round before identifying their client: 101, 102, 103)"
        assert (c1, c2, c3) == (1, 2, 3) and r1 == r2 == r3 == f"no reply as this client {unidentified}"
        assert (n1, n2, n3) == (101, 102, 103)
        assert f1.startswith("client failed (error code 2): InjectedFailure: client 1: failure injected")
        assert "heron.model/0.0.weight: contains NaN or infinite values" in f2
        assert f3 == "no reply within round_timeout=5.0 s"
    assert "round 2: node 101 left out: client failed (error code 2): InjectedFailure" in caplog.text
    assert len(run.report.rounds) == 2 and all(bool(torch.isfinite(v).all()) for v in run.client_state.values())
    model_bytes = sum(v.numel() * v.element_size() for v in run.client_state.values())
    assert run.report.rounds[0].bytes_down == 4 * model_bytes  # sent to every node


def test_a_node_flower_reports_unavailable_is_left_out_once_as_its_client(caplog):
    """Node 102 (client 2) stops after round 1: Flower's SuperLink answers for it with an error reply
    sent from the SuperLink's own node id. Client 2 is left out once, by its node, with Flower's reason."""
    grid = InProcessGrid(make_client_app(), 3)
    with caplog.at_level(logging.WARNING, logger="heron.flower"):
        run = run_rounds(grid, CONFIG, FlowerSettings(round_timeout=5.0), on_round=lambda _: grid.dead.add(102))
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1]]
    ((client, node, reason),) = _left_out(run.outcomes[1])
    assert (client, node) == (2, 102)
    assert reason.startswith("node unavailable (Flower error code ") and "Node Unavailable" in reason
    assert "node 1 " not in caplog.text


def test_a_client_without_a_node_is_left_out_every_round():
    """Client 2's node 102 goes away after round 1 (it is no longer listed as connected)."""
    grid = InProcessGrid(make_client_app(), 3)
    run = run_rounds(grid, TrainConfig(**{**CONFIG.__dict__, "rounds": 3}), FlowerSettings(node_wait=0.0),
                     on_round=lambda _: grid.contexts.pop(102, None))
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1], [0, 1]]
    for outcome in run.outcomes[1:]:
        assert _left_out(outcome) == [(2, 102, "its node 102 is not connected")]


def test_a_round_without_valid_replies_keeps_the_model(caplog):
    config = TrainConfig(**{**CONFIG.__dict__, "rounds": 1})
    initial = Experiment(config).client_parameters()
    grid = InProcessGrid(make_client_app(fail_clients={0, 1, 2}), config.clients)
    with caplog.at_level(logging.WARNING, logger="heron.flower"):
        run = run_rounds(grid, config, FlowerSettings())
    assert equal_states(run.client_state, initial)
    assert run.outcomes[0].aggregated == []
    assert [(e.client_id, e.node_id) for e in run.outcomes[0].left_out] == [
        (0, None), (1, None), (2, None), (None, 100), (None, 101), (None, 102)]
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
        assert _left_out(outcome) == [
            (2, None, "no reply as this client (nodes left out this round before identifying their client: 102)"),
            (None, 102, "reply rejected: client 0 is node 100; node 102 replied as client 0 too")]


def test_client_state_survives_in_the_context_only():
    """Two rounds of client 1 through run_client_round with one context state equal the engine's client 1."""
    engine = Experiment(CONFIG)
    broadcast = engine.client_parameters()
    state = RecordDict()
    for round_index in range(2):
        sync = [ClientSync(0, CONFIG.local_steps * round_index)] * 3  # the server accepted every earlier round
        reply = run_client_round(encode_request(CONFIG, round_index, broadcast, sync=sync), state,
                                 client_id=1, num_partitions=3)
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
    content = encode_request(CONFIG, 0, Experiment(CONFIG).client_parameters(), sync=[ClientSync()] * 3)
    with pytest.raises(ValueError, match="this node is partition 3, but the run has 3 clients"):
        run_client_round(content, RecordDict(), client_id=3)
    with pytest.raises(ValueError, match="num-partitions=5, but the run has 3 clients"):
        run_client_round(content, RecordDict(), client_id=0, num_partitions=5)


def test_missing_nodes_do_not_stop_the_run(caplog):
    with caplog.at_level(logging.WARNING, logger="heron.flower"):
        run = run_rounds(InProcessGrid(make_client_app(), 2, partitions=3), CONFIG, FlowerSettings(node_wait=0.0))
    assert [o.aggregated for o in run.outcomes] == [[0, 1], [0, 1]]
    assert "round 1: only 2 of 3 nodes connected; running with them" in caplog.text
    assert [_left_out(o) for o in run.outcomes] == [[(2, None, "no reply as this client")]] * 2


class RestartingGrid(InProcessGrid):
    """Node 102 goes away after round 1; node 200 comes back as partition 2 with an empty context (a
    restarted SuperNode)."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        if 102 in self.contexts:
            context = self.contexts.pop(102)
            self.contexts[200] = Context(run_id=1, node_id=200, state=RecordDict(), run_config={},
                                         node_config=context.node_config)
        return replies


def test_a_restarted_node_takes_over_its_client():
    run = run_rounds(RestartingGrid(make_client_app(), 3), CONFIG, FlowerSettings())
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1, 2]]


def test_a_restarted_node_takes_over_while_flower_still_lists_the_old_one():
    """SuperNode 102 (client 2) is killed after round 1 and restarted as node 200; the SuperLink still
    lists 102 until its heartbeat expires and answers for it with "node unavailable". Node 200 takes
    client 2 over in round 2: the old node no longer answers itself."""
    grid = InProcessGrid(make_client_app(), 3)

    def restart(_):
        grid.dead.add(102)
        grid.contexts[200] = Context(run_id=1, node_id=200, state=RecordDict(), run_config={},
                                     node_config=grid.contexts[102].node_config)

    run = run_rounds(grid, CONFIG, FlowerSettings(), on_round=restart)
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1, 2]]
    ((client, node, reason),) = _left_out(run.outcomes[1])
    assert (client, node) == (None, 102) and reason.startswith("node unavailable")


# -- seed-and-scalar uploads ----------------------------------------------------------------------------

def _record(record, **zeroed):
    return {**record.__dict__, "seconds": 0, **zeroed}


def test_seeds_run_equals_the_engine_in_both_upload_modes():
    """Seeds through Flower == the engine's seeds run (every record field) == the engine's parameters run
    (all but bytes_up, which is smaller)."""
    run = run_rounds(InProcessGrid(make_client_app(), SEEDS.clients), SEEDS, FlowerSettings())
    engine_seeds, engine_parameters = Experiment(SEEDS), Experiment(CONFIG)
    engine_seeds.run()
    engine_parameters.run()
    for engine in (engine_seeds, engine_parameters):
        assert equal_states(run.client_state, engine.client_parameters())
        assert equal_states(run.server_state, engine.server_model.state_dict())
    for got, seeds, parameters in zip(run.report.rounds, engine_seeds.history, engine_parameters.history,
                                      strict=True):
        assert _record(got) == _record(seeds)
        assert _record(got, bytes_up=0) == _record(parameters, bytes_up=0)
        assert got.bytes_up < parameters.bytes_up
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1, 2]]
    assert not any(o.left_out for o in run.outcomes)


def _drop_first_reply_of(node: int, how: str):
    """A tamper that makes `node`'s first reply unusable after the node ran the round: lost, malformed
    (NaN scalars: the codec rejects it) or unreplayable (other seeds: the replica rejects it)."""
    done = set()

    def tamper(at, reply):
        if at != node or node in done or reply.has_error():
            return reply
        done.add(node)
        if how == "lost":
            return None
        seeds = reply.content["heron.seeds"]
        key, change = (("projected_grads", math.nan) if how == "malformed" else ("seeds", 1))
        array = seeds[key].numpy().copy()
        array.flat[0] = change if how == "malformed" else array.flat[0] + change
        seeds[key] = Array.from_numpy_ndarray(array)
        return reply

    return tamper


def _updater_states_equal(a, b) -> bool:
    return a["steps"] == b["steps"] and a["moments"].keys() == b["moments"].keys() and all(
        torch.equal(x, y) for name in a["moments"] for x, y in zip(a["moments"][name], b["moments"][name],
                                                                     strict=True))


@pytest.fixture(scope="module")
def parameters_run_losing_client_1():
    """A parameters run in which client 1's round-1 reply is lost."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        set_task_identity(monkeypatch)
        grid = InProcessGrid(make_client_app(), 3, tamper=_drop_first_reply_of(101, "lost"))
        return run_rounds(grid, CONFIG, FlowerSettings())


@pytest.mark.parametrize(("how", "reason"), [
    ("lost", "no reply within round_timeout="),
    ("malformed", "reply rejected: heron.seeds/projected_grads: contains NaN or infinite values"),
    ("unreplayable", "reply rejected: heron.seeds: step 0 of client 1 has seeds"),
])
def test_a_dropped_seeds_reply_is_undone_on_the_client(how, reason, parameters_run_losing_client_1, servers,
                                                       caplog):
    """Client 1 trains round 1 and keeps its updater state, but the server does not use the reply: its
    replica is untouched, and in round 2 the client starts again from the state the replica has. The
    run equals a parameters run that lost the same reply, and client and replica end in step."""
    grid = InProcessGrid(make_client_app(), 3, tamper=_drop_first_reply_of(101, how))
    with caplog.at_level(logging.WARNING, logger="heron.flower"):
        run = run_rounds(grid, SEEDS, FlowerSettings())
    (server,) = servers
    assert [o.aggregated for o in run.outcomes] == [[0, 2], [0, 1, 2]]
    (node_entry,) = [entry for entry in run.outcomes[0].left_out if entry.node_id == 101]
    assert reason in node_entry.reason and 1 in {entry.client_id for entry in run.outcomes[0].left_out}
    assert "client 1: the server did not use its last round (reply lost, late or rejected); undoing it: back " \
           "from step 2 to step 0" in caplog.text
    assert server.sync == [ClientSync(0, 4), ClientSync(0, 2), ClientSync(0, 4)]
    for client_id in range(3):
        saved = load_updater_state(grid.contexts[100 + client_id].state, client_id, SEEDS)
        assert _updater_states_equal(saved, server.replicas[client_id].state_dict())

    reference = parameters_run_losing_client_1
    assert [o.aggregated for o in reference.outcomes] == [[0, 2], [0, 1, 2]]
    assert equal_states(run.client_state, reference.client_state)
    assert equal_states(run.server_state, reference.server_state)
    for got, want in zip(run.report.rounds, reference.report.rounds, strict=True):
        assert _record(got, bytes_up=0) == _record(want, bytes_up=0) and got.bytes_up < want.bytes_up


def test_a_reply_that_did_not_start_where_the_server_has_its_client_is_left_out(servers):
    def jump_ahead(node, reply):  # consistently: start-step and the step numbers (which the codec checks)
        if node == 101 and not reply.has_error() and reply.content["heron.reply"]["round"] == 1:
            reply.content["heron.reply"]["start-step"] = 5
            reply.content["heron.seeds"]["step"] = Array.from_numpy_ndarray(np.array([5, 6]))
        return reply

    run = run_rounds(InProcessGrid(make_client_app(), 3, tamper=jump_ahead), SEEDS, FlowerSettings())
    (server,) = servers
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 2]]
    (entry,) = run.outcomes[1].left_out
    assert entry.reason == ("reply rejected: heron.reply/generation, start-step: expected 0, 2 (where the server has "
                            "client 1) or 1, 0 (its updater restarted), got 0, 5")
    assert server.sync[1] == ClientSync(0, 2) and server.replicas[1].updater.steps == 2  # untouched


def test_a_restarted_node_restarts_its_replica(servers, caplog):
    """Node 200, client 2's restarted node, has no saved state: its updater starts afresh as generation 1,
    and so does client 2's replica on the server."""
    grid = RestartingGrid(make_client_app(), 3)
    with caplog.at_level(logging.WARNING, logger="heron.flower"):
        run = run_rounds(grid, SEEDS, FlowerSettings())
    (server,) = servers
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1, 2]]
    assert "client 2: no saved updater state where the server has it (step 2 of generation 0); starting afresh " \
           "as generation 1" in caplog.text
    assert "client 2 restarted its updater afresh (generation 1; the server had it at step 2 of generation 0)" in \
        caplog.text
    assert server.sync == [ClientSync(0, 4), ClientSync(0, 4), ClientSync(1, 2)]
    saved = load_updater_state(grid.contexts[200].state, 2, SEEDS)
    assert saved["steps"] == 2 and _updater_states_equal(saved, server.replicas[2].state_dict())


def test_a_restart_the_server_did_not_take_up_is_not_mistaken_for_its_state(servers):
    """Node 200's first reply (a fresh updater, generation 1) is rejected: the server keeps client 2 at
    step 2 of generation 0, while node 200's saved state is at step 2 too, of another updater. The
    generation tells them apart: node 200 starts afresh again, and the server restarts the replica."""
    grid = RestartingGrid(make_client_app(), 3, tamper=_drop_first_reply_of(200, "malformed"))
    run = run_rounds(grid, TrainConfig(**{**SEEDS.__dict__, "rounds": 3}), FlowerSettings())
    (server,) = servers
    assert [o.aggregated for o in run.outcomes] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert server.sync == [ClientSync(0, 6), ClientSync(0, 6), ClientSync(1, 2)]
    saved = load_updater_state(grid.contexts[200].state, 2, SEEDS)
    assert _updater_states_equal(saved, server.replicas[2].state_dict())


def test_a_client_out_of_step_with_the_server_refuses_the_round():
    """Counts the protocol cannot produce (here: 1 step accepted from client 1, whose saved states are at
    steps 2 and 0) fail the round on the client with the reason."""
    broadcast = Experiment(SEEDS).client_parameters()
    state = RecordDict()
    run_client_round(encode_request(SEEDS, 0, broadcast, sync=[ClientSync()] * 3), state, client_id=1)
    assert load_updater_state(state, 1, SEEDS)["steps"] == 2
    assert load_updater_state(state, 1, SEEDS, slot=BASE)["steps"] == 0
    sync = [ClientSync(0, 2), ClientSync(0, 1), ClientSync(0, 2)]
    with pytest.raises(ValueError, match=r"client 1 cannot resynchronise with the server: the server has it at step "
                                         r"1 of generation 0, this node's saved updater states of that generation "
                                         r"are at steps \[2, 0\]"):
        run_client_round(encode_request(SEEDS, 1, broadcast, sync=sync), state, client_id=1)


# -- a failed run -----------------------------------------------------------------------------------------

def _serve(app, grid, run_config=None):
    app(grid, Context(run_id=1, node_id=0, state=RecordDict(), run_config=run_config or {}, node_config={}))


def test_a_run_that_fails_midway_says_so_in_its_report(tmp_path, capsys):
    """Every node is gone after round 1: the ServerApp fails in round 2, and still writes the report of
    round 1 with status "failed" and the error; it prints the failure (which `flwr log` shows)."""
    path = tmp_path / "report.json"
    grid = InProcessGrid(make_client_app(), 3)
    app = server_app.make_server_app(CONFIG, FlowerSettings(node_wait=0.0, report=str(path)))
    with pytest.raises(RuntimeError, match="round 2: no node connected"):
        _serve(app, _vanishing(grid))
    report = json.loads(path.read_text())
    assert report["status"] == "failed" and "round 2: no node connected" in report["error"]
    assert [r["round"] for r in report["methods"]["heron"]["rounds"]] == [1]
    assert report["flower"]["heron"]["status"] == "failed"
    assert "heron: the run FAILED: RuntimeError: round 2: no node connected" in capsys.readouterr().out


def test_a_run_refused_at_the_start_says_so_in_its_report(tmp_path):
    path = tmp_path / "report.json"
    with pytest.raises(ValueError, match="method 'sflv1' is not supported"):
        _serve(server_app.make_server_app(), InProcessGrid(make_client_app(), 3),
               {"method": "sflv1", "report": str(path)})
    report = json.loads(path.read_text())
    assert report["status"] == "failed" and "method 'sflv1' is not supported" in report["error"]
    assert report["run_config"] == {"method": "sflv1", "report": str(path)}


def test_a_finished_run_says_so_in_its_report(tmp_path):
    path = tmp_path / "report.json"
    config = TrainConfig(**{**CONFIG.__dict__, "rounds": 1})
    _serve(server_app.make_server_app(config, FlowerSettings(report=str(path))), InProcessGrid(make_client_app(), 3))
    report = json.loads(path.read_text())
    assert report["status"] == "completed" and "error" not in report
    assert report["flower"]["heron"]["status"] == "completed"


def _vanishing(grid):
    """`grid`, whose nodes all disconnect after the first round."""
    send = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):
        replies = send(messages, timeout=timeout)
        grid.contexts.clear()
        return replies

    grid.send_and_receive = send_and_receive
    return grid
