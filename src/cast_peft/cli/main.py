"""`cast-peft` command line: diagnose | train | evaluate | merge | demo.

Every command runs in the same order: parse and validate every argument, check the output folder, read the inputs
(data, map, adapter config), load the model, work, and swap the output folder into place (see `cast_peft._core.io`). So a
bad argument or output path fails in seconds, before any model is loaded, and an interrupted run leaves the previous
output (or none) whole. ``--overwrite`` replaces only a folder cast-peft wrote; errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._core.errors import AdapterError, CastError
from .._core.io import output_folder, prepare_output
from ..models import DEFAULT_MODEL, DTYPES


# ----------------------------------------------------------------------------------------------------- helpers
def _output(args: argparse.Namespace, *inputs: str | None) -> dict[str, Any]:
    """Check ``--output`` before any work (and clean dead runs' leftovers beside it); returns what
    `output_folder` needs to build and swap it at the end."""
    output = dict(overwrite=args.overwrite, inputs=[i for i in inputs if i])
    prepare_output(args.output, **output)
    return {"command": f"cast-peft {args.command}", **output}


def _launch_rank() -> int:
    """This process's rank under a multi-process launch (``torchrun``, ``accelerate launch``: ``RANK``), else 0."""
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


def _join_launch(placement: Any) -> None:
    """Under a multi-process launch, start the process group (accelerate's ``PartialState``: NCCL on GPUs, gloo on
    CPU) so that ``diagnose`` splits the batches between the processes instead of each doing all of them."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        from accelerate import PartialState

        PartialState(cpu=placement.device.type == "cpu")


@contextlib.contextmanager
def _written(target: str, output: dict[str, Any]) -> Iterator[Path]:
    """`output_folder` on rank 0 (or a single process). Under a multi-process launch every rank computes the result
    (its share of the collective work), but only rank 0 writes it: the others get a temporary folder that is
    removed, so no two processes swap a folder into ``target``."""
    if _launch_rank() == 0:
        with output_folder(target, **output) as out:
            yield out
    else:
        with tempfile.TemporaryDirectory(prefix="cast-peft-rank") as tmp:
            yield Path(tmp)


def _report(message: str) -> None:
    """Print the command's closing line once per launch (rank 0 writes the output)."""
    if _launch_rank() == 0:
        print(message)


def load_examples(source: str, kind: str, split: str, limit: int | None = None) -> list[dict | str]:
    """``starter`` (the built-in set of ``kind``) or a JSONL/CSV/JSON file / hub dataset in any example form
    ``diagnose`` and ``train_adapter`` accept (prompt/response, prompt/completion, messages, text)."""
    from .. import data

    if source == "starter":
        rows = data.starter_set(kind, split)
        return rows[:limit] if limit else rows
    return data.load_examples(source, limit=limit)


def load_prompts(source: str, kind: str, split: str, limit: int | None = None) -> list[str]:
    from ..data import load_pairs, starter_set

    rows = starter_set(kind, split) if source == "starter" else load_pairs(source, response_column=None)
    return [row["prompt"] for row in rows][:limit] if limit else [row["prompt"] for row in rows]


def _placement(args: argparse.Namespace) -> Any:
    """Resolve ``--device``/``--dtype``/``--load-in-4bit`` on this machine (a `ConfigError` here, before any work)."""
    from ..models import resolve_device_and_dtype

    return resolve_device_and_dtype(args.device, args.dtype, load_in_4bit=getattr(args, "load_in_4bit", False))


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from .default_model import load_cli_model

    placement = _placement(args)
    print(f"Loading {args.model}: {placement.describe()}", file=sys.stderr, flush=True)
    return load_cli_model(args.model, device=args.device, dtype=args.dtype,
                          load_in_4bit=getattr(args, "load_in_4bit", False))  # fmt: skip


def _write_json(path: Path, data: Any) -> None:
    from .._core.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str))


