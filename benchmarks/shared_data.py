"""Loaders of the shared benchmark data (``shared/data`` beside the repository), for the benchmarks and their tests.

Not part of the installed package: the library never reads benchmark files. The folder is ``$CAST_DATA_DIR`` when
set, else ``../shared/data`` relative to the repository root. (Named ``shared_data``, not ``datasets``: the scripts
here run with this folder first on ``sys.path``, where a ``datasets.py`` would shadow Hugging Face ``datasets``.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from cast_peft.data import load_pairs


def data_dir() -> Path:
    """Location of the benchmark data: ``$CAST_DATA_DIR``, else ``../shared/data`` relative to the repository."""
    env = os.environ.get("CAST_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"CAST_DATA_DIR={env!r} is not a directory.")
        return path.resolve()
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"Benchmark data not found at {path}; set CAST_DATA_DIR to the shared/data folder.")
    return path


def available(dataset: str) -> bool:
    """Whether the benchmark data has ``dataset`` (tests that need it skip without it)."""
    try:
        return (data_dir() / dataset).is_dir()
    except FileNotFoundError:
        return False


def _join(instruction: str, extra: str | None) -> str:
    return f"{instruction.strip()}\n\n{extra.strip()}" if extra and extra.strip() else instruction.strip()


def _jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


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
    path = data_dir() / "safety_tuned_llamas" / "training" / "safety_only_data_Instructions.json"
    rows = json.loads(path.read_text(encoding="utf-8-sig"))
    return load_pairs([{"prompt": _join(r["instruction"], r.get("input")), "response": r["output"]} for r in rows])


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
    rows = _jsonl(data_dir() / "self_instruct" / "user_oriented_instructions.jsonl")
    pairs = [
        {"prompt": _join(r["instruction"], r["instances"][0].get("input")), "response": r["instances"][0]["output"]}
        for r in rows
    ]
    return load_pairs(pairs)


def load_mc_items(name: str, limit: int | None = None) -> list[dict]:
    """Multiple-choice items of one benchmark, first ``limit`` items, for ``cast_peft.evaluation``'s
    ``multiple_choice_accuracy``.

    Formats (lm-eval's zero-shot prompts; every choice starts with a space):
    ``arc_easy`` / ``boolq``: ``query + "\\nAnswer:"``; ``piqa``: ``"Question: {goal}\\nAnswer:"`` with ``sol1``/``sol2``;
    ``hellaswag``: the context line and its four endings; ``winogrande``: partial scoring, i.e.
    ``{"contexts": context_options, "continuation": " " + continuation, "gold"}``, scored as
    log p(continuation | context_option_i).
    """
    root = data_dir() / name
    if name in ("arc_easy", "boolq"):
        rows = _jsonl(root / f"{name}.jsonl", limit)
        return [
            {"context": r["query"] + "\nAnswer:", "choices": [" " + c for c in r["choices"]], "gold": int(r["gold"])}
            for r in rows
        ]
    if name == "piqa":
        rows = _jsonl(root / "valid.jsonl", limit)
        labels = (root / "valid-labels.lst").read_text(encoding="utf-8").split()
        return [
            {
                "context": f"Question: {r['goal']}\nAnswer:",
                "choices": [" " + r["sol1"], " " + r["sol2"]],
                "gold": int(g),
            }
            for r, g in zip(rows, labels)
        ]
    if name == "hellaswag":
        items: list[dict] = []
        with open(root / "hellaswag_val_full.txt", encoding="utf-8") as f:
            while limit is None or len(items) < limit:
                block = [f.readline() for _ in range(6)]
                if not block[-1]:
                    break
                block = [line.rstrip("\n") for line in block]
                items.append({"context": block[0], "choices": [" " + e for e in block[2:]], "gold": int(block[1])})
        return items
    if name == "winogrande":
        rows = _jsonl(root / "winogrande.jsonl", limit)
        return [
            {"contexts": r["context_options"], "continuation": " " + r["continuation"], "gold": int(r["gold"])}
            for r in rows
        ]
    raise ValueError(f"unknown benchmark {name!r}; choose arc_easy, piqa, hellaswag, boolq or winogrande")
