"""cast-peft: Conflict-Aware Sparse Tuning (CAST) as a peft LoRA tuner.

Diagnose which attention heads carry the conflict between a safety and a utility objective, then align the model with
a LoRA adapter that leaves those heads untouched::

    from peft import get_peft_model
    from cast_peft import CASTLoraConfig

    peft_model = get_peft_model(model, CASTLoraConfig(r=8, skip_heads={3: [0, 5]}))
"""

__version__ = "0.1.0"

from ._core.errors import (  # noqa: E402
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
from .config import CASTLoraConfig  # noqa: E402
from .conflict_map import ConflictMap  # noqa: E402
from .dense import FrozenHeads, freeze_heads, unfreeze_heads  # noqa: E402
from .diagnosis import diagnose  # noqa: E402
from .geometry import LAYOUTS, AttentionGeometry, frozen_units  # noqa: E402
from .layers import HeadMaskedLinear  # noqa: E402
from .utils import count_effective_parameters, verify_frozen_heads  # noqa: E402


__all__ = [
    "CASTLoraConfig",
    "CastWarning",
    "ConflictMap",
    "diagnose",
    "freeze_heads",
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
    "verify_frozen_heads",
    "__version__",
]
