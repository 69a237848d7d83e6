"""cast-peft: Conflict-Aware Sparse Tuning (CAST) as a peft LoRA tuner.

Diagnose which attention heads carry the conflict between a safety and a utility objective, then align the model with
a LoRA adapter that leaves those heads untouched::

    from peft import get_peft_model
    from cast_peft import CASTLoraConfig

    peft_model = get_peft_model(model, CASTLoraConfig(r=8, skip_heads={3: [0, 5]}))
"""

from ._core import __version__
from ._core.errors import (
    AdapterError,
    CastError,
    CastWarning,
    ConfigError,
    ConflictMapError,
    DataError,
    DiagnosisError,
    FrozenHeadsError,
    ModelLoadError,
    OutputError,
    UnsupportedArchitectureError,
)
from .conflict_map import ConflictMap
from .diagnosis import DiagnosisOptions, SelfTargets, diagnose
from .geometry import LAYOUTS, AttentionGeometry, frozen_units
from .tuner import (
    CASTLoraConfig,
    FrozenHeads,
    HeadMaskedLinear,
    count_effective_parameters,
    describe_frozen,
    freeze_heads,
    load_dense_config,
    unfreeze_heads,
    verify_frozen_heads,
)


__all__ = [
    "CASTLoraConfig",
    "CastWarning",
    "ConflictMap",
    "diagnose",
    "DiagnosisOptions",
    "SelfTargets",
    "freeze_heads",
    "load_dense_config",
    "unfreeze_heads",
    "FrozenHeads",
    "frozen_units",
    "LAYOUTS",
    "AttentionGeometry",
    "CastError",
    "ConfigError",
    "UnsupportedArchitectureError",
    "DataError",
    "ConflictMapError",
    "DiagnosisError",
    "AdapterError",
    "ModelLoadError",
    "OutputError",
    "FrozenHeadsError",
    "HeadMaskedLinear",
    "count_effective_parameters",
    "describe_frozen",
    "verify_frozen_heads",
    "__version__",
]
