"""The server side of a Flower run, free of transport: the engine's MainServer and FedServer fed
with the clients' decoded replies.

`SplitServer` holds a `heron.sfl.engine.Experiment` built from the same TrainConfig, so the
initial global model, the server part and its optimizer, FedAvg, evaluation, the report and, in
seeds mode, each client's `ClientReplica` are the engine's own. The Experiment's in-process
clients are never trained: only client 0 is profiled once (on a copy) for the report's
client-cost columns, as `heron train` does. A round is what `Experiment._aux_round` does with the
clients' results: each accepted reply is absorbed (in seeds mode: the client's replica replays its
upload from the round's broadcast state), then in client-id order the main server trains on each
client's uploads and the fed server averages the client models.

Clients and server stay in step: the server keeps, per client, where the rounds it accepted left
the client's updater (`codec.ClientSync`: generation and step count; in seeds mode, where its
replica is) and sends that with every request; a client starts each round from its updater state
there, so a round whose reply the server did not use (lost, late or rejected) leaves no trace on
the client either (heron.flower.client).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from heron.flower import screen
from heron.flower.codec import (
    REPLY,
    SEEDS,
    ClientReply,
    ClientSync,
    MessageRejected,
    ReplySpec,
    TensorSpec,
    check_start,
    specs_of,
)
from heron.flower.config import FlowerSettings, check_flower_dataset, check_flower_method
from heron.sfl.config import TrainConfig
from heron.sfl.engine import Experiment
from heron.sfl.records import MethodReport, RoundRecord, RoundTally
from heron.sfl.roles import ClientRoundResult, state_bytes

log = logging.getLogger("heron.flower")


@dataclass
class LeftOut:
    """A client, or a node, that a round did not aggregate, and why.

    client_id: the client, when the server knows it (None: a node that was left out before it ever
    identified its client with a usable reply). node_id: the node the server sent the round to (None:
    no node replied as this client).
    """

    client_id: int | None
    node_id: int | None
    reason: str


@dataclass(frozen=True)
class Accepted:
    """A reply that passed every check of its own: the client's round (in seeds mode with the state its
    replica rebuilt), the bytes its model upload took (the state, or the seed-and-scalar upload), the node
    it came from, where the client's updater is once the round is used, and (seeds mode) the client's
    replica state before the replay, to restore if the round is not used after all."""

    result: ClientRoundResult
    model_bytes: int
    node_id: int | None = None
    sync: ClientSync = ClientSync()
    replica_before: dict | None = None


def describe(entry: LeftOut) -> str:
    """'client 2 (node 7)', 'client 2' (no node replied as it) or 'node 7' (its client is not known)."""
    if entry.client_id is None:
        return f"node {entry.node_id}"
    return f"client {entry.client_id}" + ("" if entry.node_id is None else f" (node {entry.node_id})")


@dataclass
class RoundOutcome:
    """Which clients a round aggregated and which it left out (every client of the run is in one of the
    two lists; nodes left out before identifying their client are listed with client_id None)."""

    round: int
    aggregated: list[int] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)  # clients whose update FedAvg used clipped (heron.flower.screen)

    def leave_out(self, entry: LeftOut, *, record: bool = True) -> None:
        """Log (and, with record, list) a client or node left out of this round."""
        log.warning("round %d: %s left out: %s", self.round, describe(entry), entry.reason)
        if record:
            self.left_out.append(entry)


class SplitServer:
    """Main server + fed server of one Flower run (see the module docstring)."""

    def __init__(self, config: TrainConfig, settings: FlowerSettings | None = None, *,
                 progress: Callable[[str], None] | None = None, dataset=None, client_data=None):
        check_flower_method(config.method)
        check_flower_dataset(config.dataset)
        self.settings = (settings or FlowerSettings()).validate()
        self.experiment = Experiment(config, progress=progress, dataset=dataset, client_data=client_data)
        self.config = self.experiment.config
        # FedAvg weights: the shard sizes this server assigned, never a count a client declares
        self.shard_sizes = [len(data.y) for data in self.experiment.client_data]
        data = self.experiment.dataset
        self._reference_images = data.x_test[:max(self.config.batch_size, 2)].to(self.experiment.device)
        self.smashed_reference = 0.0
        self.log = self.experiment.log
        self.state_spec = specs_of(self.experiment.global_model.state_dict())
        self.smashed_spec = self._smashed_spec()
        self.outcomes: list[RoundOutcome] = []
        self.profile = None
        # per client id: where the rounds this server accepted left the client's updater
        self.sync = [ClientSync() for _ in range(self.config.clients)]
        # seeds mode: the engine's replicas, and their initial states for clients whose updater restarts
        self.replicas = self.experiment.replicas
        self._initial_replicas = None if self.replicas is None else [r.state_dict() for r in self.replicas]

    def _smashed_spec(self) -> TensorSpec:
        """One sample's cut-layer output: run the client part on one zero image (on a copy, in eval mode)."""
        data = self.experiment.dataset
        client_part = copy.deepcopy(self.experiment.global_model[0]).eval()
        with torch.no_grad():
            x = torch.zeros(1, data.in_channels, data.image_size, data.image_size,
                            dtype=data.x_train.dtype, device=self.experiment.device)
            out = client_part(x)
        return TensorSpec(tuple(out.shape[1:]), out.dtype)

    def start(self) -> None:
        """Profile one client step for the report, before round 1, as Experiment.run does."""
        self.profile = self.experiment.profile_client()

    def broadcast(self) -> dict[str, torch.Tensor]:
        """The global client model (client part + aux head) sent to every node; also measures the round's
        smashed-data reference (heron.flower.screen.smashed_reference) on it."""
        self.smashed_reference = screen.smashed_reference(self.experiment.global_model[0], self._reference_images)
        return self.experiment.client_parameters()

    def reply_spec(self, round_index: int) -> ReplySpec:
        """What round `round_index`'s replies must be (kind: the run's client_upload)."""
        cfg, data = self.config, self.experiment.dataset
        buffers = {} if self.replicas is None else specs_of(self.replicas[0].expected_buffers)
        return ReplySpec(round_index=round_index, client_upload=cfg.client_upload, clients=cfg.clients,
                         local_steps=cfg.local_steps, upload_every=cfg.upload_every, batch_size=cfg.batch_size,
                         max_samples=len(data.y_train), num_classes=data.num_classes, state=self.state_spec,
                         smashed=self.smashed_spec, q=cfg.q, buffers=buffers)

    def absorb(self, reply: ClientReply, broadcast: dict[str, torch.Tensor], node_id: int | None = None) -> Accepted:
        """Check a decoded reply to the round that broadcast `broadcast` against the server's own
        references and, in seeds mode, replay it into the client's state with the client's replica.

        Raises MessageRejected, leaving the replica and the server's ClientSync untouched, when the reply
        declares another sample count than the shard the server assigned, its smashed data or its update
        are out of bounds (heron.flower.screen), it did not start where the server has the client (or at
        step 0 of the next generation) or (seeds) the replica cannot replay it. A reply starting a new
        generation is a client whose updater restarted afresh (e.g. a restarted SuperNode): logged, and its
        replica restarts from the initial state. The ClientSync advances only when finish_round uses the reply.
        """
        result, start = reply.result, reply.start
        client_id = result.client_id
        if reply.kind != self.config.client_upload:
            raise ValueError(f"a {reply.kind!r} reply in a run with client_upload={self.config.client_upload!r}")
        assigned = self.shard_sizes[client_id]
        if result.num_samples != assigned:
            raise MessageRejected(f"{REPLY}/num-samples: expected {assigned} (the shard the server assigned client "
                                  f"{client_id}), got {result.num_samples}")
        screen.check_smashed(result.uploads, self.smashed_reference, self.settings.max_smashed_ratio)
        here = self.sync[client_id]
        restarted = check_start(start, here, client_id)
        if restarted:
            log.warning("client %d restarted its updater afresh (generation %d; the server had it at step %d of "
                        "generation %d)", client_id, start.generation, here.steps, here.generation)
        applied = self.config.local_steps - result.skipped_steps
        sync = ClientSync(start.generation, start.steps + applied)
        if reply.kind != "seeds":
            screen.check_update(result.state, broadcast, self.settings.max_update_ratio)
            return Accepted(result, state_bytes(result.state), node_id, sync)
        replica = self.replicas[client_id]
        before = replica.state_dict()
        if restarted:
            replica.load_state_dict(self._initial_replicas[client_id])
        try:
            try:
                result.state = replica.rebuild(broadcast, reply.seeds)  # checks everything before replaying
            except ValueError as error:
                raise MessageRejected(f"{SEEDS}: {error}") from None
            screen.check_update(result.state, broadcast, self.settings.max_update_ratio)
        except MessageRejected:
            replica.load_state_dict(before)
            raise
        return Accepted(result, reply.seeds.nbytes, node_id, sync, before)

    def finish_round(self, round_index: int, accepted: list[Accepted], outcome: RoundOutcome, *,
                     broadcast: dict[str, torch.Tensor], bytes_down: int, started: float) -> RoundRecord:
        """Train the server on the accepted replies in client-id order, FedAvg them, evaluate; the round's record.

        A client whose uploads leave the server part's loss, parameters or optimizer state non-finite is
        undone (server part, optimizer and, in seeds mode, the client's replica back to before it) and
        left out. The updates used are clipped (heron.flower.screen.clip_updates) and averaged with the
        assigned shard sizes as weights. With no replies the global client model stays as it was (and
        the server part untrained).
        """
        exp = self.experiment
        tally = RoundTally()
        for entry in sorted(accepted, key=lambda a: a.result.client_id):
            result = entry.result
            saved = self._server_state()
            own = RoundTally()
            own.absorb(exp.server, result, result.state, entry.model_bytes)
            if not (all(math.isfinite(loss) for loss in own.server_losses) and self._server_finite()):
                self._restore_server(saved)
                if entry.replica_before is not None:
                    self.replicas[result.client_id].load_state_dict(entry.replica_before)
                outcome.leave_out(LeftOut(result.client_id, entry.node_id, "reply rejected: training the server part "
                                          "on its smashed data gave non-finite values (undone)"))
                continue
            _add(tally, own)
            self.sync[result.client_id] = entry.sync
            outcome.aggregated.append(result.client_id)
            self.log(f"round {round_index + 1} client {result.client_id}: loss {result.losses[-1]:.4f}")
        tally.states, clipped = screen.clip_updates(tally.states, broadcast, self.settings.clip_ratio)
        outcome.clipped = [outcome.aggregated[i] for i in clipped]
        if outcome.clipped:
            log.warning("round %d: updates of clients %s clipped to clip_ratio=%g x the round's median update norm",
                        round_index + 1, outcome.clipped, self.settings.clip_ratio)
        if not tally.states:
            log.warning("round %d: no valid client replies; the global client model is kept", round_index + 1)
        record = exp.finish_round(round_index, tally, bytes_down=bytes_down, started=started)
        self.outcomes.append(outcome)
        return record

    def _server_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        server = self.experiment.server
        return ({k: v.detach().clone() for k, v in server.model.state_dict().items()},
                copy.deepcopy(server.optimizer.state_dict()))

    def _restore_server(self, saved: tuple[dict[str, torch.Tensor], dict]) -> None:
        server = self.experiment.server
        server.model.load_state_dict(saved[0])
        server.optimizer.load_state_dict(saved[1])

    def _server_finite(self) -> bool:
        server = self.experiment.server
        return screen.all_finite(server.model.state_dict().values()) and screen.all_finite(
            screen.optimizer_tensors(server.optimizer))

    def report(self) -> MethodReport:
        """The engine's MethodReport of the rounds run so far."""
        exp, profile = self.experiment, self.profile
        if profile is None:
            raise RuntimeError("call start() before report(): the report includes the client profile")
        return exp.method_report(profile)

    def client_parameters(self) -> dict[str, torch.Tensor]:
        return self.experiment.client_parameters()

    def server_parameters(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.experiment.server_model.state_dict().items()}


def _add(tally: RoundTally, other: RoundTally) -> None:
    """Append one client's tally to the round's."""
    tally.states += other.states
    tally.counts += other.counts
    tally.client_losses += other.client_losses
    tally.server_losses += other.server_losses
    tally.up += other.up
    tally.skipped += other.skipped
