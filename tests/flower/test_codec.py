"""Message codec: round trips, and every malformed or hostile message rejected with its reason (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from heron.flower import codec  # noqa: E402
from heron.flower.codec import MessageRejected, ReplySpec, TensorSpec  # noqa: E402
from heron.sfl.engine import TrainConfig  # noqa: E402
from heron.sfl.roles import ClientRoundResult, Upload  # noqa: E402

STATE = {"0.weight": TensorSpec((4, 3), torch.float32), "0.bias": TensorSpec((4,), torch.float32),
         "1.num_batches_tracked": TensorSpec((), torch.int64)}
SMASHED = TensorSpec((2, 3, 3), torch.float32)


def _spec(**overrides) -> ReplySpec:
    values = dict(round_index=1, client_upload="smashed", clients=3, local_steps=4, upload_every=2, batch_size=5,
                  max_samples=100, num_classes=10, state=STATE, smashed=SMASHED)
    return ReplySpec(**{**values, **overrides})


def _result(num_samples: int = 40, batch: int = 5) -> ClientRoundResult:
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s.shape, generator=generator) if s.dtype.is_floating_point
                 else torch.tensor(7, dtype=s.dtype)) for k, s in STATE.items()}
    uploads = [Upload(torch.randn(batch, *SMASHED.shape, generator=generator),
                      torch.randint(0, 10, (batch,), generator=generator)) for _ in range(2)]
    return ClientRoundResult(2, state, num_samples, uploads=uploads, losses=[2.3, 2.2, float("nan"), 2.0],
                             skipped_steps=1)


def _reply(**kwargs) -> RecordDict:
    return codec.encode_reply(_result(**kwargs), 1)


def _npy(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **save)
    return buffer.getvalue()


def _rejected(content, spec=None) -> str:
    with pytest.raises(MessageRejected) as info:
        codec.decode_reply(content, spec or _spec())
    return str(info.value)


# -- round trips ---------------------------------------------------------------------------------------

def test_request_round_trip():
    config = TrainConfig(clients=3, backend=None)
    state = {"w": torch.randn(4, 3), "n": torch.tensor(5)}
    content = codec.encode_request(config, 2, state)
    request = codec.decode_request(content, lambda cfg: codec.specs_of(state))
    assert request.config == config and request.round_index == 2 and request.client_upload == "smashed"
    assert all(torch.equal(request.state[k], state[k]) for k in state)


def test_reply_round_trip_is_exact():
    result = _result()
    reply = codec.decode_reply(codec.encode_reply(result, 1), _spec())
    got = reply.result
    assert reply.kind == "smashed"
    assert (got.client_id, got.num_samples, got.skipped_steps) == (2, 40, 1)
    assert got.losses[:2] == [2.3, 2.2] and np.isnan(got.losses[2])
    assert all(torch.equal(got.state[k], result.state[k]) for k in STATE)
    for mine, theirs in zip(got.uploads, result.uploads, strict=True):
        assert torch.equal(mine.smashed, theirs.smashed) and torch.equal(mine.labels, theirs.labels)
        assert mine.labels.dtype == torch.int64


def test_small_client_sends_its_whole_shard_as_a_batch():
    reply = codec.decode_reply(_reply(num_samples=3, batch=3), _spec())
    assert reply.result.uploads[0].smashed.shape == (3, 2, 3, 3)


# -- rejections ----------------------------------------------------------------------------------------

def _replace_array(content: RecordDict, record: str, key: str, array: np.ndarray) -> RecordDict:
    content[record][key] = Array.from_numpy_ndarray(array)
    return content


def test_wrong_parameter_shape_is_rejected():
    reason = _rejected(_replace_array(_reply(), "heron.model", "0.weight", np.zeros((3, 4), np.float32)))
    assert "heron.model/0.weight" in reason and "expected shape (4, 3), got (3, 4)" in reason


def test_wrong_parameter_dtype_is_rejected():
    reason = _rejected(_replace_array(_reply(), "heron.model", "0.bias", np.zeros(4, np.float64)))
    assert "heron.model/0.bias" in reason and "expected dtype float32, got float64" in reason


def test_extra_parameter_key_is_rejected():
    reason = _rejected(_replace_array(_reply(), "heron.model", "2.weight", np.zeros(3, np.float32)))
    assert "heron.model" in reason and "unexpected keys ['2.weight']" in reason


def test_missing_parameter_key_is_rejected():
    content = _reply()
    del content["heron.model"]["0.bias"]
    reason = _rejected(content)
    assert "heron.model" in reason and "missing keys ['0.bias']" in reason


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_parameters_are_rejected(bad):
    weight = np.zeros((4, 3), np.float32)
    weight[1, 2] = bad
    reason = _rejected(_replace_array(_reply(), "heron.model", "0.weight", weight))
    assert "heron.model/0.weight: contains NaN or infinite values" in reason


def test_non_finite_smashed_data_is_rejected():
    smashed = np.zeros((5, 2, 3, 3), np.float32)
    smashed[0, 0, 0, 0] = np.nan
    reason = _rejected(_replace_array(_reply(), "heron.upload", "smashed/1", smashed))
    assert "heron.upload/smashed/1: contains NaN" in reason


def test_smashed_data_of_the_wrong_shape_is_rejected():
    reason = _rejected(_replace_array(_reply(), "heron.upload", "smashed/0", np.zeros((5, 2, 4, 4), np.float32)))
    assert "heron.upload/smashed/0: expected shape (5, 2, 3, 3), got (5, 2, 4, 4)" in reason


def test_labels_of_the_wrong_dtype_or_range_are_rejected():
    reason = _rejected(_replace_array(_reply(), "heron.upload", "labels/0", np.zeros(5, np.float32)))
    assert "heron.upload/labels/0: expected dtype int64, got float32" in reason
    reason = _rejected(_replace_array(_reply(), "heron.upload", "labels/0", np.array([0, 1, 2, 3, 10])))
    assert "heron.upload/labels/0: expected labels in [0, 10)" in reason


def test_wrong_number_of_uploads_is_rejected():
    content = _reply()
    del content["heron.upload"]["smashed/1"], content["heron.upload"]["labels/1"]
    reason = _rejected(content)
    assert "heron.upload" in reason and "missing keys ['labels/1', 'smashed/1']" in reason


@pytest.mark.parametrize("count", [0, -5, 101])
def test_implausible_sample_counts_are_rejected(count):
    content = _reply()
    content["heron.reply"]["num-samples"] = count
    assert "heron.reply/num-samples: expected [1, 100], got" in _rejected(content)


def test_batch_must_match_the_sample_count():
    content = _reply()
    content["heron.reply"]["num-samples"] = 4  # a 4-sample client draws batches of 4, not 5
    assert "expected shape (4, 2, 3, 3), got (5, 2, 3, 3)" in _rejected(content)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("client-id", 3, "heron.reply/client-id: expected [0, 2], got 3"),
    ("client-id", True, "heron.reply/client-id: expected int, got bool"),
    ("round", 0, "heron.reply/round: expected [1, 1], got 0"),
    ("protocol", 2, "heron.reply/protocol: expected [1, 1], got 2"),
    ("skipped-steps", 5, "heron.reply/skipped-steps: expected [0, 4], got 5"),
    ("client-upload", "seeds", "heron.reply/client-upload: expected one of ['smashed'], got 'seeds'"),
    ("losses", [1.0, 2.0], "heron.reply/losses: expected 4 floats, got a list of 2 (float)"),
])
def test_bad_reply_scalars_are_rejected(key, value, expected):
    content = _reply()
    content["heron.reply"][key] = value
    assert expected in _rejected(content)


def test_extra_or_missing_reply_scalars_are_rejected():
    content = _reply()
    content["heron.reply"]["note"] = "hi"
    del content["heron.reply"]["losses"]
    assert "heron.reply: missing keys ['losses'], unexpected keys ['note']" in _rejected(content)


def test_extra_and_missing_records_are_rejected():
    content = _reply()
    content["heron.extra"] = ConfigRecord({"x": 1})
    assert "unexpected records ['heron.extra']" in _rejected(content)
    content = _reply()
    del content["heron.upload"]
    assert "missing records ['heron.upload']" in _rejected(content)
    content = RecordDict({"other": ConfigRecord({"x": 1})})
    assert "missing record 'heron.reply'" in _rejected(content)


def test_a_record_of_the_wrong_kind_is_rejected():
    content = _reply()
    content["heron.model"] = ConfigRecord({"0.weight": 1.0})
    assert "heron.model: expected an ArrayRecord, got ConfigRecord" in _rejected(content)


def test_payload_that_contradicts_its_header_is_rejected():
    content = _reply()
    content["heron.model"]["0.bias"] = Array("float32", (4,), "numpy.ndarray", _npy(np.zeros(4, np.float64)))
    reason = _rejected(content)
    assert "heron.model/0.bias: payload holds (dtype('float64'), (4,)), but its header declares float32 (4,)" in reason


def test_oversized_payload_is_rejected_before_parsing():
    content = _reply()
    content["heron.model"]["0.bias"] = Array("float32", (4,), "numpy.ndarray", b"\x00" * 10_000)
    assert "heron.model/0.bias: payload of 10000 bytes, expected at most" in _rejected(content)


def test_pickled_payload_is_rejected():
    pickled = _npy(np.array([{"x": 1}, None, 2, 3], dtype=object), allow_pickle=True)
    content = _reply()
    content["heron.model"]["0.bias"] = Array("float32", (4,), "numpy.ndarray", pickled)
    assert "heron.model/0.bias: not a valid .npy payload" in _rejected(content)


def test_unknown_serialisation_is_rejected():
    content = _reply()
    content["heron.model"]["0.bias"] = Array("float32", (4,), "pickle", b"\x80")
    assert "heron.model/0.bias: expected serialisation 'numpy.ndarray', got 'pickle'" in _rejected(content)


def test_absurd_declared_shape_is_rejected_without_allocating():
    content = _reply()
    content["heron.upload"]["smashed/0"] = Array("float32", (10**12, 2, 3, 3), "numpy.ndarray", b"")
    assert "heron.upload/smashed/0: expected shape (5, 2, 3, 3), got (1000000000000, 2, 3, 3)" in _rejected(content)


# -- requests ------------------------------------------------------------------------------------------

def _request_rejected(content, state=None) -> str:
    specs = codec.specs_of(state or {"w": torch.zeros(4, 3)})
    with pytest.raises(MessageRejected) as info:
        codec.decode_request(content, lambda cfg: specs)
    return str(info.value)


def test_request_for_an_unsupported_method_is_rejected():
    content = codec.encode_request(TrainConfig(), 0, {"w": torch.zeros(4, 3)})
    content["heron.config"]["method"] = "sflv2"
    assert "heron.config: method 'sflv2' is not supported by the Flower app" in _request_rejected(content)


def test_request_with_bad_config_or_model_is_rejected():
    content = codec.encode_request(TrainConfig(), 0, {"w": torch.zeros(4, 3)})
    content["heron.config"]["clients"] = "5"
    assert "config key 'clients' must be int, got str '5'" in _request_rejected(content)
    content = codec.encode_request(TrainConfig(), 0, {"w": torch.zeros(3, 4)})
    assert "heron.model/w: expected shape (4, 3), got (3, 4)" in _request_rejected(content)
    content = codec.encode_request(TrainConfig(), 0, {"w": torch.zeros(4, 3)})
    content["heron.round"]["round"] = -1
    assert "heron.round/round: expected >= 0, got -1" in _request_rejected(content)


def test_encoders_refuse_unknown_upload_kinds():
    with pytest.raises(ValueError, match="client_upload must be one of"):
        codec.encode_request(TrainConfig(), 0, {}, client_upload="seeds")
    with pytest.raises(ValueError, match="client_upload must be one of"):
        codec.encode_reply(_result(), 0, client_upload="seeds")


def test_array_record_rejects_non_arrays():
    record = ArrayRecord()
    with pytest.raises(MessageRejected, match="expected an ArrayRecord"):
        codec.decode_arrays({"w": 1}, {}, "where")
    assert codec.decode_arrays(record, {}, "where") == {}
