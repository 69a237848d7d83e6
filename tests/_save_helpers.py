"""What tests/test_outputs.py saves (and kills mid-save): a conflict map and a tiny CAST adapter, both seeded."""

from __future__ import annotations

import torch
from models import build_tiny_model

from cast_peft import CASTLoraConfig, ConflictMap
from cast_peft.geometry import AttentionGeometry, HeadCounts


COUNTS = HeadCounts("llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def make_map(seed: int) -> ConflictMap:
    """A valid map whose every tensor depends on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    geometry = AttentionGeometry(COUNTS)
    stats = {}
    for role in ("q", "k", "v", "o"):
        s, u = torch.randn(2, COUNTS.num_layers, geometry.units(role), 5, generator=generator, dtype=torch.float64)
        stats[role] = torch.stack([(s * s).sum(-1), (u * u).sum(-1), (s * u).sum(-1)], -1)
    fs = torch.randn(COUNTS.num_layers, COUNTS.num_heads, generator=generator, dtype=torch.float64)
    return ConflictMap(COUNTS, stats, fs, metadata={"seed": seed})


def save_adapter(target: str, seed: int, skip: dict[int, list[int]]) -> None:
    """A tiny CAST adapter whose lora_A (peft's seeded init) and skip set depend on the call."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(build_tiny_model("llama"), CASTLoraConfig(r=2, skip_heads=skip))
    model.save_pretrained(target)
