"""heron: kernels and engine for hybrid zeroth-/first-order split federated learning (HERON-SFL)."""

from heron import flops as _flops  # noqa: F401 - FLOP formulas for torch.utils.flop_counter
from heron import functional
from heron.backends import BackendUnavailableError
from heron.backends import available as available_backends
from heron.nn import LoRALinear, PerturbedLinear
from heron.profile import StepProfile, profile_step, profile_steps
from heron.stream import ParameterLayout, derive_seed, philox_words, seeded_randn
from heron.updaters import FOUpdater, MeZOUpdater, StepResult, ZOUpdater

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "FOUpdater",
    "MeZOUpdater",
    "StepProfile",
    "StepResult",
    "ZOUpdater",
    "profile_step",
    "profile_steps",
    "LoRALinear",
    "PerturbedLinear",
    "ParameterLayout",
    "available_backends",
    "derive_seed",
    "functional",
    "philox_words",
    "seeded_randn",
]
