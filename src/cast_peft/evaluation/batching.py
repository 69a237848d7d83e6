"""Batching helpers of :mod:`cast_peft.evaluation`: context/continuation splits, left padding with explicit position
ids, log-probabilities of continuations and greedy generation (the conventions are in ``evaluation``'s docstring).
Prompts are rendered and tokenized by :mod:`cast_peft.data` (``format_chat``, ``encode``, ``prompt_ids``)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .._core.errors import ConfigError
from ..data import context_length, encode, format_chat, padding_id


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


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if source is not None:
            ids.update([source] if isinstance(source, int) else source)
    return ids


def input_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def forward_params(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


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


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    flags = [(m, m.training) for m in models if m is not None]
    for m, _ in flags:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was_training in flags:
            m.train(was_training)


def batches(n: int, batch_size: int, order: Sequence[int]) -> Iterator[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield list(order[start : start + batch_size])


def nonempty(values: Sequence, what: str) -> list:
    values = list(values)
    if not values:
        raise ValueError(f"{what} is empty; pass at least one item")
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
            raise ValueError("a continuation needs at least one context token (the tokenizer produced none)")
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


def generate_ids(
    model: Any, tokenizer: Any, seqs: Sequence[list[int]], max_new_tokens: int, batch_size: int, progress: bool
) -> list[list[int]]:
    """Greedy continuations (token ids, cut before the first EOS) of left-padded prompts.

    A prompt that leaves fewer than ``max_new_tokens`` positions of the model's context keeps its last tokens (with a
    log line); ``max_new_tokens`` must fit in the context.
    """
    context = context_length(model)
    if context is not None:
        room = context[1] - max_new_tokens
        if room < 1:
            raise ConfigError(
                f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's context "
                f"(config.{context[0]}={context[1]}); use max_new_tokens < {context[1]}."
            )
        if any(len(s) > room for s in seqs):
            logger.warning(
                "Prompts longer than %d tokens (config.%s=%d minus max_new_tokens=%d) keep their last %d tokens.",
                room,
                *context,
                max_new_tokens,
                room,
            )
            seqs = [s[-room:] for s in seqs]
    pad_id, eos = padding_id(tokenizer), eos_ids(model, tokenizer)
    device = input_device(model)
    out: list[list[int]] = [[] for _ in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with tqdm(total=len(seqs), desc="generate", disable=not progress) as bar:
        for idx in batches(len(seqs), batch_size, order):
            ids, mask = left_pad([seqs[i] for i in idx], pad_id, device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
            )
            for row, i in enumerate(idx):
                new = gen[row, ids.shape[1] :].tolist()
                cut = next((j for j, t in enumerate(new) if t in eos), len(new))
                out[i] = new[:cut]
            bar.update(len(idx))
    return out
