"""Data loading, example forms, chat formatting and loss masking for CAST.

An example has one of the forms TRL's ``SFTTrainer`` accepts (see :data:`EXAMPLE_FORMS`; :func:`example_form` is the
one place that recognises them): a pair ``{"prompt", "response"}`` (this project's) or ``{"prompt", "completion"}``
(TRL's; strings, or lists of messages), a conversation ``{"messages": [{"role", "content"}, ...]}``, or a plain text
(a string or ``{"text"}``). Loaders accept JSONL/JSON/CSV files, a ``datasets.Dataset``, a list of dicts or (online) a
hub dataset name, and fail with an error that names the file, the line and the fix. Tokenized examples carry
``labels`` with ``-100`` on every token that is not scored (prompts, user and system turns).

The prompt format (the tokenizer's chat template, or :data:`FALLBACK_TEMPLATE` when it has none) is decided by
:func:`prompt_format` alone, which logs once per tokenizer which one is used and why.
"""

import contextlib
import csv
import hashlib
import json
import logging
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch

from ._core.errors import ConfigError, DataError


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FALLBACK_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
#: :func:`prompt_format` of a tokenizer without a chat template.
FALLBACK_FORMAT = "fallback:instruction"
#: The accepted example forms, as error messages name them.
EXAMPLE_FORMS = (
    '{"prompt": str, "response": str} (loss on the response)',
    '{"prompt", "completion"} as in TRL: two strings, or two lists of {"role", "content"} messages (loss on the '
    "completion)",
    '{"messages": [{"role", "content"}, ...]} (loss on the assistant turns)',
    'a string or {"text": str} (loss on every token)',
)
# Keys that decide an example's form; any other key (e.g. "category", "id") is metadata and ignored.
_FORMS = {
    frozenset({"prompt", "response"}): "prompt/response",
    frozenset({"prompt", "completion"}): "prompt/completion",
    frozenset({"messages"}): "messages",
    frozenset({"text"}): "text",
}
_FORM_KEYS = frozenset().union(*_FORMS)
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
_LOGGED_FORMATS: set[tuple[str, str]] = set()


