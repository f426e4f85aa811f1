"""One client round behind a Flower message: the engine's Client, rebuilt per message, with its
persistent state kept in the node's Flower context.

A ClientApp may be instantiated afresh for every message (in simulation each message can land on
any Ray actor), so nothing may live in Python objects between rounds. Client i is rebuilt from the
request exactly as the engine builds it (`heron.sfl.engine.build_client`: the same data shard,
`ClientBatches`, updater seed and optimizer), loads the broadcast model and its own updater state
(step count, Adam moments) from `context.state`, runs h local steps and writes the updater state
back. Flower keeps `context.state` per node and run (in simulation the driver stores the context
each ClientApp call returns; a SuperNode keeps it for the run), so client i's round t starts from
exactly the state the engine's client i would have.

Updater state is stored as `heron.sfl.state.pack` output: tensors in an ArrayRecord, the JSON
skeleton (and the client id and config it belongs to) in a ConfigRecord. It is written only after
a round succeeds, so a failed round leaves the previous state.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from heron.flower.codec import RoundRequest, decode_request, encode_arrays, encode_reply, specs_of
from heron.sfl.data import ClientData, load_dataset, split_clients
from heron.sfl.engine import TrainConfig, build_client
from heron.sfl.methods import ImageShape, build_split_model, cross_entropy
from heron.sfl.state import pack, unpack

STATE_META, STATE_TENSORS = "heron.client", "heron.updater"


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
    """The config fields a client's saved state depends on (`rounds` may differ, as for checkpoints)."""
    return json.dumps({k: v for k, v in asdict(config).items() if k != "rounds"}, sort_keys=True)


def load_updater_state(state: RecordDict, client_id: int, config: TrainConfig) -> dict[str, Any] | None:
    """The updater state this node saved after its last round, or None before its first round."""
    if STATE_META not in state.keys():
        return None
    meta = state[STATE_META]
    if meta["client-id"] != client_id or meta["config"] != _identity(config):
        raise ValueError(f"this node's saved state belongs to client {meta['client-id']} of another run "
                         f"configuration; it cannot continue as client {client_id} of this one")
    tensors = {key: torch.from_numpy(array.numpy().copy()) for key, array in state[STATE_TENSORS].items()}
    return unpack(json.loads(meta["skeleton"]), tensors)


def save_updater_state(state: RecordDict, client_id: int, config: TrainConfig, updater_state: dict[str, Any]) -> None:
    tensors, skeleton = pack(updater_state)
    state[STATE_TENSORS] = encode_arrays(tensors)
    state[STATE_META] = ConfigRecord({"client-id": client_id, "config": _identity(config),
                                      "skeleton": json.dumps(skeleton)})


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
    saved = load_updater_state(state, client_id, config)
    if saved is not None:
        client.updater.load_state_dict(saved)
    result = client.run_round(request.round_index)
    save_updater_state(state, client_id, config, client.updater.state_dict())
    return encode_reply(result, request.round_index, client_upload=request.client_upload)
