"""Checkpoints that are never half-written: safetensors files with JSON metadata, replaced atomically.

A checkpoint holds a (possibly nested) dict of tensors, stored flat under "/"-joined keys, and a
JSON-serialisable metadata dict, stored as one JSON string under the header metadata key "heron".
A SHA-256 digest of the whole file is stored beside it (computed with the digest's own 64 hex
digits written as zeros), so any edited byte -- a tensor, the metadata's round number or history,
the header -- is refused as corrupt instead of loading wrong numbers or skipping rounds; a file
without that digest is refused too. So is a checkpoint of another perturbation stream version
(heron.kernels.stream.STREAM_VERSION), or of none: a run's state (ZO optimizer moments, replicas,
the steps it will replay) is tied to the directions its stream regenerates.

`save_checkpoint` writes a temp file in the target's directory, fsyncs it, renames it over the
target (os.replace is atomic) and fsyncs the directory: a crash at any point leaves either the old
checkpoint or the new one under the final name, never a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from heron.kernels.stream import STREAM_VERSION, StreamVersionError, check_stream_version

METADATA_KEY = "heron"
DIGEST_KEY = "heron.file-sha256"  # the whole file's SHA-256 (earlier versions wrote "heron.sha256", tensors only)
_DIGEST_PLACEHOLDER = "0" * 64
STREAM_VERSION_KEY = "heron.stream_version"
SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match what the caller expects."""


# -- saving ---------------------------------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    """Write `tensors` and `metadata` to `path` atomically (creating its directory if needed).

    tensors: a dict whose values are tensors (any device, dtype, strides; shared storage is fine)
    or nested dicts of them; nested keys are joined with "/". Keys must be non-empty strings
    without empty "/" segments, and no key may be both a tensor and a prefix of another key.
    metadata: a JSON-serialisable dict (load_checkpoint returns it as JSON decodes it).
    """
    path = Path(path)
    flat = flatten_tensors(tensors)
    header = {METADATA_KEY: _encode_metadata(metadata), DIGEST_KEY: _DIGEST_PLACEHOLDER,
              STREAM_VERSION_KEY: str(STREAM_VERSION)}
    payload = bytearray(safetensors.torch.save(flat, metadata=header))
    start = _digest_position(payload)
    payload[start:start + len(_DIGEST_PLACEHOLDER)] = hashlib.sha256(payload).hexdigest().encode()
    _atomic_write(path, bytes(payload))


def flatten_tensors(tree: Mapping[str, Any]) -> dict[str, Tensor]:
    """Nested dicts of tensors -> {"a/b/c": tensor}, each a contiguous CPU tensor with its own storage."""
    flat: dict[str, Tensor] = {}
    _flatten_into(tree, "", flat)
    _check_no_prefix_clash(flat)
    seen_storages: set[int] = set()
    return {name: _storable(tensor, seen_storages) for name, tensor in flat.items()}


def _flatten_into(tree: Mapping[str, Any], prefix: str, flat: dict[str, Tensor]) -> None:
    if not isinstance(tree, Mapping):
        raise TypeError(f"tensors{' at ' + repr(prefix) if prefix else ''} must be a dict, got {type(tree).__name__}")
    for key, value in tree.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint keys must be str, got {type(key).__name__} {key!r} under {prefix or '/'!r}")
        name = f"{prefix}/{key}" if prefix else key
        if any(part == "" for part in name.split("/")):
            raise ValueError(f"checkpoint key {name!r} has an empty '/'-separated part")
        if isinstance(value, Mapping):
            _flatten_into(value, name, flat)
        elif isinstance(value, Tensor):
            if name in flat:
                raise ValueError(f"checkpoint key {name!r} occurs twice after joining nested keys with '/'")
            flat[name] = value
        else:
            raise TypeError(f"checkpoint value {name!r} must be a tensor or a dict of tensors, got "
                            f"{type(value).__name__}")


def _check_no_prefix_clash(flat: Mapping[str, Tensor]) -> None:
    """A tensor at "a" and another at "a/b" could not both be restored as nested dicts."""
    for name in flat:
        parts = name.split("/")
        for end in range(1, len(parts)):
            prefix = "/".join(parts[:end])
            if prefix in flat:
                raise ValueError(f"checkpoint key {prefix!r} is a tensor and also a prefix of {name!r}")


def _storable(tensor: Tensor, seen_storages: set[int]) -> Tensor:
    """tensor as safetensors can store it: contiguous, on CPU, and sharing no storage with another entry."""
    if tensor.layout != torch.strided:
        raise TypeError(f"only dense (strided) tensors can be checkpointed, got layout {tensor.layout}")
    tensor = tensor.detach()
    storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
    shared = storage is not None and storage in seen_storages
    if storage is not None:
        seen_storages.add(storage)
    if tensor.device.type == "cpu" and tensor.is_contiguous() and not shared and tensor.numel():
        return tensor
    copy = torch.empty(tensor.shape, dtype=tensor.dtype)
    copy.copy_(tensor)
    return copy


def _encode_metadata(metadata: Mapping[str, Any]) -> str:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        return json.dumps(metadata, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable: {error}") from error


def _digest_position(payload: bytes | bytearray) -> int | None:
    """Where the digest's 64 hex digits start in a safetensors payload (in its JSON header), or None when the
    header does not hold exactly one digest entry."""
    if len(payload) < 8:
        return None
    header_end = 8 + int.from_bytes(payload[:8], "little")
    marker = f'"{DIGEST_KEY}":"'.encode()
    header = bytes(payload[8:header_end])
    if header.count(marker) != 1:
        return None
    return 8 + header.index(marker) + len(marker)


def _atomic_write(path: Path, payload: bytes) -> None:
    """payload to path via a fsynced temp file in the same directory and os.replace; then fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A dot-prefixed ".tmp" name: latest_checkpoint and globs for "*.safetensors" never see it.
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "xb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable. Some platforms (Windows) cannot open or fsync a directory; skip there."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- loading --------------------------------------------------------------------------------------

