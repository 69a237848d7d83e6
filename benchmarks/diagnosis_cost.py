"""Cost of a conflict map vs plain gradient accumulation on the same calibration tokens (SmolLM2-135M-Instruct).

Every configuration runs in its own process (so peak memory is its own), on the same batches: the first
``--examples`` safety pairs (Safety-Tuned LLaMAs training set) and utility pairs (alpaca-libre), batch size 8.

* ``plain_all``: requires_grad on every parameter, one fwd+bwd per batch per objective, gradients kept per objective
  (what "plain gradient accumulation" costs in a training loop);
* ``plain_attn``: the same, with requires_grad on the attention projection weights only (autograd computes exactly
  the gradients the map needs, nothing else);
* ``map_exact`` / ``map_sketch``: ``cast_peft.diagnose`` (OC + Taylor FS) with exact / sketched (default
  ``sketch_dim``) accumulators;
* ``ablation`` / ``taylor_small``: exact ablation FS vs the Taylor map on a smaller set (ablation is layers x heads
  forward passes per batch).

The sketch's error is measured against the exact map on the same data (directly for the default width; for other
widths the exact accumulators are projected with the same seeded matrices, which is what the sketch path computes).

Usage::

    python benchmarks/diagnosis_cost.py --examples 16 --max-length 128 --threads 1 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


CONFIGS = ("plain_all", "plain_attn", "map_exact", "map_sketch", "ablation", "taylor_small")
SKETCH_DIMS = (64, 128, 256, 512)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
    """Samples this process's RSS every few ms in a thread: the peak of a section (ru_maxrss would include loading)."""

    def __enter__(self) -> _PeakRss:
        self.peak, self._stop = _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _batches(tokenizer, examples: int, max_length: int, batch_size: int = 8):
    from shared_data import load_alpaca_libre, load_safety_tuned_llamas_train

    from cast_peft.data import make_batches

    safety = load_safety_tuned_llamas_train()[:examples]
    utility = load_alpaca_libre(limit=examples)
    return (
        make_batches(tokenizer, safety, batch_size=batch_size, max_length=max_length),
        make_batches(tokenizer, utility, batch_size=batch_size, max_length=max_length),
    )


def _plain(model, geometry, batch_sets, attention_only: bool) -> None:
    from cast_peft.diagnosis.ablation import row_losses

    model.eval()
    modules = dict(model.named_modules())
    model.requires_grad_(not attention_only)
    if attention_only:
        for paths in geometry.projections(model).values():
            for path in paths.values():
                modules[path].weight.requires_grad_(True)
    kept = []
    for batches in batch_sets:
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for batch in batches:
            (row_losses(model, batch).sum() / n).backward()
        kept.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)


def _sketched_map(run, k: int, seed: int):
    """The map the sketch path would give with width k: the exact blocks times the same seeded matrices."""
    from cast_peft.conflict_map import ConflictMap
    from cast_peft.diagnosis.hooks import _Sketch

    sketch, counts = _Sketch(k, seed), run.geometry.counts
    stats = {role: torch.zeros(counts.num_layers, run.geometry.units(role), 3, dtype=torch.float64) for role in "qkvo"}
    for p in run.projections:
        for role in p.roles:
            blocks = []
            for objective in ("safety", "utility"):
                weight, bias = run.grads[objective].blocks(p, role)
                weight = weight.view(weight.shape[0], counts.head_dim, -1)
                projected = (weight @ sketch.matrix(weight.shape[-1], weight.device)).flatten(1).double()
                blocks.append(torch.cat([projected, bias.double()], 1) if bias is not None else projected)
            s, u = blocks
            stats[role][p.layer] += torch.stack([(s * s).sum(1), (u * u).sum(1), (s * u).sum(1)], 1)
    return ConflictMap(counts, stats, torch.zeros(counts.num_layers, counts.num_heads), kv_scoring="separate")


