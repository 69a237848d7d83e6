"""`cast-peft` command line: diagnose | train | evaluate | merge | demo.

Every command writes into one output folder. The folder is built under a temporary name and renamed into place when
the command succeeds, so an interrupted run never leaves a half-written result; an existing folder is refused unless
``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..models import DEFAULT_MODEL


# ----------------------------------------------------------------------------------------------------- helpers
@contextmanager
def run_folder(output: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; rename it to ``output`` on success, delete it on failure."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise SystemExit(f"error: {output} already exists; pass --overwrite to replace it or choose another --output.")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)


def load_examples(source: str, kind: str, split: str, limit: int | None = None) -> list[dict]:
    """``starter`` (the built-in set of ``kind``) or a JSONL/CSV/JSON file / hub dataset of prompt-response pairs."""
    from ..data import load_pairs, starter_set

    rows = starter_set(kind, split) if source == "starter" else load_pairs(source)
    return rows[:limit] if limit else rows


def load_prompts(source: str, kind: str, split: str, limit: int | None = None) -> list[str]:
    from ..data import load_pairs, starter_set

    rows = starter_set(kind, split) if source == "starter" else load_pairs(source, response_column=None)
    return [row["prompt"] for row in rows][:limit] if limit else [row["prompt"] for row in rows]


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..models import load_model

    return load_model(args.model, load_in_4bit=getattr(args, "load_in_4bit", False))


def _write_json(path: Path, data: Any) -> None:
    from .._core.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str))


# ----------------------------------------------------------------------------------------------------- commands
def cmd_diagnose(args: argparse.Namespace) -> None:
    from ..diagnosis.run import diagnose

    model, tokenizer = _load_model(args)
    safety = load_examples(args.safety, "safety", "train", args.n_calibration)
    utility = load_examples(args.utility, "utility", "train", args.n_calibration)
    with run_folder(args.output, args.overwrite) as out:
        cmap = diagnose(model, tokenizer, safety, utility, batch_size=args.batch_size, max_length=args.max_length,
                        sensitivity=args.sensitivity, seed=args.seed,
                        **({"kv_scoring": args.kv_scoring} if args.kv_scoring else {}))  # fmt: skip
        cmap.save(out / "map")
        cmap.plot(out / "conflict_map.png", skip_ratio=args.skip_ratio)
        _write_json(out / "skip_heads.json", cmap.select(skip_ratio=args.skip_ratio))
    print(f"Conflict map written to {args.output} (map/, conflict_map.png, skip_heads.json)")


def cmd_train(args: argparse.Namespace) -> None:
    from ..conflict_map.map import ConflictMap
    from ..training import train_adapter
    from ..tuner.config import CASTLoraConfig, matching_lora_config

    model, tokenizer = _load_model(args)
    data = load_examples(args.data, "safety", "train")
    if args.mix_utility:
        data = data + load_examples(args.mix_utility, "utility", "train")
    lora_kwargs = dict(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    if args.conflict_map:
        cmap = ConflictMap.load(args.conflict_map)
        cmap.check_compatible(model)
        config = CASTLoraConfig.from_conflict_map(cmap, skip_ratio=args.skip_ratio, policy=args.policy, seed=args.seed,
                                                  **lora_kwargs)  # fmt: skip
    else:  # plain LoRA on the same targets: the baseline with the same budget
        config = matching_lora_config(model, **lora_kwargs)
    with run_folder(args.output, args.overwrite) as out:
        train_adapter(model, tokenizer, data, config, out, max_steps=args.steps, learning_rate=args.lr,
                      batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)  # fmt: skip
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    print(f"Adapter written to {Path(args.output) / 'adapter'}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from peft import PeftModel

    from ..evaluation.suite import evaluate_model, summary_row

    model, tokenizer = _load_model(args)
    if args.adapter:
        _check_adapter_base(args.adapter, model)
        model = PeftModel.from_pretrained(model, args.adapter)
    harmful = load_prompts(args.harmful, "safety", "test", args.limit)
    safe = load_prompts(args.safe, "utility", "test", args.limit)
    helpful = load_examples(args.helpful, "utility", "test", args.limit)
    results = evaluate_model(model, tokenizer, harmful, safe, helpful, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size)  # fmt: skip
    with run_folder(args.output, args.overwrite) as out:
        _write_json(out / "results.json", results)
        _write_json(out / "summary.json", summary_row(results))
    print(json.dumps(summary_row(results), indent=2))


def _check_adapter_base(adapter: str, model: Any) -> None:
    """Refuse an adapter whose recorded head geometry does not match ``model``."""
    cast_file = Path(adapter) / "cast_config.json"
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise SystemExit(f"error: {adapter} has no adapter_config.json; pass the adapter folder (…/adapter).")
    if cast_file.is_file():
        from ..geometry import AttentionGeometry

        recorded = json.loads(cast_file.read_text()).get("attention_geometry")
        actual = AttentionGeometry.from_model(model).counts.to_dict()
        if recorded and recorded != actual:
            raise SystemExit(f"error: the adapter was trained on {recorded}, but --model is {actual}. Pass its base.")


def cmd_merge(args: argparse.Namespace) -> None:
    import torch
    from peft import PeftModel

    from ..models import load_model

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
    _check_adapter_base(args.adapter, model)
    merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    with run_folder(args.output, args.overwrite) as out:
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    print(f"Merged model written to {args.output}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    with run_folder(args.output, args.overwrite) as out:
        run_demo(out, model_name=args.model, quick=args.quick, safety_only=args.safety_only, steps=args.steps, skip_ratio=args.skip_ratio, seed=args.seed,
                 final_dir=Path(args.output))  # fmt: skip
    print(f"\nDemo report: {Path(args.output) / 'report.md'}")


# ----------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cast-peft",
        description="CAST: diagnose safety/utility conflicts per attention head, then align with a LoRA adapter that "
        "leaves the high-conflict heads untouched.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--output", required=True, help="output folder (refused if it exists, unless --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        p.add_argument("--seed", type=int, default=0)
        return p

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"local folder, hub id (needs the hub) or {DEFAULT_MODEL!r} (embedded, offline; default)")  # fmt: skip
        p.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 base (QLoRA)")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-length", type=int, default=256)

    p = command("diagnose", cmd_diagnose, "Compute the head conflict map (OC, FS, score), save it and plot it.")
    model_args(p)
    p.add_argument("--safety", default="starter", help="harmful prompt -> refusal pairs (file or 'starter')")
    p.add_argument("--utility", default="starter", help="benign prompt -> helpful answer pairs (file or 'starter')")
    p.add_argument("--n-calibration", type=int, default=None, help="examples per objective (default: all)")
    p.add_argument("--sensitivity", choices=("taylor", "ablation"), default="taylor")
    p.add_argument(
        "--kv-scoring",
        choices=("shared", "separate"),
        default=None,
        help="score k/v inside each query head ('shared') or per KV head ('separate'); default: library's",
    )
    p.add_argument("--skip-ratio", type=float, default=0.1, help="fraction of heads marked/listed as skipped")

    p = command("train", cmd_train, "Safety SFT with a CAST adapter (--conflict-map) or plain LoRA (baseline).")
    model_args(p)
    p.add_argument("--data", default="starter", help="harmful prompt -> refusal pairs (file or 'starter')")
    p.add_argument("--mix-utility", default=None, help="also train on these helpful pairs (file or 'starter')")
    p.add_argument("--conflict-map", default=None, help="map folder from `cast-peft diagnose` (omit: plain LoRA)")
    p.add_argument("--skip-ratio", type=float, default=0.1)
    p.add_argument("--policy", choices=("score", "oc", "fs", "random"), default="score")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)

    p = command("evaluate", cmd_evaluate, "Refusal on harmful prompts, over-refusal on safe ones, utility metrics.")
    model_args(p)
    p.add_argument("--adapter", default=None, help="adapter folder to evaluate on top of --model")
    p.add_argument("--harmful", default="starter", help="harmful prompts (file with a 'prompt' column or 'starter')")
    p.add_argument("--safe", default="starter", help="safe prompts (file with a 'prompt' column or 'starter')")
    p.add_argument("--helpful", default="starter", help="prompt -> reference answer pairs for the helpfulness NLL")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=48)

    p = command(
        "merge", cmd_merge, "Merge an adapter into its base for deployment (skipped heads stay bit-identical)."
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", required=True)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")

    p = command("demo", cmd_demo, "End to end on the embedded model: diagnose, train CAST and LoRA, evaluate, report.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model to align (default: the embedded SmolLM2)")
    p.add_argument("--quick", action="store_true", help="a few steps and prompts (smoke test, minutes)")
    p.add_argument("--steps", type=int, default=None, help="training steps per adapter (default 30; --quick: 3)")
    p.add_argument("--safety-only", action="store_true", help="train on harmful -> refusal pairs only (harsh case)")
    p.add_argument("--skip-ratio", type=float, default=0.1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
