"""Worker for test_distributed.py: ``torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py OUT`` (gloo, CPU).

One process group (its start-up dominates the time) for every mode, each a CAST LoRA adapter on a tiny Llama
trained for 20 AdamW steps (weight decay 0.1) on rank-specific batches:

* ``accelerate``: ``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))``; ``trainer``: HF
  Trainer with ``fsdp=True`` and an FSDP2 ``fsdp_config``. Both record in ``OUT/{mode}-rank{r}.json`` what accelerate
  made of the request (``distributed_type``, the wrapper's class, the parameters' class) and save rank 0's LoRA
  weights to ``OUT/{mode}.pt``.
* ``accelerate-fsdp2``: accelerate's FSDP2 preparation itself (``fsdp2_prepare_model``, with
  ``cpu_ram_efficient_loading``), which ``prepare`` skips on CPU; the gathered state goes to ``OUT/accelerate-fsdp2.pt``.
* ``fsdp2``: torch's ``fully_shard`` on every decoder layer and the root of the CAST ``PeftModel``. Each rank runs
  ``verify_frozen_heads`` on the sharded model; the full state is gathered to rank 0 (``OUT/fsdp2.pt``), which saves
  the adapter with ``save_pretrained(state_dict=...)`` to ``OUT/adapter``. The sharded state is then written with
  ``torch.distributed.checkpoint`` to ``OUT/dcp``, loaded into a fresh sharded CAST model and gathered again
  (``OUT/fsdp2-reloaded.pt``); then loaded once more with one lora_B set to ones (``OUT/fsdp2-ones.pt``). What the
  checks on the sharded models returned is in ``OUT/fsdp2-checks-rank{r}.json``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from models import build_tiny_model, build_tiny_tokenizer, tiny_batch
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard

from cast_peft import CASTLoraConfig, count_effective_parameters, verify_frozen_heads


SKIP = {0: [1], 1: [0, 3]}
STEPS = 20
QB = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"


def cast_model(seed: int = 0) -> torch.nn.Module:
    return get_peft_model(build_tiny_model("llama", seed), CASTLoraConfig(r=4, lora_alpha=8, skip_heads=SKIP)).train()


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def record(out: Path, mode: str, rank: int, wrapped: torch.nn.Module, distributed_type: str) -> None:
    info = {
        "distributed_type": distributed_type,
        "wrapper": type(wrapped).__name__,
        "param_classes": sorted({type(p).__name__ for p in wrapped.parameters()}),
        "world_size": dist.get_world_size(),
    }
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(info))


def train(wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, backward=None) -> None:
    for step in range(STEPS):
        loss = wrapped(**tiny_batch(seed=2 * step + rank)).loss
        loss.backward() if backward is None else backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0, ``{}`` on the other ranks."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main(out: Path) -> None:
    # accelerate first: it starts the gloo process group every later mode reuses.
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    rank = dist.get_rank()
    model = cast_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    record(out, "accelerate", rank, wrapped, str(accelerator.distributed_type))
    train(wrapped, optimizer, rank, accelerator.backward)
    if rank == 0:
        torch.save(lora_weights(model), out / "accelerate.pt")

    # accelerate's own FSDP2 preparation (what prepare() runs on GPUs), driven here by handing the CPU state the plugin
    # it ignores. cpu_ram_efficient_loading: every rank's model goes to `meta`, is sharded, and gets rank 0's weights
    # (rank 1 starts from another seed, so its weights must be replaced). fsdp2_prepare_model and
    # AcceleratorState.fsdp_plugin are accelerate internals, checked with accelerate 1.15.
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        cpu_ram_efficient_loading=True,
    )
    model = fsdp2_prepare_model(accelerator, cast_model(seed=rank))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    record(out, "accelerate-fsdp2", rank, model, "fsdp2_prepare_model")
    train(model, optimizer, rank)
    checks = {"accelerate-fsdp2": verify_frozen_heads(model, reference=build_tiny_model("llama"))}
    full = gathered(model)
    if rank == 0:
        torch.save(full, out / "accelerate-fsdp2.pt")

    import transformers

    from cast_peft.data import starter_set
    from cast_peft.training import TokenizedDataset, _Collator

    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=STEPS, learning_rate=1e-2, weight_decay=0.1,
        per_device_train_batch_size=2, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        remove_unused_columns=False, ddp_backend="gloo", logging_steps=100,
        fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )  # fmt: skip
    data = TokenizedDataset(build_tiny_tokenizer(), starter_set("safety")[:16], max_length=32)
    model = cast_model()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=_Collator(0))
    trainer.train()
    record(out, "trainer", rank, trainer.model_wrapped, str(trainer.accelerator.distributed_type))
    if rank == 0:
        torch.save(lora_weights(model), out / "trainer.pt")

    model = shard(cast_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    record(out, "fsdp2", rank, model, "fully_shard")
    train(model, optimizer, rank)
    checks["trained"] = verify_frozen_heads(model, reference=build_tiny_model("llama"))  # each rank, sharded
    checks["effective"] = count_effective_parameters(model)
    full = gathered(model)
    if rank == 0:
        torch.save(full, out / "fsdp2.pt")
        model.save_pretrained(out / "adapter", state_dict=full)
    dcp.save(get_model_state_dict(model), checkpoint_id=str(out / "dcp"))

    fresh = shard(cast_model())
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    set_model_state_dict(fresh, state)
    checks["reloaded"] = verify_frozen_heads(fresh, reference=build_tiny_model("llama"))
    full = gathered(fresh)
    if rank == 0:
        torch.save(full, out / "fsdp2-reloaded.pt")
    # A sharded checkpoint with non-zero skipped-head entries (e.g. trained without masks): every local entry of one
    # lora_B set to 1 before the load; the post-load hook must zero the skipped heads' rows on the DTensor shards.
    state[QB].to_local().fill_(1.0)
    set_model_state_dict(fresh, state)
    full = gathered(fresh)
    if rank == 0:
        torch.save(full[QB], out / "fsdp2-ones.pt")
    (out / f"fsdp2-checks-rank{rank}.json").write_text(json.dumps(checks))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
