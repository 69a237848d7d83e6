"""The diagnosis: per-head safety/utility gradients and functional sensitivity, giving a `ConflictMap`."""

from .._core.errors import DiagnosisError
from .calibration import DEFAULT_CALIBRATION_SIZE
from .memory import DeviceMemory, DiagnosisMemoryPlan, plan_diagnosis_memory
from .options import ACCUMULATIONS, SENSITIVITIES, DiagnosisOptions
from .run import Diagnosis, diagnose
from .self_targets import UTILITY_TARGETS, SelfTargets, generate_self_targets


__all__ = [
    "ACCUMULATIONS", "DEFAULT_CALIBRATION_SIZE", "SENSITIVITIES", "UTILITY_TARGETS", "DeviceMemory", "Diagnosis",
    "DiagnosisError", "DiagnosisMemoryPlan", "DiagnosisOptions", "SelfTargets", "diagnose", "generate_self_targets", "plan_diagnosis_memory",
]  # fmt: skip
