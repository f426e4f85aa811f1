"""Message codec: round trips, and every malformed or hostile message rejected with its reason (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from heron.flower import codec  # noqa: E402
from heron.flower.codec import ClientSync, MessageRejected, ReplySpec, TensorSpec  # noqa: E402
from heron.sfl.config import TrainConfig  # noqa: E402
from heron.sfl.replay import SeedScalarUpload  # noqa: E402
from heron.sfl.roles import ClientRoundResult, Upload  # noqa: E402

STATE = {"0.weight": TensorSpec((4, 3), torch.float32), "0.bias": TensorSpec((4,), torch.float32),
         "1.num_batches_tracked": TensorSpec((), torch.int64)}
SMASHED = TensorSpec((2, 3, 3), torch.float32)


def _spec(**overrides) -> ReplySpec:
    values = dict(round_index=1, client_upload="parameters", clients=3, local_steps=4, upload_every=2, batch_size=5,
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
    return codec.encode_reply(_result(**kwargs), 1, start=ClientSync(1, 3))


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
    sync = [ClientSync(0, 20), ClientSync(0, 0), ClientSync(1, 7)]
    content = codec.encode_request(config, 2, state, sync=sync)
    request = codec.decode_request(content, lambda cfg: codec.specs_of(state))
    assert request.config == config and request.round_index == 2 and request.client_upload == "parameters"
    assert request.sync == sync
    assert all(torch.equal(request.state[k], state[k]) for k in state)


def test_reply_round_trip_is_exact():
    result = _result()
    reply = codec.decode_reply(codec.encode_reply(result, 1, start=ClientSync(1, 3)), _spec())
    got = reply.result
    assert reply.kind == "parameters" and reply.start == ClientSync(1, 3) and reply.seeds is None
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
    ("protocol", 1, "heron.reply/protocol: expected [2, 2], got 1"),
    ("skipped-steps", 5, "heron.reply/skipped-steps: expected [0, 4], got 5"),
    ("client-upload", "seeds", "heron.reply/client-upload: expected one of ['parameters'], got 'seeds'"),
    ("start-step", -1, "heron.reply/start-step: expected >= 0, got -1"),
    ("generation", True, "heron.reply/generation: expected int, got bool"),
    ("losses", [1.0, 2.0], "heron.reply/losses: expected 4 floats, got a list of 2 (float)"),
])
def test_bad_reply_scalars_are_rejected(key, value, expected):
    content = _reply()
    content["heron.reply"][key] = value
    assert expected in _rejected(content)


@pytest.mark.parametrize(("start", "expected"), [
    (ClientSync(1, 4), "got 1, 4"), (ClientSync(1, 0), "got 1, 0"), (ClientSync(0, 3), "got 0, 3"),
    (ClientSync(3, 0), "got 3, 0"), (ClientSync(2, 1), "got 2, 1"),
])
def test_a_reply_must_start_where_the_server_has_the_client(start, expected):
    """The server (SplitServer.absorb) has client 2 at step 3 of generation 1: a reply continues from there
    or is a fresh updater of generation 2."""
    server = ClientSync(1, 3)
    assert codec.check_start(ClientSync(1, 3), server, 2) is False
    assert codec.check_start(ClientSync(2, 0), server, 2) is True  # a restart
    with pytest.raises(MessageRejected) as info:
        codec.check_start(start, server, 2)
    assert ("heron.reply/generation, start-step: expected 1, 3 (where the server has client 2) or 2, 0 (its "
            "updater restarted), " + expected) in str(info.value)


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

def _request(config=None, round_index=0, state=None) -> RecordDict:
    config = config or TrainConfig()
    sync = [ClientSync()] * config.clients
    return codec.encode_request(config, round_index, state or {"w": torch.zeros(4, 3)}, sync=sync)


def _request_rejected(content, state=None) -> str:
    specs = codec.specs_of(state or {"w": torch.zeros(4, 3)})
    with pytest.raises(MessageRejected) as info:
        codec.decode_request(content, lambda cfg: specs)
    return str(info.value)


def test_request_for_an_unsupported_method_is_rejected():
    content = _request()
    content["heron.config"]["method"] = "sflv2"
    assert "heron.config: method 'sflv2' is not supported by the Flower app" in _request_rejected(content)


def test_request_with_bad_config_or_model_is_rejected():
    content = _request()
    content["heron.config"]["clients"] = "5"
    assert "config key 'clients' must be int, got str '5'" in _request_rejected(content)
    content = _request(state={"w": torch.zeros(3, 4)})
    assert "heron.model/w: expected shape (4, 3), got (3, 4)" in _request_rejected(content)
    content = _request()
    content["heron.round"]["round"] = -1
    assert "heron.round/round: expected >= 0, got -1" in _request_rejected(content)


def test_request_kind_must_be_the_config_client_upload():
    content = _request(TrainConfig(client_upload="seeds"))
    request = codec.decode_request(content, lambda cfg: codec.specs_of({"w": torch.zeros(4, 3)}))
    assert request.client_upload == "seeds" and request.config.client_upload == "seeds"
    content["heron.round"]["client-upload"] = "parameters"
    assert "heron.round/client-upload: expected one of ['seeds'], got 'parameters'" in _request_rejected(content)


@pytest.mark.parametrize(("key", "values", "expected"), [
    ("client-steps", [0, 0], "heron.round/client-steps: expected a list of 3 ints, got a list of 2 (int)"),
    ("client-steps", [0.0, 0.0, 1.0], "heron.round/client-steps: expected a list of 3 ints, got a list of 3 (float)"),
    ("client-steps", [True, False, True], "heron.round/client-steps: expected a list of 3 ints, got a list of 3 "
                                          "(bool)"),
    ("client-steps", [0, 21, 0], "heron.round/client-steps: expected values in [0, 20], got 21"),  # 2 rounds of 10
    ("client-steps", [0, -1, 0], "heron.round/client-steps: expected values in [0, 20], got -1"),
    ("client-generations", [0, 3, 0], "heron.round/client-generations: expected values in [0, 2], got 3"),
    ("client-generations", [0, 0, 0, 0], "heron.round/client-generations: expected a list of 3 ints, got a list "
                                         "of 4 (int)"),
])
def test_request_sync_is_checked(key, values, expected):
    content = _request(TrainConfig(clients=3), round_index=2)
    content["heron.round"][key] = values
    assert expected in _request_rejected(content)


def test_encoders_check_their_input():
    with pytest.raises(ValueError, match=r"sync must have one entry per client \(5\), got 2"):
        codec.encode_request(TrainConfig(), 0, {}, sync=[ClientSync()] * 2)


def test_upload_kinds_are_the_engine_client_uploads():
    from heron.sfl.replay import CLIENT_UPLOADS

    assert codec.UPLOAD_KINDS == CLIENT_UPLOADS


# -- seed-and-scalar replies ---------------------------------------------------------------------------

BUFFERS = {"1.running_mean": TensorSpec((2,), torch.float32), "1.num_batches_tracked": TensorSpec((), torch.int64)}


def _seeds_spec(**overrides) -> ReplySpec:
    return _spec(client_upload="seeds", q=2, buffers=BUFFERS, **overrides)


def _seeds_upload(start: int = 3, applied: int = 3) -> SeedScalarUpload:
    steps = [(start + i, [11 * (start + i), 11 * (start + i) + 1], [0.5 * i, -0.25]) for i in range(applied)]
    return SeedScalarUpload(2, steps, {"1.running_mean": torch.tensor([0.1, -0.2]),
                                       "1.num_batches_tracked": torch.tensor(9)})


HERE = ClientSync(1, 3)  # where _spec's server has client 2


def _seeds_reply(start: ClientSync = HERE, **upload) -> RecordDict:
    # _result has 4 local steps, one of them skipped (the NaN loss): 3 applied steps
    return codec.encode_reply(_result(), 1, start=start, seeds=_seeds_upload(start.steps, **upload))


def test_seeds_reply_round_trip_is_exact():
    reply = codec.decode_reply(_seeds_reply(), _seeds_spec())
    assert reply.kind == "seeds" and reply.start == ClientSync(1, 3) and reply.result.state == {}
    assert reply.seeds.zo_steps == _seeds_upload().zo_steps and reply.seeds.client_id == 2
    assert all(torch.equal(reply.seeds.buffers[k], v) for k, v in _seeds_upload().buffers.items())
    assert [u.smashed.shape for u in reply.result.uploads] == [(5, 2, 3, 3)] * 2
    content = _seeds_reply()
    assert set(content.keys()) == {"heron.reply", "heron.upload", "heron.seeds"}  # no model
    assert set(content["heron.seeds"].keys()) == {"client_id", "stream_version", "step", "seeds", "projected_grads",
                                                  "buffer/1.running_mean", "buffer/1.num_batches_tracked"}


def test_seeds_reply_of_a_restarted_client_and_with_every_step_skipped():
    assert codec.decode_reply(_seeds_reply(ClientSync(2, 0)), _seeds_spec()).start == ClientSync(2, 0)
    result = _result()
    result.skipped_steps = 4
    content = codec.encode_reply(result, 1, start=ClientSync(1, 3), seeds=_seeds_upload(applied=0))
    reply = codec.decode_reply(content, _seeds_spec())
    assert reply.seeds.zo_steps == [] and reply.seeds.q == 0


def _seeds_rejected(content) -> str:
    return _rejected(content, _seeds_spec())


@pytest.mark.parametrize(("key", "array", "expected"), [
    ("seeds", np.zeros((3, 2), np.int32), "heron.seeds/seeds: expected dtype int64, got int32"),
    ("projected_grads", np.zeros((3, 2), np.float32),
     "heron.seeds/projected_grads: expected dtype float64, got float32"),
    ("projected_grads", np.zeros((3, 1)), "heron.seeds/projected_grads: expected shape (3, 2), got (3, 1)"),
    ("seeds", np.zeros((3, 3), np.int64), "heron.seeds/seeds: expected shape (3, 2), got (3, 3)"),
    ("client_id", np.array([2]), "heron.seeds/client_id: expected shape (), got (1,)"),
    ("buffer/1.running_mean", np.zeros(3, np.float32),
     "heron.seeds/buffer/1.running_mean: expected shape (2,), got (3,)"),
    ("buffer/1.running_mean", np.array([0.0, np.inf], np.float32),
     "heron.seeds/buffer/1.running_mean: contains NaN or infinite values"),
    ("projected_grads", np.array([[0.0, 1.0], [np.nan, 1.0], [0.0, 0.0]]),
     "heron.seeds/projected_grads: contains NaN or infinite values"),
    ("projected_grads", np.array([[0.0, 1.0], [-np.inf, 1.0], [0.0, 0.0]]),
     "heron.seeds/projected_grads: contains NaN or infinite values"),
    ("client_id", np.array(1), "heron.seeds/client_id: expected 2 (the reply's client-id), got 1"),
    ("step", np.array([3, 5, 6]), "heron.seeds/step: expected the 3 consecutive steps from start-step 3, got "
                                  "['3', '5', '6']"),
    ("seeds", np.array([[1, 2], [-3, 4], [5, 6]]), "heron.seeds: seed-and-scalar upload: 'step' and 'seeds' must "
                                                   "be non-negative"),
])
def test_bad_seeds_arrays_are_rejected(key, array, expected):
    assert expected in _seeds_rejected(_replace_array(_seeds_reply(), "heron.seeds", key, array))


def test_extra_or_missing_seeds_keys_are_rejected():
    content = _replace_array(_seeds_reply(), "heron.seeds", "buffer/1.running_var", np.ones(2, np.float32))
    assert "heron.seeds: missing keys none, unexpected keys ['buffer/1.running_var']" in _seeds_rejected(content)
    content = _seeds_reply()
    del content["heron.seeds"]["projected_grads"]
    assert "heron.seeds: missing keys ['projected_grads'], unexpected keys none" in _seeds_rejected(content)
    content = _seeds_reply()
    del content["heron.seeds"]["buffer/1.num_batches_tracked"]
    assert "missing keys ['buffer/1.num_batches_tracked']" in _seeds_rejected(content)


def test_seeds_step_count_must_be_the_applied_steps():
    content = _seeds_reply()
    content["heron.reply"]["skipped-steps"] = 0  # 4 applied steps claimed, 3 sent
    assert "heron.seeds/step: expected shape (4,), got (3,)" in _seeds_rejected(content)
    content = _seeds_reply(applied=4)  # 1 of the 4 steps was skipped
    assert "heron.seeds/step: expected shape (3,), got (4,)" in _seeds_rejected(content)


def test_seeds_steps_must_start_at_start_step():
    content = codec.encode_reply(_result(), 1, start=ClientSync(2, 0), seeds=_seeds_upload(start=3))
    assert "heron.seeds/step: expected the 3 consecutive steps from start-step 0, got ['3', '4', '5']" in \
        _seeds_rejected(content)


def test_a_model_in_a_seeds_run_and_seeds_in_a_parameters_run_are_rejected():
    content = _reply()
    assert "heron.reply/client-upload: expected one of ['seeds'], got 'parameters'" in _seeds_rejected(content)
    content = _seeds_reply()
    content["heron.model"] = codec.encode_arrays({"0.bias": torch.zeros(4)})
    assert "reply (seeds): missing records none, unexpected records ['heron.model']" in _seeds_rejected(content)
    content = _seeds_reply()
    content["heron.reply"]["client-upload"] = "parameters"
    assert "reply (parameters): missing records ['heron.model'], unexpected records ['heron.seeds']" in \
        _rejected(content)


def test_array_record_rejects_non_arrays():
    record = ArrayRecord()
    with pytest.raises(MessageRejected, match="expected an ArrayRecord"):
        codec.decode_arrays({"w": 1}, {}, "where")
    assert codec.decode_arrays(record, {}, "where") == {}


# -- memory and range bounds (issue 15) ----------------------------------------------------------------

def _npy_header_only(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """A .npy payload whose header claims `shape` but that carries no data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


