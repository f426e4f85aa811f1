"""Fixtures of the Flower tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def servers(monkeypatch):
    """The SplitServer of each run_rounds call (to look at its replicas, step counts and shard sizes)."""
    from heron.flower import server_app
    from heron.flower.server import SplitServer

    made = []

    class Recorded(SplitServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(server_app, "SplitServer", Recorded)
    return made
