"""Data loading, chat formatting and loss masking for CAST.

Pairs are plain dicts ``{"prompt": str, "response": str, ...}``. Loaders accept JSONL/JSON/CSV files, a
``datasets.Dataset``, a list of dicts or (online) a hub dataset name, and fail with an error that names the file, the
line and the fix. Tokenized examples mask the prompt with ``-100`` so the loss only covers response tokens.
"""

import csv
import json
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from ._core.errors import DataError


IGNORE_INDEX = -100
FALLBACK_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


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
            raise RuntimeError(
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
    raise TypeError(f"Unsupported data source of type {type(source).__name__}; pass a path, Dataset or list of dicts.")


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
    missing columns, blank values and empty sets.
    """
    name, rows = _rows(source, split, limit)
    if not rows:
        raise DataError(f"{name}: no examples found (empty data set).")
    out = []
    for where, row in rows:
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


def starter_set(kind: Literal["safety", "utility"], split: Literal["train", "test"] = "train") -> list[dict]:
    """The built-in starter set written for this project (no download needed).

    ``kind="safety"``: harmful requests with refusals; ``kind="utility"``: benign instructions with answers. Every row
    has ``prompt``, ``response`` and ``category``; train and test splits have no prompt in common.
    """
    if kind not in ("safety", "utility"):
        raise ValueError(f"kind must be 'safety' or 'utility', got {kind!r}.")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    name = f"{kind}_{split}.jsonl"
    text = resources.files("cast_peft").joinpath("starter_data", name).read_text(encoding="utf-8")
    return load_pairs([row for _, row in _parse_jsonl(text, f"cast_peft/starter_data/{name}")])


# -------------------------------------------------------------------------------------------------------- formatting
def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_chat(tokenizer: Any, prompt: str, response: str | None = None) -> tuple[str, str]:
    """Return ``(prompt_text, full_text)``.

    ``prompt_text`` is the user turn rendered with the tokenizer's chat template plus the generation prompt (or
    :data:`FALLBACK_TEMPLATE` when the tokenizer has no chat template); ``full_text`` is
    ``prompt_text + response + eos_token`` (just ``prompt_text`` when ``response`` is None).
    """
    if _has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt_text = FALLBACK_TEMPLATE.format(prompt=prompt)
    if response is None:
        return prompt_text, prompt_text
    return prompt_text, prompt_text + response + (tokenizer.eos_token or "")


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Chat templates already insert BOS and friends, so only add special tokens for the plain fallback template.
    return list(tokenizer(text, add_special_tokens=not _has_chat_template(tokenizer))["input_ids"])


def tokenize_pair(
    tokenizer: Any, prompt: str, response: str, max_length: int = 256, index: int | None = None
) -> dict[str, list[int]]:
    """Tokenize one pair with loss masking: ``labels`` is ``-100`` on prompt tokens and equals ``input_ids`` on the
    response (+ EOS) tokens.

    The prompt and the full text are tokenized separately; the prompt length is their common token prefix. When the
    pair is longer than ``max_length``, prompt tokens are dropped from the left first; a response longer than the
    window keeps its first ``max(max_length - prompt_len, max_length // 2)`` tokens. Raises ``ValueError`` (naming
    ``index``) when no response token is left.
    """
    prompt_text, full_text = format_chat(tokenizer, prompt, response)
    prompt_ids, ids = _encode(tokenizer, prompt_text), _encode(tokenizer, full_text)
    n_prompt = 0
    while n_prompt < min(len(prompt_ids), len(ids)) and prompt_ids[n_prompt] == ids[n_prompt]:
        n_prompt += 1
    n_resp = len(ids) - n_prompt
    if len(ids) > max_length:
        keep_resp = min(n_resp, max(max_length - n_prompt, max_length // 2))
        keep_prompt = max_length - keep_resp
        ids = ids[n_prompt - keep_prompt : n_prompt + keep_resp]
        n_prompt, n_resp = keep_prompt, keep_resp
    if n_resp <= 0:
        label = f"example {index}" if index is not None else "example"
        raise ValueError(
            f"{label}: no response tokens left after tokenization (max_length={max_length}, prompt tokens="
            f"{n_prompt}); use a non-empty response or a larger max_length."
        )
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_text(tokenizer: Any, text: str, max_length: int = 256) -> dict[str, list[int]]:
    """Tokenize a plain text for language modelling (``labels == input_ids``), truncated to ``max_length``."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:max_length]
    if not ids:
        raise ValueError(f"text {text[:40]!r} produced no tokens.")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into ``torch.long`` tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` (when present) with -100.
    """
    if not features:
        raise ValueError("collate() got no features.")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token).")
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
    """Tokenize and collate examples into batches, in the given order (deterministic, no shuffling).

    Each example is a pair dict (``prompt`` + ``response``: loss on the response only), a dict with only ``text`` or
    only ``prompt``, or a plain string (language-modelling loss on every token).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    features = []
    for i, ex in enumerate(examples):
        if isinstance(ex, str):
            features.append(tokenize_text(tokenizer, ex, max_length))
        elif isinstance(ex, dict) and "prompt" in ex and "response" in ex:
            features.append(tokenize_pair(tokenizer, ex["prompt"], ex["response"], max_length, index=i))
        elif isinstance(ex, dict) and ("text" in ex or "prompt" in ex):
            features.append(tokenize_text(tokenizer, ex.get("text", ex.get("prompt")), max_length))
        else:
            raise DataError(f"example {i}: expected a string or a dict with 'prompt'/'response' or 'text'.")
    if not features:
        raise DataError("make_batches() got no examples.")
    # Padded positions are masked out, so any id works when the tokenizer defines neither PAD nor EOS.
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return [collate(features[i : i + batch_size], pad_id) for i in range(0, len(features), batch_size)]


# ------------------------------------------------------------------------------------------------ shared benchmarks
def data_dir() -> Path:
    """Location of the benchmark data (``shared/data``): ``$CAST_DATA_DIR``, else ``../shared/data`` relative to the
    current directory, else relative to the repository root. Only tests and benchmarks need it."""
    env = os.environ.get("CAST_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"CAST_DATA_DIR={env!r} is not a directory.")
        return path.resolve()
    candidates = [
        Path.cwd() / ".." / "shared" / "data",
        Path(__file__).resolve().parents[2] / ".." / "shared" / "data",
    ]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    tried = ", ".join(str(p.resolve()) for p in candidates)
    raise FileNotFoundError(f"Benchmark data not found (tried {tried}); set CAST_DATA_DIR to the shared/data folder.")


def _join(instruction: str, extra: str | None) -> str:
    return f"{instruction.strip()}\n\n{extra.strip()}" if extra and extra.strip() else instruction.strip()


def load_advbench() -> list[dict]:
    """AdvBench harmful behaviours (520 prompts; the ``target`` affirmative prefix is kept as an extra key)."""
    return load_pairs(data_dir() / "advbench" / "harmful_behaviors.csv", prompt_column="goal", response_column=None)


def load_harmbench(split: str = "test") -> list[dict]:
    """HarmBench standard text behaviours without context (test: 159, val: 41, all: 200 prompts)."""
    if split not in ("test", "val", "all"):
        raise ValueError(f"split must be 'test', 'val' or 'all', got {split!r}.")
    rows = load_pairs(data_dir() / "harmbench" / f"harmbench_behaviors_text_{split}.csv", "Behavior", None)
    rows = [r for r in rows if r.get("FunctionalCategory", "standard") == "standard"]
    return [r for r in rows if not (r.get("ContextString") or "").strip()]


def load_xstest(label: Literal["safe", "unsafe"] = "safe") -> list[dict]:
    """XSTest prompts: 250 ``safe`` look-alikes (should be answered) or 200 ``unsafe`` contrasts."""
    if label not in ("safe", "unsafe"):
        raise ValueError(f"label must be 'safe' or 'unsafe', got {label!r}.")
    rows = load_pairs(data_dir() / "xstest" / "xstest_prompts.csv", response_column=None)
    return [r for r in rows if r["label"] == label]


def load_safety_tuned_llamas_train() -> list[dict]:
    """Safety-Tuned LLaMAs training pairs: 2,483 harmful requests with safe responses (CC BY-NC 4.0)."""
    rows = _read_file(data_dir() / "safety_tuned_llamas" / "training" / "safety_only_data_Instructions.json")
    pairs = [{"prompt": _join(r["instruction"], r.get("input")), "response": r["output"]} for _, r in rows]
    return load_pairs(pairs)


def load_alpaca_libre(limit: int | None = None) -> list[dict]:
    """Alpaca-libre utility pairs from v1-v3: ``status == "ok"`` rows with a non-empty output, instruction and input
    joined, the first row of each prompt kept (3,097 pairs). Lines that are malformed upstream are skipped."""
    pairs, seen = [], set()
    for version in (1, 2, 3):
        path = data_dir() / "alpaca_libre" / f"alpaca_libre_tasks_v{version}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("status") != "ok" or not (row.get("output") or "").strip():
                continue
            prompt = _join(row["instruction"], row.get("input"))
            if prompt not in seen:
                seen.add(prompt)
                pairs.append({"prompt": prompt, "response": row["output"].strip()})
    return load_pairs(pairs, limit=limit)


def load_self_instruct_user_oriented() -> list[dict]:
    """Self-Instruct user-oriented tasks (252; evaluation only), instruction and input joined, reference output as
    ``response``."""
    rows = _read_file(data_dir() / "self_instruct" / "user_oriented_instructions.jsonl")
    pairs = [
        {"prompt": _join(r["instruction"], r["instances"][0].get("input")), "response": r["instances"][0]["output"]}
        for _, r in rows
    ]
    return load_pairs(pairs)
