"""How peft picks a CAST layer: the dynamic-dispatch entry that `CASTLoraConfig` registers with peft."""

from __future__ import annotations

from typing import Any

from peft.import_utils import is_bnb_available
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._core.errors import ConfigError, UnsupportedArchitectureError
from ..geometry import is_conv1d
from .layers import CastLinear


def dispatch_cast(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> nn.Module | None:
    """peft dynamic-dispatch entry: a CAST layer for attention projections, ``None`` (plain LoRA) for the rest."""
    if config.feature_mask(kwargs["target_name"]) is None:
        return None
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if is_bnb_available():
        from .bnb import dispatch_bnb

        layer = dispatch_bnb(target, base, adapter_name, config, **kwargs)
        if layer is not None:
            return layer
    conv1d = is_conv1d(base)
    if conv1d != bool(config.fan_in_fan_out):
        raise ConfigError(
            f"{kwargs['target_name']} is a {type(base).__name__} but fan_in_fan_out={config.fan_in_fan_out}; "
            f"set fan_in_fan_out={conv1d} (Conv1D stores weights as (in, out))."
        )
    if isinstance(base, nn.Linear) or conv1d:
        return CastLinear(target, adapter_name, config=config, is_target_conv_1d_layer=conv1d, **kwargs)
    raise UnsupportedArchitectureError(
        f"CAST cannot put a head-masked LoRA on {kwargs['target_name']} ({type(base).__name__}); supported bases "
        f"are nn.Linear, transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt."
    )


def custom_module_mapping() -> dict[type, Any]:
    """The ``_register_custom_module`` mapping. bitsandbytes layers subclass nn.Linear, so one callable serves all.

    peft documents the values as layer classes; peft 0.19-0.21.2 calls each as ``value(target, adapter_name,
    config=config, **kwargs)`` and falls through to its own dispatchers when it returns ``None``
    (``LoraModel._create_new_module``), so a function serves, and returns plain LoRA for non-attention modules. Pinned
    by ``tests/test_tuner.py::test_mlp_targets_get_plain_lora_and_attention_stays_masked``.
    """
    return {nn.Linear: dispatch_cast, Conv1D: dispatch_cast}
