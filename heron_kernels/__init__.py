"""Triton kernels and their launchers; nothing else (no autograd, no nn).

Importing this package imports triton. Set TRITON_INTERPRET=1 *before* the import to run the
kernels on CPU tensors through Triton's interpreter (how CI tests them).
"""

from heron_kernels.philox import philox_randn, philox_words

__all__ = ["philox_randn", "philox_words"]
