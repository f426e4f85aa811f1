"""heron's Flower messages: building them and checking them before anything is used. No pickle.

A round is one "train" message from the ServerApp to each node and one reply. Tensors travel in
ArrayRecords as .npy payloads (read back with `allow_pickle=False`); scalars in ConfigRecords.

Request (server -> client), records of its RecordDict:
    "heron.config"  ConfigRecord  the run's TrainConfig (heron.flower.config)
    "heron.round"   ConfigRecord  protocol, round (0-based), client-upload (the reply kind asked for)
    "heron.model"   ArrayRecord   the global client model: client part + aux head state_dict

Reply (client -> server) of kind "smashed":
    "heron.reply"   ConfigRecord  protocol, round, client-id, num-samples, client-upload,
                                  skipped-steps, losses (one float per local step)
    "heron.model"   ArrayRecord   the client's model after its h local steps
    "heron.upload"  ArrayRecord   "smashed/<i>" (B, *cut shape) float, "labels/<i>" (B,) int64 for
                                  the i-th upload, i < local_steps // upload_every; B = min(batch, n)

Decoding checks, in this order, and rejects with a MessageRejected naming the record/key and the
expected vs received value: the set of records, every ConfigRecord key (exact set, exact Python
types, ranges), every ArrayRecord key (exact set), each array's declared dtype and shape, its
payload size (bounded before it is parsed), the parsed array's dtype and shape, finiteness of
floating arrays, and label range.

A second reply kind is one entry in each of `_REPLY_RECORDS`, `_ENCODERS` and `_DECODERS` (see
"HOOK (seeds)" below); the server side dispatches on `ClientReply.kind`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from heron.flower.config import check_flower_method, train_config_from_record, train_config_to_record
from heron.sfl.engine import TrainConfig
from heron.sfl.roles import ClientRoundResult, Upload

PROTOCOL = 1
MESSAGE_TYPE = "train"

CONFIG, ROUND, MODEL, REPLY, UPLOAD = "heron.config", "heron.round", "heron.model", "heron.reply", "heron.upload"

_NPY_STYPE = "numpy.ndarray"
# An .npy header for a plain dtype is 128 bytes; anything much bigger than the data is not an honest payload.
_NPY_HEADER_MAX = 4096


class MessageRejected(ValueError):
    """A message failed validation; the message says which record/key and expected vs got."""


@dataclass(frozen=True)
class TensorSpec:
    """What one array must be: its exact shape and torch dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def specs_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """{key: TensorSpec} of a state_dict (the shapes and dtypes a message must match)."""
    return {key: TensorSpec(tuple(value.shape), value.dtype) for key, value in state.items()}


# -- arrays ----------------------------------------------------------------------------------------

def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError as error:  # e.g. bfloat16: numpy has no such dtype
        raise TypeError(f"tensors of dtype {dtype} cannot travel as .npy arrays") from error


