"""heron's Flower messages: building them and checking them before anything is used. No pickle.

A round is one "train" message from the ServerApp to each node and one reply. Tensors travel in
ArrayRecords as .npy payloads (read back with `allow_pickle=False`); scalars in ConfigRecords.

Request (server -> client), records of its RecordDict:
    "heron.config"  ConfigRecord  the run's TrainConfig (heron.flower.config)
    "heron.round"   ConfigRecord  protocol, stream-version (heron.kernels.stream.STREAM_VERSION), round (0-based),
                                  client-upload (the reply kind asked for: the config's client_upload),
                                  client-generations and client-steps (per client id, where the server
                                  has that client's updater: ClientSync)
    "heron.model"   ArrayRecord   the global client model: client part + aux head state_dict

Reply (client -> server), kind "parameters" or "seeds" (TrainConfig.client_upload):
    "heron.reply"   ConfigRecord  protocol, stream-version, round, client-id, num-samples, client-upload,
                                  skipped-steps, losses (one float per local step), generation and
                                  start-step (the ClientSync the client started the round from)
    "heron.upload"  ArrayRecord   "smashed/<i>" (B, *cut shape) float, "labels/<i>" (B,) int64 for
                                  the i-th upload, i < local_steps // upload_every; B = min(batch, n)
  kind "parameters" adds
    "heron.model"   ArrayRecord   the client's model after its h local steps
  kind "seeds" adds, instead of the model (heron.sfl.replay.SeedScalarUpload.to_tensors()):
    "heron.seeds"   ArrayRecord   "client_id" int64 (), "stream_version" int64 (), "step" int64 (n,),
                                  "seeds" int64 (n, q), "projected_grads" float64 (n, q),
                                  "buffer/<state key>" for each BatchNorm buffer; n = local_steps -
                                  skipped-steps, steps numbered start-step, start-step + 1, ... (q is 0
                                  when n is 0)

Decoding checks, in this order, and rejects with a MessageRejected naming the record/key and the
expected vs received value: the set of records, the header's stream-version (a message of another
perturbation stream version, or of none, is refused saying so), every ConfigRecord key (exact set,
exact Python types, ranges), every ArrayRecord key (exact set), each array's declared dtype and
shape, its payload size (bounded before it is parsed), the parsed array's dtype and shape,
finiteness of floating arrays, label range, and for seeds the step numbers, the client id and the
seeds' range.
What depends on the server's state of the sending client is checked once the node is known to
speak for that client (heron.flower.server.SplitServer.absorb): where the reply started
(`check_start`) and, for seeds, each step's seeds against the ones the client's updater derives
(by its replica, before it replays anything).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from heron.flower.config import check_flower_method, train_config_from_record, train_config_to_record
from heron.kernels.stream import STREAM_VERSION, StreamVersionError, check_stream_version
from heron.sfl.config import TrainConfig
from heron.sfl.replay import BUFFER_PREFIX, SeedScalarUpload
from heron.sfl.roles import ClientRoundResult, Upload

PROTOCOL = 2  # 2: ClientSync in requests and replies, and the reply kinds named as TrainConfig.client_upload
MESSAGE_TYPE = "train"

CONFIG, ROUND, MODEL, REPLY, UPLOAD = "heron.config", "heron.round", "heron.model", "heron.reply", "heron.upload"
SEEDS = "heron.seeds"

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
    nbytes = int(np.prod(spec.shape, dtype=np.int64)) * want.itemsize
    limit = nbytes + _NPY_HEADER_MAX
    if len(array.data) > limit:
        raise MessageRejected(f"{name}: payload of {len(array.data)} bytes, expected at most {limit} for "
                              f"shape {spec.shape} {want}")
    dtype, shape, fortran_order, start = _npy_header(array.data, name)
    if dtype != want or shape != spec.shape:  # checked before anything the header claims is allocated
        raise MessageRejected(f"{name}: payload holds {(dtype, shape)}, but its header declares {want} {spec.shape}")
    if len(array.data) - start != nbytes:
        raise MessageRejected(f"{name}: not a valid .npy payload ({len(array.data) - start} data bytes after the "
                              f"header, expected {nbytes} for {want} {spec.shape})")
    flat = np.frombuffer(array.data, dtype=want, count=nbytes // want.itemsize, offset=start)
    value = flat.reshape(spec.shape, order="F" if fortran_order else "C")
    tensor = torch.from_numpy(np.array(value, order="C", copy=True))
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise MessageRejected(f"{name}: contains NaN or infinite values")
    return tensor


def _npy_header(data: bytes, name: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, where the data starts) from an .npy payload's header, read without
    reading (or allocating) the data; object dtypes (pickles) are refused."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=_NPY_HEADER_MAX)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=_NPY_HEADER_MAX)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError) as error:
        raise MessageRejected(f"{name}: not a valid .npy payload ({error})") from None
    if dtype.hasobject:
        raise MessageRejected(f"{name}: not a valid .npy payload (dtype {dtype} holds Python objects)")
    return dtype, tuple(shape), bool(fortran_order), stream.tell()


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


def _check_stream_version(header: Mapping[str, Any], where: str, what: str) -> None:
    """header["stream-version"] must be this heron's STREAM_VERSION (directions, seeds and optimizer
    state only mean something under the stream that made them)."""
    try:
        check_stream_version(header.get("stream-version"), what)
    except StreamVersionError as error:
        raise MessageRejected(f"{where}: {error}") from None


def _str(record: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...]) -> str:
    value = record[key]
    if type(value) is not str or value not in choices:
        raise MessageRejected(f"{where}/{key}: expected one of {list(choices)}, got {value!r}")
    return value


def _int_list(record: Mapping[str, Any], key: str, where: str, length: int, low: int, high: int) -> list[int]:
    """record[key] as a list of `length` ints, each in [low, high]."""
    value = record[key]
    if not isinstance(value, list) or len(value) != length or not all(type(v) is int for v in value):
        raise MessageRejected(f"{where}/{key}: expected a list of {length} ints, got {_describe(value)}")
    bad = [v for v in value if not low <= v <= high]
    if bad:
        raise MessageRejected(f"{where}/{key}: expected values in [{low}, {high}], got {bad[0]}")
    return list(value)


def _check_records(content: Any, expected: set[str], what: str) -> None:
    if not isinstance(content, RecordDict):
        raise MessageRejected(f"{what}: expected a RecordDict, got {type(content).__name__}")
    missing, extra = sorted(expected - content.keys()), sorted(content.keys() - expected)
    if missing or extra:
        raise MessageRejected(f"{what}: missing records {_some(missing)}, unexpected records {_some(extra)}")


# -- where a client's updater is ------------------------------------------------------------------

@dataclass(frozen=True)
class ClientSync:
    """A point on a client's updater trajectory: its generation (0 at the start of a run, one more
    each time the client's updater starts afresh after the server accepted steps from it, e.g. on a
    restarted SuperNode) and its step count within that generation.

    The server keeps one per client (where its accepted rounds left the client) and sends them with
    every request; a client tags its saved updater states with theirs and replies with the one it
    started from. Within a generation the step count names one state (skipped steps change neither).
    """

    generation: int = 0
    steps: int = 0

    def starts(self) -> tuple[ClientSync, ClientSync]:
        """The starts a reply may have when the server has the client here: continuing from here, or a
        fresh updater of the next generation."""
        return self, ClientSync(self.generation + 1, 0)


def check_start(start: ClientSync, server: ClientSync, client_id: int) -> bool:
    """Whether a reply that started at `start` may be accepted when the server has the client at
    `server`: False when it continues from there, True when it is a fresh updater of the next
    generation (a restart). Raises MessageRejected otherwise."""
    here, fresh = server.starts()
    if start not in (here, fresh):
        raise MessageRejected(f"{REPLY}/generation, start-step: expected {here.generation}, {here.steps} (where the "
                              f"server has client {client_id}) or {fresh.generation}, 0 (its updater restarted), got "
                              f"{start.generation}, {start.steps}")
    return start == fresh


# -- request (server -> client) --------------------------------------------------------------------

_REQUEST_KEYS = {"protocol", "stream-version", "round", "client-upload", "client-generations", "client-steps"}


@dataclass
class RoundRequest:
    """A decoded request: the run's config, the round index, the reply kind asked for, where the
    server has each client (the updater state a client must start the round from) and the global
    client model's state (CPU tensors)."""

    config: TrainConfig
    round_index: int
    client_upload: str
    sync: list[ClientSync]
    state: dict[str, torch.Tensor]