@pytest.mark.parametrize("claimed", [(10**8,), (10**15,), (4, 10**7)])
def test_npy_header_claiming_a_huge_array_is_rejected_before_allocating(claimed):
    """The Array declares (4,) and the payload is a few bytes, but its .npy header claims up to 10**15
    elements: refused from the header, allocating nothing near the claim."""
    import tracemalloc

    content = _reply()
    content["heron.model"]["0.bias"] = Array("float32", (4,), "numpy.ndarray", _npy_header_only(claimed))
    tracemalloc.start()
    try:
        reason = _rejected(content)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"heron.model/0.bias: payload holds (dtype('float32'), {claimed}), but its header declares float32 (4,)" \
        in reason
    assert peak < 1 << 20, peak


def test_npy_payload_with_missing_or_extra_data_is_rejected():
    data = _npy(np.zeros(4, np.float32))
    for payload in (data[:-4], data + b"\x00" * 4):
        content = _reply()
        content["heron.model"]["0.bias"] = Array("float32", (4,), "numpy.ndarray", payload)
        assert "heron.model/0.bias: not a valid .npy payload" in _rejected(content)


def test_fortran_order_payload_decodes_like_numpy():
    value = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(4, 3))
    content = _reply()
    content["heron.model"]["0.weight"] = Array("float32", (4, 3), "numpy.ndarray", _npy(value))
    reply = codec.decode_reply(content, _spec())
    assert torch.equal(reply.result.state["0.weight"], torch.from_numpy(np.ascontiguousarray(value)))


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("mu", float("nan"), "heron.config: mu must be finite in float32"),
    ("mu", 0.0, "heron.config: mu must be non-zero"),
    ("alpha", -0.5, "heron.config: alpha must be > 0 (the Dirichlet concentration), got -0.5"),
    ("alpha", float("inf"), "heron.config: alpha must be finite in float32"),
    ("zo_lr", float("nan"), "heron.config: zo_lr must be finite in float32"),
    ("client_lr", -1.0, "heron.config: client_lr must be > 0, got -1.0"),
    ("server_lr", 1e39, "heron.config: server_lr must be finite in float32"),
    ("backend", "opencl", "heron.config: backend must be one of ('triton', 'cuda', 'cpu', 'torch') or None, got "
                          "'opencl'"),
    ("seed", -3, "heron.config: seed must be non-negative, got -3"),
    ("device", "tpu", "heron.config: device must be 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'"),
])
def test_request_config_ranges_are_checked(key, value, expected):
    content = _request()
    content["heron.config"][key] = value
    assert expected in _request_rejected(content)


def test_seeds_reply_with_scalars_beyond_float32_is_rejected():
    """1e300 is finite in float64 but inf in the float32 update kernels: replaying it would make the model NaN."""
    array = np.array([[0.0, 1.0], [1e300, 1.0], [0.0, 0.0]])
    reason = _seeds_rejected(_replace_array(_seeds_reply(), "heron.seeds", "projected_grads", array))
    assert "heron.seeds: seed-and-scalar upload: 'projected_grads' must be finite in float32" in reason


def test_negative_client_id_in_a_seed_upload_is_rejected():
    tensors = _seeds_upload().to_tensors()
    tensors["client_id"] = torch.tensor(-2)
    with pytest.raises(ValueError, match="'client_id' must be non-negative, got -2"):
        SeedScalarUpload.from_tensors(tensors)
