"""One client round behind a Flower message: the engine's Client, rebuilt per message, with its
persistent state kept in the node's Flower context.

A ClientApp may be instantiated afresh for every message (in simulation each message can land on
any Ray actor), so nothing may live in Python objects between rounds. Client i is rebuilt from the
request exactly as the engine builds it (`heron.sfl.clients.build_client`: the same data shard,
`ClientBatches`, updater seed and optimizer), loads the broadcast model and its own updater state
(step count, Adam moments) from `context.state`, runs h local steps and writes the updater state
back. Flower keeps `context.state` per node and run (in simulation the driver stores the context
each ClientApp call returns; a SuperNode keeps it for the run), so client i's round t starts from
exactly the state the engine's client i would have.

A round can succeed here and still not count: its reply may be lost, arrive late or be rejected.
The server then did not take the round's steps (in seeds mode its replica of this client did not
replay them), so the client must not keep them either. Each round therefore saves two updater
states, the one it started from ("base") and the one it ended with ("latest"), each tagged with its
`codec.ClientSync` (generation, step count), and every request says where the server has each
client. The next round starts from the saved state that is there: "latest" when the reply was
used, "base" when it was not (the round is undone, and logged). When the node holds no state of
the server's generation (its first round, a restarted node, or a restart the server did not take
up), it starts a fresh updater: at the server's generation when the server has no steps from the
client, else as the next generation, which the server takes up by restarting its replica. The
generation keeps a fresh updater's states apart from the server's, even at equal step counts.
A node holding states of the server's generation, none at its step count, cannot arise in a run
that follows this protocol; the round then fails with the reason.

Updater state is stored as `heron.sfl.state.pack` output: tensors in an ArrayRecord, the JSON
skeleton (and the client id and config it belongs to) in a ConfigRecord. It is written only after
a round succeeds, so a failed round leaves the previous states.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from heron.flower.codec import ClientSync, RoundRequest, decode_request, encode_arrays, encode_reply, specs_of
from heron.sfl.clients import build_client
from heron.sfl.config import TrainConfig, identity_differences
from heron.sfl.data import ClientData, load_dataset, split_clients
from heron.sfl.methods import ImageShape, build_split_model, cross_entropy
from heron.sfl.replay import seed_scalar_upload
from heron.sfl.state import pack, unpack

log = logging.getLogger("heron.flower")

STATE_META, STATE_TENSORS = "heron.client", "heron.updater"
LATEST, BASE = "", ".base"  # record-name suffixes of the two saved updater states


@functools.lru_cache(maxsize=4)
def _shards(dataset: str, seed: int, clients: int, partition: str, alpha: float) -> tuple[ImageShape, list[ClientData]]:
    """The run's image shape and client shards, as the engine draws them (cached per process)."""
    data = load_dataset(dataset, seed=seed)
    shape = ImageShape(data.in_channels, data.image_size, data.num_classes)
    return shape, split_clients(data, clients, partition, alpha, seed)


def _client_model(config: TrainConfig, shape: ImageShape) -> torch.nn.Module:
    # The initial values are overwritten by the broadcast state; fork_rng keeps the process's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        return build_split_model(config.model, shape).client_with_aux().to(config.device)


def _identity(config: TrainConfig) -> str:
    """The run a client's saved state belongs to: TrainConfig.identity(), the rule checkpoints use too."""
    return json.dumps(config.identity(), sort_keys=True)


def load_saved_state(state: RecordDict, client_id: int, config: TrainConfig, *,
                     slot: str = LATEST) -> tuple[ClientSync, dict[str, Any]] | None:
    """(where it is, the updater state) this node saved after (slot LATEST) or before (slot BASE) its
    last round, or None before its first round."""
    if STATE_META + slot not in state.keys():
        return None
    meta = state[STATE_META + slot]
    differences = identity_differences(json.loads(meta["config"]), config)
    if meta["client-id"] != client_id or differences:
        raise ValueError(f"this node's saved state belongs to client {meta['client-id']} of another run "
                         f"configuration; it cannot continue as client {client_id} of this one"
                         + (f" ({'; '.join(differences)})" if differences else ""))
    tensors = {key: torch.from_numpy(array.numpy().copy()) for key, array in state[STATE_TENSORS + slot].items()}
    updater_state = unpack(json.loads(meta["skeleton"]), tensors)
    return ClientSync(meta["generation"], updater_state["steps"]), updater_state


