"""Safety SFT with a (CAST) LoRA adapter: a thin layer over `transformers.Trainer`.

Nothing here is CAST-specific beyond building the peft model: a CAST adapter trains like any LoRA adapter, so users of
Trainer or TRL can skip this module (see the README for `SFTTrainer(peft_config=CASTLoraConfig(...))`). What it adds
is the response-only loss masking of :mod:`cast_peft.data` and deterministic, resumable defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from torch.utils.data import Dataset

from ._io import check_output, output_folder
from .data import IGNORE_INDEX, collate, tokenize_pair, tokenize_text
from .models import check_cpu_4bit_layout


# An existing `output_dir/adapter` is replaced when cast-peft wrote it (marker) or it holds only what peft writes.
_ADAPTER_OUTPUT = dict(
    overwrite=True, replaceable=("adapter_config.json", "adapter_model.safetensors", "cast_config.json", "README.md")
)


class TokenizedDataset(Dataset):
    """Pairs (loss on responses only) or plain texts, tokenized once up front."""

    def __init__(self, tokenizer: Any, examples: list[dict | str], max_length: int = 256):
        if not examples:
            raise ValueError("The training set is empty; pass at least one {prompt, response} pair or text.")
        self.features = [
            tokenize_text(tokenizer, ex, max_length)
            if isinstance(ex, str)
            else tokenize_pair(tokenizer, ex["prompt"], ex["response"], max_length, index=i)
            for i, ex in enumerate(examples)
        ]

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
    ``PeftModel`` (``peft_config=None``). Data order, dropout and LoRA init follow ``seed``. Checkpoints go to
    ``output_dir/checkpoints`` every ``save_steps``; pass ``resume_from_checkpoint=True`` to continue the last one.
    Extra keyword arguments go to `transformers.TrainingArguments`.
    """
    from transformers import Trainer, TrainingArguments, set_seed

    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first.")
    set_seed(seed)
    check_cpu_4bit_layout(model)
    if isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError("`model` is already a PeftModel; pass peft_config=None or the unwrapped base model.")
        peft_model = model
    else:
        if peft_config is None:
            raise ValueError("Pass a peft_config (e.g. CASTLoraConfig(...)) to train an adapter on a base model.")
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            model.config.use_cache = False
        peft_model = get_peft_model(model, peft_config)
    dataset = TokenizedDataset(tokenizer, train_data, max_length)
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=_Collator(pad_id))
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    peft_model.eval()
    if trainer.is_world_process_zero():
        # Built beside and swapped in: an interrupted save leaves the previous adapter whole. Attention adapters
        # never touch the embeddings; "auto" would look the base model up on the hub.
        with output_folder(output_dir / "adapter", command="train_adapter", **_ADAPTER_OUTPUT) as tmp:
            peft_model.save_pretrained(tmp, save_embedding_layers=False)
    return peft_model


__all__ = ["IGNORE_INDEX", "TokenizedDataset", "train_adapter"]
