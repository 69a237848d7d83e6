"""Safety SFT with a (CAST) LoRA adapter: a thin layer over `transformers.Trainer`.

Nothing here is CAST-specific beyond building the peft model: a CAST adapter trains like any LoRA adapter, so users of
Trainer or TRL can skip this module (see the README for `SFTTrainer(peft_config=CASTLoraConfig(...))`). What it adds
is the response-only loss masking of :mod:`cast_peft.data` and deterministic, resumable defaults.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch.utils.data import Dataset

from ._core.errors import CastWarning, ConfigError, DataError
from ._core.io import check_output, output_folder
from .data import (
    IGNORE_INDEX,
    _positive_int,
    collate,
    example_form,
    fit_max_length,
    padding_id,
    prompt_format,
    tokenize_example,
)
from .models import check_cpu_4bit_layout


# An existing `output_dir/adapter` is replaced when cast-peft wrote it (marker) or it holds only what peft writes.
_ADAPTER_OUTPUT = dict(
    overwrite=True, replaceable=("adapter_config.json", "adapter_model.safetensors", "cast_config.json", "README.md")
)


class TokenizedDataset(Dataset):
    """Examples of any accepted form (``cast_peft.data.EXAMPLE_FORMS``: pairs, TRL prompt/completion, conversations,
    plain texts), tokenized once up front with their loss masks.

    ``prompt_format`` is the tokenizer's :func:`cast_peft.data.prompt_format` when some example is rendered with it
    (anything but plain text), else ``None``.
    """

    def __init__(self, tokenizer: Any, examples: Any, max_length: int = 256):
        examples = [] if examples is None else list(examples)
        if not examples:
            raise DataError("The training set is empty; pass at least one example (e.g. {prompt, response} pairs).")
        max_length = _positive_int(max_length, "max_length")
        forms = [example_form(ex, f"example {i}") for i, ex in enumerate(examples)]
        self.features = [tokenize_example(tokenizer, ex, max_length, f"example {i}") for i, ex in enumerate(examples)]
        self.prompt_format = prompt_format(tokenizer) if any(form != "text" for form in forms) else None

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


class _Collator:
    """Picklable collator (DataLoader workers and DDP need it at module level)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return collate(features, self.pad_token_id)


def train_adapter(
    model: Any,
    tokenizer: Any,
    train_data: list[dict | str],
    peft_config: PeftConfig | None,
    output_dir: str | Path,
    *,
    max_steps: int = 100,
    learning_rate: float = 2e-4,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    max_length: int = 256,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    resume_from_checkpoint: str | bool | None = None,
    save_steps: int | None = None,
    logging_steps: int = 10,
    weight_decay: float = 0.0,
    report_to: str | list[str] = "none",
    **training_args: Any,
) -> PeftModel:
    """Train an adapter on ``train_data`` and return the peft model (the adapter is also saved to ``output_dir``).

    ``model`` is a base model (``peft_config`` then builds the adapter with peft's ``get_peft_model``) or an existing
    ``PeftModel`` (``peft_config=None``). ``train_data`` holds examples of any form TRL's SFTTrainer takes
    (``cast_peft.data.EXAMPLE_FORMS``). Data order, dropout and LoRA init follow ``seed``. Checkpoints go to
    ``output_dir/checkpoints`` every ``save_steps``; pass ``resume_from_checkpoint=True`` to continue the last one.
    Extra keyword arguments go to `transformers.TrainingArguments`.

    Counts (``max_steps``, ``batch_size``, ...) must be positive integers, and the data is tokenized (``max_length``
    lowered to the model's context) before the model is touched. With a ``CASTLoraConfig``, the training data's
    prompt format is recorded in its ``source_map["train_prompt_format"]`` (saved in ``cast_config.json``), with a
    ``CastWarning`` when it differs from the format the conflict map was diagnosed with.
    """
    from transformers import Trainer, TrainingArguments, set_seed

    # Every count is checked before any work: 0 or -1 would mean "epochs" or "untrained" to Trainer.
    for name, value in (
        ("max_steps", max_steps),
        ("batch_size", batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("max_length", max_length),
        ("logging_steps", logging_steps),
    ):
        _positive_int(value, name)
    if save_steps is not None:
        _positive_int(save_steps, "save_steps")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ConfigError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first.")
    if isinstance(model, PeftModel):
        if peft_config is not None:
            raise ConfigError("`model` is already a PeftModel; pass peft_config=None or the unwrapped base model.")
    elif peft_config is None:
        raise ConfigError("Pass a peft_config (e.g. CASTLoraConfig(...)) to train an adapter on a base model.")
    # Tokenized before the model is touched, so bad data leaves it as it was.
    dataset = TokenizedDataset(tokenizer, train_data, fit_max_length(model, max_length))
    _record_prompt_format(peft_config or model.peft_config[model.active_adapter], dataset.prompt_format)
    set_seed(seed)
    check_cpu_4bit_layout(model)
    if isinstance(model, PeftModel):
        peft_model = model
    else:
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            model.config.use_cache = False
        peft_model = get_peft_model(model, peft_config)
    output_dir = Path(output_dir)
    check_output(output_dir / "adapter", **_ADAPTER_OUTPUT)  # before training, not after
    args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        weight_decay=weight_decay,
        seed=seed,
        data_seed=seed,
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or max_steps,
        report_to=report_to,
        remove_unused_columns=False,
        disable_tqdm=training_args.pop("disable_tqdm", False),
        use_cpu=not torch.cuda.is_available(),
        **training_args,
    )
    pad_id = padding_id(tokenizer)  # PAD, else EOS (one of them exists: checked above)
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=_Collator(pad_id))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    # With bf16/fp16, accelerate wrapped peft_model.forward in autocast; unwrapped in place so that later evaluations
    # and merge checks run in the model's own dtype (accelerate 1.15.0: unwrap_model(keep_fp32_wrapper=False)).
    trainer.accelerator.unwrap_model(peft_model, keep_fp32_wrapper=False)
    peft_model.eval()
    if trainer.is_world_process_zero():
        # Built beside and swapped in: an interrupted save leaves the previous adapter whole. Attention adapters
        # never touch the embeddings; "auto" would look the base model up on the hub.
        with output_folder(output_dir / "adapter", command="train_adapter", **_ADAPTER_OUTPUT) as tmp:
            peft_model.save_pretrained(tmp, save_embedding_layers=False)
    return peft_model


def _record_prompt_format(config: PeftConfig, data_format: str | None) -> None:
    """Warn when a CAST config's conflict map was diagnosed on prompts of another format than the training data's,
    and record the training data's in ``source_map["train_prompt_format"]`` (saved in ``cast_config.json``)."""
    if data_format is None or not hasattr(config, "source_map"):  # plain texts, or not a CASTLoraConfig
        return
    source = dict(config.source_map or {})
    map_format = source.get("prompt_format")
    if map_format is not None and map_format != data_format:
        warnings.warn(
            f"The conflict map behind this CAST config was diagnosed on prompts rendered as {map_format!r}, but the "
            f"training data is rendered as {data_format!r} (cast_peft.data.prompt_format of this tokenizer), so the "
            "skip set may not fit this data. Diagnose with the tokenizer (chat template) used for training.",
            CastWarning,
            stacklevel=3,
        )
    config.source_map = {**source, "train_prompt_format": data_format}


__all__ = ["IGNORE_INDEX", "TokenizedDataset", "train_adapter"]
