"""Worker for tests/test_outputs.py: saves a conflict map or a CAST adapter, to be SIGKILLed at a pause point.

Usage: ``python _save_worker.py map|adapter TARGET SEED`` with ``CAST_PEFT_TEST_PAUSE_AT=<stage>`` in the environment.
"""

from __future__ import annotations

import sys

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


if __name__ == "__main__":
    kind, target, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "map":
        make_map(seed).save(target)
    else:
        save_adapter(target, seed, {0: [seed % 4]})
