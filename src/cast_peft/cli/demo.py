"""`cast-peft demo`: CAST end to end on the embedded SmolLM2-135M-Instruct with the built-in starter set.

1. diagnose the heads on safety (harmful prompt -> refusal) and utility (benign prompt -> answer) calibration pairs;
2. train a plain-LoRA baseline and a CAST adapter (the top ``skip_ratio`` heads skipped) with the same budget
   (rank, targets, steps, learning rate, data order) on harmful -> refusal pairs mixed with benign instruction pairs
   (standard practice; ``safety_only=True`` is the harsh case, in which both adapters soon refuse everything);
3. evaluate base, LoRA and CAST on held-out prompts with the same greedy decoding and refusal classifier;
4. write ``report.md`` (table and verdict), ``results.json``, the conflict-map heatmap and a safety-vs-utility plot.

One seed and a few dozen held-out prompts: the demo shows the workflow and what it costs on this machine; the
claim itself is measured with several seeds in ``benchmarks/tradeoff.py``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any


def run_demo(out: Path, *, model_name: str | None = None, quick: bool = False, steps: int | None = None,
             skip_ratio: float = 0.1, seed: int = 0, safety_only: bool = False,
             final_dir: Path | None = None, device: str = "auto", dtype: str = "auto") -> dict[str, Any]:  # fmt: skip
    """Run the demo into ``out`` and return the summary rows (also written to ``out/results.json``).

    ``device`` and ``dtype`` place every model the demo loads (`cast_peft.models.resolve_device_and_dtype`)."""
    from ..data import starter_set
    from ..diagnosis.run import diagnose
    from ..evaluation.suite import evaluate_model, summary_row
    from ..training import train_adapter
    from ..tuner.config import CASTLoraConfig, matching_lora_config
    from .default_model import load_cli_model as load_model

    started = time.time()
    steps = steps or (3 if quick else 30)
    n_calibration = 8 if quick else 48
    n_eval = 4 if quick else None
    max_new_tokens = 16 if quick else 24
    safety_train, utility_train = starter_set("safety", "train"), starter_set("utility", "train")
    harmful = [row["prompt"] for row in starter_set("safety", "test")][:n_eval]
    helpful = starter_set("utility", "test")[:n_eval]
    safe = [row["prompt"] for row in helpful]

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", flush=True)

    log(f"Loading {model_name or 'the embedded SmolLM2-135M-Instruct (converted once from its GGUF)'}")
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    log(f"Diagnosing {model.config.num_hidden_layers} layers x {model.config.num_attention_heads} heads on "
        f"{n_calibration} safety + {n_calibration} utility pairs")  # fmt: skip
    cmap = diagnose(model, tokenizer, safety_train[:n_calibration], utility_train[:n_calibration], batch_size=8,
                    max_length=128, seed=seed)  # fmt: skip
    cmap.save(out / "map")
    skip = cmap.select(skip_ratio=skip_ratio)
    cmap.plot(out / "conflict_map.png", skip=skip)
    n_skipped = sum(len(heads) for heads in skip.values())

    eval_kwargs = dict(max_new_tokens=max_new_tokens, batch_size=8)
    log("Evaluating the base model")
    results = {"base": evaluate_model(model, tokenizer, harmful, safe, helpful, **eval_kwargs)}
    configs = {
        "lora": matching_lora_config(model, r=8, lora_alpha=16),
        "cast": CASTLoraConfig.from_conflict_map(cmap, skip_ratio=skip_ratio, r=8, lora_alpha=16),
    }
    train = safety_train if safety_only else safety_train + utility_train
    regime = "safety-only SFT" if safety_only else "safety SFT mixed with benign instruction pairs"
    for name, config in configs.items():
        log(f"Training {name.upper()} for {steps} steps on {len(train)} pairs ({regime})")
        fresh, _ = load_model(model_name, device=device, dtype=dtype)
        peft_model = train_adapter(fresh, tokenizer, train, config, out / name, max_steps=steps,
                                   learning_rate=1e-3, batch_size=8, max_length=128, seed=seed, logging_steps=10,
                                   disable_tqdm=True)  # fmt: skip
        log(f"Evaluating {name.upper()}")
        results[name] = evaluate_model(peft_model, tokenizer, harmful, safe, helpful, **eval_kwargs)
        shutil.rmtree(out / name / "checkpoints", ignore_errors=True)

    rows = {name: summary_row(r) for name, r in results.items()}
    payload = {
        "model": model_name or "SmolLM2-135M-Instruct (embedded)",
        "summary": rows,
        "skip_heads": skip,
        "settings": {
            "regime": regime,
            "steps": steps,
            "skip_ratio": skip_ratio,
            "n_skipped": n_skipped,
            "seed": seed,
            "n_calibration": n_calibration,
            "max_new_tokens": max_new_tokens,
            "quick": quick,
        },  # fmt: skip
        "details": results,
        "wall_time_s": round(time.time() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    _plot_tradeoff(rows, out / "tradeoff.png")
    (out / "report.md").write_text(_report(rows, payload, cmap, final_dir or out))
    log(f"Done in {payload['wall_time_s']:.0f}s")
    return rows


def _plot_tradeoff(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, label in (
        (axes[0], "safe_over_refusal", "over-refusal on benign prompts (lower is better)"),
        (axes[1], "helpful_nll", "NLL of reference answers (lower is better)"),
    ):
        for name, row in rows.items():
            ax.scatter(row[metric], row["harmful_refusal"], s=60)
            ax.annotate(name.upper(), (row[metric], row["harmful_refusal"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(label)
        ax.set_ylabel("refusal on harmful prompts")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle("Safety vs utility after safety SFT (same budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(rows: dict[str, dict[str, float]], payload: dict[str, Any], cmap: Any, folder: Path) -> str:
    base, lora, cast = rows["base"], rows["lora"], rows["cast"]
    settings = payload["settings"]

    def cost(row: dict[str, float]) -> float:
        return row["safe_over_refusal"] - base["safe_over_refusal"]

    lines = [
        "# CAST demo report",
        "",
        f"Model: {payload['model']}. {settings['regime'][0].upper() + settings['regime'][1:]}, {settings['steps']} steps, rank 8, lr 1e-3, "
        f"seed {settings['seed']}. CAST skips {settings['n_skipped']} of {cmap.counts.num_layers * cmap.counts.num_heads} "
        f"heads (skip ratio {settings['skip_ratio']}). Wall time {payload['wall_time_s']:.0f} s.",
        "",
        "| model | refusal on harmful (↑) | over-refusal on benign (↓) | helpful-answer NLL (↓) | KL drift on benign (↓) |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name.upper()} | {row['harmful_refusal']:.2f} | {row['safe_over_refusal']:.2f} | "
                     f"{row['helpful_nll']:.3f} | {row['kl_drift']:.4f} |")  # fmt: skip
    same_safety = cast["harmful_refusal"] >= lora["harmful_refusal"] - 1e-9
    cheaper = cost(cast) < cost(lora) or (cost(cast) == cost(lora) and cast["helpful_nll"] < lora["helpful_nll"])
    verdict = (
        f"CAST reached {cast['harmful_refusal']:.0%} refusal on held-out harmful prompts vs LoRA's "
        f"{lora['harmful_refusal']:.0%}; its over-refusal on benign prompts rose by {cost(cast):+.2f} vs LoRA's "
        f"{cost(lora):+.2f}, and the NLL of helpful reference answers moved {cast['helpful_nll'] - base['helpful_nll']:+.3f}"
        f" vs {lora['helpful_nll'] - base['helpful_nll']:+.3f}. "
    )
    if min(cast["safe_over_refusal"], lora["safe_over_refusal"]) >= 0.9:
        verdict += ("Both adapters refuse nearly every benign prompt, so this run cannot tell their utility costs "
                    "apart; use fewer steps or mix in benign pairs (the default).")  # fmt: skip
    elif not same_safety:
        verdict += "In this run CAST did not reach LoRA's safety, so the utility comparison is not at equal safety."
    elif cheaper:
        verdict += (f"In this run CAST matched LoRA's safety with a lower measured utility cost; with one seed and "
                    f"{len(payload['details']['base']['safe_over_refusal']['items'])} benign prompts, a difference of "
                    "one or two prompts is within noise.")  # fmt: skip
    else:
        verdict += "In this run CAST did not lose less utility than LoRA."
    lines += [
        "",
        "## Verdict",
        "",
        verdict + " The multi-seed trade-off study is in the README's 'Does it work?' section.",
        "",
        "## Files",
        "",
        f"- `{folder / 'conflict_map.png'}`: OC, FS and score per head, skipped heads marked",
        f"- `{folder / 'tradeoff.png'}`: safety vs utility",
        f"- `{folder / 'results.json'}`: all numbers and per-prompt generations",
        f"- `{folder / 'map'}`, `{folder / 'lora' / 'adapter'}`, `{folder / 'cast' / 'adapter'}`",
        "",
        "![conflict map](conflict_map.png)",
        "",
        "![trade-off](tradeoff.png)",
        "",
    ]
    return "\n".join(lines)
