"""Worker for test_training.py's DDP test: run by torch.distributed.run with 2 CPU processes (gloo)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from models import build_tiny_model, build_tiny_tokenizer

from cast_peft import CASTLoraConfig, verify_frozen_heads
from cast_peft.data import starter_set
from cast_peft.training import train_adapter


out = Path(sys.argv[1])
train = starter_set("safety")[:16] + starter_set("utility")[:16]
config = CASTLoraConfig(r=4, lora_alpha=8, skip_heads={0: [1], 1: [0, 3]})
model = train_adapter(build_tiny_model("llama"), build_tiny_tokenizer(), train, config, out, max_steps=4,
                      batch_size=4, learning_rate=1e-2, disable_tqdm=True, max_length=64, ddp_backend="gloo")  # fmt: skip
verify_frozen_heads(model)
rank = dist.get_rank()
lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
torch.save({"world_size": dist.get_world_size(), "lora": lora}, out / f"rank{rank}.pt")
