"""Building blocks of ``benchmarks/tradeoff.py``: profiles, data splits, methods, the PCGrad-style trainer and the
evaluation suite (the report, plot and verdict are written by ``tradeoff.py`` itself).

Everything here calls the library (``cast_peft.data``, ``cast_peft.evaluation``, ``cast_peft.training``); nothing is
re-implemented except the PCGrad step, which is a benchmark baseline and not part of cast-peft.
"""

from __future__ import annotations

import contextlib
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

from cast_peft import evaluation as ev
from cast_peft.data import IGNORE_INDEX, make_batches


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
        max_new_tokens=8, self_target_tokens=8, n_lookalike=4,
    ),
    "reduced": dict(
        seeds=[0, 1, 2], regimes=["safety", "mixed"], ratios=[0.1, 0.2], steps=40, batch_size=8, max_length=128,
        learning_rate=1e-3, rank=8, n_calibration=256, n_harmful=60, n_safe=80, n_helpful=50, mc_sets=["arc_easy"],
        n_mc=100, n_ppl=10, max_new_tokens=32, self_target_tokens=64, n_lookalike=None,
    ),
    "full": dict(
        seeds=[0, 1, 2], regimes=["safety", "mixed"], ratios=[0.05, 0.1, 0.2, 0.4], steps=100, batch_size=8,
        max_length=128, learning_rate=1e-3, rank=8, n_calibration=256, n_harmful=100, n_safe=100, n_helpful=100,
        mc_sets=["arc_easy", "piqa"], n_mc=200, n_ppl=40, max_new_tokens=48, self_target_tokens=64, n_lookalike=None,
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
    return FINGERPRINT_KEYS + (LOOKALIKE_KEYS if settings.get("study", "generic") == "lookalike" else ())


def fingerprint(settings: dict[str, Any]) -> str:
    """Short hash of the settings that define a run's measurement (seeds, regimes and methods excluded)."""
    text = json.dumps({k: settings[k] for k in fingerprint_keys(settings)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------------------ methods
_METHOD = re.compile(r"^(base|lora|pcgrad)$|^(cast|pilot|random|oc|fs)-(\d+)$")
#: ``ConflictMap.select`` policy of each head-skipping method (``pilot`` selects like ``cast``, on the pilot map).
POLICY = {"cast": "score", "pilot": "score", "random": "random", "oc": "oc", "fs": "fs"}
#: Run seed of the pilot LoRA whose merged weights the ``pilot-P`` maps are diagnosed on; not one of the study's seeds.
PILOT_SEED = 1000


def parse_method(name: str) -> tuple[str, float | None]:
    """``"cast-10"`` -> ``("cast", 0.1)``; ``"lora"`` -> ``("lora", None)``. Raises ``ValueError`` on other names."""
    match = _METHOD.match(name)
    if not match:
        raise ValueError(f"Unknown method {name!r}: use base, lora, pcgrad or cast-/pilot-/random-/oc-/fs-<percent>.")
    if match.group(1):
        return match.group(1), None
    return match.group(2), int(match.group(3)) / 100


def default_methods(ratios: list[float]) -> list[str]:
    """All methods of the study, in the order they run (cheap and most informative first)."""
    pct = [round(r * 100) for r in ratios]
    first = round(0.1 * 100) if 0.1 in ratios else pct[0]
    return (["base", "lora"] + [f"cast-{p}" for p in pct] + [f"random-{p}" for p in pct]
            + [f"oc-{first}", f"fs-{first}", "pcgrad", f"pilot-{first}"])  # fmt: skip


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
def evaluate(model: Any, tokenizer: Any, splits: dict[str, Any], settings: dict[str, Any], *, drift: bool) -> dict:
    """The same metrics, decoding and refusal classifier for every method.

    Returns ``{"summary": {metric: value}, "details": {...per-item outputs...}, "eval_time_s"}``. ``drift``: compute
    KL(base || model) on the self-instruct prompts (``model`` must be a ``PeftModel``; the base is its adapter
    disabled); the base model's own drift is 0 by definition.
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
        details["kl_drift"] = ev.kl_drift(model, None, tokenizer, [r["prompt"] for r in helpful], batch_size=8,
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
