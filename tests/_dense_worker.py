"""Worker for test_dense.py: ``torch.distributed.run --nproc_per_node 2 tests/_dense_worker.py OUT`` (gloo, CPU).

In one process group (one start-up, which dominates the time): ``ddp`` and ``fsdp2`` each train a tiny Llama with
frozen heads for 20 AdamW steps (weight decay 0.1) on rank-specific batches and save each rank's full parameters to
``OUT/{mode}-rank{r}.pt``; ``fsdp1`` writes the error FSDP1's flat parameters must raise, and how many steps ran;
``trainer`` trains with HF Trainer, which accelerate runs as MULTI_CPU DDP here (it applies no FSDP on CPU).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from models import build_tiny_model, build_tiny_tokenizer, tiny_batch

from cast_peft import FrozenHeadsError, freeze_heads, unfreeze_heads


out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
for mode in ("ddp", "fsdp2", "fsdp1", "trainer"):
    model = build_tiny_model("llama").train()
    handle = freeze_heads(model, {0: [1], 1: [2, 3]})  # on the plain model, before wrapping (as a Trainer does)
    if mode == "trainer":
        import transformers

        from cast_peft.data import starter_set
        from cast_peft.training import TokenizedDataset, _Collator

        args = transformers.TrainingArguments(
            output_dir=str(out / "trainer"), max_steps=20, learning_rate=1e-2, weight_decay=0.1,
            per_device_train_batch_size=2, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
            remove_unused_columns=False, ddp_backend="gloo", logging_steps=100,
        )  # fmt: skip
        data = TokenizedDataset(build_tiny_tokenizer(), starter_set("safety")[:16], max_length=32)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=_Collator(0))
        trainer.train()
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
        wrapped = None
    elif mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    optimizer = torch.optim.AdamW(
        model.parameters() if wrapped is None else wrapped.parameters(), lr=1e-2, weight_decay=0.1
    )
    steps = 0
    try:
        for step in range(0 if wrapped is None else 20):
            wrapped(**tiny_batch(seed=2 * step + rank)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    except FrozenHeadsError as err:
        (out / f"{mode}-rank{rank}.txt").write_text(f"steps={steps}\n{err}")
        unfreeze_heads(model)
        continue
    handle.verify()  # under FSDP2 each rank checks its own shard
    params = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }
    torch.save({"world_size": dist.get_world_size(), "params": params}, out / f"{mode}-rank{rank}.pt")
    handle.remove()
dist.destroy_process_group()
