"""Triton kernels and their launchers; nothing else (no autograd, no nn).

Importing this package imports triton. Set TRITON_INTERPRET=1 *before* the import to run the
kernels on CPU tensors through Triton's interpreter (how CI tests them).
"""

from heron_kernels.linear import lora_perturbed_linear, lowrank_perturbed_linear, perturbed_linear
from heron_kernels.philox import philox_randn, philox_words
from heron_kernels.updates import (
    lowrank_zo_adam_update_,
    lowrank_zo_sgd_update_,
    perturb_,
    zo_adam_update_,
    zo_sgd_update_,
)

__all__ = [
    "lora_perturbed_linear",
    "lowrank_perturbed_linear",
    "lowrank_zo_adam_update_",
    "lowrank_zo_sgd_update_",
    "perturb_",
    "perturbed_linear",
    "philox_randn",
    "philox_words",
    "zo_adam_update_",
    "zo_sgd_update_",
]