# ----------------------------------------------------------------------------------------------------- commands
def cmd_diagnose(args: argparse.Namespace) -> None:
    from ..diagnosis import DiagnosisOptions, diagnose

    placement = _placement(args)
    output = _output(args, args.model, args.safety, args.utility)
    safety = load_examples(args.safety, "safety", "train", args.n_calibration)
    targets: Any = "data"
    if args.utility_targets == "self":  # prompts only: the model's own greedy answers are the utility targets
        from ..diagnosis import SelfTargets

        utility = load_prompts(args.utility, "utility", "train", args.n_calibration)
        targets = SelfTargets(max_new_tokens=args.self_target_tokens, cache_dir=args.self_target_cache)
    else:
        utility = load_examples(args.utility, "utility", "train", args.n_calibration)
    _join_launch(placement)
    model, tokenizer = _load_model(args)
    with _written(args.output, output) as out:
        options = DiagnosisOptions(batch_size=args.batch_size, max_length=args.max_length,
                                   sensitivity=args.sensitivity, kv_scoring=args.kv_scoring,
                                   hook_precision=args.hook_precision, seed=args.seed)  # fmt: skip
        cmap = diagnose(model, tokenizer, safety, utility, options, utility_targets=targets)
        cmap.save(out / "map")
        cmap.plot(out / "conflict_map.png", skip_ratio=args.skip_ratio)
        _write_json(out / "skip_heads.json", cmap.select(skip_ratio=args.skip_ratio))
    _report(f"Conflict map written to {args.output} (map/, conflict_map.png, skip_heads.json)")


