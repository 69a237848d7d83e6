"""Compute and memory overhead of CAST-LoRA against plain peft LoRA, and of the merged CAST model against the base.

What is measured (all in one process, one run):

(a) Training. Two adapters on the same randomly initialised model with SmolLM2-135M's geometry (a
    ``LlamaForCausalLM`` built from a ``LlamaConfig`` with SmolLM2-135M-Instruct's sizes; no download):

    * ``lora``: peft ``LoraConfig(r=8, lora_alpha=16, target_modules=q/k/v/o_proj)``;
    * ``cast``: ``CASTLoraConfig(r=8, lora_alpha=16, skip_heads=...)`` on the same modules, skipping 10% of the
      heads (27 of 30 x 9), evenly spaced over the layer-major (layer, head) grid, so it is deterministic and spread
      over layers and heads.

    Both are built with the same seed (same base weights, same LoRA initialisation). One *training step* is
    forward + causal-LM loss + backward + ``AdamW.step()`` + ``zero_grad(set_to_none=True)`` on a fixed batch of
    random token ids (``--batch-size`` x ``--seq-len``). After ``--warmup`` untimed steps per variant, each repeat runs
    ``--steps`` timed steps of each variant, alternating step by step (A B A B ...), and which variant goes first
    alternates from repeat to repeat, so changes in machine load (other jobs) hit both variants alike. Each cast step
    and the lora step run right beside it form a pair; the headline ratio is the median over all ``repeats x steps``
    pair ratios (cast / lora), with a distribution-free 95% confidence interval for that median (order statistics
    of the pair ratios, binomial coverage) and the interquartile range of the pair ratios as the spread; per-repeat
    ratios of medians and pooled medians are in the JSON. The target counts as met when the median is <= 1.03, and
    as resolved when the upper end of the interval is too. Wall time (``time.perf_counter``, after
    ``cuda.synchronize`` on GPU) is the headline; on CPU the process CPU time (``time.process_time``, all threads) is
    reported too, because it leaves out the time spent waiting for a core held by another job, so on a shared
    machine it resolves a few-percent effect that the wall clock cannot.

    ``--threads`` defaults to 1: on a shared CPU a multi-threaded (OpenMP) torch step stalls whenever another job
    holds one of its cores (2-thread steps were seen to jump from 2 s to 20 s, and their CPU time with them, from
    spinning), which swamps a few-percent effect; one thread gives stable numbers. On a dedicated machine pass
    ``--threads $(nproc)``.

    Peak memory of a training step:

    * CUDA: ``torch.cuda.max_memory_allocated()`` over one step, after ``reset_peak_memory_stats``.
    * CPU: one step is run under ``torch.profiler`` with ``profile_memory=True``; every allocation and free of the
      c10 CPU allocator is an event with a signed byte count, and the peak of their running sum is the largest amount
      of tensor memory the step holds above what was live when it started (activations, gradients, optimizer
      temporaries, the mask products). The persistent part (parameters, buffers, AdamW state, all counted exactly
      from the tensors) is added to it. This is the CPU analogue of ``max_memory_allocated``; RSS is not used
      because its high-water mark is per process (both variants share one) and includes allocator caching and
      library code, and tracemalloc does not see torch's allocations at all.

    CAST's expected extra is small and known: ``HeadMaskedLinear`` computes ``weight * mask`` in every forward and
    autograd keeps that copy for the backward, i.e. one LoRA factor's worth of bytes per masked factor; the report
    prints that number next to the measured difference. Its time cost is also timed alone (``isolated_mask_cost``:
    forward + backward of each masked factor shape against the same factor unmasked, many short interleaved
    rounds), which bounds the true step overhead far more tightly than whole-step timings on a busy machine can.

(b) Inference. ``merge_and_unload()`` of the trained CAST model against a freshly built base model (same seed):
    forward over the same batch under ``torch.inference_mode()``, timed and interleaved the same way. Both are plain
    ``LlamaForCausalLM`` after merging, so the expected ratio is 1.00.

Results are printed and written to ``--out`` (markdown) with the raw numbers in a JSON file beside it.

    .venv/bin/python benchmarks/overhead.py                      # defaults; 8-10 min on 2 shared CPU cores
    .venv/bin/python benchmarks/overhead.py --repeats 3 --steps 2 --batch-size 1 --seq-len 32 --out /tmp/o.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import cast_peft
from cast_peft import CASTLoraConfig, HeadMaskedLinear


ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGET_RATIO = 1.03
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------- models
def smollm2_135m_config() -> LlamaConfig:
    """SmolLM2-135M-Instruct's architecture (values from its config.json); weights are random."""
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    )


