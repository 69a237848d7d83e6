"""Checks users run on a CAST model: effective trainable parameters and frozen-head verification."""

from __future__ import annotations

import torch
from torch import nn

from .layers import HeadMaskedLinear, cast_layers


def count_effective_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters with masked (always-zero) LoRA entries excluded.

    Returns ``{"trainable": ..., "effective": ..., "masked": ...}``; ``trainable`` is what peft's
    ``print_trainable_parameters`` counts.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    masked = 0
    for module in model.modules():
        if isinstance(module, HeadMaskedLinear) and module.weight.requires_grad:
            masked += int((~module.weight_mask.expand_as(module.weight)).sum())
    return {"trainable": trainable, "effective": trainable - masked, "masked": masked}


@torch.no_grad()
def verify_frozen_heads(model: nn.Module) -> dict[str, int]:
    """Check that every masked LoRA slice of every CAST layer is exactly zero; raise ``AssertionError`` otherwise.

    Returns the number of checked layers and masked entries. Zero slices mean skipped heads' delta is exactly zero,
    so the merged weights of those heads are bit-identical to the base (fp32/bf16/fp16 bases).
    """
    layers = cast_layers(model)
    checked = masked = 0
    for name, layer in layers.items():
        for factors in (layer.lora_A, layer.lora_B):
            for adapter, factor in factors.items():
                if not isinstance(factor, HeadMaskedLinear):
                    continue
                off = ~factor.weight_mask.expand_as(factor.weight)
                bad = int((factor.weight[off] != 0).sum())
                if bad:
                    raise AssertionError(
                        f"{name} adapter {adapter!r}: {bad} masked LoRA entries are non-zero, so skipped heads would "
                        f"change. Were the LoRA weights written directly (not through training or load_state_dict)?"
                    )
                checked += 1
                masked += int(off.sum())
    return {"checked_factors": checked, "masked_entries": masked}
