"""heron's Flower app on Flower's deployment engine: a real SuperLink and two SuperNodes on 127.0.0.1
(free ports, every process stopped at the end, each command bounded in time), one round with
`flwr run` (through heron.flower.submit), the report equal to `heron train`'s on the same config.
Once as docs/flower.md's first walk-through does it (--insecure), once secured (TLS, SuperNode
authentication with registered keys, the CLI's root-certificates). A run the ServerApp refuses is
reported failed by heron (report, exit status) and by `flwr ls`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from tests.flower.deployment import CONNECTION, LocalDeployment  # noqa: E402

pytestmark = pytest.mark.slow

APP = str(Path(__file__).parents[2] / "python" / "heron" / "flower" / "app")
RUN = {"method": "heron", "model": "cnn", "dataset": "digits", "clients": 2, "rounds": 1, "local_steps": 2,
       "batch_size": 8}


def _run_config(report: Path, **overrides) -> str:
    values = {**RUN, **overrides, "report": str(report), "node_wait": 60.0, "round_timeout": 120.0}
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items())


def _rounds(report: dict) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in report["methods"]["heron"]["rounds"]]


@pytest.fixture(scope="module")
def heron_train(tmp_path_factory) -> dict:
    """`heron train` on RUN, in the deployment's environment (one torch thread, as its processes)."""
    root = tmp_path_factory.mktemp("train")
    report = root / "train.json"
    done = LocalDeployment(root, secure=False, nodes=0).python(
        "-m", "heron", "train", "--method", RUN["method"], "--model", RUN["model"], "--dataset", RUN["dataset"],
        "--clients", str(RUN["clients"]), "--rounds", str(RUN["rounds"]), "--local-steps", str(RUN["local_steps"]),
        "--batch-size", str(RUN["batch_size"]), "--no-progress", "--report", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(report.read_text())


@pytest.mark.parametrize("secure", [False, True], ids=["insecure", "tls-supernode-auth"])
def test_a_deployed_round_equals_heron_train(secure, heron_train, tmp_path):
    with LocalDeployment(tmp_path, secure=secure, nodes=2) as deployment:
        deployment.start_superlink()
        for i in range(2):
            if secure:
                deployment.register(i)
            deployment.start_supernode(f"node-{i}", i, 2)
        report = tmp_path / "report.json"
        done = deployment.python("-m", "heron.flower.submit", APP, CONNECTION, "--run-config", _run_config(report))
        assert done.returncode == 0, done.stdout + done.stderr + deployment.log("superlink")
        assert "round 1: test acc" in done.stdout and "finished:completed" in done.stdout
        deployed = json.loads(report.read_text())
        assert deployed["status"] == "completed"
        assert _rounds(deployed) == _rounds(heron_train)
        assert deployed["flower"]["heron"]["rounds"] == [{"round": 1, "aggregated": [0, 1], "left_out": [],
                                                          "clipped": []}]
        if secure:  # the nodes authenticated: the SuperLink lists them, by the keys registered
            nodes = json.loads(deployment.flwr("supernode", "list", CONNECTION, "--format", "json").stdout)
            assert len(nodes["nodes"]) == 2, nodes
            return

        failed = tmp_path / "failed.json"
        done = deployment.python("-m", "heron.flower.submit", APP, CONNECTION, "--no-stream",
                                 "--run-config", _run_config(failed, method="sflv1"))
        assert done.returncode == 1 and "finished:failed" in done.stderr and "sflv1" in done.stderr
        refused = json.loads(failed.read_text())
        assert refused["status"] == "failed" and "method 'sflv1' is not supported" in refused["error"]
        # the documented check: `flwr ls` shows the run failed (while `flwr run --stream` exits 0)
        runs = json.loads(deployment.flwr("ls", CONNECTION, "--format", "json").stdout)["runs"]
        assert sorted(run["status"] for run in runs) == ["finished:completed", "finished:failed"]
