"""heron's Flower ServerApp: `heron.flower.server_app:app`.

Each round the ServerApp sends every connected node the run's TrainConfig, the round index, where
it has each client's updater (codec.ClientSync) and the global client model (heron.flower.codec),
waits for the replies (at most `round_timeout` seconds when set), checks each one, absorbs the
valid ones (`SplitServer.absorb`: in seeds mode the client's replica replays its upload) and hands
them to `SplitServer.finish_round`, which trains the server part on them in client-id order and
averages them (FedAvg). A node that fails (an error reply), times out, sends a malformed reply or an
upload its replica cannot replay, or claims a client id that another node holds is left out of that
round with a logged reason; a round without one valid reply keeps the previous global model.

Configured from `context.run_config` (heron.flower.config) when deployed; `make_server_app(config,
settings)` fixes the configuration in code (used by `heron flower` and the tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from heron.flower.codec import MESSAGE_TYPE, MessageRejected, decode_reply, encode_request
from heron.flower.config import FlowerSettings, from_run_config
from heron.flower.report import FlowerRun, write_report
from heron.flower.server import Accepted, LeftOut, RoundOutcome, SplitServer
from heron.sfl.config import TrainConfig
from heron.sfl.records import RoundRecord
from heron.sfl.roles import state_bytes

log = logging.getLogger("heron.flower")


class _NodeBinding:
    """Which node is which client: a node keeps the client id it first replied with, and no two
    connected nodes share one. A client whose node has gone (a restarted SuperNode comes back with
    a new node id) may be taken over by a new node; its updater state then starts afresh."""

    def __init__(self):
        self.client_of: dict[int, int] = {}

    def check(self, node_id: int, client_id: int, connected: set[int]) -> str | None:
        """None when node_id may speak for client_id (binding it), otherwise the reason it may not."""
        bound = self.client_of.get(node_id)
        if bound is not None and bound != client_id:
            return f"node {node_id} is client {bound} but replied as client {client_id}"
        holder = next((n for n, c in self.client_of.items() if c == client_id and n != node_id), None)
        if holder is not None and holder in connected:
            return f"client {client_id} is node {holder}; node {node_id} replied as client {client_id} too"
        if holder is not None:
            log.warning("client %d moved from node %d (gone) to node %d", client_id, holder, node_id)
            del self.client_of[holder]
        self.client_of[node_id] = client_id
        return None


def _connected_nodes(grid: Grid, clients: int, wait_s: float, round_index: int) -> list[int]:
    """The connected node ids. Before round 1, wait up to wait_s seconds for `clients` nodes; later,
    only while no node at all is connected."""
    wanted = clients if round_index == 0 else 1
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not nodes:
        raise RuntimeError(f"round {round_index + 1}: no node connected (waited {wait_s} s)")
    if len(nodes) < clients:
        log.warning("round %d: only %d of %d nodes connected; running with them", round_index + 1, len(nodes),
                    clients)
    return nodes


def run_rounds(grid: Grid, config: TrainConfig, settings: FlowerSettings, *,
               progress: Callable[[str], None] | None = None,
               on_round: Callable[[RoundRecord], None] | None = None) -> FlowerRun:
    """Run `config.rounds` rounds over `grid`; returns the FlowerRun."""
    server = SplitServer(config, progress=progress)
    server.start()
    binding = _NodeBinding()
    timeout = settings.round_timeout or None
    for round_index in range(config.rounds):
        nodes = _connected_nodes(grid, config.clients, settings.node_wait, round_index)
        started = time.perf_counter()
        state = server.broadcast()
        content = encode_request(config, round_index, state, sync=server.sync)
        # With a timeout, the messages expire with it: a node must not train a round the server gave up on.
        messages = [Message(content, node, MESSAGE_TYPE, group_id=str(round_index + 1), ttl=timeout)
                    for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        outcome = RoundOutcome(round_index + 1)
        valid = _accept_replies(replies, server, round_index, state, binding, set(nodes), outcome)
        for node in sorted(set(nodes) - {reply.metadata.src_node_id for reply in replies}):
            _leave_out(outcome, round_index, LeftOut(node, f"no reply within round_timeout={settings.round_timeout} s",
                                                     binding.client_of.get(node)))
        record = server.finish_round(round_index, valid, outcome, bytes_down=state_bytes(state) * len(messages),
                                     started=started)
        if on_round is not None:
            on_round(record)
    return FlowerRun(config, settings, server.report(), server.client_parameters(), server.server_parameters(),
                     server.outcomes)


def _accept_replies(replies: list[Message], server: SplitServer, round_index: int, broadcast: dict[str, torch.Tensor],
                    binding: _NodeBinding, connected: set[int], outcome: RoundOutcome) -> list[Accepted]:
    """The replies the round uses, absorbed by the server; the others are left out with their reason."""
    spec = server.reply_spec(round_index)
    valid, seen = [], set()
    for reply in replies:
        node = reply.metadata.src_node_id
        if node in seen:
            _leave_out(outcome, round_index, LeftOut(node, "a second reply in one round (only the first is used)",
                                                     binding.client_of.get(node)))
            continue
        seen.add(node)
        if reply.has_error():
            error = reply.error
            _leave_out(outcome, round_index, LeftOut(node, f"client failed (error code {error.code}): {error.reason}",
                                                     binding.client_of.get(node)))
            continue
        try:
            decoded = decode_reply(reply.content, spec)
        except MessageRejected as error:
            _leave_out(outcome, round_index, LeftOut(node, f"reply rejected: {error}", binding.client_of.get(node)))
            continue
        except Exception as error:  # noqa: BLE001 - whatever a node sends must not end the round
            _leave_out(outcome, round_index, LeftOut(node, f"reply could not be decoded: {type(error).__name__}: "
                                                     f"{error}", binding.client_of.get(node)))
            continue
        client_id = decoded.result.client_id
        problem = binding.check(node, client_id, connected)
        if problem is not None:
            _leave_out(outcome, round_index, LeftOut(node, f"reply rejected: {problem}", client_id))
            continue
        try:  # not under the catch-all above: a replay that fails midway is a bug, not a bad reply
            valid.append(server.absorb(decoded, broadcast))
        except MessageRejected as error:
            _leave_out(outcome, round_index, LeftOut(node, f"reply rejected: {error}", client_id))
    return valid


def _leave_out(outcome: RoundOutcome, round_index: int, entry: LeftOut) -> None:
    client = "" if entry.client_id is None else f" (client {entry.client_id})"
    log.warning("round %d: node %d%s left out: %s", round_index + 1, entry.node_id, client, entry.reason)
    outcome.left_out.append(entry)


def make_server_app(config: TrainConfig | None = None, settings: FlowerSettings | None = None, *,
                    on_finish: Callable[[FlowerRun], None] | None = None,
                    progress: Callable[[str], None] | None = None,
                    on_round: Callable[[RoundRecord], None] | None = None) -> ServerApp:
    """A ServerApp for `config` (None: read TrainConfig and FlowerSettings from the run config).

    on_finish receives the FlowerRun; when settings.report is set the JSON report is written there.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
            run_config, run_settings = from_run_config(context.run_config)
        else:
            run_config, run_settings = config, (settings or FlowerSettings()).validate()
        run = run_rounds(grid, run_config, run_settings, progress=progress, on_round=on_round)
        if run_settings.report:
            write_report(run_settings.report, [run])
            log.info("wrote %s", run_settings.report)
        if on_finish is not None:
            on_finish(run)

    return app


def print_round(record: RoundRecord) -> None:
    """One progress line per round (a deployed ServerApp's stdout reaches `flwr run --stream` / `flwr log`)."""
    print(f"round {record.round}: test acc {record.test_accuracy:.4f}, client loss {record.client_loss:.4f} "
          f"({record.seconds:.1f} s)", flush=True)


app = make_server_app(on_round=print_round)
