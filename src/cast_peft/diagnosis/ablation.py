"""The calibration loss per sequence, and exact head ablation (the loss with a head's output zeroed).

Ablation runs several ablations in one forward pass: the batch is repeated once per ablation ("replica") and a
forward pre-hook on each affected output projection multiplies its input by a per-replica mask that zeroes the
ablated head's slice. So a data batch costs ``ceil(units / chunk)`` forward passes of ``chunk`` replicas each, rather
than one pass per head, and no gradient is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..geometry import AttentionGeometry


def row_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per sequence, the sum of token cross-entropies over response tokens: ``[batch]`` float32, differentiable.

    ``labels`` follow the transformers convention: aligned with ``input_ids`` (``labels[:, t]`` is predicted from
    position ``t - 1``), ``-100`` where a token is not scored.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:].to(logits.device)
    scored = targets != IGNORE_INDEX
    # Only scored positions are cast to fp32: the full [batch, time, vocab] logits are never copied.
    token_ce = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="none")
    # masked_scatter + sum keeps the reduction deterministic (no atomics, unlike index_add_ on CUDA).
    per_position = torch.zeros(scored.shape, dtype=token_ce.dtype, device=token_ce.device)
    return per_position.masked_scatter(scored, token_ce).sum(1)


def ablation_units(geometry: AttentionGeometry, kv_groups: bool) -> list[tuple[int, tuple]]:
    """``(layer, heads)`` to ablate: every query head alone, then (``kv_groups``) every KV head's query group."""
    counts = geometry.counts
    units = [(layer, (head,)) for layer in range(counts.num_layers) for head in range(counts.num_heads)]
    if kv_groups:
        groups = [tuple(group) for group in geometry.kv_groups().tolist()]
        units += [(layer, group) for layer in range(counts.num_layers) for group in groups]
    return units


@torch.no_grad()
def ablated_losses(
    model: nn.Module,
    o_modules: Mapping[int, nn.Module],
    o_width: int,
    o_index: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    units: Sequence[tuple[int, tuple]],
    chunk: int,
) -> torch.Tensor:
    """Summed response-token loss of ``batch`` with each unit's heads zeroed: ``[len(units)]`` float64.

    Args:
        o_modules: layer -> the module whose input is the concatenated head outputs (the o-projection).
        o_width: input features of the o-projection.
        o_index: ``[num_heads, head_dim]`` input features of each head in that module (from the geometry).
        units: ``(layer, heads)`` pairs; each is ablated on its own.
        chunk: ablations per forward pass (the pass has ``chunk * batch size`` rows).
    """
    rows = batch["input_ids"].shape[0]
    out = torch.zeros(len(units), dtype=torch.float64)
    for start in range(0, len(units), chunk):
        part = units[start : start + chunk]
        replicas = len(part)
        masks: dict[int, torch.Tensor] = {}
        for r, (layer, heads) in enumerate(part):
            if layer not in masks:
                masks[layer] = torch.ones(replicas, o_width)
            masks[layer][r, o_index[list(heads)].reshape(-1)] = 0
        handles = [o_modules[layer].register_forward_pre_hook(_mask_hook(mask, rows)) for layer, mask in masks.items()]
        try:
            repeated = {
                key: batch[key].repeat(replicas, *([1] * (batch[key].dim() - 1)))
                for key in ("input_ids", "attention_mask", "labels")
            }
            per_row = row_losses(model, repeated).double()
        finally:
            for handle in handles:
                handle.remove()
        out[start : start + replicas] = per_row.view(replicas, rows).sum(1).cpu()
    return out


def _mask_hook(mask: torch.Tensor, rows: int):
    per_row = mask.repeat_interleave(rows, dim=0)  # replica-major, like Tensor.repeat on the batch

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        m = per_row.to(device=x.device, dtype=x.dtype)
        return (x * m.view(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1]), *args[1:])

    return hook