def encode_request(config: TrainConfig, round_index: int, state: Mapping[str, torch.Tensor], *,
                   sync: Sequence[ClientSync]) -> RecordDict:
    """The content of round `round_index`'s message to every node. sync: per client id, where the
    server's accepted rounds left that client."""
    if len(sync) != config.clients:
        raise ValueError(f"sync must have one entry per client ({config.clients}), got {len(sync)}")
    return RecordDict({
        CONFIG: ConfigRecord(train_config_to_record(config)),
        ROUND: ConfigRecord({"protocol": PROTOCOL, "stream-version": STREAM_VERSION, "round": round_index,
                             "client-upload": config.client_upload,
                             "client-generations": [int(s.generation) for s in sync],
                             "client-steps": [int(s.steps) for s in sync]}),
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
    _check_stream_version(header, ROUND, "this request")
    _check_keys(header, _REQUEST_KEYS, ROUND)
    _int(header, "protocol", ROUND, PROTOCOL, PROTOCOL)
    round_index = _int(header, "round", ROUND, 0)
    kind = _str(header, "client-upload", ROUND, (config.client_upload,))
    # each earlier round can restart a client once and add at most local_steps to its count
    generations = _int_list(header, "client-generations", ROUND, config.clients, 0, round_index)
    steps = _int_list(header, "client-steps", ROUND, config.clients, 0, round_index * config.local_steps)
    state = decode_arrays(content[MODEL], state_specs(config), MODEL)
    sync = [ClientSync(g, n) for g, n in zip(generations, steps, strict=True)]
    return RoundRequest(config, round_index, kind, sync, state)


# -- reply (client -> server) ----------------------------------------------------------------------

@dataclass(frozen=True)
class ReplySpec:
    """What the server accepts as round `round_index`'s reply.

    state: the global client model's specs; smashed: one sample's cut-layer output, shape (C', H', W')
    and dtype; max_samples: the largest honest sample count (the training set's size);
    q: directions per ZO step; buffers: the state entries a seed-and-scalar upload carries (kind
    "seeds"), by state_dict key.
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
    q: int = 1
    buffers: Mapping[str, TensorSpec] = field(default_factory=dict)
    labels_dtype: torch.dtype = torch.int64

    @property
    def num_uploads(self) -> int:
        return self.local_steps // self.upload_every


@dataclass
class ClientReply:
    """A decoded, checked reply.

    kind "parameters": `result` carries state, uploads, losses and counts. Kind "seeds": `result`
    carries all but the state (empty until the server rebuilds it from `seeds`). start: where the
    client's updater started the round.
    """

    kind: str
    result: ClientRoundResult
    start: ClientSync
    seeds: SeedScalarUpload | None = None


_REPLY_KEYS = {"protocol", "stream-version", "round", "client-id", "num-samples", "client-upload", "skipped-steps",
               "losses", "generation", "start-step"}


def encode_reply(result: ClientRoundResult, round_index: int, *, start: ClientSync,
                 seeds: SeedScalarUpload | None = None) -> RecordDict:
    """The content of a client's reply to round `round_index`, which its updater started at `start`:
    kind "seeds" when `seeds` is given (the upload of `result`, heron.sfl.replay.seed_scalar_upload),
    else kind "parameters"."""
    kind = "parameters" if seeds is None else "seeds"
    content = RecordDict({REPLY: ConfigRecord({
        "protocol": PROTOCOL, "stream-version": STREAM_VERSION, "round": round_index, "client-id": result.client_id,
        "num-samples": result.num_samples, "client-upload": kind, "skipped-steps": result.skipped_steps,
        "losses": [float(loss) for loss in result.losses], "generation": start.generation,
        "start-step": start.steps})})
    content[UPLOAD] = _encode_uploads(result)
    if seeds is None:
        content[MODEL] = encode_arrays(result.state)
    else:
        content[SEEDS] = encode_arrays(seeds.to_tensors())
    return content


def decode_reply(content: Any, spec: ReplySpec) -> ClientReply:
    """Check and decode a reply against `spec`; raises MessageRejected with the reason."""
    if not isinstance(content, RecordDict):
        raise MessageRejected(f"reply: expected a RecordDict, got {type(content).__name__}")
    if REPLY not in content.keys():
        raise MessageRejected(f"reply: missing record {REPLY!r}")
    header = _config_record(content, REPLY)
    _check_stream_version(header, REPLY, "this reply")
    _check_keys(header, _REPLY_KEYS, REPLY)
    kind = _str(header, "client-upload", REPLY, (spec.client_upload,))
    _check_records(content, _REPLY_RECORDS[kind], f"reply ({kind})")
    _int(header, "protocol", REPLY, PROTOCOL, PROTOCOL)
    _int(header, "round", REPLY, spec.round_index, spec.round_index)
    client_id = _int(header, "client-id", REPLY, 0, spec.clients - 1)
    num_samples = _int(header, "num-samples", REPLY, 1, spec.max_samples)
    skipped = _int(header, "skipped-steps", REPLY, 0, spec.local_steps)
    start = ClientSync(_int(header, "generation", REPLY, 0), _int(header, "start-step", REPLY, 0))
    losses = header["losses"]
    if (not isinstance(losses, list) or len(losses) != spec.local_steps
            or not all(type(loss) is float for loss in losses)):
        raise MessageRejected(f"{REPLY}/losses: expected {spec.local_steps} floats, got {_describe(losses)}")
    result = ClientRoundResult(client_id, {}, num_samples, losses=list(losses), skipped_steps=skipped)
    reply = ClientReply(kind, result, start)
    result.uploads = _decode_uploads(content, spec, num_samples)
    _DECODERS[kind](content, spec, reply)
    return reply


def _encode_uploads(result: ClientRoundResult) -> ArrayRecord:
    uploads: dict[str, torch.Tensor] = {}
    for i, upload in enumerate(result.uploads):
        uploads[f"smashed/{i}"], uploads[f"labels/{i}"] = upload.smashed, upload.labels
    return encode_arrays(uploads)


def _decode_uploads(content: RecordDict, spec: ReplySpec, num_samples: int) -> list[Upload]:
    batch = min(spec.batch_size, num_samples)
    expected: dict[str, TensorSpec] = {}
    for i in range(spec.num_uploads):
        expected[f"smashed/{i}"] = TensorSpec((batch, *spec.smashed.shape), spec.smashed.dtype)
        expected[f"labels/{i}"] = TensorSpec((batch,), spec.labels_dtype)
    tensors = decode_arrays(content[UPLOAD], expected, UPLOAD)
    uploads = []
    for i in range(spec.num_uploads):
        labels = tensors[f"labels/{i}"]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
            raise MessageRejected(f"{UPLOAD}/labels/{i}: expected labels in [0, {spec.num_classes}), got range "
                                  f"[{int(labels.min())}, {int(labels.max())}]")
        uploads.append(Upload(tensors[f"smashed/{i}"], labels))
    return uploads


def _decode_parameters(content: RecordDict, spec: ReplySpec, reply: ClientReply) -> None:
    reply.result.state = decode_arrays(content[MODEL], spec.state, MODEL)


def seeds_specs(spec: ReplySpec, applied_steps: int) -> dict[str, TensorSpec]:
    """The arrays of a "seeds" reply with `applied_steps` applied steps (SeedScalarUpload.to_tensors)."""
    n = applied_steps
    q = spec.q if n else 0  # to_tensors writes seeds of shape (0, 0) when no step was applied
    return {"client_id": TensorSpec((), torch.int64), "stream_version": TensorSpec((), torch.int64),
            "step": TensorSpec((n,), torch.int64),
            "seeds": TensorSpec((n, q), torch.int64), "projected_grads": TensorSpec((n, q), torch.float64),
            **{BUFFER_PREFIX + key: buffer for key, buffer in spec.buffers.items()}}


def _decode_seeds(content: RecordDict, spec: ReplySpec, reply: ClientReply) -> None:
    result, start = reply.result, reply.start.steps
    n = spec.local_steps - result.skipped_steps
    # shapes, dtypes, exact keys (buffers included), payload sizes; no NaN/inf in scalars or buffers
    tensors = decode_arrays(content[SEEDS], seeds_specs(spec, n), SEEDS)
    if int(tensors["client_id"]) != result.client_id:
        raise MessageRejected(f"{SEEDS}/client_id: expected {result.client_id} (the reply's client-id), got "
                              f"{int(tensors['client_id'])}")
    steps = tensors["step"]
    if not torch.equal(steps, torch.arange(start, start + n, dtype=torch.int64)):
        raise MessageRejected(f"{SEEDS}/step: expected the {n} consecutive steps from start-step {start}, got "
                              f"{_some([str(s) for s in steps.tolist()], 8)}")
    try:
        reply.seeds = SeedScalarUpload.from_tensors(tensors)
    except ValueError as error:
        raise MessageRejected(f"{SEEDS}: {error}") from None


# A reply kind: the records it holds besides REPLY and UPLOAD, and its decoder (which fills in the
# ClientReply's client state or seed-and-scalar upload); the server side dispatches on ClientReply.kind.
_REPLY_RECORDS: dict[str, set[str]] = {"parameters": {REPLY, UPLOAD, MODEL}, "seeds": {REPLY, UPLOAD, SEEDS}}
_DECODERS: dict[str, Callable[[RecordDict, ReplySpec, ClientReply], None]] = {
    "parameters": _decode_parameters, "seeds": _decode_seeds}
UPLOAD_KINDS: tuple[str, ...] = tuple(_REPLY_RECORDS)  # = heron.sfl.replay.CLIENT_UPLOADS (tested)


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