def load_checkpoint(path: str | os.PathLike, *, expected_metadata: Mapping[str, Any] | None = None,
                    expected_shapes: Mapping[str, Any] | None = None,
                    expected_dtypes: Mapping[str, torch.dtype] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(nested dict of CPU tensors, metadata) from a checkpoint written by save_checkpoint (with this
    heron's stream version).

    expected_metadata: each of its keys must hold an equal value in the stored metadata (nested
    dicts are compared key by key). expected_shapes: {key: shape}, flat "/"-joined or nested;
    the checkpoint must hold exactly these tensor keys with these shapes. expected_dtypes:
    {key: dtype} for the tensors whose dtype matters. Any failure raises CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    flat, header = _read(path)
    metadata = _decode_metadata(path, header)
    _check_stream_version(path, header)
    if expected_metadata is not None:
        _check_metadata(path, metadata, expected_metadata)
    if expected_shapes is not None:
        _check_shapes(path, flat, expected_shapes)
    if expected_dtypes is not None:
        _check_dtypes(path, flat, expected_dtypes)
    return unflatten_tensors(flat), metadata


def unflatten_tensors(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    """{"a/b/c": tensor} -> {"a": {"b": {"c": tensor}}}."""
    tree: dict[str, Any] = {}
    for name, tensor in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    return tree


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a checkpoint whose whole-file digest matches (else CheckpointError)."""
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from error
    try:
        flat = safetensors.torch.load(payload)
        header = _header_metadata(payload)
    except (SafetensorError, ValueError) as error:  # json's errors are ValueErrors
        raise CheckpointError(f"checkpoint {path} is corrupt (truncated or not a safetensors file): {error}") from error
    if METADATA_KEY in header:  # a file without it is not heron's (load_checkpoint says so)
        _check_digest(path, payload, header)
    return flat, header


def _header_metadata(payload: bytes) -> dict[str, str]:
    """The "__metadata__" dict of a safetensors payload that safetensors has parsed already."""
    header = json.loads(payload[8:8 + int.from_bytes(payload[:8], "little")])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("its __metadata__ is not a JSON object")
    return metadata


def _decode_metadata(path: Path, header: Mapping[str, str]) -> dict[str, Any]:
    if METADATA_KEY not in header:
        raise CheckpointError(f"checkpoint {path} has no {METADATA_KEY!r} metadata; it was not written by "
                              f"heron's save_checkpoint")
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: its {METADATA_KEY!r} metadata is not JSON "
                              f"({error})") from error
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its {METADATA_KEY!r} metadata is not a JSON object")
    return metadata


def _check_stream_version(path: Path, header: Mapping[str, str]) -> None:
    stored = header.get(STREAM_VERSION_KEY)
    try:
        check_stream_version(int(stored) if stored is not None and stored.isdigit() else stored, f"checkpoint {path}")
    except StreamVersionError as error:
        raise CheckpointError(str(error)) from None


def _check_digest(path: Path, payload: bytes, header: Mapping[str, str]) -> None:
    stored, start = header.get(DIGEST_KEY), _digest_position(payload)
    if stored is None or start is None:
        raise CheckpointError(f"checkpoint {path} has no whole-file SHA-256 digest ({DIGEST_KEY!r}): it was edited, "
                              f"or written by another program or an earlier heron; refusing to trust it")
    canonical = bytearray(payload)
    canonical[start:start + len(_DIGEST_PLACEHOLDER)] = _DIGEST_PLACEHOLDER.encode()
    if stored != hashlib.sha256(canonical).hexdigest():
        raise CheckpointError(f"checkpoint {path} is corrupt: its bytes do not match the stored SHA-256 digest")


def _check_metadata(path: Path, stored: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    # Compare with what the expected values become after a JSON round trip (tuples -> lists, ...).
    expected = json.loads(_encode_metadata(expected))
    differences = _metadata_differences(stored, expected, "")
    if differences:
        raise CheckpointError(f"checkpoint {path} does not match this run: " + "; ".join(differences))


def _metadata_differences(stored: Mapping[str, Any], expected: Mapping[str, Any], prefix: str) -> list[str]:
    differences = []
    for key, want in expected.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in stored:
            differences.append(f"metadata {name!r} is missing from the checkpoint, expected {want!r}")
        elif isinstance(want, dict) and isinstance(stored[key], dict):
            differences.extend(_metadata_differences(stored[key], want, name))
        elif stored[key] != want:
            differences.append(f"metadata {name!r} is {stored[key]!r} in the checkpoint, expected {want!r}")
    return differences


def _check_shapes(path: Path, flat: Mapping[str, Tensor], expected_shapes: Mapping[str, Any]) -> None:
    expected = _flatten_shapes(expected_shapes, "")
    missing, unexpected = sorted(expected.keys() - flat.keys()), sorted(flat.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} holds different tensors than expected: missing "
                              f"{_some(missing)}, unexpected {_some(unexpected)}")
    for name, shape in expected.items():
        if tuple(flat[name].shape) != shape:
            raise CheckpointError(f"checkpoint {path}: tensor {name!r} has shape {tuple(flat[name].shape)} in the "
                                  f"checkpoint, expected {shape}")


def _flatten_shapes(tree: Mapping[str, Any], prefix: str) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            shapes.update(_flatten_shapes(value, name))
        else:
            shapes[name] = tuple(int(size) for size in value)
    return shapes


def _check_dtypes(path: Path, flat: Mapping[str, Tensor], expected_dtypes: Mapping[str, torch.dtype]) -> None:
    for name, dtype in expected_dtypes.items():
        if name not in flat:
            raise CheckpointError(f"checkpoint {path} has no tensor {name!r}")
        if flat[name].dtype != dtype:
            raise CheckpointError(f"checkpoint {path}: tensor {name!r} has dtype {flat[name].dtype} in the "
                                  f"checkpoint, expected {dtype}")


def _some(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- finding checkpoints --------------------------------------------------------------------------

def checkpoint_path(directory: str | os.PathLike, prefix: str, round_number: int) -> Path:
    """directory / f"{prefix}-round{round_number:05d}.safetensors", the name latest_checkpoint looks for."""
    return Path(directory) / f"{prefix}-round{round_number:05d}{SUFFIX}"


def latest_checkpoint(directory: str | os.PathLike, prefix: str) -> Path | None:
    """The checkpoint "{prefix}-round{N}.safetensors" in directory with the largest N, or None.

    Temp files of an interrupted save and checkpoints of other prefixes are ignored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    pattern = re.compile(rf"{re.escape(prefix)}-round(\d+){re.escape(SUFFIX)}")
    rounds = [(int(match.group(1)), entry.name, entry) for entry in directory.iterdir()
              if (match := pattern.fullmatch(entry.name)) and entry.is_file()]
    return max(rounds)[2] if rounds else None
