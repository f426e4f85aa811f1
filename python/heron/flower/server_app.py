"""heron's Flower ServerApp: `heron.flower.server_app:app`.

Each round the ServerApp sends every connected node the run's TrainConfig, the round index, where
it has each client's updater (codec.ClientSync) and the global client model (heron.flower.codec),
waits at most `round_timeout` seconds for the replies, matches each reply to the node it answers,
checks it, absorbs the valid ones (`SplitServer.absorb`: the reply bounds of heron.flower.screen;
in seeds mode the client's replica replays its upload) and hands them to `SplitServer.finish_round`,
which trains the server part on them in client-id order and averages them (FedAvg). A node that
fails (an error reply, its own or the SuperLink's on its behalf), times out, sends a malformed,
out-of-bound or unreplayable reply, or claims a client id that another answering node holds is left
out of that round with a logged reason, and every client the round does not aggregate is listed
in its RoundOutcome; a round without one valid reply keeps the previous global model. A run that
fails still writes its report (status "failed").

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
from heron.flower.report import FlowerRun, write_failure, write_report
from heron.flower.server import Accepted, LeftOut, RoundOutcome, SplitServer
from heron.sfl.config import TrainConfig
from heron.sfl.records import RoundRecord
from heron.sfl.roles import state_bytes

log = logging.getLogger("heron.flower")


class RunFailed(RuntimeError):
    """A run that failed after it started: `run` holds the rounds it finished (status "failed")."""

    def __init__(self, run: FlowerRun):
        super().__init__(run.error)
        self.run = run


class _NodeBinding:
    """Which node is which client: a node keeps the client id it first replied with, and no two
    nodes that answer a round share one. A client whose node has gone (a restarted SuperNode comes
    back with a new node id; the old one no longer answers) may be taken over by a new node; its
    updater state then starts afresh."""

    def __init__(self):
        self.client_of: dict[int, int] = {}

    def node_of(self, client_id: int) -> int | None:
        return next((n for n, c in self.client_of.items() if c == client_id), None)

    def check(self, node_id: int, client_id: int, answering: set[int]) -> str | None:
        """None when node_id may speak for client_id (binding it), otherwise the reason it may not.
        answering: the nodes that answered this round themselves (not through a SuperLink error)."""
        bound = self.client_of.get(node_id)
        if bound is not None and bound != client_id:
            return f"node {node_id} is client {bound} but replied as client {client_id}"
        holder = self.node_of(client_id)
        if holder is not None and holder != node_id and holder in answering:
            return f"client {client_id} is node {holder}; node {node_id} replied as client {client_id} too"
        if holder is not None and holder != node_id:
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
    server = SplitServer(config, settings, progress=progress)
    server.start()

    def finished(**status) -> FlowerRun:
        return FlowerRun(config, settings, server.report(), server.client_parameters(), server.server_parameters(),
                         server.outcomes, **status)

    try:
        _rounds(grid, server, config, settings, on_round)
    except Exception as error:
        raise RunFailed(finished(status="failed", error=f"{type(error).__name__}: {error}")) from error
    return finished()


def _rounds(grid: Grid, server: SplitServer, config: TrainConfig, settings: FlowerSettings,
            on_round: Callable[[RoundRecord], None] | None) -> None:
    binding = _NodeBinding()
    timeout = settings.round_timeout
    for round_index in range(config.rounds):
        nodes = _connected_nodes(grid, config.clients, settings.node_wait, round_index)
        started = time.perf_counter()
        state = server.broadcast()
        content = encode_request(config, round_index, state, sync=server.sync)
        # The messages expire with the timeout: a node must not train a round the server gave up on.
        messages = [Message(content, node, MESSAGE_TYPE, group_id=str(round_index + 1), ttl=timeout)
                    for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        outcome = RoundOutcome(round_index + 1)
        round_replies = _RoundReplies(messages, replies, round_index, outcome)
        valid = _accept_replies(round_replies, server, round_index, state, binding)
        for node in nodes:
            if node not in round_replies.by_node:
                round_replies.leave_out(node, binding.client_of.get(node), f"no reply within round_timeout={timeout} s")
        record = server.finish_round(round_index, valid, outcome, broadcast=state,
                                     bytes_down=state_bytes(state) * len(messages), started=started)
        _account_clients(outcome, config.clients, binding, set(nodes))
        if on_round is not None:
            on_round(record)


class _RoundReplies:
    """A round's replies by the node each one answers: the node the answered message was sent to
    (`reply_to_message_id`), not the reply's sender, which for an error Flower's SuperLink raises on a
    node's behalf (e.g. a node that stopped heartbeating) is the SuperLink itself."""

    def __init__(self, messages: list[Message], replies: list[Message], round_index: int, outcome: RoundOutcome):
        self.round_index, self.outcome = round_index, outcome
        sent_to = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}
        self.by_node: dict[int, Message] = {}
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id)
            if node is None:
                log.warning("round %d: ignored a reply to a message this round did not send (from node %d)",
                            round_index + 1, reply.metadata.src_node_id)
            elif node in self.by_node:
                log.warning("round %d: node %d sent a second reply; only the first is used", round_index + 1, node)
            else:
                self.by_node[node] = reply
        # the nodes that answered themselves, alive this round (an error reply from a ClientApp counts)
        self.answering = {node for node, reply in self.by_node.items() if reply.metadata.src_node_id == node}

    def leave_out(self, node: int, client_id: int | None, reason: str) -> None:
        self.outcome.leave_out(LeftOut(client_id, node, reason))


