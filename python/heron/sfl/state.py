"""Pack nested Python state (optimizer state_dicts, updater states) into tensors + JSON, for
checkpoints and messages that must not use pickle."""

from __future__ import annotations

from typing import Any

import torch


def _join(path: str, key: object) -> str:
    return f"{path}/{key}" if path else str(key)


def pack(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors by path, a JSON-serialisable skeleton with {"__tensor__": path} where tensors were).

    dicts keep their key types (int or str); tuples and lists both become lists.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach()
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[k, walk(v, _join(path, k))] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [walk(v, _join(path, i)) for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot pack {type(value).__name__} at {path or '/'}")

    skeleton = walk(obj, prefix)
    return tensors, skeleton


def unpack(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of pack."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            path = skeleton["__tensor__"]
            if path not in tensors:
                raise KeyError(f"packed state refers to tensor {path!r}, which is missing")
            return tensors[path]
        return {k: unpack(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unpack(v, tensors) for v in skeleton]
    return skeleton
