"""The perturbation contract: (seed, offset) -> a stream of N(0, 1) numbers, on every backend.

Stream version 2 (:data:`STREAM_VERSION`). Element ``i`` of a direction keyed by ``(seed, offset)``
is element ``c = offset + i`` of the stream: word ``c % 4`` of ``tl.randn4x(seed, c // 4)``, exactly
as Triton defines it:

1. the 64-bit group counter ``g = c // 4`` gives the Philox counter words ``(lo32(g), hi32(g), 0, 0)``
   and the seed gives the key ``(lo32(seed), hi32(seed))``;
2. Philox4x32-10 yields four 32-bit words; each becomes a uniform in [0, 1) (word read as int32,
   negative values bit-inverted, times 4.6566127342e-10);
3. Box-Muller on ``(u0, u1)`` and on ``(u2, u3)``: ``r = sqrt(-2 log max(u_even, 1e-7))``,
   ``t = 2 pi u_odd``; the pair's normals are ``(r cos t, r sin t)``. So one Philox call gives the
   four normals ``(n0, n1, n2, n3)`` of elements ``4g .. 4g + 3``.

Version 1 (before) used one Philox call per element and only ``r cos t`` of its first two words
(``tl.randn``); the two streams differ, so data tied to one (checkpoints, seed-and-scalar uploads,
Flower messages) carries :data:`STREAM_VERSION` and is refused by a heron of another version
(:func:`check_stream_version`).

Seeds and counters live in [0, 2**63): the counter is 64-bit, so a model with billions of
parameters never wraps, and both fit torch's int64. Kernels generate whole groups of four and use
the elements their range needs; nothing depends on tile sizes or thread counts. The Philox words are
bit-identical on every backend (C++ CPU, CUDA, Triton, the pure-torch reference); the normals agree
within 1e-5 (each backend's own log/sin/cos).

A model's direction is one stream: :class:`ParameterLayout` gives each named parameter a stable
offset, so parameter ``p`` uses counters ``[layout.offset(p), layout.offset(p) + p.numel())``.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from heron.kernels import backends
from heron.kernels import ops as _ops  # noqa: F401 - registers torch.ops.heron.*

STREAM_VERSION = 2  # the contract above; data tied to the stream carries it
COUNTER_LIMIT = 2**63
SEED_LIMIT = 2**63
STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASK64 = 2**64 - 1


class StreamVersionError(ValueError):
    """Data made with another perturbation stream version than this heron's."""


def check_stream_version(found: object, what: str) -> None:
    """Refuse `what` (e.g. "checkpoint x.safetensors") unless `found` is this heron's STREAM_VERSION.

    found: the version `what` carries, or None when it carries none (written before versions were
    recorded, i.e. by a heron of stream version 1). Replaying or resuming it would regenerate
    different directions than the ones it was made with, so it is never mixed in silently.
    """
    if type(found) is int and found == STREAM_VERSION:
        return
    if found is None:
        raise StreamVersionError(
            f"{what} carries no perturbation stream version: it was written by a heron before stream "
            f"versions were recorded (stream version 1, one normal per Philox call); this heron uses stream "
            f"version {STREAM_VERSION} and would regenerate different directions, so it refuses it")
    raise StreamVersionError(
        f"{what} was made with perturbation stream version {found!r}; this heron uses stream version "
        f"{STREAM_VERSION} and would regenerate different directions, so it refuses it")


def check_int(value: object, name: str, *, limit: int) -> int:
    """`value` as a Python int in [0, limit), or a TypeError/ValueError naming `name`."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(f"{name} must be an integer, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        value = value.item()
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must be non-negative, got {number}")
    if number >= limit:
        raise ValueError(f"{name} must be below 2**{limit.bit_length() - 1}, got {number}")
    return number


def check_key(seed: object, offset: object, numel: int, *, offset_name: str = "offset") -> tuple[int, int]:
    """Validated (seed, offset) for a stream of `numel` elements; the counter must not overflow.

    offset_name names the offset in error messages (e.g. "bias_offset").
    """
    seed = check_int(seed, "seed", limit=SEED_LIMIT)
    offset = check_int(offset, offset_name, limit=COUNTER_LIMIT)
    if offset + numel > COUNTER_LIMIT:
        raise ValueError(
            f"{offset_name} + numel overflows the 63-bit counter range: {offset_name}={offset}, numel={numel}, "
            f"{offset_name} + numel must be <= 2**63"
        )
    return seed, offset


def _check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, int) and not hasattr(dim, "__index__"):
            raise TypeError(f"shape must be a sequence of ints, got {shape!r}")
        if operator.index(dim) < 0:
            raise ValueError(f"shape must have non-negative sizes, got {shape!r}")
    return tuple(operator.index(d) for d in dims)


def _check_device(device: torch.device) -> torch.device:
    if device.type not in backends.SUPPORTED_DEVICE_TYPES:
        raise ValueError(f"device must be a {' or '.join(backends.SUPPORTED_DEVICE_TYPES)} device, "
                         f"got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} requested but CUDA is not available in this torch build")
    return device


def _as_device(device: torch.device | str | None) -> torch.device:
    # torch.empty(0) follows torch's default device (and stays traceable by torch.compile).
    return torch.empty(0).device if device is None else torch.device(device)


def seeded_randn(
    shape: int | Sequence[int],
    seed: int,
    offset: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """Materialise the stream: a tensor of `shape` whose flat element i is randn(seed, offset + i).

    Args:
        shape: output shape; the flat (row-major) index i selects counter offset + i.
        seed: 0 <= seed < 2**63.
        offset: first counter, 0 <= offset and offset + numel <= 2**63.
        device: "cpu" or a CUDA device; None uses torch's default device.
        dtype: float32, bfloat16 or float16 (values are computed in float32 and rounded).
        backend: "triton", "cuda", "cpu", "torch", or None for the best available on `device`.
    Returns:
        Tensor of `shape`, `dtype`, on `device`.
    """
    dims = _check_shape(shape)
    if dtype not in STREAM_DTYPES:
        raise TypeError(f"dtype must be one of {STREAM_DTYPES}, got {dtype}")
    out = torch.empty(dims, dtype=dtype, device=_check_device(_as_device(device)))
    seed, offset = check_key(seed, offset, out.numel())
    name = backends.resolve(backend, out.device)
    torch.ops.heron.philox_randn_(out=out, seed=seed, offset=offset, backend=name)
    return out


def philox_words(
    n: int, seed: int, offset: int = 0, *, device: torch.device | str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The raw Philox4x32-10 words behind the stream, for inspection and tests.

    Returns:
        int64 tensor of shape (n, 4); row i holds words w0..w3 (values in [0, 2**32)) at Philox
        counter offset + i, i.e. of group g = offset + i, whose normals are stream elements
        4g .. 4g + 3 (seeded_randn(4, seed, 4 * g)).
    """
    (n,) = _check_shape((n,))
    out = torch.empty((n, 4), dtype=torch.int32, device=_check_device(_as_device(device)))
    seed, offset = check_key(seed, offset, n)
    name = backends.resolve(backend, out.device)
    torch.ops.heron.philox_words_(out=out, seed=seed, offset=offset, backend=name)
    return out.to(torch.int64) & 0xFFFFFFFF


