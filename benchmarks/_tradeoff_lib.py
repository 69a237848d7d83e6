"""Building blocks of ``benchmarks/tradeoff.py``: profiles, data splits, methods, the PCGrad-style trainer and the
evaluation suite (the report, plot and verdict are written by ``tradeoff.py`` itself).

Everything here calls the library (``cast_peft.data``, ``cast_peft.evaluation``, ``cast_peft.training``); nothing is
re-implemented except the PCGrad step, which is a benchmark baseline and not part of cast-peft.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import re
import time
from collections.abc import Iterator
from typing import Any

import lookalike as la
import torch
import transformers
from shared_data import (
    data_dir,
    load_advbench,
    load_alpaca_libre,
    load_harmbench,
    load_mc_items,
    load_safety_tuned_llamas_train,
    load_self_instruct_user_oriented,
    load_xstest,
)

from cast_peft import FrozenHeads, freeze_heads
from cast_peft import evaluation as ev
from cast_peft.conflict_map import ConflictMap
from cast_peft.data import IGNORE_INDEX, collate, fit_max_length, make_batches
from cast_peft.geometry import AttentionGeometry, HeadCounts, frozen_units
from cast_peft.training import TokenizedDataset


#: Seed of the data splits (calibration / training / evaluation subsets). Fixed: the run seed only changes the
#: adapter's initialisation, the training order and the random-skip control, never which prompts are evaluated.
DATA_SEED = 1234
#: Calibration pairs reserved per objective (the first ones after the shuffle); training uses the rest, so the map's
#: calibration data is disjoint from the training data and from every evaluation set.
CALIBRATION_POOL = 256
#: Chance accuracy of the multiple-choice sets (lm-eval formats in ``shared_data.load_mc_items``).
MC_CHANCE = {"arc_easy": 0.25, "piqa": 0.5, "hellaswag": 0.25, "boolq": 0.5, "winogrande": 0.5}

# Presets; every value can be overridden on the command line. Generation is the dominant cost on CPU.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(
        seeds=[0], regimes=["safety", "mixed"], ratios=[0.1], steps=2, batch_size=4, max_length=64, learning_rate=1e-3,
        rank=8, n_calibration=8, n_harmful=4, n_safe=4, n_helpful=4, mc_sets=["arc_easy"], n_mc=4, n_ppl=2,
        max_new_tokens=8, self_target_tokens=8, n_lookalike=4, calibration_target=0.0,
    ),
    "reduced": dict(
        seeds=[0, 1, 2], regimes=["safety", "mixed"], ratios=[0.1, 0.2], steps=40, batch_size=8, max_length=128,
        learning_rate=1e-3, rank=8, n_calibration=256, n_harmful=60, n_safe=80, n_helpful=50, mc_sets=["arc_easy"],
        n_mc=100, n_ppl=10, max_new_tokens=32, self_target_tokens=64, n_lookalike=None, calibration_target=0.9,
    ),
    "full": dict(
        seeds=[0, 1, 2], regimes=["safety", "mixed"], ratios=[0.05, 0.1, 0.2, 0.4], steps=100, batch_size=8,
        max_length=128, learning_rate=1e-3, rank=8, n_calibration=256, n_harmful=100, n_safe=100, n_helpful=100,
        mc_sets=["arc_easy", "piqa"], n_mc=200, n_ppl=40, max_new_tokens=48, self_target_tokens=64, n_lookalike=None, calibration_target=0.9,
    ),
}  # fmt: skip
#: Settings that change what a run measures; results made with other values are never mixed into one table.
FINGERPRINT_KEYS = (
    "steps", "batch_size", "max_length", "learning_rate", "rank", "n_calibration", "n_harmful", "n_safe", "n_helpful",
    "mc_sets", "n_mc", "n_ppl", "max_new_tokens", "model",
)  # fmt: skip


#: Studies: ``generic`` (the map's utility data are alpaca-libre pairs; evaluation on XSTest safe prompts of all
#: types) and ``lookalike`` (issue 15: the map's utility data are the look-alike calibration prompts of
#: ``lookalike.py`` with the model's own answers as targets; evaluation on the held-out look-alike sets).
STUDIES = ("generic", "lookalike")
#: Settings that also define a look-alike run (added to :data:`FINGERPRINT_KEYS` only for that study, so the
#: generic study's folders keep their fingerprint): the study itself, the self targets' length (``max_new_tokens``
#: of ``cast_peft.SelfTargets``) and the size cap of each held-out look-alike set (``None``: all of it).
LOOKALIKE_KEYS = ("study", "self_target_tokens", "n_lookalike")
#: Methods of the look-alike study's safety regime (issue 15, item 3); the map-based ones use the look-alike map.
LOOKALIKE_METHODS = ["base", "lora", "cast-10", "cast-20", "random-10", "random-20", "fs-10", "oc-10",
                     "random-depth-10", "random-kv-10"]  # fmt: skip
#: Over-refusal summary key of each held-out look-alike set (``xstest_over_refusal`` is XSTest's evaluation types in
#: this study), and the pooled one: the look-alike study's primary utility metric.
LOOKALIKE_SETS = {"xstest_eval_types": "xstest_over_refusal", "physical_safety_safe": "physical_safety_over_refusal",
                  "i_alpaca": "i_alpaca_over_refusal"}  # fmt: skip
LOOKALIKE_PRIMARY = "lookalike_over_refusal"


def fingerprint_keys(settings: dict[str, Any]) -> tuple[str, ...]:
    """The keys :func:`fingerprint` hashes. LoRA mode: :data:`FINGERPRINT_KEYS` as they were (so the committed LoRA
    study's folder stays valid). Full modes: no ``rank`` (no adapter) and no ``learning_rate`` (calibrated inside the
    folder and recorded in its ``settings.json``, see ``tradeoff.calibrate``), plus the mode and the calibration rule's
    safety target (``calibration_target``, the verdict's 90% outside the quick profile). The look-alike study adds
    :data:`LOOKALIKE_KEYS`."""
    keys = FINGERPRINT_KEYS
    if settings.get("mode", "lora") != "lora":
        keys = tuple(k for k in keys if k not in ("rank", "learning_rate")) + ("mode", "calibration_target")
    return keys + (LOOKALIKE_KEYS if settings.get("study", "generic") == "lookalike" else ())


def fingerprint(settings: dict[str, Any]) -> str:
    """Short hash of the settings that define a run's measurement (seeds, regimes and methods excluded)."""
    text = json.dumps({k: settings[k] for k in fingerprint_keys(settings)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------------------ methods
#: What is trained: ``lora`` (a rank-``rank`` adapter on the attention projections; the committed study), ``full``
#: (the attention weights themselves, everything else frozen; skipped heads via ``cast_peft.freeze_heads``) or
#: ``full-mlp`` (attention and MLP weights; only attention heads are ever skipped).
MODES = ("lora", "full", "full-mlp")
#: The all-heads method of each mode: the verdict's reference and the run the full-FT learning rate is calibrated on.
REFERENCE = {"lora": "lora", "full": "full", "full-mlp": "full"}
_METHOD = re.compile(r"^(base|lora|pcgrad|full)$|^(cast|pilot|random-depth|random-kv|random|oc|fs)-(\d+)$")
#: How each head-skipping method picks its heads (see :func:`select_skip`): a ``ConflictMap.select`` policy, or
#: ``"depth"`` / ``"kv"`` for the random controls matched to the CAST set's layers / frozen KV heads.
POLICY = {"cast": "score", "pilot": "score", "random": "random", "oc": "oc", "fs": "fs", "random-depth": "depth",
          "random-kv": "kv"}  # fmt: skip
#: Methods that need a LoRA adapter (the pilot map is diagnosed after a pilot LoRA run), so not in the full modes.
LORA_ONLY = ("lora", "pcgrad", "pilot")
#: Run seed of the pilot LoRA whose merged weights the ``pilot-P`` maps are diagnosed on; not one of the study's seeds.
PILOT_SEED = 1000


def parse_method(name: str) -> tuple[str, float | None]:
    """``"cast-10"`` -> ``("cast", 0.1)``; ``"random-kv-20"`` -> ``("random-kv", 0.2)``; ``"lora"`` -> ``("lora",
    None)``. Raises ``ValueError`` on other names."""
    match = _METHOD.match(name)
    if not match:
        raise ValueError(
            f"Unknown method {name!r}: use base, lora, pcgrad, full or cast-/pilot-/random-/random-depth-/random-kv-/"
            "oc-/fs-<percent>."
        )
    if match.group(1):
        return match.group(1), None
    return match.group(2), int(match.group(3)) / 100


def check_method(name: str, mode: str) -> None:
    """Refuse a method that the mode cannot run (``ValueError`` naming the one to use)."""
    kind = parse_method(name)[0]
    if mode == "lora" and kind == "full":
        raise ValueError("Method 'full' trains the dense attention weights: run it with --mode full (or full-mlp).")
    if mode != "lora" and kind in LORA_ONLY:
        raise ValueError(f"Method {name!r} needs a LoRA adapter; --mode {mode} has 'full' as its all-heads run.")


def default_methods(ratios: list[float], mode: str = "lora") -> list[str]:
    """All methods of the study, in the order they run (cheap and most informative first).

    ``lora``: the committed study's plan (OC/FS/PCGrad/pilot controls at 10%). Full modes: the issue-16 plan, ``full``,
    CAST and random at every ratio, then FS and the two confound controls (same skipped heads per layer; same frozen
    KV heads) at the largest ratio, where the one-seed measurement saw the effect.
    """
    pct = [round(r * 100) for r in ratios]
    if mode != "lora":
        top = max(pct)
        return (["base", "full"] + [f"cast-{p}" for p in pct] + [f"random-{p}" for p in pct]
                + [f"fs-{top}", f"random-depth-{top}", f"random-kv-{top}"])  # fmt: skip
    first = round(0.1 * 100) if 0.1 in ratios else pct[0]
    return (["base", "lora"] + [f"cast-{p}" for p in pct] + [f"random-{p}" for p in pct]
            + [f"oc-{first}", f"fs-{first}", "pcgrad", f"pilot-{first}"])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- selection
def select_skip(cmap: ConflictMap, kind: str, ratio: float, seed: int) -> dict[int, list[int]]:
    """The skip set of method ``kind``-``ratio`` for run ``seed`` (query heads; KV heads follow the default
    ``kv_head_policy="all"`` of the tuner and of ``freeze_heads``).

    ``cast``/``pilot``/``oc``/``fs``/``random`` are ``cmap.select(skip_ratio=ratio, policy=POLICY[kind],
    seed=seed)``. The two confound controls start from the CAST set of the same ratio, ``cast = cmap.select(
    skip_ratio=ratio)``, and draw with ``random.Random(seed)``:

    * ``random-depth``: in every layer, as many heads as ``cast`` skips there, drawn uniformly without replacement
      from that layer's heads (layers in increasing order, one ``sample`` per layer). Matches the depth profile.
    * ``random-kv``: with ``K`` the KV heads ``cast`` freezes (groups whose query heads are all skipped) and ``N`` its
      heads: first ``K`` whole KV groups drawn uniformly from all ``(layer, kv head)`` groups (one ``sample``), then
      the other ``N - K * group_size`` heads taken in a uniformly shuffled order of the remaining heads, passing over a
      head that would complete its group (so no further KV head freezes). Matches ``N`` and ``K`` exactly; this always
      fills, since the remaining groups can hold ``group_size - 1`` heads each, as ``cast``'s own partial ones do. With
      multi-head attention (``group_size`` 1) every skipped head freezes its KV head, so this is ``random`` drawn
      with another generator.

    Neither control matches the other confound (``random-depth`` frozen KV heads, ``random-kv`` the layers):
    :func:`skip_profile` records both for every run.
    """
    policy = POLICY[kind]
    if policy not in ("depth", "kv"):
        return cmap.select(skip_ratio=ratio, policy=policy, seed=seed)
    counts, cast = cmap.counts, cmap.select(skip_ratio=ratio)
    rng = random.Random(seed)
    if policy == "depth":
        drawn = {layer: rng.sample(range(counts.num_heads), len(heads)) for layer, heads in sorted(cast.items())}
        return {layer: sorted(heads) for layer, heads in drawn.items()}
    g = counts.group_size
    groups = [(layer, kv) for layer in range(counts.num_layers) for kv in range(counts.num_kv_heads)]
    whole = set(rng.sample(groups, frozen_kv_heads(cast, counts)))
    chosen = {(layer, kv * g + i) for layer, kv in sorted(whole) for i in range(g)}
    rest = [(layer, h) for layer in range(counts.num_layers) for h in range(counts.num_heads)
            if (layer, h // g) not in whole]  # fmt: skip
    rng.shuffle(rest)
    in_group: dict[tuple[int, int], int] = {}
    need = sum(len(h) for h in cast.values()) - len(chosen)
    for layer, h in rest:
        if need == 0:
            break
        if in_group.get((layer, h // g), 0) < g - 1:
            chosen.add((layer, h))
            in_group[(layer, h // g)] = in_group.get((layer, h // g), 0) + 1
            need -= 1
    out: dict[int, list[int]] = {}
    for layer, h in sorted(chosen):
        out.setdefault(layer, []).append(h)
    return out


def frozen_kv_heads(skip: dict[int, list[int]], counts: HeadCounts, kv_head_policy: str = "all") -> int:
    """How many KV heads ``skip`` freezes under ``kv_head_policy`` (the tuner's and ``freeze_heads``'s rule)."""
    return sum(int(frozen_units(counts, layer, skip, None, kv_head_policy)["k"].sum()) for layer in skip)


def skip_profile(skip: dict[int, list[int]], counts: HeadCounts) -> dict[str, Any]:
    """Where a skip set sits, to read the confounds off every run: heads per layer, frozen KV heads, mean layer."""
    n = sum(len(h) for h in skip.values())
    return {
        "heads_per_layer": {str(layer): len(h) for layer, h in sorted(skip.items())},
        "frozen_kv_heads": frozen_kv_heads(skip, counts),
        "mean_layer": sum(layer * len(h) for layer, h in skip.items()) / n if n else None,
    }


# --------------------------------------------------------------------------------------------------------------- data
def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _shuffled(rows: list, salt: int = 0) -> list:
    rows = list(rows)
    random.Random(DATA_SEED + salt).shuffle(rows)
    return rows


def wikitext_paragraphs(limit: int) -> list[str]:
    """The first ``limit`` WikiText-2 test paragraphs of at least 400 characters (section headings skipped)."""
    lines = (data_dir() / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
    return [t.strip() for t in lines if not t.strip().startswith("=") and len(t.strip()) >= 400][:limit]


def build_splits(settings: dict[str, Any]) -> dict[str, Any]:
    """Calibration, training and evaluation sets, all fixed by :data:`DATA_SEED`.

    * ``calib_safety`` / ``calib_utility``: the first ``n_calibration`` of :data:`CALIBRATION_POOL` reserved
      Safety-Tuned LLaMAs / alpaca-libre pairs (the map; also the PCGrad baseline's utility direction).
    * ``train_safety``: the other Safety-Tuned LLaMAs pairs; ``train_utility``: as many other alpaca-libre pairs
      (regime "mixed" trains on both, 1:1).
    * evaluation: AdvBench + HarmBench-test prompts (half each), XSTest safe prompts, self-instruct user-oriented
      pairs, multiple-choice items, WikiText-2 paragraphs. Evaluation prompts that also occur (case/space-insensitive)
      in a calibration or training set are dropped.
    * look-alike study (``settings["study"] == "lookalike"``): ``calib_lookalike``, the first ``n_calibration``
      prompts of XSTest's calibration types (``lookalike.xstest_split``: 125, all of them at 256), is the map's
      utility data (answered by the model itself); ``safe`` is XSTest's evaluation types instead of a sample of all
      types, and ``lookalike`` holds the two held-out Safety-Tuned LLaMAs sets; each capped at ``n_lookalike``.
    """
    if settings["n_calibration"] > CALIBRATION_POOL:
        raise ValueError(f"n_calibration must be <= {CALIBRATION_POOL} (the reserved calibration pool).")
    safety, utility = _shuffled(load_safety_tuned_llamas_train(), 1), _shuffled(load_alpaca_libre(), 2)
    n_cal, train_safety = settings["n_calibration"], safety[CALIBRATION_POOL:]
    splits: dict[str, Any] = {
        "calib_safety": safety[:n_cal],
        "calib_utility": utility[:n_cal],
        "train_safety": train_safety,
        "train_utility": utility[CALIBRATION_POOL : CALIBRATION_POOL + len(train_safety)],
    }
    lookalike = settings.get("study", "generic") == "lookalike"
    if lookalike:
        splits["calib_lookalike"] = la.xstest_split("calibration")[:n_cal]
    seen = {_norm(r["prompt"]) for key in splits for r in splits[key]}

    def fresh(rows: list[dict], n: int, source: str, salt: int) -> list[dict]:
        kept = [r for r in _shuffled(rows, salt) if _norm(r["prompt"]) not in seen]
        return [{"prompt": r["prompt"], "response": r.get("response"), "source": source} for r in kept[:n]]

    n_harm = settings["n_harmful"]
    splits["harmful"] = fresh(load_advbench(), n_harm // 2, "advbench", 3) + fresh(
        load_harmbench("test"), n_harm - n_harm // 2, "harmbench", 4
    )
    if lookalike:
        n_set = settings["n_lookalike"]
        splits["safe"] = fresh(la.xstest_split("evaluation"), n_set, "xstest_eval_types", 7)
        splits["lookalike"] = {short: fresh(la.load_safety_tuned_llamas_eval(stem), n_set, short, 8 + i)
                               for i, (stem, short) in enumerate(la.HELD_OUT_SETS.items())}  # fmt: skip
    else:
        splits["safe"] = fresh(load_xstest("safe"), settings["n_safe"], "xstest", 5)
    splits["helpful"] = fresh(load_self_instruct_user_oriented(), settings["n_helpful"], "self_instruct", 6)
    splits["mc"] = {name: load_mc_items(name, limit=settings["n_mc"]) for name in settings["mc_sets"]}
    splits["wikitext"] = wikitext_paragraphs(settings["n_ppl"])
    return splits


#: Training regimes of the study (see :func:`training_data`).
REGIMES = ("safety", "mixed")


def training_data(splits: dict[str, Any], regime: str) -> list[dict]:
    """Training pairs of a regime: ``"safety"`` (safety-only SFT) or ``"mixed"`` (safety + benign pairs, 1:1)."""
    if regime == "safety":
        return splits["train_safety"]
    if regime == "mixed":
        return splits["train_safety"] + splits["train_utility"]
    raise ValueError(f"Unknown regime {regime!r}: use 'safety' or 'mixed'.")


# ------------------------------------------------------------------------------------------------------ evaluation
def evaluate(model: Any, tokenizer: Any, splits: dict[str, Any], settings: dict[str, Any], *, drift: bool,
             reference: Any = None) -> dict:  # fmt: skip
    """The same metrics, decoding and refusal classifier for every method.

    Returns ``{"summary": {metric: value}, "details": {...per-item outputs...}, "eval_time_s"}``. ``drift``: compute
    KL(base || model) on the self-instruct prompts, the base being ``reference`` (the full modes pass a fresh copy of
    the base model) or, when ``None``, ``model``'s adapter disabled (``model`` a ``PeftModel``); the base model's own
    drift is 0 by definition.
    """
    started = time.time()
    gen = dict(max_new_tokens=settings["max_new_tokens"], batch_size=8, progress=False)
    harmful, safe, helpful = splits["harmful"], splits["safe"], splits["helpful"]
    details = {
        "harmful": ev.refusal_rate(model, tokenizer, [r["prompt"] for r in harmful], **gen),
        "safe": ev.over_refusal_rate(model, tokenizer, [r["prompt"] for r in safe], **gen),
        "helpful_nll": ev.response_nll(model, tokenizer, helpful, batch_size=8, progress=False),
    }
    summary = {
        "harmful_refusal": details["harmful"]["refusal_rate"],
        "xstest_over_refusal": details["safe"]["over_refusal_rate"],
        "helpful_nll": details["helpful_nll"]["nll"],
        "kl_drift": 0.0,
    }
    for source in ("advbench", "harmbench"):
        flags = [it["refused"] for it, r in zip(details["harmful"]["items"], harmful) if r["source"] == source]
        if flags:
            summary[f"{source}_refusal"] = sum(flags) / len(flags)
    if "lookalike" in splits:  # the look-alike study: each held-out benign set on its own, and pooled
        flags = [it["refused"] for it in details["safe"]["items"]]
        for name, rows in splits["lookalike"].items():
            details[f"safe_{name}"] = ev.over_refusal_rate(model, tokenizer, [r["prompt"] for r in rows], **gen)
            summary[LOOKALIKE_SETS[name]] = details[f"safe_{name}"]["over_refusal_rate"]
            flags += [it["refused"] for it in details[f"safe_{name}"]["items"]]
        summary[LOOKALIKE_PRIMARY] = sum(flags) / len(flags)
    if drift:
        details["kl_drift"] = ev.kl_drift(model, reference, tokenizer, [r["prompt"] for r in helpful], batch_size=8,
                                          progress=False)  # fmt: skip
        summary["kl_drift"] = details["kl_drift"]["kl"]
    for name, items in splits["mc"].items():
        res = ev.multiple_choice_accuracy(model, tokenizer, items, batch_size=8, progress=False)
        details[f"mc_{name}"] = {k: v for k, v in res.items() if k != "items"}
        summary[f"mc_{name}_acc"] = res["acc"]
    if splits["wikitext"]:
        ppl = ev.perplexity(model, tokenizer, splits["wikitext"], max_length=256, batch_size=4, progress=False)
        details["wikitext"] = {k: v for k, v in ppl.items() if k != "items"}
        summary["wikitext_ppl"] = ppl["perplexity"]
    return {"summary": summary, "details": details, "eval_time_s": round(time.time() - started, 1)}


# -------------------------------------------------------------------------------------------------- full fine-tuning
_MLP = re.compile(r"\.\d+\.mlp\.")


def set_trainable(model: Any, mode: str) -> list[str]:
    """Train only what ``mode`` trains (``requires_grad``): every attention projection's weight and bias (``full``),
    plus every parameter under a decoder layer's ``mlp`` (``full-mlp``). Returns the trained parameter names."""
    attention = {path for paths in AttentionGeometry.from_model(model).projections(model).values()
                 for path in paths.values()}  # fmt: skip
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad = name.rpartition(".")[0] in attention or (mode == "full-mlp" and bool(_MLP.search(name)))
        if param.requires_grad:
            trained.append(name)
    if mode == "full-mlp" and not any(_MLP.search(n) for n in trained):
        raise ValueError(f"{type(model).__name__} has no '<layer>.mlp.' parameters; --mode full-mlp cannot find them.")
    return trained


def train_full(model: Any, tokenizer: Any, train_data: list[dict], skip: dict[int, list[int]], settings: dict,
               seed: int, learning_rate: float, output_dir: str) -> FrozenHeads | None:  # fmt: skip
    """Fine-tune ``model`` in place in ``settings["mode"]`` (``full`` / ``full-mlp``), with ``skip``'s heads frozen
    by ``cast_peft.freeze_heads`` (no handle when nothing is skipped: plain full fine-tuning).

    The budget is the LoRA study's: ``cast_peft.training.train_adapter``'s `TrainingArguments` (AdamW, linear decay,
    no warm-up, no weight decay, clipping at 1.0), its dataset and collator, its seeding (``seed`` and ``data_seed``:
    the same data order per seed as every other method), ``steps`` and ``batch_size``; only the learning rate is the
    mode's own (calibrated, see ``tradeoff.calibrate``). Returns the ``FrozenHeads`` handle (still installed).
    """
    dataset = TokenizedDataset(tokenizer, train_data, fit_max_length(model, settings["max_length"]))
    transformers.set_seed(seed)
    set_trainable(model, settings["mode"])
    handle = freeze_heads(model, skip) if skip else None
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=settings["steps"], learning_rate=learning_rate,
        per_device_train_batch_size=settings["batch_size"], weight_decay=0.0, seed=seed, data_seed=seed,
        logging_steps=max(1, settings["steps"] // 4), save_strategy="no", report_to="none",
        remove_unused_columns=False, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = functools.partial(collate, pad_token_id=pad_id)
    transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    model.eval()
    return handle


def pick_learning_rate(refusal: dict[float, dict[str, float]], target: float) -> float | None:
    """The calibration rule: the smallest candidate learning rate whose all-heads run reaches held-out harmful
    refusal ``>= target`` in every calibrated regime (``refusal[lr][regime]``); ``None`` when none does.

    Why the smallest: the regime is then one where training does what safety SFT is for (matched safety) with the
    least over-training, so over-refusal and drift have room to differ between skip sets instead of sitting at their
    ceiling (the one-seed measurement at 1e-4 had 95% XSTest over-refusal for all heads).
    """
    ok = [lr for lr, by_regime in refusal.items() if by_regime and all(v >= target for v in by_regime.values())]
    return min(ok) if ok else None


# ------------------------------------------------------------------------------------------------- PCGrad baseline
def _row_keys(batch: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def _token_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of next-token cross-entropy on the labelled (response) tokens, and the batch's token count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    return ce.sum(-1), (labels != IGNORE_INDEX).sum()


def make_pcgrad_trainer(safety_pairs: list[dict], utility_reference: list[dict], tokenizer: Any,
                        settings: dict[str, Any], log: list[dict]) -> type[transformers.Trainer]:  # fmt: skip
    """A ``transformers.Trainer`` whose step is PCGrad-style (Yu et al. 2020) on plain LoRA, globally over all LoRA
    parameters: with ``g_s`` the gradient of the batch's safety tokens and ``g_u`` the utility direction, when
    ``⟨g_s, g_u⟩ < 0`` the update uses ``g_s − ⟨g_s, g_u⟩/‖g_u‖² g_u`` (the conflicting component removed) plus, in
    the mixed regime, ``g_u`` itself.

    ``g_u`` comes from the batch's own utility rows (mixed regime) or, when the batch has none (safety-only regime),
    from the next batch of ``utility_reference`` (the map's utility calibration pairs, cycled): one extra forward and
    backward per step. Both parts are normalised by the batch's token count, so without conflict the step equals the
    plain LoRA step. Everything else (data order, optimizer, schedule, clipping) is the Trainer's, as for the other
    methods. ``log`` receives ``{"cos", "projected"}`` per step.
    """
    safety_keys = set(_row_keys(make_batches(tokenizer, safety_pairs, len(safety_pairs), settings["max_length"])[0]))
    reference = make_batches(tokenizer, utility_reference, settings["batch_size"], settings["max_length"])

    class PCGradTrainer(transformers.Trainer):
        # training_step(model, inputs, num_items_in_batch) checked against transformers 5.24.
        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102
            model.train()
            inputs = self._prepare_inputs(inputs)
            params = [p for p in model.parameters() if p.requires_grad]
            is_safety = torch.tensor([key in safety_keys for key in _row_keys(inputs)], device=params[0].device)
            row_loss, n_tokens = _token_losses(model, inputs)
            n_tokens = n_tokens.clamp_min(1)
            loss_s, loss_u = row_loss[is_safety].sum() / n_tokens, row_loss[~is_safety].sum() / n_tokens

            def flat_grad(loss: torch.Tensor, retain: bool) -> torch.Tensor:
                grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
                return torch.cat(
                    [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
                )

            has_u = bool((~is_safety).any())
            g_s = flat_grad(loss_s, retain=has_u) if bool(is_safety.any()) else None
            if has_u:
                g_u, direction = flat_grad(loss_u, retain=False), None
            else:
                g_u = None
                ref = {k: v.to(params[0].device) for k, v in reference[len(log) % len(reference)].items()}
                ref_loss, ref_tokens = _token_losses(model, ref)
                direction = flat_grad(ref_loss.sum() / ref_tokens.clamp_min(1), retain=False)
            direction = g_u if direction is None else direction
            total = torch.zeros_like(direction) if g_s is None else g_s
            if g_s is not None:
                dot, norm2 = torch.dot(g_s, direction), direction.square().sum()
                cos = float(dot / (g_s.norm() * direction.norm()).clamp_min(1e-30))
                projected = bool(dot < 0 and norm2 > 0)
                if projected:
                    total = g_s - dot / norm2 * direction
                log.append({"cos": cos, "projected": projected})
            if g_u is not None:
                total = total + g_u
            offset = 0
            for p in params:
                g = total[offset : offset + p.numel()].view_as(p).to(p.dtype)
                p.grad = g if p.grad is None else p.grad + g
                offset += p.numel()
            return (loss_s + loss_u).detach()

    return PCGradTrainer


@contextlib.contextmanager
def trainer_class(cls: type[transformers.Trainer]) -> Iterator[None]:
    """Make ``cast_peft.training.train_adapter`` build ``cls`` instead of ``transformers.Trainer``.

    ``train_adapter`` imports ``transformers.Trainer`` when it is called (cast-peft 0.1.0), so swapping the module
    attribute for the duration of the call gives the PCGrad baseline exactly the other methods' training setup.
    """
    original = transformers.Trainer
    transformers.Trainer = cls
    try:
        yield
    finally:
        transformers.Trainer = original
