"""Head-masked LoRA on bitsandbytes 8-bit and 4-bit (QLoRA) bases.

Importable only where bitsandbytes is (as peft's own ``peft.tuners.lora.bnb``): :mod:`.dispatch` imports it lazily,
after ``peft.import_utils.is_bnb_available()``.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
from torch import nn

from .layers import CastLayerMixin


class _MaskOnInit(CastLayerMixin):
    """Installs the head mask of the first adapter once peft's bnb layer is built."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, target_name: str | None = None, **kwargs
    ):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # peft's bnb layers do not pass target_name to update_layer for the first adapter (peft 0.21.2).
        self.install_head_mask(adapter_name, config, target_name)


class CastLinear8bitLt(_MaskOnInit, Linear8bitLt):
    """Head-masked LoRA on a bitsandbytes 8-bit base."""


class CastLinear4bit(_MaskOnInit, Linear4bit):
    """Head-masked LoRA on a bitsandbytes 4-bit (QLoRA) base."""


def dispatch_bnb(
    target: nn.Module, base: nn.Module, adapter_name: str, config: Any, **kwargs: Any
) -> nn.Module | None:
    """A CAST layer for a bitsandbytes ``base``, ``None`` for any other layer."""
    if isinstance(base, bnb.nn.Linear4bit):
        # Same extra arguments as peft's dispatch_bnb_4bit (peft 0.21.2).
        return CastLinear4bit(
            target,
            adapter_name,
            config=config,
            compute_dtype=base.compute_dtype,
            compress_statistics=base.weight.compress_statistics,
            quant_type=base.weight.quant_type,
            **kwargs,
        )
    if isinstance(base, bnb.nn.Linear8bitLt):
        # Same extra arguments as peft's dispatch_bnb_8bit (peft 0.21.2).
        return CastLinear8bitLt(
            target,
            adapter_name,
            config=config,
            has_fp16_weights=base.state.has_fp16_weights,
            threshold=base.state.threshold,
            index=base.index,
            **kwargs,
        )
    return None