def load_updater_state(state: RecordDict, client_id: int, config: TrainConfig, *,
                       slot: str = LATEST) -> dict[str, Any] | None:
    """The updater state of load_saved_state (without its generation)."""
    saved = load_saved_state(state, client_id, config, slot=slot)
    return None if saved is None else saved[1]


def save_updater_state(state: RecordDict, client_id: int, config: TrainConfig, updater_state: dict[str, Any], *,
                       generation: int = 0, slot: str = LATEST) -> None:
    tensors, skeleton = pack(updater_state)
    state[STATE_TENSORS + slot] = encode_arrays(tensors)
    state[STATE_META + slot] = ConfigRecord({"client-id": client_id, "config": _identity(config),
                                             "generation": generation, "skeleton": json.dumps(skeleton)})


def starting_state(state: RecordDict, client_id: int, config: TrainConfig,
                   server: ClientSync) -> tuple[ClientSync, dict[str, Any] | None]:
    """Where this round starts and the saved updater state to start from (None: a fresh updater), given
    where the server has this client (see the module docstring).

    Raises ValueError when the node holds states of the server's generation but none at its step count.
    """
    saved = {slot: load_saved_state(state, client_id, config, slot=slot) for slot in (LATEST, BASE)}
    current = {slot: entry for slot, entry in saved.items() if entry is not None
               and entry[0].generation == server.generation}
    for slot, (where, updater_state) in current.items():
        if where == server:
            if slot == BASE:
                log.warning("client %d: the server did not use its last round (reply lost, late or rejected); "
                            "undoing it: back from step %d to step %d", client_id, saved[LATEST][0].steps,
                            server.steps)
            return where, updater_state
    if current:
        steps = [where.steps for where, _ in current.values()]
        raise ValueError(f"client {client_id} cannot resynchronise with the server: the server has it at step "
                         f"{server.steps} of generation {server.generation}, this node's saved updater states of "
                         f"that generation are at steps {steps}")
    fresh = server if server.steps == 0 else server.starts()[1]
    if fresh != server or saved[LATEST] is not None:
        log.warning("client %d: no saved updater state where the server has it (step %d of generation %d); "
                    "starting afresh as generation %d", client_id, server.steps, server.generation, fresh.generation)
    return fresh, None


def run_client_round(content: RecordDict, state: RecordDict, *, client_id: int,
                     num_partitions: int | None = None) -> RecordDict:
    """Decode a round request, run client `client_id`'s h local steps, return the reply content.

    state: the node's `context.state` (read and updated). num_partitions: the node's
    "num-partitions" setting, which must equal the run's number of clients when given.
    Raises MessageRejected for a malformed request and ValueError for a node that does not fit the run.
    """
    shape: ImageShape | None = None
    model: torch.nn.Module | None = None

    def state_specs(config: TrainConfig):
        nonlocal shape, model
        if not 0 <= client_id < config.clients:
            raise ValueError(f"this node is partition {client_id}, but the run has {config.clients} clients")
        if num_partitions is not None and num_partitions != config.clients:
            raise ValueError(f"this node has num-partitions={num_partitions}, but the run has "
                             f"{config.clients} clients")
        shape = _shards(config.dataset, config.seed, config.clients, config.partition, config.alpha)[0]
        model = _client_model(config, shape)
        return specs_of(model.state_dict())

    request: RoundRequest = decode_request(content, state_specs)
    config = request.config
    model.load_state_dict(request.state)
    data = _shards(config.dataset, config.seed, config.clients, config.partition, config.alpha)[1][client_id]
    client = build_client(config, client_id, data, model, cross_entropy(), config.device)
    start, saved = starting_state(state, client_id, config, request.sync[client_id])
    if saved is not None:
        client.updater.load_state_dict(saved)
    base = client.updater.state_dict()
    result = client.run_round(request.round_index)
    seeds = seed_scalar_upload(client, result) if config.client_upload == "seeds" else None
    save_updater_state(state, client_id, config, base, generation=start.generation, slot=BASE)
    save_updater_state(state, client_id, config, client.updater.state_dict(), generation=start.generation)
    return encode_reply(result, request.round_index, start=start, seeds=seeds)