def spread_skip_heads(num_layers: int, num_heads: int, ratio: float) -> dict[int, list[int]]:
    """``round(ratio * L * H)`` heads evenly spaced over the layer-major (layer, head) grid: deterministic, spread."""
    total = num_layers * num_heads
    k = max(1, round(ratio * total))
    skip: dict[int, list[int]] = {}
    for i in range(k):
        position = i * total // k
        skip.setdefault(position // num_heads, []).append(position % num_heads)
    return skip


def build_base(config: LlamaConfig, seed: int, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.to(device)


def build_adapter(kind: str, config: LlamaConfig, seed: int, device: torch.device, rank: int, skip: dict) -> nn.Module:
    """``kind`` is ``"lora"`` or ``"cast"``; the same seed gives the same base weights and the same LoRA init."""
    base = build_base(config, seed, device)
    if kind == "lora":
        adapter_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ATTENTION_PROJECTIONS)
    else:
        adapter_config = CASTLoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=ATTENTION_PROJECTIONS, skip_heads=skip
        )
    torch.manual_seed(seed + 1)
    model = get_peft_model(base, adapter_config)
    model.train()
    return model


def describe_masks(model: nn.Module) -> tuple[dict[str, int], int]:
    """How many LoRA factors carry a head mask (per projection name), and the bytes of their weights."""
    counts: dict[str, int] = {}
    weight_bytes = 0
    for name, module in model.named_modules():
        if isinstance(module, HeadMaskedLinear):
            projection = name.split(".")[-3]  # ...<proj>.lora_B.<adapter>
            counts[projection] = counts.get(projection, 0) + 1
            weight_bytes += module.weight.numel() * module.weight.element_size()
    return dict(sorted(counts.items())), weight_bytes