def encode_arrays(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of .npy payloads (tensors are detached and copied to CPU)."""
    record = ArrayRecord()
    for key, tensor in tensors.items():
        _numpy_dtype(tensor.dtype)
        record[key] = Array.from_numpy_ndarray(tensor.detach().cpu().contiguous().numpy())
    return record


def decode_arrays(record: Any, expected: Mapping[str, TensorSpec], where: str, *,
                  finite: bool = True) -> dict[str, torch.Tensor]:
    """{key: CPU tensor} from an ArrayRecord that must hold exactly `expected`'s keys, shapes and dtypes.

    finite: also reject NaN/inf in floating arrays.
    """
    if not isinstance(record, ArrayRecord):
        raise MessageRejected(f"{where}: expected an ArrayRecord, got {type(record).__name__}")
    missing, extra = sorted(expected.keys() - record.keys()), sorted(record.keys() - expected.keys())
    if missing or extra:
        raise MessageRejected(f"{where}: missing keys {_some(missing)}, unexpected keys {_some(extra)}")
    return {key: _decode_array(record[key], spec, f"{where}/{key}", finite) for key, spec in expected.items()}


def _decode_array(array: Any, spec: TensorSpec, name: str, finite: bool) -> torch.Tensor:
    if not isinstance(array, Array):
        raise MessageRejected(f"{name}: expected an Array, got {type(array).__name__}")
    if array.stype != _NPY_STYPE:
        raise MessageRejected(f"{name}: expected serialisation {_NPY_STYPE!r}, got {array.stype!r}")
    want = _numpy_dtype(spec.dtype)
    if array.dtype != str(want):
        raise MessageRejected(f"{name}: expected dtype {want}, got {array.dtype}")
    if tuple(array.shape) != spec.shape:
        raise MessageRejected(f"{name}: expected shape {spec.shape}, got {tuple(array.shape)}")
    limit = int(np.prod(spec.shape, dtype=np.int64)) * want.itemsize + _NPY_HEADER_MAX
    if len(array.data) > limit:
        raise MessageRejected(f"{name}: payload of {len(array.data)} bytes, expected at most {limit} for "
                              f"shape {spec.shape} {want}")
    try:
        value = np.load(io.BytesIO(array.data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise MessageRejected(f"{name}: not a valid .npy payload ({error})") from None
    if not isinstance(value, np.ndarray) or value.dtype != want or value.shape != spec.shape:
        got = (value.dtype, value.shape) if isinstance(value, np.ndarray) else type(value).__name__
        raise MessageRejected(f"{name}: payload holds {got}, but its header declares {want} {spec.shape}")
    tensor = torch.from_numpy(np.array(value, copy=True))
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MessageRejected(f"{name}: contains NaN or infinite values")
    return tensor


# -- scalars ---------------------------------------------------------------------------------------

def _config_record(content: RecordDict, name: str) -> ConfigRecord:
    record = content[name]
    if not isinstance(record, ConfigRecord):
        raise MessageRejected(f"{name}: expected a ConfigRecord, got {type(record).__name__}")
    return record


def _check_keys(record: Mapping[str, Any], expected: set[str], where: str) -> None:
    missing, extra = sorted(expected - record.keys()), sorted(record.keys() - expected)
    if missing or extra:
        raise MessageRejected(f"{where}: missing keys {_some(missing)}, unexpected keys {_some(extra)}")


def _int(record: Mapping[str, Any], key: str, where: str, low: int, high: int | None = None) -> int:
    """record[key] as an int in [low, high] (bools are not ints here)."""
    value = record[key]
    if type(value) is not int:
        raise MessageRejected(f"{where}/{key}: expected int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise MessageRejected(f"{where}/{key}: expected {bound}, got {value}")
    return value


def _str(record: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...]) -> str:
    value = record[key]
    if type(value) is not str or value not in choices:
        raise MessageRejected(f"{where}/{key}: expected one of {list(choices)}, got {value!r}")
    return value


def _check_records(content: Any, expected: set[str], what: str) -> None:
    if not isinstance(content, RecordDict):
        raise MessageRejected(f"{what}: expected a RecordDict, got {type(content).__name__}")
    missing, extra = sorted(expected - content.keys()), sorted(content.keys() - expected)
    if missing or extra:
        raise MessageRejected(f"{what}: missing records {_some(missing)}, unexpected records {_some(extra)}")


# -- request (server -> client) --------------------------------------------------------------------

@dataclass
class RoundRequest:
    """A decoded request: the run's config, the round index, the reply kind asked for, the global
    client model's state (CPU tensors)."""

    config: TrainConfig
    round_index: int
    client_upload: str
    state: dict[str, torch.Tensor]


def encode_request(config: TrainConfig, round_index: int, state: Mapping[str, torch.Tensor], *,
                   client_upload: str = "smashed") -> RecordDict:
    """The content of round `round_index`'s message to every node."""
    if client_upload not in UPLOAD_KINDS:
        raise ValueError(f"client_upload must be one of {UPLOAD_KINDS}, got {client_upload!r}")
    return RecordDict({
        CONFIG: ConfigRecord(train_config_to_record(config)),
        ROUND: ConfigRecord({"protocol": PROTOCOL, "round": round_index, "client-upload": client_upload}),
        MODEL: encode_arrays(state),
    })


def decode_request(content: Any, state_specs: Callable[[TrainConfig], Mapping[str, TensorSpec]]) -> RoundRequest:
    """Check and decode a request. state_specs(config): the specs of the model that config builds."""
    _check_records(content, {CONFIG, ROUND, MODEL}, "request")
    try:
        config = train_config_from_record(_config_record(content, CONFIG))
        check_flower_method(config.method)
    except (TypeError, ValueError) as error:
        raise MessageRejected(f"{CONFIG}: {error}") from None
    header = _config_record(content, ROUND)
    _check_keys(header, {"protocol", "round", "client-upload"}, ROUND)
    _int(header, "protocol", ROUND, PROTOCOL, PROTOCOL)
    round_index = _int(header, "round", ROUND, 0)
    kind = _str(header, "client-upload", ROUND, UPLOAD_KINDS)
    state = decode_arrays(content[MODEL], state_specs(config), MODEL)
    return RoundRequest(config, round_index, kind, state)


# -- reply (client -> server) ----------------------------------------------------------------------

@dataclass(frozen=True)
class ReplySpec:
    """What the server accepts as round `round_index`'s reply.

    state: the global client model's specs; smashed: one sample's cut-layer output, shape (C', H', W')
    and dtype; max_samples: the largest honest sample count (the training set's size).
    """

    round_index: int
    client_upload: str
    clients: int
    local_steps: int
    upload_every: int
    batch_size: int
    max_samples: int
    num_classes: int
    state: Mapping[str, TensorSpec]
    smashed: TensorSpec
    labels_dtype: torch.dtype = torch.int64

    @property
    def num_uploads(self) -> int:
        return self.local_steps // self.upload_every


@dataclass
class ClientReply:
    """A decoded, checked reply. kind "smashed": `result` carries state, uploads, losses and counts."""

    kind: str
    result: ClientRoundResult


_REPLY_KEYS = {"protocol", "round", "client-id", "num-samples", "client-upload", "skipped-steps", "losses"}


def encode_reply(result: ClientRoundResult, round_index: int, *, client_upload: str = "smashed") -> RecordDict:
    """The content of a client's reply to round `round_index`."""
    if client_upload not in UPLOAD_KINDS:
        raise ValueError(f"client_upload must be one of {UPLOAD_KINDS}, got {client_upload!r}")
    content = RecordDict({REPLY: ConfigRecord({
        "protocol": PROTOCOL, "round": round_index, "client-id": result.client_id,
        "num-samples": result.num_samples, "client-upload": client_upload,
        "skipped-steps": result.skipped_steps, "losses": [float(loss) for loss in result.losses]})})
    _ENCODERS[client_upload](result, content)
    return content


def decode_reply(content: Any, spec: ReplySpec) -> ClientReply:
    """Check and decode a reply against `spec`; raises MessageRejected with the reason."""
    if not isinstance(content, RecordDict):
        raise MessageRejected(f"reply: expected a RecordDict, got {type(content).__name__}")
    if REPLY not in content.keys():
        raise MessageRejected(f"reply: missing record {REPLY!r}")
    header = _config_record(content, REPLY)
    _check_keys(header, _REPLY_KEYS, REPLY)
    kind = _str(header, "client-upload", REPLY, (spec.client_upload,))
    _check_records(content, _REPLY_RECORDS[kind], f"reply ({kind})")
    _int(header, "protocol", REPLY, PROTOCOL, PROTOCOL)
    _int(header, "round", REPLY, spec.round_index, spec.round_index)
    client_id = _int(header, "client-id", REPLY, 0, spec.clients - 1)
    num_samples = _int(header, "num-samples", REPLY, 1, spec.max_samples)
    skipped = _int(header, "skipped-steps", REPLY, 0, spec.local_steps)
    losses = header["losses"]
    if (not isinstance(losses, list) or len(losses) != spec.local_steps
            or not all(type(loss) is float for loss in losses)):
        raise MessageRejected(f"{REPLY}/losses: expected {spec.local_steps} floats, got {_describe(losses)}")
    result = ClientRoundResult(client_id, {}, num_samples, losses=list(losses), skipped_steps=skipped)
    _DECODERS[kind](content, spec, result)
    return ClientReply(kind, result)


def _encode_smashed(result: ClientRoundResult, content: RecordDict) -> None:
    content[MODEL] = encode_arrays(result.state)
    uploads: dict[str, torch.Tensor] = {}
    for i, upload in enumerate(result.uploads):
        uploads[f"smashed/{i}"], uploads[f"labels/{i}"] = upload.smashed, upload.labels
    content[UPLOAD] = encode_arrays(uploads)


def _decode_smashed(content: RecordDict, spec: ReplySpec, result: ClientRoundResult) -> None:
    result.state = decode_arrays(content[MODEL], spec.state, MODEL)
    batch = min(spec.batch_size, result.num_samples)
    expected: dict[str, TensorSpec] = {}
    for i in range(spec.num_uploads):
        expected[f"smashed/{i}"] = TensorSpec((batch, *spec.smashed.shape), spec.smashed.dtype)
        expected[f"labels/{i}"] = TensorSpec((batch,), spec.labels_dtype)
    tensors = decode_arrays(content[UPLOAD], expected, UPLOAD)
    for i in range(spec.num_uploads):
        labels = tensors[f"labels/{i}"]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
            raise MessageRejected(f"{UPLOAD}/labels/{i}: expected labels in [0, {spec.num_classes}), got range "
                                  f"[{int(labels.min())}, {int(labels.max())}]")
        result.uploads.append(Upload(tensors[f"smashed/{i}"], labels))


# HOOK (seeds): a seed-and-scalar upload (heron.sfl.replay.SeedScalarUpload) is a second reply kind.
# Add "seeds" here with the records it uses (e.g. {REPLY, UPLOAD}: no model, the server rebuilds it),
# an encoder writing SeedScalarUpload.to_tensors() into UPLOAD and a decoder checking them and
# setting a ClientReply payload; then handle kind "seeds" in heron.flower.server.SplitServer.absorb.
_REPLY_RECORDS: dict[str, set[str]] = {"smashed": {REPLY, MODEL, UPLOAD}}
_ENCODERS: dict[str, Callable[[ClientRoundResult, RecordDict], None]] = {"smashed": _encode_smashed}
_DECODERS: dict[str, Callable[[RecordDict, ReplySpec, ClientRoundResult], None]] = {"smashed": _decode_smashed}
UPLOAD_KINDS: tuple[str, ...] = tuple(_REPLY_RECORDS)


def _some(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(name) for name in names[:limit])
    return "[" + shown + (f" and {len(names) - limit} more" if len(names) > limit else "") + "]"


def _describe(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {len(value)} ({', '.join(kinds) or 'empty'})"
    return f"{type(value).__name__} {value!r}"
