"""heron's Flower ClientApp: `heron.flower.client_app:app`.

A node is client `partition-id` of the run (its node config: set by the simulation engine, or
`flower-supernode --node-config "partition-id=0 num-partitions=3"` in a deployment). Each "train"
message runs one round of that client (heron.flower.client.run_client_round); a malformed request
or a failing round raises, which Flower returns to the ServerApp as an error reply.

Fault injection for tests only: `make_client_app(fail_clients={1})` builds an app whose client 1
raises on every round request it gets; `make_client_app(hostile_clients={2})` one whose client 2 runs
its round and then replaces every floating-point value of its reply (smashed data, model or
seed-and-scalar upload) by 1e30: well formed, finite and poisoned. The deployed `app` does neither,
and nothing a server sends or a run config holds can switch this on.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from heron.flower.client import run_client_round

log = logging.getLogger("heron.flower")


class InjectedFailure(RuntimeError):
    """Raised by a client that a test asked to fail."""


def _node_int(context: Context, key: str) -> int | None:
    value = context.node_config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"node config {key!r} must be an int, got {type(value).__name__} {value!r}")
    return value


def _poisoned(content: RecordDict, value: float) -> RecordDict:
    """`content` with every floating-point array filled with `value` (shapes and dtypes kept)."""
    for record in content.values():
        if isinstance(record, ArrayRecord):
            for key in list(record.keys()):
                array = record[key].numpy()
                if np.issubdtype(array.dtype, np.floating):
                    record[key] = Array.from_numpy_ndarray(np.full_like(array, value))
    return content


def make_client_app(*, fail_clients: Collection[int] = (), hostile_clients: Collection[int] = (),
                    hostile_value: float = 1e30) -> ClientApp:
    """A ClientApp running heron clients; clients in `fail_clients` raise InjectedFailure, clients in
    `hostile_clients` reply with every floating-point value replaced by `hostile_value` (tests only)."""
    failing = frozenset(int(i) for i in fail_clients)
    hostile = frozenset(int(i) for i in hostile_clients)
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        client_id = _node_int(context, "partition-id")
        if client_id is None:
            raise ValueError("this node has no 'partition-id' in its node config; start it with "
                             "--node-config \"partition-id=<i> num-partitions=<clients>\"")
        if client_id in failing:
            raise InjectedFailure(f"client {client_id}: failure injected by make_client_app(fail_clients=...)")
        content = run_client_round(message.content, context.state, client_id=client_id,
                                   num_partitions=_node_int(context, "num-partitions"))
        if client_id in hostile:
            content = _poisoned(content, hostile_value)
        return Message(content, reply_to=message)

    return app


app = make_client_app()
