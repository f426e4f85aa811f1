"""An in-process stand-in for Flower's Grid: the ServerApp's round loop and the ClientApp wired
together in one process (no Ray, no SuperLink), with the ways a deployment loses a node's reply."""

from __future__ import annotations

import copy
import uuid

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity

from heron.sfl.config import TrainConfig

# A small run of every in-process test: 3 clients, 2 rounds of 2 local steps on digits.
CONFIG = TrainConfig(method="heron", model="cnn", dataset="digits", clients=3, rounds=2, local_steps=2,
                     upload_every=1, batch_size=8)
SEEDS = TrainConfig(**{**CONFIG.__dict__, "client_upload": "seeds"})


class InProcessGrid:
    """A Grid stand-in: node 100 + i is client i of `partitions`; messages run through the ClientApp right here.

    Like Flower, a pushed message gets a message id, a node's context is only updated by a call that
    returns, and a raising ClientApp becomes an error reply from that node. silent: nodes that never
    answer (a timeout); dead: nodes the SuperLink answers for with its own "node unavailable" error
    reply (sent from the SuperLink's node id, as Flower does for a node that stopped heartbeating);
    tamper(node, reply): rewrites a node's reply before the server sees it, or returns None to lose
    it (the node ran the round and kept its context, the server never hears of it).
    """

    def __init__(self, app, nodes: int, *, partitions: int | None = None, silent=(), dead=(), tamper=None):
        self.app, self.silent, self.dead, self.tamper = app, set(silent), set(dead), tamper
        node_config = {"num-partitions": partitions or nodes}
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                                          node_config={**node_config, "partition-id": i})
                         for i in range(nodes)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what push_messages does
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.dead:
                replies.append(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))
                continue
            context = copy.deepcopy(self.contexts[node])
            try:
                reply = self.app(message, context)
                self.contexts[node] = context
            except Exception as error:  # noqa: BLE001 - what Flower's runtime does with a raising ClientApp
                reply = Message(Error(code=2, reason=f"{type(error).__name__}: {error}"), reply_to=message)
            reply = self.tamper(node, reply) if self.tamper else reply
            if reply is not None:
                replies.append(reply)
        return replies


def set_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages read the run and node ids of the current task, which Flower's runtime sets."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def equal_states(a, b) -> bool:
    """Two state dicts with the same keys and bit-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
