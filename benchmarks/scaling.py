"""Diagnosis memory and time vs model size, measured on this machine's CPU, against the memory planner.

Each (size, weights, accumulation) runs in a fresh process: a random-init Llama of that shape (fp32, or NF4 through
bitsandbytes with fp32 compute: the only 4-bit compute bitsandbytes has on CPU), one safety and one utility batch at
the diagnosis defaults (8 rows x 256 tokens, one row padded, the first 64 positions an unscored prompt; Taylor FS;
whole batches, which is what ``max_tokens_per_pass="auto"`` picks when memory is ample). Measured:

* ``measured added``: the process's peak RSS during ``diagnose()`` minus its RSS just before it (model and batches
  loaded): what the diagnosis allocated on top of the loaded model. RSS is sampled every millisecond from
  ``/proc/self/statm``, with ``MALLOC_MMAP_THRESHOLD_`` fixed so that glibc returns every large freed tensor to the
  OS at once (otherwise RSS keeps freed memory and overstates later peaks). Short spikes between samples can be
  missed, so it is a lower bound within a millisecond of activity;
* ``planned added``: ``plan_diagnosis_memory(model, ...).devices["cpu"].added`` (the planned peak minus the
  resident weights), computed before the run;
* ``weights``: resident parameter bytes (planner's count from the loaded model) and the RSS growth while loading;
* ``time``: wall time of ``diagnose()`` (two forward/backward passes of 2,048 tokens) with ``--threads`` threads; the
  machine is shared, so times are indicative.

Then the planner's table for Llama-3-8B, Qwen2.5-7B and Llama-3-70B shapes (no weights needed).

Usage::

    python benchmarks/scaling.py --sizes 135M 360M 760M 1.3B --out benchmarks/results
    python benchmarks/scaling.py --table-only --out benchmarks/results
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


#: Llama shapes: (hidden, intermediate, layers, heads, kv heads, vocab). 135M/360M are SmolLM2's shapes.
SIZES = {
    "135M": (576, 1536, 30, 9, 3, 49152),
    "360M": (960, 2560, 32, 15, 5, 49152),
    "760M": (1536, 4096, 24, 16, 8, 49152),
    "1.3B": (2048, 6144, 24, 16, 8, 49152),
}
BATCH_SIZE, MAX_LENGTH = 8, 256
GIB = 2**30

TABLE_SHAPES = {
    "Llama-3-8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        model_type="llama",
    ),
    "Qwen2.5-7B": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        model_type="qwen2",
    ),
    "Llama-3-70B": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        model_type="llama",
    ),
}
CARDS_GB = (12, 16, 24, 80)
CUDA_CONTEXT = GIB // 2  # what the CUDA context and kernels take outside PyTorch's allocator (typical, not measured)


def _config(size: str):
    import transformers

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return config


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    def __enter__(self) -> _PeakRss:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _batches(vocab: int, seed: int, rows: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, MAX_LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, MAX_LENGTH // 2 :] = 0  # one padded row, as in real batches (it keeps the padding-mask attention path)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :64] = -100
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels}]


def worker(size: str, weights: str, accumulation: str, threads: int, out: Path, rows: int = BATCH_SIZE) -> None:
    torch.set_num_threads(threads)
    import transformers

    from cast_peft import diagnose
    from cast_peft.diagnosis.memory import plan_diagnosis_memory

    config = _config(size)
    before_load = _rss()
    torch.manual_seed(0)
    if weights == "fp32":
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp)
            quantization = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=quantization, dtype=torch.float32, device_map={"": "cpu"}
            )
        # The unquantized weights (embeddings, LM head, norms) can still be pages of the safetensors file, which
        # enter RSS only when the diagnosis reads them: copy them into anonymous memory so the baseline holds them.
        with torch.no_grad():
            for param in model.parameters():
                if type(param).__name__ != "Params4bit":
                    param.data = param.data.clone()
    safety, utility = _batches(config.vocab_size, 0, rows), _batches(config.vocab_size, 1, rows)
    plan = plan_diagnosis_memory(
        model, batch_size=rows, max_length=MAX_LENGTH, accumulation=accumulation, max_tokens_per_pass=None
    ).devices["cpu"]
    import gc

    gc.collect()
    base = _rss()
    with _PeakRss() as peak:
        start = time.perf_counter()
        cmap = diagnose(
            model, None, safety, utility, accumulation=accumulation, max_tokens_per_pass=None, progress=False
        )
        seconds = time.perf_counter() - start
    assert cmap.metadata["options"]["accumulation_used"] == accumulation
    result = {
        "size": size,
        "params": _param_count(config),
        "weights": weights,
        "rows": rows,
        "accumulation": accumulation,
        "threads": threads,
        "seconds": seconds,
        "rss_load": base - before_load,
        "planned_weights": plan.weights,
        "measured_added": peak.peak - base,
        "planned_added": plan.added,
        "plan": plan.to_dict(),
    }
    out.write_text(json.dumps(result))


def _param_count(config) -> int:
    from cast_peft.diagnosis.memory import _Shapes

    s = _Shapes.of(config)
    other = s.vocab * s.hidden * (1 if s.tied else 2) + (2 * s.layers + 1) * s.hidden
    return s.layers * (s.attention_params() + s.mlp_params()) + other


def _measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    runs = (
        [run.split(":") for run in args.runs]
        if args.runs
        else [
            (size, weights, accumulation)
            for size in args.sizes
            for weights in args.weights
            for accumulation in args.accumulations
        ]
    )
    for size, weights, accumulation in runs:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "result.json"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                size,
                weights,
                accumulation,
                str(args.threads),
                str(path),
                str(args.rows),
            ]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{size} {weights} {accumulation} failed")
            row = json.loads(path.read_text())
        row["process_seconds"] = time.perf_counter() - start
        rows.append(row)
        print(_row_line(row), flush=True)
        if args.out:
            _save_partial(args.out, rows)
    return rows


def _save_partial(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    previous = []
    path = out / "scaling.json"
    if path.exists():
        previous = json.loads(path.read_text()).get("measured", [])
    keys = {(r["size"], r["weights"], r["accumulation"], r.get("rows", BATCH_SIZE)) for r in rows}
    merged = [
        r for r in previous if (r["size"], r["weights"], r["accumulation"], r.get("rows", BATCH_SIZE)) not in keys
    ] + rows
    path.write_text(json.dumps({"measured": merged, "table": _table()}, indent=1))


def _row_line(r: dict) -> str:
    error = r["planned_added"] / r["measured_added"] - 1
    return (
        f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['weights']} | {r['accumulation']} | "
        f"{r.get('rows', BATCH_SIZE)} x {MAX_LENGTH} | "
        f"{r['planned_weights'] / GIB:.2f} | {r['measured_added'] / GIB:.2f} | {r['planned_added'] / GIB:.2f} | "
        f"{100 * error:+.1f}% | {r['seconds']:.0f} |"
    )


def _table() -> list[dict]:
    import transformers

    from cast_peft.diagnosis.memory import FREE_MEMORY_SHARE, choose_plan, plan_diagnosis_memory

    rows = []
    for name, shape in TABLE_SHAPES.items():
        shape = dict(shape)
        config_class = transformers.Qwen2Config if shape.pop("model_type") == "qwen2" else transformers.LlamaConfig
        config = config_class(**shape)
        for nf4 in (True, False):
            for accumulation in ("exact", "sketch"):
                plan = plan_diagnosis_memory(config, accumulation=accumulation, load_in_4bit=nf4)
                rows.append(
                    {
                        "model": name,
                        "weights": "NF4" if nf4 else "bf16",
                        "accumulation": accumulation,
                        "tokens_per_pass": plan.tokens_per_pass,
                        "peak": plan.peak,
                        "breakdown": plan.devices["cuda:0"].to_dict(),
                    }
                )
            weights = plan_diagnosis_memory(config, load_in_4bit=nf4).devices["cuda:0"].weights
            for card in CARDS_GB:
                free = card * 10**9 - CUDA_CONTEXT - weights
                choice, fits = (
                    (None, False)
                    if free <= 0
                    else choose_plan(
                        config,
                        accumulation="auto",
                        max_tokens_per_pass="auto",
                        memory_budget=int(FREE_MEMORY_SHARE * free),
                        batch_size=BATCH_SIZE,
                        max_length=MAX_LENGTH,
                        sketch_dim=512,
                        offload=False,
                        sensitivity="taylor",
                        ablation_chunk=8,
                        load_in_4bit=nf4,
                    )
                )
                rows.append(
                    {
                        "model": name,
                        "weights": "NF4" if nf4 else "bf16",
                        "card_gb": card,
                        "fits": fits,
                        "accumulation": choice.accumulation if fits else None,
                        "tokens_per_pass": choice.tokens_per_pass if fits else None,
                        "peak": choice.peak if fits else None,
                    }
                )
    return rows


def _markdown(measured: list[dict], table: list[dict], commands: list[str]) -> str:
    lines = [
        "# Diagnosis memory vs model size, and the planner",
        "",
        "Commands (in this order, each adding its rows to `scaling.json`):",
        "",
        *[f"    {command}" for command in commands],
        "",
        "## Measured on this machine (CPU) vs `plan_diagnosis_memory`",
        "",
        "Random-init Llama shapes (untied embeddings, so the 135M shape has 163M parameters), one safety + one utility"
        " batch of 256-token rows, Taylor FS, whole batches: 8 rows (the default, 2,048 tokens per pass) for 135M, 2"
        ' rows (512 tokens per pass; `max_tokens_per_pass="auto"` picks 256-1,024 for 7-8B NF4 models on 12-16 GB'
        " cards, table below) for the larger sizes, whose 8-row runs would take 10-40 min each on this shared 2-core"
        " CPU; every"
        " planned term is linear in the tokens per pass. Times are wall seconds on a machine shared with other jobs"
        " (load average 4-8 on 2 cores), indicative only. *added* = peak RSS during `diagnose()` minus RSS before it"
        " (the loaded model); the"
        " planner's *added* is its predicted peak minus the resident weights. See the module docstring of"
        " `benchmarks/scaling.py` for how RSS is measured and what it can miss. NF4 runs with fp32 compute (the"
        " bitsandbytes CPU path).",
        "",
        "| size | weights | accumulators | tokens per pass | resident weights GiB | measured added GiB | planned added GiB | planner"
        " error | diagnose() s |",
        "|---|---|---|---|---|---|---|---|---|",
        *[_row_line(r) for r in measured],
        "",
        "## Planner: large shapes (bf16 compute, 8 x 256 tokens, whole batches)",
        "",
        "| model | weights | accumulators | weights GiB | accumulators GiB | activations GiB | logits GiB | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        if "card_gb" in r:
            continue
        b = r["breakdown"]
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['accumulation']} | {b['weights'] / GIB:.2f} | "
            f"{b['accumulators'] / GIB:.2f} | {(b['activations'] + b['backward']) / GIB:.2f} | {b['logits'] / GIB:.2f}"
            f" | {r['peak'] / GIB:.2f} |"
        )
    lines += [
        "",
        '## What `diagnose()` picks on one card (`accumulation="auto"`, `max_tokens_per_pass="auto"`)',
        "",
        f"Free memory assumed: the card minus {CUDA_CONTEXT / GIB:.1f} GiB of CUDA context minus the weights;"
        " the choice keeps the planned addition within 85% of that. Cell: accumulators, tokens per pass, planned"
        " peak.",
        "",
        "| model | weights | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |",
        "|---|---|" + "---|" * len(CARDS_GB),
    ]
    for name in TABLE_SHAPES:
        for weights in ("NF4", "bf16"):
            cells = []
            for card in CARDS_GB:
                r = next(
                    x for x in table if x["model"] == name and x["weights"] == weights and x.get("card_gb") == card
                )
                cells.append(
                    f"{r['accumulation']}, {r['tokens_per_pass']}, {r['peak'] / GIB:.1f} GiB" if r["fits"] else "no"
                )
            lines.append(f"| {name} | {weights} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        size, weights, accumulation, threads, out = sys.argv[2:7]
        rows = int(sys.argv[7]) if len(sys.argv) > 7 else BATCH_SIZE
        worker(size, weights, accumulation, int(threads), Path(out), rows)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--weights", nargs="+", default=["fp32", "nf4"], choices=["fp32", "nf4"])
    parser.add_argument("--accumulations", nargs="+", default=["exact", "sketch"], choices=["exact", "sketch"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rows", type=int, default=BATCH_SIZE, help="rows of 256 tokens per batch (default 8: the diagnosis default)"
    )
    parser.add_argument(
        "--runs", nargs="+", default=None, help="explicit SIZE:WEIGHTS:ACCUMULATION runs instead of the product"
    )
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:])
    measured = [] if args.table_only else _measure(args)
    if args.out:
        if not args.table_only:
            _save_partial(args.out, measured)
        path = args.out / "scaling.json"
        data = json.loads(path.read_text()) if path.exists() else {"measured": []}
        data["table"] = _table()
        data["commands"] = data.get("commands", []) + [command]
        path.write_text(json.dumps(data, indent=1))
        (args.out / "scaling.md").write_text(_markdown(data["measured"], data["table"], data["commands"]))
    else:
        print(_markdown(measured, _table(), [command]))


if __name__ == "__main__":
    main()