def _positive_int(value: Any, name: str, error: type[Exception] = ConfigError) -> int:
    """``value`` if it is an integer >= 1 (bools are not), else ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise error(f"{name}={value!r} must be a positive integer (>= 1).")
    return int(value)


def _check_limit(limit: int | None) -> None:
    if limit is not None:
        _positive_int(limit, "limit")


# ----------------------------------------------------------------------------------------------------------- readers
def _parse_jsonl(text: str, name: str) -> list[tuple[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{name}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{lineno}: malformed JSON ({e.msg} at column {e.colno}).") from None
    return rows


def _read_file(path: Path) -> list[tuple[str, Any]]:
    """Rows of a local file as ``(location, row)``; location is ``file:line`` (or ``file[index]``)."""
    suffix, name = path.suffix.lower(), str(path)
    if suffix == ".jsonl":
        return _parse_jsonl(path.read_text(encoding="utf-8-sig"), name)
    if suffix == ".json":
        text = path.read_text(encoding="utf-8-sig")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # one object per line, saved as .json
                return _parse_jsonl(text, name)
            raise DataError(f"{name}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}).") from None
        if isinstance(data, dict) and len(lists := [v for v in data.values() if isinstance(v, list)]) == 1:
            data = lists[0]  # {"data": [...]}: an object holding a single list
        if not isinstance(data, list):
            raise DataError(f"{name}: expected a JSON list of objects, got {type(data).__name__}.")
        return [(f"{name}[{i}]", row) for i, row in enumerate(data)]
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            return [(f"{name}:{reader.line_num}", row) for row in reader]
    raise DataError(f"{name}: unsupported file type {suffix!r}; use .jsonl, .json or .csv (.txt: load_texts).")


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is treated as a local path.
    return source.lower().endswith(_FILE_SUFFIXES) or source.startswith((".", "~", "/")) or source.count("/") > 1


def _rows(source: Any, split: str, limit: int | None) -> tuple[str, list[tuple[str, Any]]]:
    """Normalise any supported source to ``(display_name, [(location, row), ...])``, first ``limit`` rows only."""
    import datasets

    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_file():
            return str(path), _read_file(path)[:limit]
        if not isinstance(source, str) or _looks_like_path(source) or path.exists():
            raise FileNotFoundError(f"No data file at {str(source)!r} (resolved to {path.resolve()}).")
        try:
            source = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise DataError(
                f"Could not load {source!r} (split {split!r}) from the Hugging Face Hub: {type(e).__name__}: {e}. "
                "If the hub is unreachable (offline machine), pass a local .jsonl/.json/.csv file instead."
            ) from e
    if isinstance(source, datasets.DatasetDict):
        source = source[split]
    if isinstance(source, datasets.Dataset):
        source = source.select(range(min(len(source), len(source) if limit is None else limit)))
        return "dataset", [(f"dataset row {i}", row) for i, row in enumerate(source)]
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return "list", [(f"item {i}", row) for i, row in enumerate(source[:limit])]
    raise DataError(f"Unsupported data source of type {type(source).__name__}; pass a path, Dataset or list of dicts.")


def _field(row: Any, column: str, where: str) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}.")
    if column not in row:
        raise DataError(f"{where}: missing column {column!r}; available columns: {sorted(row)}.")
    value = row[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: empty value in column {column!r}.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must hold text, got {type(value).__name__}.")
    return value


def load_pairs(
    source: Any,
    prompt_column: str = "prompt",
    response_column: str | None = "response",
    limit: int | None = None,
    split: str = "train",
) -> list[dict]:
    """Load prompt/response pairs as ``[{"prompt": str, "response": str, ...}]``.

    Args:
        source: a ``.jsonl``/``.json``/``.csv`` file, a ``datasets.Dataset``, a list of dicts, or a hub dataset name
            (online only; ``split`` picks the split).
        prompt_column: column holding the prompt; it is renamed to ``"prompt"``.
        response_column: column holding the response, renamed to ``"response"``; ``None`` loads prompts only.
        limit: keep at most this many rows (the first ones, in file order).

    Other columns are kept. Raises ``DataError`` (a ``ValueError``) naming the file and line for malformed lines,
    missing columns, blank values and empty sets; ``limit`` must be a positive integer (``ConfigError``).
    """
    _check_limit(limit)
    name, rows = _rows(source, split, limit)
    if not rows:
        raise DataError(f"{name}: no examples found (empty data set).")
    out = []
    for where, row in rows:
        if isinstance(row, dict) and response_column == "response" and "response" not in row and "completion" in row:
            raise DataError(
                f"{where}: the row has TRL's 'completion' instead of 'response'; pass response_column='completion', "
                "or read every example form with cast_peft.data.load_examples."
            )
        example = {"prompt": _field(row, prompt_column, where)}
        if response_column is not None:
            example["response"] = _field(row, response_column, where)
        example.update({k: v for k, v in row.items() if k not in (prompt_column, response_column, *example)})
        out.append(example)
    return out


def load_texts(source: Any, text_column: str = "text", limit: int | None = None, split: str = "train") -> list[str]:
    """Load plain texts, e.g. for perplexity or language-modelling calibration.

    ``source`` is a ``.txt`` file (split into paragraphs at blank lines, or into lines when it has no blank line), a
    list of strings, or anything :func:`load_pairs` accepts (then ``text_column`` is read).
    """
    _check_limit(limit)
    if isinstance(source, (str, os.PathLike)) and str(source).lower().endswith(".txt"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Text file not found: {str(source)!r}.")
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        blocks = text.split("\n\n") if "\n\n" in text.strip() else text.split("\n")
        texts = [b.strip() for b in blocks if b.strip()]
        if not texts:
            raise DataError(f"{path}: no text found (empty file).")
        return texts[:limit]
    if isinstance(source, (list, tuple)) and source and all(isinstance(t, str) for t in source):
        if (blank := next((i for i, t in enumerate(source) if not t.strip()), None)) is not None:
            raise DataError(f"item {blank}: empty text.")
        return list(source[:limit])
    return [row["prompt"] for row in load_pairs(source, text_column, None, limit=limit, split=split)]


def load_examples(source: Any, limit: int | None = None, split: str = "train") -> list[dict | str]:
    """Load examples of any accepted form (:data:`EXAMPLE_FORMS`), each checked, as they are in ``source``.

    ``source`` as for :func:`load_pairs`. A row with no form's keys (e.g. ``{"instruction", "output"}``, or a prompt
    without a response) is a ``DataError`` naming its file and line; other keys are kept. ``limit`` keeps the first
    rows and must be a positive integer.
    """
    _check_limit(limit)
    name, rows = _rows(source, split, limit)
    if not rows:
        raise DataError(f"{name}: no examples found (empty data set).")
    for where, row in rows:
        example_form(row, where)
    return [row for _, row in rows]


def starter_set(kind: Literal["safety", "utility"], split: Literal["train", "test"] = "train") -> list[dict]:
    """The built-in starter set written for this project (no download needed).

    ``kind="safety"``: harmful requests with refusals; ``kind="utility"``: benign instructions with answers. Every row
    has ``prompt``, ``response`` and ``category``; train and test splits have no prompt in common.
    """
    if kind not in ("safety", "utility"):
        raise ConfigError(f"kind must be 'safety' or 'utility', got {kind!r}.")
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}.")
    name = f"{kind}_{split}.jsonl"
    text = resources.files("cast_peft").joinpath("starter_data", name).read_text(encoding="utf-8")
    return load_pairs([row for _, row in _parse_jsonl(text, f"cast_peft/starter_data/{name}")])


# -------------------------------------------------------------------------------------------------------- formatting
def prompt_format(tokenizer: Any) -> str:
    """How prompts are rendered for ``tokenizer``: ``"chat_template:<sha256 of the template>"``, or
    :data:`FALLBACK_FORMAT` (``"fallback:instruction"``: :data:`FALLBACK_TEMPLATE`) when it has no chat template.

    The one place that decides it: diagnosis, training and evaluation all render prompts through it. The choice is
    logged once per tokenizer (and template). ``diagnose`` records it in the map's ``metadata["prompt_format"]``;
    ``train_adapter`` records the training data's in the CAST config's ``source_map["train_prompt_format"]`` and warns
    when it differs from the map's.
    """
    template = getattr(tokenizer, "chat_template", None)
    if template:
        text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
        fmt = "chat_template:" + hashlib.sha256(text.encode()).hexdigest()
    else:
        fmt = FALLBACK_FORMAT
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    if (name, fmt) not in _LOGGED_FORMATS:
        _LOGGED_FORMATS.add((name, fmt))
        if template:
            logger.info("Prompt format for tokenizer %r: its chat template (%s).", name, fmt)
        else:
            logger.warning(
                "Prompt format for tokenizer %r: it has no chat template, so prompts are rendered with cast-peft's "
                "fallback %r (%s) in diagnosis, training and evaluation alike. Set tokenizer.chat_template to use "
                "another format.",
                name,
                FALLBACK_TEMPLATE,
                FALLBACK_FORMAT,
            )
    return fmt


def uses_chat_template(tokenizer: Any) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template (see :func:`prompt_format`)."""
    return prompt_format(tokenizer) != FALLBACK_FORMAT


