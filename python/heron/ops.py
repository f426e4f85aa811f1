"""torch.library definitions of heron's ops: schema and fake impl once, one impl per device.

The op's default body is the plain-PyTorch reference (any device); the "cpu" and "cuda" kernels
registered below pick among the backends that run on that device. Each op takes a `backend`
string ("auto" or a name from heron.backends.BACKENDS) so a caller can pin an implementation and
still go through the dispatcher (and torch.compile). Inputs are validated by the public
functions (heron.stream, heron.functional) before they get here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from heron import backends, reference

Impl = Callable[[torch.Tensor, int, int], None]


def _randn_torch(out: torch.Tensor, seed: int, offset: int) -> None:
    out.copy_(reference.randn(seed, offset, out.numel(), out.device).view(out.shape))


def _words_torch(out: torch.Tensor, seed: int, offset: int) -> None:
    counters = offset + torch.arange(out.shape[0], dtype=torch.int64, device=out.device)
    words = reference.philox_words(seed, counters)
    out.copy_(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))


def _dispatch(impls: dict[str, Callable[[], Impl]], out: torch.Tensor, backend: str) -> Impl:
    return impls[backends.resolve(backend, out.device)]()


_RANDN = {
    "torch": lambda: _randn_torch,
    "triton": lambda: backends.triton_kernels().philox_randn,
    "cpu": lambda: backends.extension().philox_randn_cpu,
    "cuda": lambda: backends.extension().philox_randn_cuda,
}
_WORDS = {
    "torch": lambda: _words_torch,
    "triton": lambda: backends.triton_kernels().philox_words,
    "cpu": lambda: backends.extension().philox_words_cpu,
    "cuda": lambda: backends.extension().philox_words_cuda,
}


@torch.library.custom_op("heron::philox_randn_", mutates_args=("out",))
def philox_randn_(out: torch.Tensor, seed: int, offset: int, backend: str) -> None:
    """Fill contiguous `out` (float32/bfloat16/float16, any shape) with randn(seed, offset + i)."""
    _randn_torch(out, seed, offset)


@torch.library.custom_op("heron::philox_words_", mutates_args=("out",))
def philox_words_(out: torch.Tensor, seed: int, offset: int, backend: str) -> None:
    """Fill contiguous int32 `out` of shape (n, 4) with the Philox4x32-10 words at offset + i."""
    _words_torch(out, seed, offset)


for _device in ("cpu", "cuda"):

    @philox_randn_.register_kernel(_device)
    def _(out, seed, offset, backend):
        _dispatch(_RANDN, out, backend)(out, seed, offset)

    @philox_words_.register_kernel(_device)
    def _(out, seed, offset, backend):
        _dispatch(_WORDS, out, backend)(out, seed, offset)


@philox_randn_.register_fake
def _(out, seed, offset, backend):
    return None


@philox_words_.register_fake
def _(out, seed, offset, backend):
    return None
