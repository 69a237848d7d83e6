"""The diagnosis: per-head safety/utility gradients and functional sensitivity, giving a `ConflictMap`."""

from .._core.errors import DiagnosisError
from .calibration import DEFAULT_CALIBRATION_SIZE
from .memory import DeviceMemory, DiagnosisMemoryPlan, plan_diagnosis_memory
from .run import ACCUMULATIONS, SENSITIVITIES, Diagnosis, diagnose


__all__ = [
    "ACCUMULATIONS",
    "DEFAULT_CALIBRATION_SIZE",
    "SENSITIVITIES",
    "DeviceMemory",
    "Diagnosis",
    "DiagnosisError",
    "DiagnosisMemoryPlan",
    "diagnose",
    "plan_diagnosis_memory",
]
