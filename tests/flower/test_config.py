"""TrainConfig on the wire and in Flower's run config (no Ray)."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.common.config import get_fused_config_from_dir  # noqa: E402

from heron.flower import config as fc  # noqa: E402
from heron.sfl.config import TrainConfig  # noqa: E402
from heron.sfl.methods import IMAGE, MODELS  # noqa: E402

APP = Path(__file__).parents[2] / "python" / "heron" / "flower" / "app"


def test_wire_types_cover_exactly_the_train_config_fields():
    assert set(fc._TRAIN_TYPES) == {f.name for f in fields(TrainConfig)}


def test_app_run_config_lists_every_setting():
    """The Flower app's pyproject.toml, read as `flwr run` reads it, lists every TrainConfig field and
    Flower setting (client_upload included), and parses; --run-config overrides reach the TrainConfig."""
    run_config = get_fused_config_from_dir(APP, {})
    assert set(run_config) == set(fc._TRAIN_TYPES) | set(fc._SETTING_TYPES)
    assert fc.from_run_config(run_config)[0].client_upload == "parameters"
    seeds = get_fused_config_from_dir(APP, {"client_upload": "seeds"})
    assert fc.from_run_config(seeds)[0].client_upload == "seeds"


@pytest.mark.parametrize("backend", [None, "torch"])
def test_train_config_round_trips(backend):
    config = TrainConfig(method="cse-fsl", clients=3, alpha=1.5, backend=backend)
    assert fc.train_config_from_record(fc.train_config_to_record(config)) == config


def test_wire_config_is_strict():
    record = fc.train_config_to_record(TrainConfig())
    with pytest.raises(ValueError, match=r"missing keys \['seed'\], unexpected keys \['speed'\]"):
        fc.train_config_from_record({**{k: v for k, v in record.items() if k != "seed"}, "speed": 1})
    with pytest.raises(TypeError, match="config key 'rounds' must be int, got bool True"):
        fc.train_config_from_record({**record, "rounds": True})
    with pytest.raises(ValueError, match="local_steps must be >= 1"):
        fc.train_config_from_record({**record, "local_steps": 0})
    assert fc.train_config_from_record({**record, "mu": 1}).mu == 1.0  # an int where a float belongs is fine


def test_run_config_fills_defaults_and_checks_keys():
    config, settings = fc.from_run_config({"clients": 3, "rounds": 2, "round_timeout": 30, "backend": ""})
    assert config == TrainConfig(clients=3, rounds=2)
    assert settings == fc.FlowerSettings(round_timeout=30.0)
    assert fc.from_run_config({"cut": 0, "aux_layers": 0})[0] == TrainConfig()  # 0: the model's default split
    assert fc.from_run_config({"model": "gpt2", "dataset": "text-convention", "cut": 3})[0].cut == 3
    with pytest.raises(ValueError, match="config key 'cut' must be >= 0"):
        fc.from_run_config({"cut": -1})
    with pytest.raises(ValueError, match=r"unknown keys \['round-timeout'\]"):
        fc.from_run_config({"round-timeout": 3})
    for timeout in (0.0, -1.0, math.inf):  # a node that hangs must not stall the run
        with pytest.raises(ValueError, match="round_timeout must be a finite number of seconds > 0"):
            fc.from_run_config({"round_timeout": timeout})
    assert fc.FlowerSettings().round_timeout == fc.ROUND_TIMEOUT == get_fused_config_from_dir(APP, {})["round_timeout"]


@pytest.mark.parametrize("method", ["sflv1", "sflv2"])
def test_split_learning_methods_are_refused_with_the_reason(method):
    with pytest.raises(ValueError, match="need a server round trip .* after every local step"):
        fc.from_run_config({"method": method})


def test_heron_flower_takes_client_upload():
    from heron.cli.main import build_parser

    args = build_parser().parse_args(["flower", "--method", "heron", "--client-upload", "seeds"])
    assert args.client_upload == "seeds"
    assert build_parser().parse_args(["flower"]).client_upload == "parameters"


def test_text_datasets_are_refused_with_the_image_ones_listed():
    from heron.flower.config import check_flower_dataset

    assert check_flower_dataset("mnist") == "mnist"
    with pytest.raises(ValueError, match="text-rt.*mnist"):
        check_flower_dataset("text-rt")


@pytest.mark.parametrize("model", [name for name, entry in MODELS.items() if entry.data == IMAGE])
def test_shipped_app_config_runs_every_image_model(model, monkeypatch):
    """The deployed ServerApp and ClientApp (`heron.flower.server_app:app`, `...client_app:app`) run one
    round on the app's pyproject.toml as `flwr run` reads it, for every model the Flower app takes;
    only the model and the round's size are overridden."""
    from flwr.app import Context, RecordDict

    from heron.flower import client_app, server_app
    from tests.flower.inprocess import InProcessGrid, set_task_identity

    set_task_identity(monkeypatch)
    finished = []
    monkeypatch.setattr(server_app, "print_round", finished.append)
    overrides = {"model": model, "rounds": 1, "local_steps": 1, "batch_size": 4}
    run_config = get_fused_config_from_dir(APP, overrides)
    clients = run_config["clients"]
    grid = InProcessGrid(client_app.app, clients)
    server_app.make_server_app(on_round=server_app.print_round)(
        grid, Context(run_id=1, node_id=0, state=RecordDict(), run_config=run_config, node_config={}))
    (record,) = finished
    assert record.round == 1 and record.server_loss is not None
