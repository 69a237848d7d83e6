"""Calibration data for the diagnosis: any accepted form -> tokenized batches, checked one by one."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .._core.errors import DataError, DiagnosisError
from .ablation import IGNORE_INDEX


#: Calibration examples per objective recommended for a stable map. benchmarks/map_stability.py (SmolLM2-135M, CPU,
#: default scoring) measured a split-half Spearman of the score of 0.59 / 0.68 / 0.795 and a top-10% skip-set overlap
#: of 0.67 / 0.59 / 0.81 at 96 / 128 / 256 examples (results/map_stability*.md); Spearman-Brown extrapolation puts a
#: Spearman of 0.8 at ~265, so the default leaves a margin. 384 itself was not measured.
DEFAULT_CALIBRATION_SIZE = 384


def prepare_batches(data: Any, tokenizer: Any, batch_size: int, max_length: int, what: str = "data") -> Iterable:
    """Tokenized batches from any accepted data form (see :func:`diagnose`; examples go through
    ``cast_peft.data.make_batches``, which recognises every example form); raises ``DataError`` when empty."""
    if data is None:
        raise DataError(f"No {what} data given; pass a list of examples (e.g. {{'prompt', 'response'}}) or batches.")
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if isinstance(data, Mapping) and "input_ids" in data:
        return [data]
    if isinstance(data, (str, bytes, Mapping)):
        raise DataError(f"{what} data must be a list of examples or batches, not a single {type(data).__name__}.")
    rows = list(data)
    if not rows:
        raise DataError(
            f"The {what} data is empty; give at least one example (about {DEFAULT_CALIBRATION_SIZE} "
            "per objective give a stable map)."
        )
    if isinstance(rows[0], Mapping) and "input_ids" in rows[0]:
        return rows
    if tokenizer is None:
        raise DataError(f"The {what} data are examples, so diagnose() needs the model's tokenizer.")
    from ..data import make_batches

    return make_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length)


def check_batch(
    raw: Mapping[str, torch.Tensor],
    objective: str,
    index: int,
    vocab: int,
    context: tuple[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The batch as ``input_ids``/``attention_mask``/``labels`` tensors; refuses ids outside the model's vocabulary
    (a tokenizer of another model), rows longer than the model's ``context`` (``data.context_length``) and rows
    without a scored token. Missing labels: every attended token."""
    if not isinstance(raw, Mapping) or "input_ids" not in raw:
        raise DataError(
            f"{objective} batch {index} is a {type(raw).__name__}; batches must be dicts with "
            "'input_ids' (and 'attention_mask', 'labels')."
        )
    ids = torch.as_tensor(raw["input_ids"])
    if ids.dim() != 2 or ids.numel() == 0:
        raise DataError(f"{objective} batch {index}: input_ids must be a non-empty [batch, length] tensor.")
    if context is not None and ids.shape[1] > context[1]:
        raise DiagnosisError(
            f"{objective} batch {index} has {ids.shape[1]} positions but the model takes at most "
            f"{context[1]} (config.{context[0]}); tokenize with max_length <= {context[1]}."
        )
    mask = torch.as_tensor(raw["attention_mask"]) if raw.get("attention_mask") is not None else torch.ones_like(ids)
    labels = raw.get("labels")
    labels = torch.as_tensor(labels) if labels is not None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise DataError(
            f"{objective} batch {index} has token id {int(ids.max())} but the model's vocabulary has "
            f"{vocab} entries: the tokenizer does not match the model. Use the model's own tokenizer."
        )
    empty = ((labels[:, 1:] != IGNORE_INDEX).sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise DataError(
            f"{objective} batch {index}: rows {empty} have no response tokens (all labels -100, e.g. "
            "the prompt filled max_length). Raise max_length or drop those examples."
        )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def digest(batch: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a batch's token ids, mask and labels (what the model actually saw)."""
    sha = hashlib.sha256()
    for key in ("input_ids", "attention_mask", "labels"):
        tensor = batch[key].detach().to("cpu", torch.int64).contiguous()
        sha.update(f"{key}{tuple(tensor.shape)}".encode())
        sha.update(tensor.numpy().tobytes())
    return sha.hexdigest()
