"""Split-half stability of the conflict map vs calibration size (SmolLM2-135M-Instruct).

The safety pairs (Safety-Tuned LLaMAs training set) and utility pairs (alpaca-libre) are shuffled with a fixed seed
and split into two disjoint halves A and B. Each half is diagnosed incrementally (``Diagnosis.add``), and at every
size n (examples per objective) the maps A_n and B_n are compared: Spearman correlation of OC, FS and score over all
heads, and the overlap of their top-``skip_ratio`` skip sets. Every scoring variant (kv_scoring x normalisation x
combination) is evaluated from the same measurements (``ConflictMap.rescore``). The sizes needed for a Spearman of
0.8 are extrapolated with the Spearman-Brown formula from the largest measured size (reliability of a mean of k
times as many samples: ``k r / (1 + (k - 1) r)``).

The map of half A at the largest size is also saved, reloaded and plotted into the output folder.

Usage::

    python benchmarks/map_stability.py --sizes 8 16 32 64 --max-length 128 --threads 1 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch


VARIANTS = [
    {"kv_scoring": kv, "normalization": norm, "combine": comb}
    for kv, norm, comb in itertools.product(("shared", "separate"), ("rank", "minmax"), ("product", "sum"))
]


def _overlap(x: dict, y: dict) -> float:
    first = {(layer, h) for layer, heads in x.items() for h in heads}
    second = {(layer, h) for layer, heads in y.items() for h in heads}
    return len(first & second) / len(first) if first else math.nan


def _needed(r: float, n: int, target: float = 0.8) -> float:
    """Spearman-Brown: examples per objective for reliability ``target`` given ``r`` at ``n``."""
    if not r > 0:
        return math.inf
    return n * target * (1 - r) / (r * (1 - target)) if r < target else float(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64], help="examples per objective")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--skip-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from shared_data import load_alpaca_libre, load_safety_tuned_llamas_train

    from cast_peft.conflict_map import ConflictMap, spearman
    from cast_peft.data import make_batches
    from cast_peft.diagnosis import Diagnosis
    from cast_peft.models import load_model

    model, tokenizer = load_model()
    sizes = sorted(args.sizes)
    top = sizes[-1]
    pools = {"safety": load_safety_tuned_llamas_train(), "utility": load_alpaca_libre()}
    halves: dict[str, dict[str, list]] = {"A": {}, "B": {}}
    for objective, pool in pools.items():
        random.Random(args.seed).shuffle(pool)
        halves["A"][objective], halves["B"][objective] = pool[:top], pool[top : 2 * top]

    maps: dict[str, dict[int, ConflictMap]] = {"A": {}, "B": {}}
    start = time.perf_counter()
    for half, data in halves.items():
        run = Diagnosis(model, progress=False)
        done = 0
        for n in sizes:
            for objective in ("safety", "utility"):
                run.add(
                    objective,
                    make_batches(
                        tokenizer, data[objective][done:n], batch_size=args.batch_size, max_length=args.max_length
                    ),
                )
            done = n
            maps[half][n] = run.conflict_map()
            print(f"half {half}: n={n} done after {time.perf_counter() - start:.0f}s", flush=True)

    curve = []
    for n in sizes:
        row: dict = {"examples_per_objective": n, "variants": []}
        for variant in VARIANTS:
            a, b = maps["A"][n].rescore(**variant), maps["B"][n].rescore(**variant)
            result = {**variant, **a.stability(b, skip_ratio=args.skip_ratio)}
            # How much of the score's skip set the single-metric controls pick too (mean over both halves): a score
            # that is stable only because it reduces to FS or OC alone shows up here.
            for control in ("fs", "oc"):
                result[f"shared_with_{control}_control"] = (
                    sum(
                        _overlap(
                            m.select(skip_ratio=args.skip_ratio), m.select(skip_ratio=args.skip_ratio, policy=control)
                        )
                        for m in (a, b)
                    )
                    / 2
                )
            if variant["kv_scoring"] == "separate":
                result["spearman_score_kv"] = spearman(a.score_kv, b.score_kv)
            row["variants"].append(result)
        shared, separate = maps["A"][n].rescore(kv_scoring="shared"), maps["A"][n].rescore(kv_scoring="separate")
        row["spearman_oc_shared_vs_q_o_only"] = spearman(shared.oc, separate.oc)
        curve.append(row)

    largest = curve[-1]
    extrapolation = [
        {
            **{k: v[k] for k in ("kv_scoring", "normalization", "combine")},
            "needed_for_spearman_0.8": {
                metric: _needed(v[metric], top) for metric in ("spearman_oc", "spearman_fs", "spearman_score")
            },
        }
        for v in largest["variants"]
    ]

    args.out.mkdir(parents=True, exist_ok=True)
    final = maps["A"][top]
    folder = final.save(args.out / "smollm2_map")
    reloaded = ConflictMap.load(folder)
    assert all(torch.equal(t, reloaded.tensors()[k]) for k, t in final.tensors().items())
    reloaded.plot(args.out / "smollm2_map.png", skip_ratio=args.skip_ratio)
    command = "python benchmarks/map_stability.py " + " ".join(sys.argv[1:])
    from cast_peft.conflict_map import DEFAULT_COMBINE, DEFAULT_KV_SCORING, DEFAULT_NORMALIZATION

    default = {"kv_scoring": DEFAULT_KV_SCORING, "normalization": DEFAULT_NORMALIZATION, "combine": DEFAULT_COMBINE}
    report = {
        "command": command,
        "seconds": time.perf_counter() - start,
        "max_length": args.max_length,
        "skip_ratio": args.skip_ratio,
        "heads": final.score.numel(),
        "default": default,
        "curve": curve,
        "extrapolation": extrapolation,
    }
    (args.out / "map_stability.json").write_text(json.dumps(report, indent=2))
    (args.out / "map_stability.md").write_text(_markdown(report))
    _plot_curve(report, args.out / "map_stability.png")
    print((args.out / "map_stability.md").read_text())


def _markdown(report: dict) -> str:
    lines = [
        "# Conflict-map split-half stability: SmolLM2-135M-Instruct",
        "",
        f"Command: `{report['command']}` ({report['seconds'] / 60:.1f} min on CPU)",
        "",
        f"Spearman over all {report['heads']} heads between maps from two disjoint halves; overlap = shared fraction of the "
        f"top-{report['skip_ratio']:.0%} skip sets. Taylor FS.",
        "",
    ]
    lines += [
        'Columns ∩FS / ∩OC: fraction of the score\'s skip set that the budget-matched `policy="fs"` / '
        '`"oc"` controls also pick (same map).',
        "",
    ]
    lines += [
        "| n/objective | kv_scoring | norm | combine | ρ OC | ρ FS | ρ score | overlap | ρ score_kv | ∩FS | ∩OC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["curve"]:
        for v in row["variants"]:
            mark = " **(default)**" if all(v[k] == report["default"][k] for k in report["default"]) else ""
            lines.append(
                f"| {row['examples_per_objective']} | {v['kv_scoring']}{mark} | {v['normalization']} | "
                f"{v['combine']} | {v['spearman_oc']:.3f} | {v['spearman_fs']:.3f} | "
                f"{v['spearman_score']:.3f} | {v['overlap']:.2f} | {v.get('spearman_score_kv', math.nan):.3f} | "
                f"{v['shared_with_fs_control']:.2f} | {v['shared_with_oc_control']:.2f} |"
            )
    last = report["curve"][-1]["variants"]
    best_overlap = max(last, key=lambda v: v["overlap"])
    best_rho = max(last, key=lambda v: v["spearman_score"])
    lines += [
        "",
        f"At the largest size the highest skip-set overlap is {best_overlap['overlap']:.2f} "
        f"({best_overlap['kv_scoring']}, {best_overlap['normalization']}, {best_overlap['combine']}) and the "
        f"highest score correlation {best_rho['spearman_score']:.3f} ({best_rho['kv_scoring']}, "
        f"{best_rho['normalization']}, {best_rho['combine']}). One split per size: differences of a few "
        f"hundredths (or one head of the skip set, 1/{round(report['skip_ratio'] * report['heads'])}) are within "
        "noise.",
    ]
    lines += [
        "",
        "Spearman(OC over q/k/v/o, OC over q/o only), half A: "
        + ", ".join(
            f"n={row['examples_per_objective']}: {row['spearman_oc_shared_vs_q_o_only']:.3f}"
            for row in report["curve"]
        ),
    ]
    lines += [
        "",
        "Examples per objective needed for ρ = 0.8 (Spearman-Brown extrapolation from the largest size):",
        "",
        "| kv_scoring | norm | combine | OC | FS | score |",
        "|---|---|---|---|---|---|",
    ]
    for e in report["extrapolation"]:
        need = e["needed_for_spearman_0.8"]
        lines.append(
            f"| {e['kv_scoring']} | {e['normalization']} | {e['combine']} | {need['spearman_oc']:.0f} | "
            f"{need['spearman_fs']:.0f} | {need['spearman_score']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _plot_curve(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    sizes = [row["examples_per_objective"] for row in report["curve"]]
    shown = [
        (report["default"], "-", "default"),
        ({"kv_scoring": "shared", "normalization": "rank", "combine": "product"}, "--", "shared, rank, product"),
    ]
    for variant, style, label in shown:
        pick = [
            next(v for v in row["variants"] if all(v[k] == variant[k] for k in variant)) for row in report["curve"]
        ]
        ax.plot(sizes, [v["spearman_score"] for v in pick], "o" + style, label=f"ρ score ({label})")
        ax.plot(sizes, [v["overlap"] for v in pick], "s" + style, label=f"top-10% overlap ({label})")
    first = report["curve"]
    ax.plot(sizes, [row["variants"][0]["spearman_oc"] for row in first], "^:", label="ρ OC (q/k/v/o)")
    ax.plot(
        sizes,
        [next(v for v in row["variants"] if v["kv_scoring"] == "separate")["spearman_oc"] for row in first],
        "<:",
        label="ρ OC (q/o)",
    )
    ax.plot(sizes, [row["variants"][0]["spearman_fs"] for row in first], "v:", label="ρ FS (Taylor)")
    ax.axhline(0.8, color="gray", lw=0.8)
    ax.axhline(0.7, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration examples per objective (each half)")
    ax.set_ylabel("split-half agreement")
    ax.set_title("SmolLM2-135M-Instruct conflict-map stability")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
