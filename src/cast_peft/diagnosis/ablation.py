"""The calibration loss per sequence, and exact head ablation (the loss with a head's output zeroed).

Ablation runs several ablations in one forward pass: the batch is repeated once per ablation ("replica") and a
forward pre-hook on each affected output projection multiplies its input by a per-replica mask that zeroes the
ablated head's slice. So a data batch costs ``ceil(units / chunk)`` forward passes of ``chunk`` replicas each, rather
than one pass per head, and no gradient is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..data import IGNORE_INDEX
from ..geometry import AttentionGeometry
from .memory import ce_chunk_positions


def row_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per sequence, the sum of token cross-entropies over response tokens: ``[batch]`` float32, differentiable.

    ``labels`` follow the transformers convention: aligned with ``input_ids`` (``labels[:, t]`` is predicted from
    position ``t - 1``), ``-100`` where a token is not scored. The cross-entropy runs over chunks of positions
    (:class:`_ChunkedCrossEntropy`), so no full fp32 copy of the ``[batch, time, vocab]`` logits is ever made.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"].to(logits.device)
    # targets[:, t] is the token predicted at position t; the last position predicts nothing.
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    chunk = ce_chunk_positions(logits.shape[-1])
    per_position = _ChunkedCrossEntropy.apply(logits.contiguous(), targets, chunk)
    return per_position.view(targets.shape).sum(1)  # a plain sum: deterministic (no atomics)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Token cross-entropy ``[batch * time]`` fp32 (0 where the target is ``IGNORE_INDEX``) from logits of any dtype,
    ``chunk`` scored positions at a time in fp32: memory is the logits, their gradient (in the logits' dtype, as
    autograd would make it) and one fp32 chunk, instead of fp32 copies and a saved log-softmax of every position."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        flat = logits.view(-1, logits.shape[-1])
        flat_targets = targets.reshape(-1)
        scored = (flat_targets != IGNORE_INDEX).nonzero().flatten()
        out = torch.zeros(flat.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, scored.numel(), chunk):
            index = scored[start : start + chunk]
            part = flat.index_select(0, index).float()
            target = flat_targets.index_select(0, index)
            out[index] = torch.logsumexp(part, dim=1) - part.gather(1, target[:, None]).squeeze(1)
        ctx.save_for_backward(logits, flat_targets, scored)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, flat_targets, scored = ctx.saved_tensors
        flat = logits.view(-1, logits.shape[-1])
        grad_logits = torch.zeros_like(flat)
        for start in range(0, scored.numel(), ctx.chunk):
            index = scored[start : start + ctx.chunk]
            part = torch.softmax(flat.index_select(0, index).float(), dim=1)  # d CE / d logits = softmax - onehot
            part[torch.arange(index.numel(), device=part.device), flat_targets.index_select(0, index)] -= 1
            part *= grad.index_select(0, index)[:, None]
            grad_logits.index_copy_(0, index, part.to(grad_logits.dtype))
        return grad_logits.view_as(logits), None, None


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