def cmd_train(args: argparse.Namespace) -> None:
    from ..conflict_map import ConflictMap
    from ..training import train_adapter
    from ..tuner.checks import describe_frozen
    from ..tuner.config import CASTLoraConfig, matching_lora_config

    placement = _placement(args)
    output = _output(args, args.model, args.data, args.mix_utility, args.conflict_map)
    data = load_examples(args.data, "safety", "train")
    if args.mix_utility:
        data = data + load_examples(args.mix_utility, "utility", "train")
    cmap = ConflictMap.load(args.conflict_map) if args.conflict_map else None
    model, tokenizer = _load_model(args)
    lora_kwargs = dict(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    if cmap is not None:
        # get_peft_model refuses a map of another geometry and warns about another checkpoint (CASTLoraConfig.bind).
        config = CASTLoraConfig.from_conflict_map(cmap, skip_ratio=args.skip_ratio, policy=args.policy, seed=args.seed,
                                                  **lora_kwargs)  # fmt: skip
        describe_frozen(config)  # what exactly stays frozen: q rows, o columns, and k/v only of frozen KV heads
    else:  # plain LoRA on the same targets: the baseline with the same budget
        config = matching_lora_config(model, **lora_kwargs)
    with _written(args.output, output) as out:  # train_adapter saves on rank 0 only
        train_adapter(model, tokenizer, data, config, out, max_steps=args.steps, learning_rate=args.lr,
                      batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                      **placement.mixed_precision)  # fmt: skip
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    _report(f"Adapter written to {Path(args.output) / 'adapter'}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from peft import PeftModel

    from ..evaluation.suite import evaluate_model, summary_row

    _placement(args)
    output = _output(args, args.model, args.adapter, args.harmful, args.safe, args.helpful)
    cast_config = _read_adapter_config(args.adapter) if args.adapter else None
    harmful = load_prompts(args.harmful, "safety", "test", args.limit)
    safe = load_prompts(args.safe, "utility", "test", args.limit)
    helpful = load_examples(args.helpful, "utility", "test", args.limit)
    model, tokenizer = _load_model(args)
    if args.adapter:
        _check_adapter_base(cast_config, model)
        model = PeftModel.from_pretrained(model, args.adapter)
    results = evaluate_model(model, tokenizer, harmful, safe, helpful, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size)  # fmt: skip
    with _written(args.output, output) as out:  # launched on several processes, each evaluates everything
        _write_json(out / "results.json", results)
        _write_json(out / "summary.json", summary_row(results))
    _report(json.dumps(summary_row(results), indent=2))


def _read_adapter_config(adapter: str) -> Any:
    """The adapter's `CASTLoraConfig` (weights checked against its recorded hash), ``None`` for plain LoRA."""
    from ..tuner.config import ADAPTER_CONFIG_NAME, CAST_CONFIG_NAME, CASTLoraConfig

    if not (Path(adapter) / ADAPTER_CONFIG_NAME).is_file():
        raise AdapterError(f"{adapter} has no {ADAPTER_CONFIG_NAME}; pass the adapter folder (…/adapter).")
    return CASTLoraConfig.from_pretrained(adapter) if (Path(adapter) / CAST_CONFIG_NAME).is_file() else None


def _check_adapter_base(cast_config: Any, model: Any) -> None:
    """Refuse an adapter whose recorded head geometry does not match ``model``."""
    if cast_config is None or not cast_config.attention_geometry:
        return
    from ..geometry import AttentionGeometry

    recorded, actual = cast_config.attention_geometry, AttentionGeometry.from_model(model).counts.to_dict()
    if recorded != actual:
        raise AdapterError(f"the adapter was trained on {recorded}, but --model is {actual}. Pass its base.")


def cmd_merge(args: argparse.Namespace) -> None:
    from peft import PeftModel

    _placement(args)
    output = _output(args, args.model, args.adapter)
    cast_config = _read_adapter_config(args.adapter)
    model, tokenizer = _load_model(args)  # merged, and saved, in --dtype
    _check_adapter_base(cast_config, model)
    merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    with _written(args.output, output) as out:
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    _report(f"Merged model written to {args.output}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    _placement(args)
    output = _output(args, args.model)
    with output_folder(args.output, **output) as out:
        run_demo(out, model_name=args.model, quick=args.quick, safety_only=args.safety_only, steps=args.steps, skip_ratio=args.skip_ratio, seed=args.seed,
                 final_dir=Path(args.output), device=args.device, dtype=args.dtype)  # fmt: skip
    print(f"\nDemo report: {Path(args.output) / 'report.md'}")


# ----------------------------------------------------------------------------------------------------- parser
def _number(kind: type, low: float, high: float = math.inf, *, high_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type=`` that accepts a finite ``kind`` in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    span = f"in [{low}, {high})" if high_open else (f">= {low}" if high == math.inf else f"in [{low}, {high}]")

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} {span}, got {text!r}") from None
        inside = value < high if high_open else value <= high
        if not (math.isfinite(value) and value >= low and inside):
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} {span}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_COUNT = _number(int, 1)  # --steps, --r, --batch-size, ...: 0 or -1 would silently mean something else
_RATIO = _number(float, 0.0, 1.0, high_open=True)


def build_parser() -> argparse.ArgumentParser:
    # Choices and defaults come from the library, so the CLI cannot drift from it.
    from ..conflict_map import DEFAULT_SKIP_RATIO, POLICIES
    from ..diagnosis import UTILITY_TARGETS, DiagnosisOptions, SelfTargets

    option = {f.name: f for f in dataclasses.fields(DiagnosisOptions)}

    def diagnosis_option(p: argparse.ArgumentParser, name: str) -> None:
        f = option[name]
        p.add_argument(f"--{name.replace('_', '-')}", choices=f.metadata["choices"], default=f.default,
                       help=f.metadata["help"])  # fmt: skip

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
        p.add_argument(
            "--overwrite", action="store_true", help="replace an existing output folder that cast-peft wrote"
        )
        p.add_argument("--seed", type=int, default=0)
        return p

    def placement_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto",
                       help="auto (default: the GPU when CUDA is present, all visible GPUs via device_map='auto', "
                            "each torchrun/accelerate rank its own; else the CPU), cpu, cuda or cuda:N")  # fmt: skip
        p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                       help="weights and compute dtype; auto (default): bfloat16 on GPUs with compute capability "
                            ">= 8.0, float16 on older ones, float32 on the CPU")  # fmt: skip

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"local folder, .gguf file, hub id (needs the hub) or {DEFAULT_MODEL!r} (embedded, offline; default)")  # fmt: skip
        placement_args(p)
        p.add_argument(
            "--load-in-4bit", action="store_true", help="bitsandbytes NF4 base (QLoRA), computing in --dtype"
        )
        p.add_argument("--batch-size", type=_COUNT, default=option["batch_size"].default)
        p.add_argument("--max-length", type=_COUNT, default=option["max_length"].default)

    p = command("diagnose", cmd_diagnose, "Compute the head conflict map (OC, FS, score), save it and plot it.")
    model_args(p)
    p.add_argument("--safety", default="starter", help="harmful prompt -> refusal pairs (file or 'starter')")
    p.add_argument("--utility", default="starter", help="benign prompt -> helpful answer pairs (file or 'starter')")
    p.add_argument("--n-calibration", type=_COUNT, default=None, help="examples per objective (default: all)")
    p.add_argument("--utility-targets", choices=UTILITY_TARGETS, default=UTILITY_TARGETS[0],
                   help="'self': --utility holds prompts only, answered greedily by the model itself (its answers "
                        "are the utility targets)")  # fmt: skip
    p.add_argument("--self-target-tokens", type=_COUNT, default=SelfTargets().max_new_tokens,
                   help="with --utility-targets self: new tokens per answer")  # fmt: skip
    p.add_argument("--self-target-cache", default=None,
                   help="with --utility-targets self: folder caching the answers (reused on a match)")  # fmt: skip
    diagnosis_option(p, "sensitivity")
    diagnosis_option(p, "kv_scoring")
    diagnosis_option(p, "hook_precision")
    p.add_argument("--skip-ratio", type=_RATIO, default=DEFAULT_SKIP_RATIO, help="fraction of heads listed as skipped")

    p = command("train", cmd_train, "Safety SFT with a CAST adapter (--conflict-map) or plain LoRA (baseline).")
    model_args(p)
    p.add_argument("--data", default="starter", help="harmful prompt -> refusal pairs (file or 'starter')")
    p.add_argument("--mix-utility", default=None, help="also train on these helpful pairs (file or 'starter')")
    p.add_argument("--conflict-map", default=None, help="map folder from `cast-peft diagnose` (omit: plain LoRA)")
    p.add_argument("--skip-ratio", type=_RATIO, default=DEFAULT_SKIP_RATIO, help="fraction of heads to skip")
    p.add_argument("--policy", choices=POLICIES, default=POLICIES[0], help="score, or a budget-matched control")
    p.add_argument("--r", type=_COUNT, default=8)
    p.add_argument("--lora-alpha", type=_COUNT, default=16)
    p.add_argument("--lora-dropout", type=_RATIO, default=0.0)
    p.add_argument("--steps", type=_COUNT, default=60)
    p.add_argument("--lr", type=_number(float, 1e-12), default=1e-3)

    p = command("evaluate", cmd_evaluate, "Refusal on harmful prompts, over-refusal on safe ones, utility metrics.")
    model_args(p)
    p.add_argument("--adapter", default=None, help="adapter folder to evaluate on top of --model")
    p.add_argument("--harmful", default="starter", help="harmful prompts (file with a 'prompt' column or 'starter')")
    p.add_argument("--safe", default="starter", help="safe prompts (file with a 'prompt' column or 'starter')")
    p.add_argument("--helpful", default="starter", help="prompt -> reference answer pairs for the helpfulness NLL")
    p.add_argument("--limit", type=_COUNT, default=None, help="examples per set (default: all)")
    p.add_argument("--max-new-tokens", type=_COUNT, default=48)

    p = command(
        "merge", cmd_merge, "Merge an adapter into its base for deployment (skipped heads stay bit-identical)."
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--adapter", required=True)
    placement_args(p)  # the base is loaded, merged and saved in --dtype

    p = command("demo", cmd_demo, "End to end on the embedded model: diagnose, train CAST and LoRA, evaluate, report.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model to align (default: the embedded SmolLM2)")
    placement_args(p)
    p.add_argument("--quick", action="store_true", help="a few steps and prompts (smoke test, minutes)")
    p.add_argument("--steps", type=_COUNT, default=None, help="training steps per adapter (default 30; --quick: 3)")
    p.add_argument("--safety-only", action="store_true", help="train on harmful -> refusal pairs only (harsh case)")
    p.add_argument("--skip-ratio", type=_RATIO, default=DEFAULT_SKIP_RATIO, help="fraction of heads CAST skips")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    # Our errors say what to do: one line, no traceback. Plain ValueError/RuntimeError are still caught because some
    # library checks (and peft/transformers) raise them with a user-facing message.
    except (CastError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # permissions, full disk, a vanished path: name the path and what to check
        if err.strerror is None:  # raised with a message of its own
            print(f"error: {err}", file=sys.stderr)
        else:
            where = f" ({err.filename})" if err.filename else ""
            print(f"error: {err.strerror}{where}; check that the path exists, is writable and has space.",
                  file=sys.stderr)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
