"""Batching helpers of :mod:`cast_peft.evaluation`: context/continuation splits, explicit position ids and
log-probabilities of continuations (the conventions are in ``evaluation``'s docstring). Prompt rendering and ids,
left padding and greedy generation live in :mod:`cast_peft.data` (the diagnosis generates self targets with them, and
it is an earlier stage); they are imported here so the evaluation has one name for each."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .._core.errors import ConfigError, DataError
from ..data import (
    context_length,
    encode,
    format_chat,
    input_device,
    left_pad,
)


logger = logging.getLogger(__name__)


def split_encode(
    tokenizer: Any, context: str, continuation: str, add_special_tokens: bool | None
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as it is tokenized after ``context`` (``add_special_tokens``
    as in :func:`cast_peft.data.encode`)."""
    ctx = encode(tokenizer, context, add_special_tokens)
    whole = encode(tokenizer, context + continuation, add_special_tokens)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, encode(tokenizer, continuation, add_special_tokens=False)


def chat_split(tokenizer: Any, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """:func:`split_encode` of the rendered ``prompt`` (:func:`cast_peft.data.format_chat`) and ``continuation``."""
    return split_encode(tokenizer, format_chat(tokenizer, prompt)[0], continuation, add_special_tokens=None)


def forward_params(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def fp32_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """fp32 logits of a left-padded batch; with ``keep`` > 0 only the last ``keep`` positions."""
    params = forward_params(model)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if "position_ids" in params:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if keep and "logits_to_keep" in params:  # transformers >= 4.50 (checked against 5.24)
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits
    return (logits[:, -keep:] if keep else logits).float()


def batches(n: int, batch_size: int, order: Sequence[int]) -> Iterator[list[int]]:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield list(order[start : start + batch_size])


def nonempty(values: Sequence, what: str) -> list:
    values = list(values)
    if not values:
        raise DataError(f"{what} is empty; pass at least one item")
    return values


def continuation_logprobs(
    model: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    progress: bool,
    desc: str,
    max_length: int | None = None,
) -> list[list[float]]:
    """Per-token log p(continuation | context) for each (context_ids, continuation_ids) pair.

    With ``max_length`` the continuation is cut to ``max_length - 1`` tokens and the context keeps its last tokens
    (lm-eval's left truncation); ``max_length`` is at most the model's context (``n_positions`` for GPT-2), and
    longer pairs are cut so, with a log line. A pair needs at least one context token.
    """
    context = context_length(model)
    if context is not None and (max_length is None or max_length > context[1]):
        if any(len(ctx) + len(cont) > context[1] for ctx, cont in pairs):
            logger.warning(
                "%s: inputs longer than the model's context (config.%s=%d) are cut to it (the continuation keeps "
                "its first tokens, the context its last ones).",
                desc,
                *context,
            )
        max_length = context[1]
    seqs = []
    for ctx, cont in pairs:
        if max_length is not None:
            cont = cont[: max_length - 1]
            ctx = ctx[-(max_length - len(cont)) :]
        if not ctx:
            raise DataError("a continuation needs at least one context token (the tokenizer produced none)")
        seqs.append((ctx, cont))
    device = input_device(model)
    out: list[list[float]] = [[] for _ in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))  # longest first
    with tqdm(total=len(seqs), desc=desc, disable=not progress) as bar:
        for idx in batches(len(seqs), batch_size, order):
            n_max = max(len(seqs[i][1]) for i in idx)
            if n_max == 0:
                bar.update(len(idx))
                continue
            ids, mask = left_pad([seqs[i][0] + seqs[i][1] for i in idx], pad_id, device)
            # the last n_max + 1 positions; position j predicts token j + 1
            logp = fp32_logits(model, ids, mask, keep=n_max + 1)[:, :-1].log_softmax(-1)
            targets = ids[:, -n_max:]
            token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for row, i in enumerate(idx):
                n = len(seqs[i][1])
                out[i] = token_lp[row, n_max - n :].tolist() if n else []
            bar.update(len(idx))
    return out
