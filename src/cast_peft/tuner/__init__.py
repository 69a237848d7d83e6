"""The head-sliced LoRA tuner: `CASTLoraConfig`, the head-masked layers peft dispatches to, and the checks."""

from .checks import count_effective_parameters, describe_frozen, verify_frozen_heads
from .config import CASTLoraConfig, matching_lora_config, normalize_head_map
from .dense import FrozenHeads, freeze_heads, load_dense_config, unfreeze_heads
from .layers import HeadMaskedLinear, cast_layers


__all__ = [
    "CASTLoraConfig", "FrozenHeads", "freeze_heads", "load_dense_config", "unfreeze_heads", "HeadMaskedLinear", "cast_layers", "count_effective_parameters", "describe_frozen", "matching_lora_config",
    "normalize_head_map", "verify_frozen_heads",
]  # fmt: skip