# ----------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn: Any, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(
    runners: dict[str, Any], repeats: int, steps: int, device: torch.device, label: str
) -> dict[str, list[list[dict[str, float]]]]:
    """``{variant: [repeat][step] = {"wall": s, "cpu": s}}``; steps alternate A B A B, the first variant per repeat."""
    names = list(runners)
    raw: dict[str, list[list[dict[str, float]]]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        blocks: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        gc.collect()
        gc.disable()
        try:
            for _ in range(steps):
                for name in order:
                    wall, cpu = timed(runners[name], device)
                    blocks[name].append({"wall": wall, "cpu": cpu})
        finally:
            gc.enable()
        medians = []
        for name in names:
            raw[name].append(blocks[name])
            wall = statistics.median(s["wall"] for s in blocks[name])
            cpu = statistics.median(s["cpu"] for s in blocks[name])
            medians.append(f"{name} {wall:.3f} s wall / {cpu:.3f} s cpu")
        print(f"  [{label}] repeat {repeat + 1}/{repeats} (first: {order[0]}): median step " + ", ".join(medians))
    return raw


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free confidence interval for the median: ``(low, high, coverage)`` from order statistics.

    ``[x_(k), x_(n+1-k)]`` covers the median with probability ``1 - 2 P(Binomial(n, 1/2) <= k - 1)``; the largest ``k``
    whose coverage is still ``>= confidence`` is used (``k = 1``, the full range, when ``n`` is too small).
    """
    ordered, n = sorted(values), len(values)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


def ratio_summary(raw: dict[str, list[list[dict[str, float]]]], num: str, den: str, key: str) -> dict[str, Any]:
    """Median of the back-to-back pair ratios ``num / den`` with its interval, spread, and per-repeat/pooled ratios."""
    pairs = [a[key] / b[key] for block_a, block_b in zip(raw[num], raw[den]) for a, b in zip(block_a, block_b)]
    per_repeat = [
        statistics.median(s[key] for s in a) / statistics.median(s[key] for s in b) for a, b in zip(raw[num], raw[den])
    ]
    pooled = {name: statistics.median(s[key] for block in raw[name] for s in block) for name in (num, den)}
    low, high, coverage = median_interval(pairs)
    q1, _, q3 = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else (pairs[0],) * 3
    return {
        "median": statistics.median(pairs),
        "ci_low": low,
        "ci_high": high,
        "ci_coverage": coverage,
        "q1": q1,
        "q3": q3,
        "min": min(pairs),
        "max": max(pairs),
        "pairs": pairs,
        "per_repeat": per_repeat,
        f"{num}_median_s": pooled[num],
        f"{den}_median_s": pooled[den],
        "pooled_ratio": pooled[num] / pooled[den],
    }


# ----------------------------------------------------------------------------------------------------- memory
def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def persistent_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, buffers and optimizer state (tied weights counted once)."""
    params = {p.data_ptr(): p for p in model.parameters()}
    state = [value for per_param in optimizer.state.values() for value in per_param.values()]
    return {
        "parameters": tensor_bytes(params.values()),
        "buffers": tensor_bytes(model.buffers()),
        "optimizer_state": tensor_bytes(state),
    }


def isolated_mask_cost(model: nn.Module, tokens: int, device: torch.device, reps: int, rounds: int) -> dict[str, Any]:
    """Seconds per training step that the head masks add, timed on the masked LoRA factors alone.

    For each distinct masked-factor shape, forward + backward of the ``HeadMaskedLinear`` (``weight * mask``, then
    ``F.linear``) is timed against a plain ``nn.Linear`` sharing the same weight, on ``tokens`` rows, alternating in
    ``rounds`` rounds of ``reps`` calls; the median per-call difference times the number of such factors estimates
    what the masks add to one step. Tiny ops repeated many times give a noise-robust bound on the true overhead.
    """
    groups: dict[tuple[int, int], list[HeadMaskedLinear]] = {}
    for module in model.modules():
        if isinstance(module, HeadMaskedLinear):
            groups.setdefault((module.in_features, module.out_features), []).append(module)
    total = 0.0
    per_shape = []
    for (in_features, out_features), factors in groups.items():
        masked = factors[0]
        plain = nn.Linear(in_features, out_features, bias=False, device=device)
        plain.weight = masked.weight  # the same Parameter: only the mask differs
        x = torch.randn(tokens, in_features, device=device, requires_grad=True)

        def call(layer: nn.Module, x: torch.Tensor = x, weight: nn.Parameter = masked.weight) -> None:
            layer(x).sum().backward()
            x.grad = weight.grad = None

        timings: dict[str, list[float]] = {"masked": [], "plain": []}
        for round_index in range(rounds):
            order = [("masked", masked), ("plain", plain)]
            for name, layer in order if round_index % 2 == 0 else order[::-1]:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(reps):
                    call(layer)
                synchronize(device)
                timings[name].append((time.perf_counter() - start) / reps)
        diffs = [m - p for m, p in zip(timings["masked"], timings["plain"])]
        extra = statistics.median(diffs)
        total += extra * len(factors)
        per_shape.append(
            {
                "shape": [out_features, in_features],
                "factors": len(factors),
                "masked_call_s": statistics.median(timings["masked"]),
                "plain_call_s": statistics.median(timings["plain"]),
                "extra_per_call_s": extra,
            }
        )
    return {"extra_per_step_s": total, "tokens": tokens, "reps": reps, "rounds": rounds, "per_shape": per_shape}


def step_peak_bytes(fn: Any, device: torch.device) -> int:
    """Peak tensor bytes a call holds above the level live when it starts (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # `kineto_results.events()` and `[memory]` events with signed `nbytes()` are what torch's own
    # `_parse_kineto_results` reads (checked against torch 2.13).
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------------- report
def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """Plain statements: target met or missed per clock, and whether the confidence interval resolves it."""
    clocks = {"wall": "wall clock", "cpu": "process CPU time"}
    lines, missed = [], []
    for key, summary in result["train"].items():
        met = summary["median"] <= TARGET_RATIO
        if not met:
            missed.append(clocks[key])
        interval = f"{summary['ci_coverage']:.0%} CI {summary['ci_low']:.3f} - {summary['ci_high']:.3f}"
        if not met:
            resolution = f"{interval}"
        elif summary["ci_coverage"] < 0.95:
            resolution = f"{interval}: too few pairs for a 95% interval, so the run cannot resolve it"
        elif summary["ci_high"] <= TARGET_RATIO:
            resolution = f"{interval}, entirely <= {TARGET_RATIO}, so the run resolves it"
        else:
            resolution = (
                f"{interval} reaches above {TARGET_RATIO}, so this run cannot exclude an overhead of up to "
                f"{summary['ci_high'] - 1:.1%} (noise from other jobs on the machine)"
            )
        lines.append(
            f"- Training step, {clocks[key]}: median CAST/LoRA ratio {summary['median']:.3f} "
            f"{'<=' if met else '>'} {TARGET_RATIO} ({'met' if met else 'MISSED'}); {resolution}."
        )
    overall = (
        f"**Target (CAST/LoRA step ratio <= {TARGET_RATIO}): met.**"
        if not missed
        else f"**Target (CAST/LoRA step ratio <= {TARGET_RATIO}): missed on {' and '.join(missed)}.**"
    )
    lines.insert(0, f"- {overall}")
    cost = result["mask_cost"]
    lora_step = result["train"]["wall"]["lora_median_s"]
    factors = sum(shape["factors"] for shape in cost["per_shape"])
    lines.append(
        f"- What the masks cost, timed alone ({factors} masked LoRA factors, forward + backward of `weight * mask` "
        f"vs the same factor unmasked, {cost['tokens']} tokens): {cost['extra_per_step_s'] * 1e3:.2f} ms per step, "
        f"{cost['extra_per_step_s'] / lora_step:.2%} of the median LoRA step ({lora_step:.2f} s). The rest of the "
        "CAST layer runs peft's own LoRA code, so step-ratio deviations from 1 much larger than this are most likely "
        "machine noise."
    )
    for key, summary in result["inference"].items():
        if key not in clocks:
            continue
        within = summary["ci_low"] <= 1.0 <= summary["ci_high"]
        lines.append(
            f"- Merged inference, {clocks[key]}: merged CAST / base ratio {summary['median']:.3f} "
            f"({summary['ci_coverage']:.0%} CI {summary['ci_low']:.3f} - {summary['ci_high']:.3f}; 1.00 is "
            f"{'inside' if within else 'OUTSIDE'} it"
            f"{'' if summary['ci_coverage'] >= 0.95 else '; too few pairs for a 95% interval'})."
        )
    info = result["inference"]
    lines.append(
        f"- The merged model is a plain `{info['merged_class']}` with {info['lora_layers_left']} LoRA layers left and "
        f"{'the same' if info['same_state_dict_keys'] else 'DIFFERENT'} state-dict keys and shapes as the base."
    )
    mem = result["memory"]
    lines.append(
        f"- Peak training memory CAST/LoRA: {mem['cast']['total'] / mem['lora']['total']:.4f} "
        f"(+{mib(mem['cast']['total'] - mem['lora']['total'])} MiB)."
    )
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    mem = result["memory"]
    args = result["args"]
    masked = result["skip"]["masked_factors"]
    kv_note = (
        " (k/v_proj stay unmasked: no KV group has all its query heads skipped, `kv_head_policy='all'`)"
        if not {"k_proj", "v_proj"} & set(masked)
        else ""
    )
    lines = [
        "# CAST overhead: training step and merged inference",
        "",
        f"Generated by `benchmarks/overhead.py` on {result['date']} "
        f"(total run time {result['total_s'] / 60:.1f} min).",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"- versions: torch {result['versions']['torch']}, peft {result['versions']['peft']}, "
        f"transformers {result['versions']['transformers']}, cast-peft {result['versions']['cast_peft']}",
        f"- machine: {result['machine']['cpu_model']}, {result['machine']['cpu_count']} CPUs "
        f"(torch threads: {result['machine']['torch_threads']}), device `{result['machine']['device']}`"
        + (f" ({result['machine']['gpu']})" if "gpu" in result["machine"] else ""),
        f"- load average (1 min) at start / end: {result['load_start']:.2f} / {result['load_end']:.2f} "
        "(the machine is shared: see the CI and IQR columns)",
        "- model: random-init LlamaForCausalLM with SmolLM2-135M geometry "
        f"({result['model']['parameters'] / 1e6:.1f}M "
        f"parameters, 30 layers x 9 heads, 3 KV heads)",
        f"- adapters: r={args['rank']}, lora_alpha={2 * args['rank']}, targets q/k/v/o_proj, same seed; CAST skips "
        f"{result['skip']['count']} of {result['skip']['total']} heads (evenly spaced); masked LoRA factors: "
        f"{result['skip']['masked_factors']}{kv_note}",
        f"- batch {args['batch_size']} x {args['seq_len']} tokens; {args['warmup']} warmup steps per variant, then "
        f"{args['repeats']} repeats x {args['steps']} timed steps per variant, alternating step by step (which "
        "variant goes first alternates per repeat)",
        "",
        "## Results",
        "",
        "A/B ratio: median over the back-to-back step pairs (one step of each variant) of A's time / B's; CI: "
        "distribution-free confidence interval for that median; IQR: interquartile range of the pair ratios; A/B "
        "median: median step time over all timed steps.",
        "",
        "| measurement | A | B | A median | B median | A/B ratio | CI of the ratio | IQR (pairs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("training step, wall", "cast", "lora", result["train"]["wall"])]
    if "cpu" in result["train"]:
        rows.append(("training step, CPU time", "cast", "lora", result["train"]["cpu"]))
    rows.append(("merged inference, wall", "merged", "base", result["inference"]["wall"]))
    if "cpu" in result["inference"]:
        rows.append(("merged inference, CPU time", "merged", "base", result["inference"]["cpu"]))
    for title, name_a, name_b, summary in rows:
        lines.append(
            f"| {title} | {name_a} | {name_b} | {summary[f'{name_a}_median_s']:.3f} s | "
            f"{summary[f'{name_b}_median_s']:.3f} s | **{summary['median']:.3f}** | "
            f"{summary['ci_low']:.3f} - {summary['ci_high']:.3f} ({summary['ci_coverage']:.0%}) | "
            f"{summary['q1']:.3f} - {summary['q3']:.3f} |"
        )
    lines += [
        f"| peak training memory (MiB) | cast | lora | {mib(mem['cast']['total'])} | {mib(mem['lora']['total'])} | "
        f"**{mem['cast']['total'] / mem['lora']['total']:.4f}** | (deterministic) | |",
        "",
        f"Peak memory ({mem['method']}): persistent part (parameters + buffers + AdamW state) + peak above it during "
        "one training step. Expected CAST extra: the `weight * mask` copies kept for the backward, "
        f"{mib(mem['masked_factor_bytes'])} MiB (measured step-peak difference: "
        f"{mib(mem['cast']['step_peak'] - mem['lora']['step_peak'])} MiB).",
        "",
        "| variant | parameters | buffers | AdamW state | step peak above start | total (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("lora", "cast"):
        m = mem[name]
        lines.append(
            f"| {name} | {mib(m['parameters'])} | {mib(m['buffers'])} | {mib(m['optimizer_state'])} | "
            f"{mib(m['step_peak'])} | {mib(m['total'])} |"
        )
    lines += ["", "## Verdict", "", *verdict_lines(result), "", f"Raw per-step numbers: `{result['json_name']}`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=8, help="interleaved repeats per variant (default 8)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per repeat (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank for both adapters (default 8)")
    parser.add_argument("--skip-ratio", type=float, default=0.1, help="fraction of heads CAST skips (default 0.1)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; see the docstring for why)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, LoRA init and the batch (default 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results" / "overhead.md",
        help="markdown report (default benchmarks/results/overhead.md); the JSON goes beside it",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    threads = args.threads
    torch.set_num_threads(threads)
    config = smollm2_135m_config()
    skip = spread_skip_heads(config.num_hidden_layers, config.num_attention_heads, args.skip_ratio)
    batch = torch.randint(
        0, config.vocab_size, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(args.seed)
    ).to(device)

    print(f"building lora and cast on {device} ({threads} threads) ...", flush=True)
    models = {kind: build_adapter(kind, config, args.seed, device, args.rank, skip) for kind in ("cast", "lora")}
    optimizers = {
        kind: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for kind, model in models.items()
    }
    trainable = {kind: sum(p.numel() for p in m.parameters() if p.requires_grad) for kind, m in models.items()}
    runners = {kind: (lambda m=models[kind], o=optimizers[kind]: train_step(m, o, batch)) for kind in models}

    # (a) training steps: warm up (also creates the AdamW state), time, then measure memory.
    for kind in models:
        for _ in range(args.warmup):
            runners[kind]()
    print("(a) training steps", flush=True)
    train_raw = interleaved(runners, args.repeats, args.steps, device, "train")
    memory: dict[str, Any] = {
        "method": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "torch.profiler CPU allocator events (profile_memory=True)"
    }
    for kind in ("lora", "cast"):
        entry = persistent_bytes(models[kind], optimizers[kind])
        entry["step_peak"] = step_peak_bytes(runners[kind], device)
        entry["total"] = entry["parameters"] + entry["buffers"] + entry["optimizer_state"] + entry["step_peak"]
        memory[kind] = entry
    masked, masked_weight_bytes = describe_masks(models["cast"])
    mask_cost = isolated_mask_cost(models["cast"], args.batch_size * args.seq_len, device, reps=100, rounds=9)
    memory["masked_factor_bytes"] = masked_weight_bytes

    # (b) merged CAST model against the base model.
    print("(b) merged inference", flush=True)
    runners.clear()  # drop the LoRA model, its optimizer and the CAST optimizer
    optimizers.clear()
    del models["lora"]
    merged = models.pop("cast").merge_and_unload().eval()
    base = build_base(config, args.seed, device).eval()
    merged_shapes = {k: tuple(v.shape) for k, v in merged.state_dict().items()}
    base_shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    lora_left = sum(isinstance(m, LoraLayer) for m in merged.modules())

    def infer(model: nn.Module) -> Any:
        def run() -> None:
            with torch.inference_mode():
                model(input_ids=batch)

        return run

    infer_runners = {"merged": infer(merged), "base": infer(base)}
    for run in infer_runners.values():
        for _ in range(args.warmup):
            run()
    infer_raw = interleaved(infer_runners, args.repeats, args.steps, device, "infer")

    keys = ["wall"] + (["cpu"] if device.type == "cpu" else [])
    out_md = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out_json = out_md.with_suffix(".json")
    try:
        shown = out_md.relative_to(REPO_ROOT)
    except ValueError:
        shown = out_md
    script = Path(sys.argv[0]).resolve()
    script_shown = script.relative_to(REPO_ROOT) if script.is_relative_to(REPO_ROOT) else script
    command = shlex.join([".venv/bin/python", str(script_shown), *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "cast_peft": cast_peft.__version__,
        },
        "machine": machine_info(device, threads),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"config": "SmolLM2-135M geometry", "parameters": sum(p.numel() for p in base.parameters())},
        "skip": {
            "heads": {str(k): v for k, v in skip.items()},
            "count": sum(len(v) for v in skip.values()),
            "total": config.num_hidden_layers * config.num_attention_heads,
            "masked_factors": masked,
        },
        "trainable_parameters": trainable,
        "train": {key: ratio_summary(train_raw, "cast", "lora", key) for key in keys},
        "inference": {
            **{key: ratio_summary(infer_raw, "merged", "base", key) for key in keys},
            "merged_class": type(merged).__name__,
            "lora_layers_left": lora_left,
            "same_state_dict_keys": merged_shapes == base_shapes,
        },
        "memory": memory,
        "mask_cost": mask_cost,
        "raw": {"train": train_raw, "inference": infer_raw},
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "json_name": out_json.name,
    }
    result["total_s"] = time.perf_counter() - started
    markdown = render_markdown(result)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(markdown)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(markdown)
    print(f"wrote {shown} and {out_json.name}")
    return result


if __name__ == "__main__":
    main()