def format_chat(tokenizer: Any, prompt: str, response: str | None = None) -> tuple[str, str]:
    """Return ``(prompt_text, full_text)``.

    ``prompt_text`` is the user turn rendered with the tokenizer's chat template plus the generation prompt (or
    :data:`FALLBACK_TEMPLATE` when the tokenizer has no chat template); ``full_text`` is
    ``prompt_text + response + eos_token`` (just ``prompt_text`` when ``response`` is None).
    """
    if uses_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt_text = FALLBACK_TEMPLATE.format(prompt=prompt)
    if response is None:
        return prompt_text, prompt_text
    return prompt_text, prompt_text + response + (tokenizer.eos_token or "")


def encode(tokenizer: Any, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of ``text``. ``add_special_tokens=None`` (for rendered prompts) adds them only with the fallback
    template: a chat template already writes BOS and friends."""
    if add_special_tokens is None:
        add_special_tokens = not uses_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` rendered as a user turn with the generation prompt (:func:`format_chat`)."""
    return encode(tokenizer, format_chat(tokenizer, prompt)[0])


def padding_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's PAD, else its EOS, else 0 (padded positions are masked out, so any id
    works when it defines neither)."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------- example forms
def _refuse(where: str, reason: str) -> NoReturn:
    raise DataError(f"{where}: {reason}. Accepted example forms: {'; '.join(EXAMPLE_FORMS)}.")


