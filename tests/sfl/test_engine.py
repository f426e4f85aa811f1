"""The SFL engine: every method end to end, determinism, resume after a kill, reports, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from heron.sfl import checkpoint as ckpt
from heron.sfl.config import TrainConfig
from heron.sfl.engine import Experiment
from heron.sfl.methods import METHODS
from tests.sfl.runs import assert_resume_equals_uninterrupted, run_parameters

SMALL = TrainConfig(model="cnn", dataset="digits", clients=3, rounds=2, local_steps=3, batch_size=32, seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_reports(method):
    report = Experiment(replace(SMALL, method=method)).run()
    assert report.method == method
    assert len(report.rounds) == 2
    assert 0.0 <= report.final_accuracy <= 1.0
    assert report.client_peak_memory_bytes > 0 and report.client_flops_per_step > 0
    assert report.bytes_up > 0 and report.bytes_down > 0


def test_communication_counts():
    config = replace(SMALL, method="heron", rounds=1, upload_every=1)
    experiment = Experiment(config)
    report = experiment.run()
    state_size = sum(v.numel() * v.element_size() for v in experiment.global_model.state_dict().values())
    assert report.bytes_down == state_size * config.clients
    smashed = 32 * 32 * 8 * 8 * 4 + 32 * 8  # (batch, width, 8, 8) float32 + int64 labels per upload
    assert report.bytes_up == config.clients * (state_size + config.local_steps * smashed)


def test_same_seed_same_parameters_bit_identical():
    a, b = Experiment(replace(SMALL, method="heron")), Experiment(replace(SMALL, method="heron"))
    a.run()
    b.run()
    for key, value in run_parameters(a).items():
        assert torch.equal(value, run_parameters(b)[key]), key


@pytest.mark.parametrize("method", ["heron", "cse-fsl", "sflv1"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, method):
    config = replace(SMALL, method=method, rounds=3)
    assert_resume_equals_uninterrupted(config, tmp_path)


def test_mismatched_checkpoint_is_rejected(tmp_path):
    Experiment(replace(SMALL, method="heron", rounds=1), checkpoint_dir=tmp_path).run()
    other = Experiment(replace(SMALL, method="heron", rounds=2, clients=2), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ckpt.CheckpointError, match="clients"):
        other.run()


def test_corrupt_checkpoint_is_rejected(tmp_path):
    Experiment(replace(SMALL, method="heron", rounds=1), checkpoint_dir=tmp_path).run()
    path = next(tmp_path.glob("heron-round*.safetensors"))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Experiment(replace(SMALL, method="heron", rounds=2), checkpoint_dir=tmp_path, resume=True).run()


def test_heron_accuracy_close_to_cse_fsl_on_digits():
    """A small version of the parity experiment (README: the MNIST command)."""
    config = replace(SMALL, clients=3, rounds=4, local_steps=10)
    heron = Experiment(replace(config, method="heron")).run()
    cse = Experiment(replace(config, method="cse-fsl")).run()
    assert heron.final_accuracy > 0.5  # chance is 0.1
    assert abs(heron.final_accuracy - cse.final_accuracy) <= 0.05


def test_cli_writes_report_and_plot(tmp_path):
    from heron.cli.main import main

    report_path, plot_path = tmp_path / "r.json", tmp_path / "p.png"
    code = main(["train", "--compare", "heron,sflv2", "--model", "cnn", "--dataset", "digits", "--clients", "2",
                 "--rounds", "1", "--local-steps", "2", "--batch-size", "16", "--no-progress",
                 "--report", str(report_path), "--plot", str(plot_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert set(report) == {"config", "environment", "methods"}
    assert set(report["methods"]) == {"heron", "sflv2"}
    entry = report["methods"]["heron"]
    for key in ("final_accuracy", "client_peak_memory_bytes", "client_flops_per_step", "bytes_up", "bytes_down",
                "rounds"):
        assert key in entry
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class TestBadInput:
    def test_unknown_method(self):
        with pytest.raises(ValueError, match="unknown method 'fedsgd'; valid methods: heron, cse-fsl"):
            Experiment(replace(SMALL, method="fedsgd"))

    def test_unknown_model(self):
        with pytest.raises(ValueError, match="unknown model 'vgg'; valid models: cnn, gpt2, gpt2-small, minilm, "
                                             "resnet18"):
            Experiment(replace(SMALL, model="vgg"))

    def test_unknown_dataset(self):
        with pytest.raises(KeyError, match="digits"):
            Experiment(replace(SMALL, dataset="imagenet"))

    def test_more_clients_than_samples(self):
        with pytest.raises(ValueError, match="clients"):
            Experiment(replace(SMALL, clients=100000))

    def test_bad_alpha(self):
        with pytest.raises(ValueError, match="alpha"):
            Experiment(replace(SMALL, partition="dirichlet", alpha=0.0))

    def test_bad_counts(self):
        with pytest.raises(ValueError, match="rounds must be >= 1"):
            Experiment(replace(SMALL, rounds=0))


@pytest.mark.parametrize("zo_rank", [0, 2], ids=["full", "lowrank"])
def test_sequential_zo_schedule_trains_the_same_model(zo_rank):
    """The schedule changes how a ZO step runs, not what it computes: same directions (full or
    low-rank), same estimates up to rounding, so the same model within float tolerance; less
    client memory."""
    dual = Experiment(replace(SMALL, method="heron", zo_rank=zo_rank))
    sequential = Experiment(replace(SMALL, method="heron", zo_schedule="sequential", zo_rank=zo_rank))
    dual_report, sequential_report = dual.run(), sequential.run()
    assert sequential.clients[0].updater.schedule == "sequential"
    for key, value in run_parameters(dual).items():
        torch.testing.assert_close(run_parameters(sequential)[key], value, rtol=1e-3, atol=1e-4, msg=key)
    assert sequential_report.client_peak_memory_bytes < dual_report.client_peak_memory_bytes


def test_bad_zo_rank():
    with pytest.raises(ValueError, match="zo_rank must be >= 0"):
        replace(SMALL, zo_rank=-1).validate()


def test_unknown_zo_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="dual, sequential"):
        replace(SMALL, zo_schedule="interleaved").validate()