def _splitmix64(state: int) -> int:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(run_seed: int, *indices: int) -> int:
    """The seed of one direction, from the run's seed and indices such as
    (client, round, step, direction).

    SplitMix64 folded over the indices, truncated to 63 bits. Pure and documented, so any run
    can be replayed and any client's update rebuilt from (run_seed, indices) alone.
    """
    state = check_int(run_seed, "run_seed", limit=SEED_LIMIT)
    for position, index in enumerate(indices):
        index = check_int(index, f"indices[{position}]", limit=2**64)
        state = _splitmix64(state ^ _splitmix64(index + position))
    return state & (SEED_LIMIT - 1)


@dataclass(frozen=True)
class LayoutEntry:
    """One parameter's slice of the model-wide stream: counters [offset, offset + numel)."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


class ParameterLayout:
    """Stable offsets that make a whole model's direction one stream.

    Parameters are laid out densely in the order given (for :meth:`from_module`: the order of
    ``module.named_parameters()``, i.e. registration order, the same on every client built from
    the same code); parameter k starts at ``base_offset + sum(numel of parameters before k)``.
    Two layouts with the same :attr:`fingerprint` assign identical offsets.
    """

    def __init__(self, named_shapes: Iterable[tuple[str, Sequence[int]]], base_offset: int = 0):
        base_offset = check_int(base_offset, "base_offset", limit=COUNTER_LIMIT)
        entries: list[LayoutEntry] = []
        position = base_offset
        for name, shape in named_shapes:
            entry = LayoutEntry(name, tuple(int(d) for d in shape), position)
            if any(e.name == name for e in entries):
                raise ValueError(f"named_shapes lists parameter {name!r} twice")
            entries.append(entry)
            position += entry.numel
        if position > COUNTER_LIMIT:
            raise ValueError(f"layout spans counters up to {position}, beyond 2**63")
        self.entries: tuple[LayoutEntry, ...] = tuple(entries)
        self.base_offset = base_offset
        self.total = position - base_offset
        self._by_name = {e.name: e for e in entries}

    @classmethod
    def from_module(
        cls, module: torch.nn.Module, *, trainable_only: bool = True, names: Iterable[str] | None = None,
        base_offset: int = 0,
    ) -> ParameterLayout:
        """Layout of `module`'s parameters (those with requires_grad, unless trainable_only=False;
        or exactly `names`, in module order)."""
        wanted = None if names is None else set(names)
        named = dict(module.named_parameters())
        if wanted is not None and not wanted <= named.keys():
            missing = sorted(wanted - named.keys())
            raise KeyError(f"names lists parameters the module does not have: {missing}")
        chosen = [
            (name, p.shape) for name, p in named.items()
            if (wanted is None or name in wanted) and (p.requires_grad or not trainable_only or wanted)
        ]
        return cls(chosen, base_offset=base_offset)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> LayoutEntry:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"parameter {name!r} is not in this layout; it has {list(self._by_name)}") from None

    def offset(self, name: str) -> int:
        """First counter of parameter `name`."""
        return self[name].offset

    @property
    def fingerprint(self) -> str:
        """sha256 of (name, shape, offset) for every entry: equal fingerprints, equal layouts."""
        text = ";".join(f"{e.name}:{'x'.join(map(str, e.shape))}@{e.offset}" for e in self.entries)
        return hashlib.sha256(text.encode()).hexdigest()

    def direction(
        self, name: str, seed: int, *, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32, backend: str | None = None,
    ) -> torch.Tensor:
        """Parameter `name`'s slice of the direction keyed by `seed`, in the parameter's shape."""
        entry = self[name]
        return seeded_randn(entry.shape, seed, entry.offset, device=device, dtype=dtype, backend=backend)

    def __repr__(self) -> str:
        return f"ParameterLayout({len(self.entries)} parameters, {self.total} elements, base_offset={self.base_offset})"
