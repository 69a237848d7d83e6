"""Self targets: utility calibration data from prompts alone, answered by the model itself (issue 15).

``diagnose(..., utility_data=prompts, utility_targets="self")`` takes benign prompts without reference answers, lets
the model being diagnosed answer each one greedily, once, and scores the utility loss on those answers. The loss is
then the model's NLL of its own behaviour on the prompts, so the utility gradient says which heads carry *answering
these prompts as it does now* (e.g. answering look-alikes of harmful requests instead of refusing them).

The targets are the generated token ids themselves, not a decoded and re-tokenized text: prompt ids
(``data.prompt_ids``, the same rendering as every pair) + the new tokens + the EOS token the model emitted, when it
stopped before ``max_new_tokens``. An answer cut at ``max_new_tokens`` gets no EOS appended, since the model would not
have stopped there and that one token's loss would be large. Generation is greedy (``do_sample=False``, one beam),
in eval mode, batched longest-first with left padding, so it is deterministic for a given model, dtype and batch size.

Cache: with ``SelfTargets(cache_dir=...)`` the answers are stored as ``cache_dir/self_targets-<key>.json`` (written
atomically), where ``key`` hashes everything the answers depend on (:func:`cache_key`): the prompts, their token ids
(so the tokenizer and chat template), ``max_new_tokens``, greedy decoding, the batch size, the model's identity and
dtype, a sample of its weights, its EOS ids and the torch/transformers versions. A second diagnosis with the same key
reads the file instead of generating; any other key is another file. Under ``torch.distributed`` every process
generates the same answers (the cache file is then written by each, atomically, with the same content).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from .._core.errors import ConfigError, DataError, DiagnosisError
from .._core.io import atomic_write_text
from ..data import (
    collate,
    eos_ids,
    eval_mode,
    generate_ids,
    padding_id,
    pair_features,
    prompt_format,
    prompt_ids,
)
from ..models import model_identity


logger = logging.getLogger(__name__)

__all__ = ["UTILITY_TARGETS", "SelfTargets", "generate_self_targets", "resolve_utility_targets"]

#: Values of ``diagnose(utility_targets=...)``: ``"data"`` (the responses in the utility data) or ``"self"`` (the
#: model's own greedy answers to the utility prompts, with :class:`SelfTargets`'s defaults).
UTILITY_TARGETS = ("data", "self")
CACHE_FORMAT = 1
_ANSWER_KEYS = ("response", "completion", "messages")


@dataclass(frozen=True)
class SelfTargets:
    """How ``diagnose`` answers prompt-only utility data (``utility_targets=SelfTargets(...)``; ``"self"`` is
    ``SelfTargets()``).

    Args:
        max_new_tokens: greedy tokens per answer (an answer stops earlier at EOS). The diagnosis window
            (``max_length``) must hold the prompt and the answer, or the prompt is cut from the left.
        batch_size: prompts per ``generate`` call; ``None``: the diagnosis' ``batch_size``. Part of the cache key,
            since padding can change low-precision greedy decoding.
        cache_dir: folder of the cached answers (created when missing); ``None``: generate every time.
    """

    max_new_tokens: int = 128
    batch_size: int | None = None
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is None and name == "batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SelfTargets({name}={value!r}): use a positive integer.")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ConfigError(f"SelfTargets(cache_dir={self.cache_dir!r}): use a folder path or None.")


def resolve_utility_targets(value: Any) -> SelfTargets | None:
    """``"data"`` -> ``None`` (use the responses given); ``"self"`` -> ``SelfTargets()``; a :class:`SelfTargets` as
    is; anything else is a ``ConfigError``."""
    if isinstance(value, SelfTargets):
        return value
    if isinstance(value, str) and value in UTILITY_TARGETS:
        return SelfTargets() if value == "self" else None
    raise ConfigError(
        f"utility_targets={value!r}: use 'data' (the responses in utility_data), 'self' (the model's own greedy "
        "answers to utility prompts) or cast_peft.SelfTargets(max_new_tokens=..., cache_dir=...)."
    )


def utility_prompts(data: Any) -> list[str]:
    """The prompts of prompt-only utility data: strings, or dicts with a string ``"prompt"`` (other keys such as
    ``"type"`` are metadata). A ``DataError`` names the first bad item; nothing is generated before this check."""
    hint = "pass a list of prompts (strings or {'prompt': str} dicts)"
    if data is None:
        raise DataError(f"No utility data given; with utility_targets='self' {hint}.")
    if isinstance(data, (str, bytes, Mapping, torch.utils.data.DataLoader)):
        raise DataError(
            f"utility_targets='self' needs prompts, not a {type(data).__name__}; {hint}. (Tokenized batches "
            "already hold their targets: use utility_targets='data'.)"
        )
    rows = list(data)
    if not rows:
        raise DataError(f"The utility prompt list is empty; {hint}.")
    prompts = []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            answers = [k for k in _ANSWER_KEYS if k in row]
            if answers:
                raise DataError(
                    f"utility item {i} has {answers[0]!r}: with utility_targets='self' the model writes the answers. "
                    "Pass only prompts, or use utility_targets='data' to score the answers given."
                )
            if "prompt" not in row:
                raise DataError(f"utility item {i} has no 'prompt' key (keys: {sorted(map(str, row))}); {hint}.")
            row = row["prompt"]
        if not isinstance(row, str):
            raise DataError(f"utility item {i} is a {type(row).__name__}, not a prompt string; {hint}.")
        if not row.strip():
            raise DataError(f"utility item {i} is an empty prompt; drop it.")
        prompts.append(row)
    return prompts


# ---------------------------------------------------------------------------------------------------------- the key
def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def weights_sample_sha256(model: Any) -> str:
    """sha256 over every parameter's name, shape, dtype and first/last 16 stored elements: cheap (no full pass over
    the weights), and any fine-tuning or another checkpoint of the same architecture changes it."""
    sha = hashlib.sha256()
    for name, param in model.named_parameters():
        tensor = param.detach()
        sha.update(f"{name}{tuple(tensor.shape)}{tensor.dtype};".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:  # offloaded: shape only
            continue
        flat = tensor.reshape(-1)
        sample = torch.cat([flat[:16], flat[-16:]]).contiguous()
        sha.update(sample.view(torch.uint8).cpu().numpy().tobytes())
    return sha.hexdigest()


def _version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def generation_settings(model: Any, tokenizer: Any, prompts: Sequence[str], targets: SelfTargets,
                        batch_size: int) -> dict[str, Any]:  # fmt: skip
    """Everything the answers depend on (recorded in the map's metadata; :func:`cache_key` hashes it)."""
    seqs = [prompt_ids(tokenizer, p) for p in prompts]
    param = next(model.parameters())
    return {
        "n_prompts": len(prompts),
        "prompts_sha256": _sha256_json(list(prompts)),
        "prompt_ids_sha256": _sha256_json(seqs),
        "prompt_format": prompt_format(tokenizer),
        "max_new_tokens": targets.max_new_tokens,
        "greedy": True,
        "batch_size": batch_size,
        "model": model_identity(model),
        "dtype": str(param.dtype),
        "weights_sample_sha256": weights_sample_sha256(model),
        "eos_ids": sorted(eos_ids(model, tokenizer)),
        "versions": {name: _version(name) for name in ("torch", "transformers")},
    }


def cache_key(settings: Mapping[str, Any]) -> str:
    return _sha256_json({"format": CACHE_FORMAT, **settings})


# ---------------------------------------------------------------------------------------------------- generation
def generate_self_targets(
    model: Any,
    tokenizer: Any,
    prompts: Any,
    targets: SelfTargets | str = "self",
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """The model's greedy answers to ``prompts`` (generated, or read from ``targets.cache_dir``).

    Returns ``{"prompts", "response_ids" (new tokens, with the EOS the model emitted), "responses" (decoded text),
    "metadata"}``; ``metadata`` is what ``diagnose`` stores in ``ConflictMap.metadata["utility_targets"]``. Raises
    ``DataError`` on bad prompts (before generating) and ``DiagnosisError`` when an answer is empty (the model emits
    EOS first): such an answer has no token to score.
    """
    targets = resolve_utility_targets(targets) or SelfTargets()
    prompts = utility_prompts(prompts)
    if tokenizer is None:
        raise DataError("utility_targets='self' renders and answers prompts, so diagnose() needs the tokenizer.")
    gen_batch = targets.batch_size or batch_size
    settings = generation_settings(model, tokenizer, prompts, targets, gen_batch)
    key = cache_key(settings)
    path = Path(targets.cache_dir).expanduser() / f"self_targets-{key[:24]}.json" if targets.cache_dir else None
    cached = _read_cache(path, key, prompts) if path is not None else None
    if cached is not None:
        logger.info("self targets: %d answers read from %s", len(prompts), path)
        ids = cached
    else:
        with eval_mode(model):
            seqs = [prompt_ids(tokenizer, p) for p in prompts]
            ids = generate_ids(model, tokenizer, seqs, targets.max_new_tokens, gen_batch, progress, keep_eos=True,
                               desc="self targets")  # fmt: skip
    eos = set(settings["eos_ids"])
    empty = [i for i, seq in enumerate(ids) if not [t for t in seq if t not in eos]]
    if empty:
        raise DiagnosisError(
            f"utility_targets='self': the model's greedy answer to {len(empty)} prompt(s) is empty (it emits EOS "
            f"first), so there is no utility token to score: items {empty[:10]}{' ...' if len(empty) > 10 else ''} "
            f"(first: {prompts[empty[0]][:60]!r}). Drop those prompts, or give them answers with "
            "utility_targets='data'."
        )
    responses = [tokenizer.decode([t for t in seq if t not in eos], skip_special_tokens=True) for seq in ids]
    stopped = sum(bool(seq) and seq[-1] in eos for seq in ids)
    metadata = {
        "source": "self",
        **settings,
        "key": key,
        "targets_sha256": _sha256_json(ids),
        "stopped_at_eos": stopped,
        "cut_at_max_new_tokens": len(ids) - stopped,
        "mean_new_tokens": sum(map(len, ids)) / len(ids),
        "cache": None if path is None else {"file": str(path), "hit": cached is not None},
    }
    if path is not None and cached is None:
        payload = {"format": CACHE_FORMAT, "key": key, "settings": settings, "prompts": prompts,
                   "response_ids": ids, "responses": responses}  # fmt: skip
        atomic_write_text(path, json.dumps(payload, ensure_ascii=False))
        logger.info("self targets: %d answers cached in %s", len(prompts), path)
    return {"prompts": prompts, "response_ids": ids, "responses": responses, "metadata": metadata}


def _read_cache(path: Path, key: str, prompts: list[str]) -> list[list[int]] | None:
    """The cached answers when ``path`` holds this key's complete record, else ``None`` (a damaged file is logged
    and regenerated; the file name carries only part of the key, so the whole key is compared)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ids = data["response_ids"]
        valid = (
            data["format"] == CACHE_FORMAT
            and data["key"] == key
            and data["prompts"] == prompts
            and len(ids) == len(prompts)
            and all(isinstance(seq, list) and all(isinstance(t, int) for t in seq) for seq in ids)
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("self targets: cache file %s is unreadable (%s); generating again.", path, err)
        return None
    if not valid:
        logger.warning("self targets: cache file %s does not match these prompts/settings; generating again.", path)
        return None
    return ids


def self_target_batches(
    model: Any,
    tokenizer: Any,
    data: Any,
    targets: SelfTargets,
    *,
    batch_size: int,
    max_length: int,
    progress: bool,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """The utility batches of ``diagnose(..., utility_targets=...)``: prompt ids + the model's own answer ids, loss on
    the answer (``data.pair_features``, cut to ``max_length``), and the metadata to record."""
    result = generate_self_targets(model, tokenizer, data, targets, batch_size=batch_size, progress=progress)
    features = [
        pair_features(prompt_ids(tokenizer, p), ids, max_length, f"utility prompt {i}")
        for i, (p, ids) in enumerate(zip(result["prompts"], result["response_ids"]))
    ]
    pad = padding_id(tokenizer)
    batches = [collate(features[i : i + batch_size], pad) for i in range(0, len(features), batch_size)]
    return batches, {**result["metadata"], "max_length": max_length}
