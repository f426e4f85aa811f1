"""heron: kernels and engine for hybrid zeroth-/first-order split federated learning (HERON-SFL)."""

from importlib.metadata import version

from heron.kernels import flops as _flops  # noqa: F401 - FLOP formulas for torch.utils.flop_counter
from heron.kernels import functional
from heron.kernels.backends import BackendUnavailableError
from heron.kernels.backends import available as available_backends
from heron.kernels.nn import LoRALinear, PerturbedLinear
from heron.kernels.stream import ParameterLayout, derive_seed, philox_words, seeded_randn
from heron.profiling.profile import StepProfile, profile_step, profile_steps
from heron.zo.updaters import FOUpdater, MeZOUpdater, StepResult, ZOUpdater

__version__ = version("heron")  # pyproject.toml is the one place it is written

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
