"""heron's ClientApp behind faults that a node's config sets (tests/flower/test_deployment_faults.py only).

A test builds a Flower app from the shipped app's pyproject.toml with this module as its ClientApp.
Node config `test-stall-round=R test-stall-s=S test-marker="PATH"`: before round R (0-based) the node
touches PATH (when given) and sleeps S seconds, then runs heron's round as `heron.flower.client_app:app`
does; a test kills the node while it sleeps (a node dying mid-round) or lets it answer after the
round timeout (a slow node).
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from heron.flower.client_app import app as heron_app

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    config = context.node_config
    if config.get("test-stall-round") == message.content["heron.round"]["round"]:
        if config.get("test-marker"):
            Path(str(config["test-marker"])).touch()
        time.sleep(float(config["test-stall-s"]))
    return heron_app(message, context)