def _accept_replies(round_replies: _RoundReplies, server: SplitServer, round_index: int,
                    broadcast: dict[str, torch.Tensor], binding: _NodeBinding) -> list[Accepted]:
    """The replies the round uses, absorbed by the server; the others are left out with their reason."""
    spec = server.reply_spec(round_index)
    valid = []
    for node, reply in sorted(round_replies.by_node.items()):
        known = binding.client_of.get(node)
        if reply.has_error():
            error = reply.error
            what = "client failed (error code" if node in round_replies.answering else "node unavailable (Flower " \
                "error code"
            round_replies.leave_out(node, known, f"{what} {error.code}): {error.reason}")
            continue
        try:
            decoded = decode_reply(reply.content, spec)
        except MessageRejected as error:
            round_replies.leave_out(node, known, f"reply rejected: {error}")
            continue
        except Exception as error:  # noqa: BLE001 - whatever a node sends must not end the round
            round_replies.leave_out(node, known, f"reply could not be decoded: {type(error).__name__}: {error}")
            continue
        client_id = decoded.result.client_id
        problem = binding.check(node, client_id, round_replies.answering)
        if problem is not None:
            round_replies.leave_out(node, known, f"reply rejected: {problem}")
            continue
        try:  # not under the catch-all above: a replay that fails midway is a bug, not a bad reply
            valid.append(server.absorb(decoded, broadcast, node))
        except MessageRejected as error:
            round_replies.leave_out(node, client_id, f"reply rejected: {error}")
    return valid


def _account_clients(outcome: RoundOutcome, clients: int, binding: _NodeBinding, nodes: set[int]) -> None:
    """Every client the round neither aggregated nor left out by its node is left out by client; the nodes
    left out without a known client are listed after the clients, as they were found."""
    for entry in outcome.left_out:
        if entry.client_id in outcome.aggregated:  # its client was taken over by another node this round
            entry.reason += f" (it was client {entry.client_id}, which another node took over)"
            entry.client_id = None
    named = set(outcome.aggregated) | {entry.client_id for entry in outcome.left_out}
    unidentified = [entry for entry in outcome.left_out if entry.client_id is None]
    suffix = (" (nodes left out this round before identifying their client: "
              f"{', '.join(str(entry.node_id) for entry in unidentified)})" if unidentified else "")
    missing = []
    for client_id in range(clients):
        if client_id in named:
            continue
        node = binding.node_of(client_id)
        if node is not None and node not in nodes:
            missing.append(LeftOut(client_id, node, f"its node {node} is not connected"))
        else:
            missing.append(LeftOut(client_id, None, f"no reply as this client{suffix}"))
    for entry in missing:
        outcome.leave_out(entry, record=False)
    identified = [entry for entry in outcome.left_out if entry.client_id is not None]
    outcome.left_out = sorted(identified + missing, key=lambda entry: entry.client_id) + unidentified


def make_server_app(config: TrainConfig | None = None, settings: FlowerSettings | None = None, *,
                    on_finish: Callable[[FlowerRun], None] | None = None,
                    progress: Callable[[str], None] | None = None,
                    on_round: Callable[[RoundRecord], None] | None = None) -> ServerApp:
    """A ServerApp for `config` (None: read TrainConfig and FlowerSettings from the run config).

    on_finish receives the FlowerRun; when settings.report is set the JSON report is written there. A run
    that fails still writes its report (status "failed", the error, the rounds it finished), prints
    "heron: the run FAILED: ..." and raises, so that Flower marks it failed (`flwr ls`: finished:failed).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        report = "" if config is not None else context.run_config.get("report", "")
        try:
            if config is None:
                run_config, run_settings = from_run_config(context.run_config)
            else:
                run_config, run_settings = config, (settings or FlowerSettings()).validate()
            report = run_settings.report
            run = run_rounds(grid, run_config, run_settings, progress=progress, on_round=on_round)
        except Exception as error:
            reason = error.run.error if isinstance(error, RunFailed) else f"{type(error).__name__}: {error}"
            print(f"heron: the run FAILED: {reason}", flush=True)
            if isinstance(report, str) and report:
                if isinstance(error, RunFailed):
                    write_report(report, [error.run])
                else:
                    write_failure(report, reason, dict(context.run_config))
                log.info("wrote %s", report)
            raise
        if report:
            write_report(report, [run])
            log.info("wrote %s", report)
        if on_finish is not None:
            on_finish(run)

    return app


def print_round(record: RoundRecord) -> None:
    """One progress line per round (a deployed ServerApp's stdout reaches `flwr run --stream` / `flwr log`)."""
    print(f"round {record.round}: test acc {record.test_accuracy:.4f}, client loss {record.client_loss:.4f} "
          f"({record.seconds:.1f} s)", flush=True)


app = make_server_app(on_round=print_round)
