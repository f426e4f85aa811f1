"""Bad command lines: one line on stderr, exit status 2, and no data loaded (no traceback, no run that
silently does something else)."""

from __future__ import annotations

import importlib

import pytest
import torch

import heron.profiling.presets
import heron.sfl.data
import heron.sfl.engine
from heron.cli.main import main


@pytest.fixture
def no_data(monkeypatch):
    """Loading data or building a profiling model fails the test: errors must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the command line was checked")

    modules = [heron.sfl.data, heron.sfl.engine]  # the engine binds load_dataset when imported
    try:
        modules.append(importlib.import_module("heron.flower.client"))  # so does the Flower client
    except ImportError:  # no flwr
        pass
    for module in modules:
        monkeypatch.setattr(module, "load_dataset", refuse)
    monkeypatch.setattr(heron.profiling.presets, "build_config", refuse)


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"heron {argv[0]}: error: "), err
    return err


@pytest.mark.parametrize(("argv", "expected"), [
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--local-steps", "1", "--upload-every", "2"], "upload_every must be <= local_steps"),
    (["--mu", "nan"], "mu must be finite in float32"),
    (["--alpha", "-1"], "alpha must be > 0"),
    (["--backend", "opencl"], "backend must be one of"),
])
@pytest.mark.parametrize("command", ["train", "run"])
def test_bad_train_arguments(command, argv, expected, capsys, no_data):
    assert expected in _usage_error([command, *argv], capsys)


def test_unknown_method_and_resume_without_a_directory(capsys, no_data):
    assert "nope" in _usage_error(["train", "--method", "nope"], capsys)
    assert "--resume needs --checkpoint-dir" in _usage_error(["train", "--resume"], capsys)


def test_resume_from_a_missing_directory(tmp_path, capsys, no_data):
    missing = tmp_path / "nope"
    err = _usage_error(["train", "--resume", "--checkpoint-dir", str(missing)], capsys)
    assert f"--resume: checkpoint directory {missing} does not exist" in err


def test_triton_backend_without_the_interpreter(monkeypatch, capsys, no_data):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    err = _usage_error(["train", "--backend", "triton"], capsys)
    assert "backend 'triton' is not available on cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(capsys, no_data):
    assert "device 'cuda' needs CUDA" in _usage_error(["train", "--device", "cuda"], capsys)


def test_flower_command_checks_the_same_way(capsys, no_data):
    pytest.importorskip("flwr")
    assert "batch_size must be >= 1, got 0" in _usage_error(["flower", "--batch-size", "0"], capsys)
    assert "is not supported by the Flower app" in _usage_error(["flower", "--method", "sflv2"], capsys)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--updaters", "zo,sgd"], "--updaters: unknown updater 'sgd'"),
    (["--backend", "opencl"], "--backend must be one of"),
])
def test_bad_profile_arguments(argv, expected, capsys, no_data):
    assert expected in _usage_error(["profile", "--model", "resnet18-paper", "--device", "cpu", *argv], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_profile_on_cuda_without_cuda(capsys, no_data):
    assert "--device cuda needs CUDA" in _usage_error(["profile", "--model", "resnet18-paper", "--device", "cuda"],
                                                      capsys)
