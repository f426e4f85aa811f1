"""heron.sfl.checkpoint: atomic safetensors checkpoints with JSON metadata."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from heron.sfl.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

METADATA = {"config": {"method": "heron", "model": "cnn", "lr": 1e-3}, "format": 1, "round": 3}


def make_state() -> dict:
    weight = torch.randn(6, 4)
    return {
        "client": {"conv.weight": torch.randn(2, 1, 3, 3), "conv.bias": torch.randn(2)},
        "server": {"fc.weight": weight, "fc.weight_t": weight.t(), "row": weight[2], "bf16": torch.randn(5).bfloat16()},
        "optim": {"step": torch.tensor(7), "mask": torch.tensor([True, False]), "empty": torch.empty(0, 3)},
    }


def assert_same_tree(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same_tree(actual[key], value)
        else:
            assert actual[key].dtype == value.dtype and actual[key].shape == value.shape
            assert torch.equal(actual[key], value), key


def test_round_trip_nested_bf16_non_contiguous_and_shared(tmp_path: Path) -> None:
    state = make_state()
    path = tmp_path / "run-round00003.safetensors"
    save_checkpoint(path, state, METADATA)
    tensors, metadata = load_checkpoint(path, expected_metadata=METADATA)
    assert metadata == METADATA
    assert_same_tree(tensors, state)
    assert tensors["server"]["bf16"].dtype == torch.bfloat16


def test_flat_slash_keys_come_back_nested(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"global/0.weight": torch.ones(2), "clients/0/updater/m": torch.zeros(3)}, {})
    tensors, _ = load_checkpoint(path)
    expected = {"global": {"0.weight": torch.ones(2)}, "clients": {"0": {"updater": {"m": torch.zeros(3)}}}}
    assert_same_tree(tensors, expected)


def test_tensors_requiring_grad_are_saved_detached(tmp_path: Path) -> None:
    weight = torch.nn.Linear(3, 2).weight
    save_checkpoint(tmp_path / "c.safetensors", {"w": weight}, {})
    tensors, _ = load_checkpoint(tmp_path / "c.safetensors")
    assert not tensors["w"].requires_grad and torch.equal(tensors["w"], weight.detach())


def test_crash_before_replace_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run-round00001.safetensors"
    old = {"w": torch.zeros(3)}
    save_checkpoint(path, old, {"round": 1})

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, {"w": torch.ones(3)}, {"round": 2})
    monkeypatch.undo()
    tensors, metadata = load_checkpoint(path)
    assert torch.equal(tensors["w"], old["w"]) and metadata == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the temp file was removed


def test_crash_while_writing_leaves_no_file_under_the_final_name(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    path = tmp_path / "new.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(3)}, {})
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, make_state(), METADATA)
    data = path.read_bytes()
    for length in (len(data) - 7, 100, 3, 0):
        path.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt"):
            load_checkpoint(path)


def test_flipped_tensor_byte_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.zeros(64)}, {})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: its bytes do not match the stored SHA-256"):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_missing_heron_metadata(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path), metadata={"other": "x"})
    with pytest.raises(CheckpointError, match="has no 'heron' metadata"):
        load_checkpoint(path)


def test_metadata_mismatch_names_the_key_and_both_values(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(2)}, METADATA)
    expected = {"config": {**METADATA["config"], "method": "sfl-v1"}, "format": 1}
    with pytest.raises(CheckpointError, match="'config.method' is 'heron' in the checkpoint, expected 'sfl-v1'"):
        load_checkpoint(path, expected_metadata=expected)
    with pytest.raises(CheckpointError, match="'seed' is missing from the checkpoint, expected 0"):
        load_checkpoint(path, expected_metadata={"seed": 0})


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"client": {"w": torch.ones(3, 4), "b": torch.ones(3)}}, {})
    tensors, _ = load_checkpoint(path, expected_shapes={"client/w": (3, 4), "client/b": (3,)})
    assert tensors["client"]["w"].shape == (3, 4)
    load_checkpoint(path, expected_shapes={"client": {"w": torch.Size([3, 4]), "b": [3]}})
    match = r"tensor 'client/w' has shape \(3, 4\) in the checkpoint, expected \(4, 3\)"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, expected_shapes={"client/w": (4, 3), "client/b": (3,)})


def test_tensor_key_set_and_dtype_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"client": {"w": torch.ones(3, 4), "b": torch.ones(3)}}, {})
    with pytest.raises(CheckpointError, match="missing 'client/v', unexpected 'client/b'"):
        load_checkpoint(path, expected_shapes={"client/w": (3, 4), "client/v": (3,)})
    with pytest.raises(CheckpointError, match="tensor 'client/b' has dtype torch.float32 in the checkpoint, "
                                              "expected torch.bfloat16"):
        load_checkpoint(path, expected_dtypes={"client/b": torch.bfloat16})


def test_checkpoint_error_is_a_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize(("tensors", "metadata", "error", "match"), [
    ({"w": [1.0, 2.0]}, {}, TypeError, "'w' must be a tensor or a dict of tensors, got list"),
    ({"a": torch.ones(1), "a/b": torch.ones(1)}, {}, ValueError, "'a' is a tensor and also a prefix of 'a/b'"),
    ({"a/b": torch.ones(1), "a": {"b": torch.ones(1)}}, {}, ValueError, "'a/b' occurs twice"),
    ({"a//b": torch.ones(1)}, {}, ValueError, "empty '/'-separated part"),
    ({"opt": {0: torch.ones(1)}}, {}, TypeError, "keys must be str, got int 0"),
    ({"w": torch.ones(1)}, {"bad": object()}, TypeError, "metadata must be JSON-serialisable"),
    ({"w": torch.ones(1).to_sparse()}, {}, TypeError, "only dense"),
])
def test_bad_save_arguments(tmp_path: Path, tensors, metadata, error, match) -> None:
    path = tmp_path / "c.safetensors"
    with pytest.raises(error, match=match):
        save_checkpoint(path, tensors, metadata)
    assert not path.exists()


def test_latest_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing", "heron") is None
    assert latest_checkpoint(tmp_path, "heron") is None
    for round_number in (1, 2, 10):
        save_checkpoint(checkpoint_path(tmp_path, "heron", round_number), {"w": torch.ones(1)}, {})
    save_checkpoint(checkpoint_path(tmp_path, "heron-v2", 99), {"w": torch.ones(1)}, {})
    (tmp_path / ".heron-round00050.safetensors.0123abcd.tmp").write_bytes(b"partial")
    (tmp_path / "heron-round00077.safetensors.tmp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path, "heron") == tmp_path / "heron-round00010.safetensors"
    assert latest_checkpoint(tmp_path, "heron-v2") == tmp_path / "heron-v2-round00099.safetensors"
    assert latest_checkpoint(str(tmp_path), "sfl-v1") is None


def test_every_edited_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    """The digest covers the whole file: header, metadata (round number, history) and tensors. Flipping
    any one bit anywhere is refused, with the file named."""
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.arange(6, dtype=torch.float32), "step": torch.tensor(3)}, METADATA)
    data = path.read_bytes()
    for position in range(len(data)):
        edited = bytearray(data)
        edited[position] ^= 0x01
        path.write_bytes(bytes(edited))
        with pytest.raises(CheckpointError, match=f"checkpoint {path} "):
            load_checkpoint(path)
    path.write_bytes(data)
    assert load_checkpoint(path)[1] == METADATA


def test_edited_round_number_is_refused(tmp_path: Path) -> None:
    """A forged round number in the metadata (same length, valid JSON) is caught by the digest."""
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, make_state(), METADATA)
    data = path.read_bytes()
    assert data.count(b'\\"round\\": 3') == 1
    path.write_bytes(data.replace(b'\\"round\\": 3', b'\\"round\\": 9'))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt: its bytes do not match the stored "
                                              f"SHA-256 digest"):
        load_checkpoint(path)


@pytest.mark.parametrize("digest", [None, "tensors only"])
def test_file_without_a_whole_file_digest_is_refused(tmp_path: Path, digest) -> None:
    import json

    path = tmp_path / "c.safetensors"
    header = {"heron": json.dumps(METADATA)}
    if digest is not None:  # what earlier versions wrote: a digest of the tensors only
        header["heron.sha256"] = "0" * 64
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path), metadata=header)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} has no whole-file SHA-256 digest"):
        load_checkpoint(path)
