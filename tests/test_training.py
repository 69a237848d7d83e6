"""Training a CAST adapter: the Trainer helper (resume), TRL SFT and DPO, and DDP with 2 CPU processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import launch_two
from models import build_tiny_model, build_tiny_tokenizer
from peft import PeftModel
from safetensors.torch import load_file

from cast_peft import CASTLoraConfig, verify_frozen_heads
from cast_peft.data import starter_set
from cast_peft.training import train_adapter


SKIP = {0: [1], 1: [0, 3]}
TRAIN = starter_set("safety")[:12] + starter_set("utility")[:12]


def _config():
    return CASTLoraConfig(r=4, lora_alpha=8, skip_heads=SKIP)


def _frozen_q_rows_zero(adapter_dir: Path) -> None:
    """From the saved file alone: layer 0 head 1 (q rows 8..15) and layer 1 heads 0, 3 have zero lora_B rows."""
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    q0 = next(v for k, v in weights.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    q1 = next(v for k, v in weights.items() if "layers.1.self_attn.q_proj.lora_B" in k)
    assert (
        torch.count_nonzero(q0[8:16]) == 0 and torch.count_nonzero(q1[0:8]) == 0 and torch.count_nonzero(q1[24:]) == 0
    )
    assert torch.count_nonzero(q0) > 0, "the other heads must have trained"


def test_train_adapter_resumes_to_the_same_adapter(tmp_path):
    tokenizer = build_tiny_tokenizer()
    kwargs = dict(max_steps=6, batch_size=4, learning_rate=1e-2, seed=0, disable_tqdm=True, max_length=64)
    straight = train_adapter(build_tiny_model("llama"), tokenizer, TRAIN, _config(), tmp_path / "a", **kwargs)
    verify_frozen_heads(straight)
    _frozen_q_rows_zero(tmp_path / "a" / "adapter")

    # A run that checkpoints at step 3, resumed from that checkpoint in a fresh process-like setting (new model,
    # new Trainer), ends with the same adapter as the uninterrupted run.
    train_adapter(build_tiny_model("llama"), tokenizer, TRAIN, _config(), tmp_path / "b", save_steps=3, **kwargs)
    checkpoint = tmp_path / "b" / "checkpoints" / "checkpoint-3"
    resumed = train_adapter(build_tiny_model("llama"), tokenizer, TRAIN, _config(), tmp_path / "c",
                            resume_from_checkpoint=str(checkpoint), **kwargs)  # fmt: skip
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        if "lora_" in name:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_train_adapter_with_gradient_checkpointing(tmp_path):
    model = train_adapter(
        build_tiny_model("qwen2"), build_tiny_tokenizer(), TRAIN, _config(), tmp_path,
        max_steps=3, batch_size=4, gradient_checkpointing=True, disable_tqdm=True, max_length=64,
    )  # fmt: skip
    assert verify_frozen_heads(model)["checked_factors"] > 0


def test_trl_sft_trainer_with_cast_config(tmp_path):
    trl = pytest.importorskip("trl", reason="the `trl` extra is installed in CI; pip install cast-peft[trl]")
    from datasets import Dataset

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": ex["prompt"]}],
                                  "completion": [{"role": "assistant", "content": ex["response"]}]} for ex in TRAIN])  # fmt: skip
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to="none", use_cpu=True, max_length=64, disable_tqdm=True)  # fmt: skip
    trainer = trl.SFTTrainer(
        model=build_tiny_model("llama"), args=args, train_dataset=dataset,
        processing_class=build_tiny_tokenizer(), peft_config=_config(),
    )  # fmt: skip
    trainer.train()
    assert isinstance(trainer.model, PeftModel)
    assert verify_frozen_heads(trainer.model)["checked_factors"] > 0
    trainer.model.save_pretrained(tmp_path / "adapter")
    _frozen_q_rows_zero(tmp_path / "adapter")


def test_trl_dpo_trainer_with_adapter_disabled_reference(tmp_path):
    trl = pytest.importorskip("trl", reason="the `trl` extra is installed in CI; pip install cast-peft[trl]")
    from datasets import Dataset

    safety = starter_set("safety")[:8]
    dataset = Dataset.from_list(
        [{"prompt": ex["prompt"], "chosen": ex["response"], "rejected": "Sure, here is how."} for ex in safety]
    )
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to="none", use_cpu=True, max_length=64, disable_tqdm=True)  # fmt: skip
    trainer = trl.DPOTrainer(
        model=build_tiny_model("llama"), args=args, train_dataset=dataset,
        processing_class=build_tiny_tokenizer(), peft_config=_config(),
    )  # fmt: skip
    trainer.train()
    assert trainer.ref_model is None  # reference = the same model with the adapter disabled
    assert verify_frozen_heads(trainer.model)["checked_factors"] > 0
    trainer.model.save_pretrained(tmp_path / "adapter")
    _frozen_q_rows_zero(tmp_path / "adapter")


def test_ddp_two_cpu_processes_keep_skipped_heads_frozen(tmp_path):
    launch_two([str(Path(__file__).with_name("_ddp_train.py")), str(tmp_path)], port=29517)
    _frozen_q_rows_zero(tmp_path / "adapter")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    for name in ranks[0]["lora"]:  # DDP keeps the replicas identical
        assert torch.equal(ranks[0]["lora"][name], ranks[1]["lora"][name]), name