def _check_text(value: Any, where: str, key: str) -> None:
    if not isinstance(value, str):
        _refuse(where, f"{key!r} must hold text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty value in {key!r}.")


def _check_messages(value: Any, where: str, key: str) -> None:
    if not isinstance(value, list) or not value:
        _refuse(where, f"{key!r} must be a non-empty list of {{'role', 'content'}} messages")
    for i, message in enumerate(value):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)):
            _refuse(where, f"{key}[{i}] must be a {{'role': str, 'content': str}} message, got {message!r:.80}")
        if not isinstance(message.get("content"), str):
            _refuse(where, f"{key}[{i}]['content'] must be a string (text-only conversations)")


def example_form(example: Any, where: str = "example") -> str:
    """The form of one example: ``"prompt/response"``, ``"prompt/completion"`` (two strings), ``"conversational
    prompt/completion"`` (two lists of messages), ``"messages"`` or ``"text"`` (a string or ``{"text"}``).

    The one place that recognises forms (:func:`make_batches`, ``TokenizedDataset`` and :func:`load_examples` ask
    it). An example is a form's keys plus any other keys, which are metadata and ignored (``"category"``, ``"id"``);
    one that has no form's keys, or those of two forms, is a ``DataError`` naming ``where`` and the accepted forms.
    """
    if isinstance(example, str):
        _check_text(example, where, "text")
        return "text"
    if not isinstance(example, Mapping):
        _refuse(where, f"expected a string or a dict, got {type(example).__name__}")
    keys = frozenset(example) & _FORM_KEYS
    form = _FORMS.get(keys)
    if form is None:
        if keys == {"prompt"}:
            reason = (
                "it has a 'prompt' but no 'response' or 'completion' to score (for a loss on the prompt text "
                "itself, pass it as a string or {'text': ...})"
            )
        elif keys:
            reason = f"its keys {sorted(keys)} mix several forms"
        else:
            named = "'prompt', 'response', 'completion', 'messages' or 'text'"
            reason = f"none of its keys {sorted(map(str, example))} is {named}"
        _refuse(where, reason)
    if form == "messages":
        _check_messages(example["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in example["messages"]):
            _refuse(where, "the conversation has no assistant turn, so nothing would be scored")
        return form
    if form == "prompt/completion" and isinstance(example["prompt"], list):
        _check_messages(example["prompt"], where, "prompt")
        _check_messages(example["completion"], where, "completion")
        return "conversational prompt/completion"
    for key in keys:
        _check_text(example[key], where, key)
    return form


def tokenize_example(tokenizer: Any, example: Any, max_length: int = 256, where: str = "example") -> dict:
    """Tokenize one example of any form (:func:`example_form`) with its loss mask in ``labels``.

    Pairs (``prompt`` + ``response`` or string ``completion``) go through :func:`tokenize_pair`: the prompt is
    rendered as a user turn with the chat template. (TRL concatenates a string prompt and completion without the
    template; here both pair forms are the same pair, so a map or adapter does not depend on the column name.)
    Conversations go through :func:`tokenize_messages`: loss on the assistant turns of ``messages``, or on the
    ``completion`` turns of a conversational prompt/completion. Texts: loss on every token.
    """
    form = example_form(example, where)
    if form == "text":
        return tokenize_text(tokenizer, example if isinstance(example, str) else example["text"], max_length)
    if form in ("prompt/response", "prompt/completion"):
        response = example["response" if form == "prompt/response" else "completion"]
        return tokenize_pair(tokenizer, example["prompt"], response, max_length, index=where)
    if form == "messages":
        messages = list(example["messages"])
        scored = [m["role"] == "assistant" for m in messages]
    else:
        messages = [*example["prompt"], *example["completion"]]
        scored = [False] * len(example["prompt"]) + [True] * len(example["completion"])
    return tokenize_messages(tokenizer, messages, scored, max_length, where)


def _fallback_turn(tokenizer: Any, message: Mapping[str, str]) -> str:
    # The fallback rendering of one turn; a user turn followed by an assistant turn is exactly format_chat's pair.
    if message["role"] == "user":
        return FALLBACK_TEMPLATE.format(prompt=message["content"])
    if message["role"] == "assistant":
        return message["content"] + (tokenizer.eos_token or "")
    return message["content"] + "\n\n"  # system (or another role): plain text before the next turn


def tokenize_messages(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    scored: Sequence[bool],
    max_length: int = 256,
    where: str = "example",
) -> dict[str, list[int]]:
    """Tokenize a conversation with ``labels`` on the turns flagged in ``scored`` only (TRL's assistant-only loss).

    The conversation is rendered with the chat template, or without one turn by turn: system text + blank line,
    :data:`FALLBACK_TEMPLATE` per user turn, content + EOS per assistant turn. A scored turn spans from the end of the
    conversation before it rendered with the generation prompt (not scored) to the end of the conversation up to and
    including it (its end-of-turn tokens are scored), both found as common token prefixes of the whole rendering, so
    no ``{% generation %}`` markers are needed in the template. A conversation longer than ``max_length`` loses
    unscored tokens from the left first, then its end.
    """
    chat = uses_chat_template(tokenizer)

    def render(turns: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
        if not chat:
            return "".join(_fallback_turn(tokenizer, m) for m in turns)
        try:
            return tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja raises e.g. on roles the template does not allow
            raise DataError(
                f"{where}: the tokenizer's chat template cannot render this conversation ({type(err).__name__}: "
                f"{err}). Fix the roles/order of its messages."
            ) from None

    ids = encode(tokenizer, render(messages, False))
    labels = [IGNORE_INDEX] * len(ids)
    for i, score in enumerate(scored):
        if score:
            start = _common_prefix(encode(tokenizer, render(messages[:i], True)), ids) if i else 0
            end = _common_prefix(encode(tokenizer, render(messages[: i + 1], False)), ids)
            labels[start:end] = ids[start:end]
    if len(ids) > max_length:
        first = next((j for j, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        drop = min(len(ids) - max_length, max(first - 1, 0))  # keep one token of context before the first scored one
        ids, labels = ids[drop : drop + max_length], labels[drop : drop + max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise DataError(
            f"{where}: no scored (assistant/completion) token left after tokenization (max_length={max_length}, "
            f"{len(ids)} tokens); use a larger max_length or shorter earlier turns."
        )
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_pair(
    tokenizer: Any, prompt: str, response: str, max_length: int = 256, index: int | str | None = None
) -> dict[str, list[int]]:
    """Tokenize one pair with loss masking: ``labels`` is ``-100`` on prompt tokens and equals ``input_ids`` on the
    response (+ EOS) tokens.

    The prompt and the full text are tokenized separately; the prompt length is their common token prefix. The
    window is cut by :func:`pair_features`. Raises ``DataError`` (naming ``index``: an example number or a location)
    when no response token is left.
    """
    prompt_text, full_text = format_chat(tokenizer, prompt, response)
    ids = encode(tokenizer, full_text)
    n_prompt = _common_prefix(encode(tokenizer, prompt_text), ids)
    label = index if isinstance(index, str) else f"example {index}" if index is not None else "example"
    return pair_features(ids[:n_prompt], ids[n_prompt:], max_length, label)


def pair_features(
    prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int = 256, where: str = "example"
) -> dict[str, list[int]]:
    """Features of a tokenized pair: ``labels`` ``-100`` on the prompt, equal to ``input_ids`` on the response.

    When the pair is longer than ``max_length``, prompt tokens are dropped from the left first; a response longer than
    the window keeps its first ``max(max_length - prompt_len, max_length // 2)`` tokens. Raises ``DataError`` naming
    ``where`` when no response token is left.
    """
    ids, n_prompt = [*prompt_ids, *response_ids], len(prompt_ids)
    n_resp = len(ids) - n_prompt
    if len(ids) > max_length:
        keep_resp = min(n_resp, max(max_length - n_prompt, max_length // 2))
        keep_prompt = max_length - keep_resp
        ids = ids[n_prompt - keep_prompt : n_prompt + keep_resp]
        n_prompt, n_resp = keep_prompt, keep_resp
    if n_resp <= 0:
        raise DataError(
            f"{where}: no response tokens left after tokenization (max_length={max_length}, prompt tokens="
            f"{n_prompt}); use a non-empty response or a larger max_length."
        )
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_text(tokenizer: Any, text: str, max_length: int = 256) -> dict[str, list[int]]:
    """Tokenize a plain text for language modelling (``labels == input_ids``), truncated to ``max_length``."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:max_length]
    if not ids:
        raise DataError(f"text {text[:40]!r} produced no tokens.")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into ``torch.long`` tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` (when present) with -100.
    """
    if not features:
        raise DataError("collate() got no features.")
    if pad_token_id is None:
        raise ConfigError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token).")
    width = max(len(f["input_ids"]) for f in features)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    batch = {}
    for key, pad in pads.items():
        if key == "labels" and not all("labels" in f for f in features):
            continue
        rows = [list(f[key]) + [pad] * (width - len(f[key])) for f in features]
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch


def make_batches(
    tokenizer: Any, examples: Iterable[dict | str], batch_size: int = 8, max_length: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Tokenize and collate examples of any accepted form (:data:`EXAMPLE_FORMS`, :func:`tokenize_example`) into
    batches, in the given order (deterministic, no shuffling)."""
    batch_size, max_length = _positive_int(batch_size, "batch_size"), _positive_int(max_length, "max_length")
    features = [tokenize_example(tokenizer, ex, max_length, f"example {i}") for i, ex in enumerate(examples)]
    if not features:
        raise DataError("make_batches() got no examples.")
    pad_id = padding_id(tokenizer)
    return [collate(features[i : i + batch_size], pad_id) for i in range(0, len(features), batch_size)]


# ---------------------------------------------------------------------------------------------------- model context
def context_length(model: Any) -> tuple[str, int] | None:
    """``(config field, value)`` of the longest sequence ``model`` takes (``n_positions`` for GPT-2, else
    ``max_position_embeddings``), or ``None`` when its config says nothing."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def fit_max_length(model: Any, max_length: int) -> int:
    """``max_length``, lowered (with a log line) to the model's context: longer inputs would index past GPT-2's
    position table."""
    max_length = _positive_int(max_length, "max_length")
    context = context_length(model)
    if context is not None and max_length > context[1]:
        logger.warning(
            "max_length=%d is longer than the model's context (config.%s=%d); sequences are cut to %d tokens.",
            max_length,
            *context,
            context[1],
        )
        return context[1]
    return max_length


# ------------------------------------------------------------------------------------------------ greedy generation
# Shared by the diagnosis (self targets, ``diagnosis/self_targets.py``) and the evaluation (``evaluation/batching.py``
# re-exports these names): one prompt encoding, one left padding and one greedy decoder for both.
def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the model's ``generation_config.eos_token_id`` (one or a list) and the
    tokenizer's EOS."""
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if source is not None:
            ids.update([source] if isinstance(source, int) else source)
    return ids


def input_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``seqs`` padded on the left with ``pad_id``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """Eval mode and ``torch.no_grad()`` for the block; each model's training flag is restored afterwards."""
    flags = [(m, m.training) for m in models if m is not None]
    for m, _ in flags:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was_training in flags:
            m.train(was_training)


def generate_ids(
    model: Any,
    tokenizer: Any,
    seqs: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
    *,
    keep_eos: bool = False,
    desc: str = "generate",
) -> list[list[int]]:
    """Greedy continuations (token ids) of left-padded prompts, cut before the first EOS (:func:`eos_ids`), or just
    after it with ``keep_eos``. Call it under :func:`eval_mode`.

    Prompts run longest first in batches of ``batch_size`` (deterministic). A prompt that leaves fewer than
    ``max_new_tokens`` positions of the model's context keeps its last tokens (with a log line); ``max_new_tokens``
    must fit in the context.
    """
    from tqdm.auto import tqdm

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
    with tqdm(total=len(seqs), desc=desc, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
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
                out[i] = new[: cut + 1] if keep_eos and cut < len(new) else new[:cut]
            bar.update(len(idx))
    return out