def worker(config: str, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(args.threads)
    from cast_peft.diagnosis import Diagnosis
    from cast_peft.geometry import AttentionGeometry
    from cast_peft.models import load_model

    model, tokenizer = load_model()
    small = config in ("ablation", "taylor_small")
    examples = args.ablation_examples if small else args.examples
    max_length = args.ablation_max_length if small else args.max_length
    safety, utility = _batches(tokenizer, examples, max_length)
    geometry = AttentionGeometry.from_model(model)
    result: dict = {
        "config": config,
        "examples_per_objective": examples,
        "max_length": max_length,
        "tokens": sum(int(b["attention_mask"].sum()) for b in safety + utility),
        "response_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in safety + utility),
    }
    base_rss = _rss_mib()
    with _PeakRss() as peak:
        start = time.perf_counter()
        if config.startswith("plain"):
            _plain(model, geometry, (safety, utility), attention_only=config == "plain_attn")
        else:
            options = {
                "map_exact": {"accumulation": "exact"},
                "map_sketch": {"accumulation": "sketch"},  # the default sketch_dim
                "ablation": {"sensitivity": "ablation", "accumulation": "exact"},
                "taylor_small": {"accumulation": "exact"},
            }[config]
            run = Diagnosis(model, progress=False, **options)
            run.add("safety", safety)
            run.add("utility", utility)
            cmap = run.conflict_map()
        result["seconds"] = time.perf_counter() - start
    result["peak_rss_mib"] = peak.peak
    result["rss_after_load_mib"] = base_rss
    result["peak_extra_mib"] = peak.peak - base_rss
    if not config.startswith("plain"):
        # safetensors, not torch.save: the parent reads it back without unpickling anything.
        tensors = {"oc": cmap.oc, "fs": cmap.fs, "taylor": cmap.extras["taylor_signed"]}
        save_file(
            {k: t.detach().contiguous().clone() for k, t in tensors.items()}, str(out.with_suffix(".safetensors"))
        )
        if config == "map_exact":
            # OC over q/o (separate, the default), k/v per KV head, and q/k/v/o per head (shared).
            exact = {
                "q/o": cmap.rescore(kv_scoring="separate").oc,
                "k/v": cmap.rescore(kv_scoring="separate").oc_kv,
                "q/k/v/o": cmap.rescore(kv_scoring="shared").oc,
            }
            result["sketch_oc"] = {}
            for k in SKETCH_DIMS:
                sketched = _sketched_map(run, k, seed=0)
                approx = {
                    "q/o": sketched.oc,
                    "k/v": sketched.oc_kv,
                    "q/k/v/o": sketched.rescore(kv_scoring="shared").oc,
                }
                result["sketch_oc"][k] = {
                    part: {
                        "mean_abs_error": float((approx[part] - exact[part]).abs().mean()),
                        "max_abs_error": float((approx[part] - exact[part]).abs().max()),
                        "spearman": _spearman(approx[part], exact[part]),
                    }
                    for part in exact
                }
    out.write_text(json.dumps(result))


def _spearman(a, b) -> float:
    from cast_peft.conflict_map import spearman

    return spearman(a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=16, help="calibration pairs per objective")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--ablation-examples", type=int, default=1)
    parser.add_argument("--ablation-max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args, args.result)
        return
    results, tensors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            path = Path(tmp) / f"{config}.json"
            command = [sys.executable, __file__, "--worker", config, "--result", str(path)] + sys.argv[1:]
            print(f"running {config} ...", flush=True)
            subprocess.run(command, check=True)
            results[config] = json.loads(path.read_text())
            if path.with_suffix(".safetensors").exists():
                tensors[config] = load_file(str(path.with_suffix(".safetensors")))
            print(json.dumps(results[config]), flush=True)
    summary = _summary(results, tensors)
    args.out.mkdir(parents=True, exist_ok=True)
    command_line = "python benchmarks/diagnosis_cost.py " + " ".join(sys.argv[1:])
    (args.out / "diagnosis_cost.json").write_text(
        json.dumps(
            {
                "command": command_line,
                "results": results,
                "summary": summary,
                "torch": torch.__version__,
                "cpu_threads": args.threads,
            },
            indent=2,
        )
    )
    (args.out / "diagnosis_cost.md").write_text(_markdown(command_line, results, summary))
    print((args.out / "diagnosis_cost.md").read_text())


def _summary(results: dict, tensors: dict) -> dict:
    summary = {}
    if "map_exact" in results:
        exact = results["map_exact"]
        for base in ("plain_all", "plain_attn"):
            if base in results:
                summary[f"time_ratio_map_vs_{base}"] = exact["seconds"] / results[base]["seconds"]
                summary[f"memory_ratio_map_vs_{base}"] = exact["peak_extra_mib"] / results[base]["peak_extra_mib"]
        if "map_sketch" in tensors:
            from cast_peft.diagnosis import DiagnosisOptions

            dim = DiagnosisOptions().sketch_dim
            error = (tensors["map_sketch"]["oc"] - tensors["map_exact"]["oc"]).abs()
            summary[f"sketch{dim}_direct_oc_mean_abs_error"] = float(error.mean())
            summary[f"sketch{dim}_direct_oc_max_abs_error"] = float(error.max())
            summary[f"sketch{dim}_direct_spearman_oc_vs_exact"] = _spearman(
                tensors["map_sketch"]["oc"], tensors["map_exact"]["oc"]
            )
    if "ablation" in results and "taylor_small" in results:
        summary["time_ratio_ablation_vs_taylor"] = results["ablation"]["seconds"] / results["taylor_small"]["seconds"]
        summary["spearman_taylor_vs_ablation_fs"] = _spearman(
            tensors["ablation"]["fs"], tensors["ablation"]["taylor"].abs()
        )
    return summary


def _markdown(command: str, results: dict, summary: dict) -> str:
    lines = [
        "# Diagnosis cost: SmolLM2-135M-Instruct, CPU",
        "",
        f"Command: `{command}`",
        "",
        "| config | examples/objective | tokens | seconds | peak RSS MiB | peak extra MiB (over loaded model) |",
        "|---|---|---|---|---|---|",
    ]
    for config, r in results.items():
        lines.append(
            f"| {config} | {r['examples_per_objective']} | {r['tokens']} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {r['peak_extra_mib']:.0f} |"
        )
    lines += ["", "| summary | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" for key, value in summary.items()]
    sketch = results.get("map_exact", {}).get("sketch_oc")
    if sketch:
        lines += [
            "",
            "Sketch error of OC (cosine units) vs the exact map on the same data, by the parameters OC is taken "
            'over (q/o: default `kv_scoring="separate"` per query head; k/v: per KV head; q/k/v/o: '
            '`"shared"`). The sketch path computes exactly these projections of the exact gradients.',
            "",
            "| sketch_dim | OC over | mean abs error | max abs error | Spearman with exact |",
            "|---|---|---|---|---|",
        ]
        for k, parts in sketch.items():
            lines += [
                f"| {k} | {part} | {v['mean_abs_error']:.4f} | {v['max_abs_error']:.4f} | {v['spearman']:.4f} |"
                for part, v in parts.items()
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
