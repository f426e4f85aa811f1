"""Faults on Flower's deployment engine, with a real SuperLink and SuperNodes on 127.0.0.1: a SuperNode
killed mid-round and restarted, and a node that answers after round_timeout; the report's
left-out entries are checked round by round.

It waits out round_timeout three times (about 3 minutes on 2 cores), so it runs on request only:
`make flower-faults` (HERON_FLOWER_FAULTS=1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from tests.flower.deployment import CONNECTION, LocalDeployment  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("HERON_FLOWER_FAULTS") != "1",
                                                   reason="set HERON_FLOWER_FAULTS=1 (make flower-faults)")]

HERE = Path(__file__).parent
SHIPPED = HERE.parents[1] / "python" / "heron" / "flower" / "app" / "pyproject.toml"
TIMEOUT = 45.0  # round_timeout (s): an honest round here (a ClientApp process start included) takes well under it


def _fault_app(root: Path) -> Path:
    """The shipped app (its run config) with tests/flower/fault_app/faulty_client.py as its ClientApp."""
    app = root / "fault-app"
    app.mkdir()
    text = SHIPPED.read_text()
    assert 'clientapp = "heron.flower.client_app:app"' in text
    (app / "pyproject.toml").write_text(text.replace('clientapp = "heron.flower.client_app:app"',
                                                     'clientapp = "faulty_client:app"'))
    shutil.copy(HERE / "fault_app" / "faulty_client.py", app / "faulty_client.py")
    return app


def _node_ids(deployment: LocalDeployment) -> set[int]:
    listed = json.loads(deployment.flwr("supernode", "list", CONNECTION, "--format", "json").stdout)
    return {int(node["node-id"]) for node in listed["nodes"]}


def test_killed_restarted_and_slow_nodes_are_left_out_by_client(tmp_path):
    marker = tmp_path / "b-stalled"
    report = tmp_path / "report.json"
    run_config = (f"clients=2 rounds=5 dataset='digits' local_steps=2 batch_size=8 round_timeout={TIMEOUT} "
                  f"node_wait=60.0 report='{report}'")
    with LocalDeployment(tmp_path, secure=False, nodes=2) as deployment:
        deployment.start_superlink()
        # A (client 0) answers round 4 after the timeout; B (client 1) stalls in round 2 and is killed there
        deployment.start_supernode("A", 0, 2, f"test-stall-round=3 test-stall-s={TIMEOUT + 3}")
        deployment.start_supernode("B", 1, 2, f'test-stall-round=1 test-stall-s=600 test-marker="{marker}"')
        started = deployment.flwr("run", str(_fault_app(tmp_path)), CONNECTION, "--run-config", run_config,
                                  "--format", "json")
        run_id = json.loads(started.stdout)["run-id"]
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert time.monotonic() < deadline, deployment.log("superlink")
            time.sleep(0.5)
        nodes_before = _node_ids(deployment)
        deployment.stop("B", signal.SIGKILL)  # mid-round 2
        deployment.start_supernode("B2", 1, 2)  # restarted
        deployment.flwr("log", str(run_id), CONNECTION, "--stream", timeout_s=900)
        status = json.loads(deployment.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json").stdout)
        assert status["runs"][0]["status"] == "finished:completed", deployment.log("superlink")

    rounds = json.loads(report.read_text())["flower"]["heron"]["rounds"]
    entries = [[(e["client_id"], e["node_id"], e["reason"]) for e in r["left_out"]] for r in rounds]
    assert [r["aggregated"] for r in rounds] == [[0, 1], [0], [0, 1], [1], [0, 1]]
    late = f"no reply within round_timeout={TIMEOUT} s"
    assert not any(node == 1 for entry in entries for _, node, _ in entry)  # no phantom SuperLink node
    assert entries[0] == [] and entries[4] == []
    ((client, node_b, reason),) = entries[1]  # B killed mid-round: client 1, once, by its node
    assert client == 1 and node_b in nodes_before and (reason == late or reason.startswith("node unavailable"))
    # round 3: B2 took client 1 over; B, still listed until its heartbeat expires, left out by node if sent to
    assert all(c is None and n == node_b for c, n, _ in entries[2])
    (client_0,) = [e for e in entries[3] if e[0] is not None]  # A answered round 4 too late
    assert client_0[0] == 0 and client_0[2] == late
    assert all(c is None and n == node_b for c, n, _ in entries[3] if c is None)
