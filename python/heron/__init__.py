"""heron: kernels and engine for hybrid zeroth-/first-order split federated learning (HERON-SFL)."""

from heron.backends import BackendUnavailableError
from heron.backends import available as available_backends
from heron.stream import ParameterLayout, derive_seed, philox_words, seeded_randn

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ParameterLayout",
    "available_backends",
    "derive_seed",
    "philox_words",
    "seeded_randn",
]
