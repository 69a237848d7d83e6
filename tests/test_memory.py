"""The diagnosis memory planner, token-budget micro-batches and the chunked cross-entropy (issue 14 item 8)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from _diag_worker import labelled_batches
from models import build_tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from cast_peft import diagnose
from cast_peft.diagnosis import ablation, memory
from cast_peft.diagnosis.hooks import GradAccumulator, HookSession, hooked_projections
from cast_peft.diagnosis.memory import plan_diagnosis_memory
from cast_peft.geometry import AttentionGeometry


LLAMA_3_8B = transformers.LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
)


def _sdpa_llama(dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def _padded_batch(rows: int = 4, length: int = 64, vocab: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, -10:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :8] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------------ chunked CE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_autograd_cross_entropy(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 11, 50, generator=generator) * 3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (3, 11), generator=generator)
    targets[0, :4] = -100
    targets[2, -3:] = -100
    weights = torch.rand(3, 11, generator=generator)  # a non-uniform upstream gradient

    ours = ablation._ChunkedCrossEntropy.apply(logits, targets, 4).view(3, 11)
    (ours * weights).sum().backward()
    grad_ours, logits.grad = logits.grad.clone(), None

    reference = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # 0 at -100
    (reference * weights).sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert grad_ours.dtype == dtype
    torch.testing.assert_close(grad_ours, logits.grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


def test_row_losses_never_copies_all_logits_to_fp32(monkeypatch):
    model = _sdpa_llama(torch.bfloat16)
    monkeypatch.setattr(memory, "CE_CHUNK_ELEMENTS", 32 * 1000)  # 32 positions per chunk: 8 chunks here

    class LargestFp32Logits(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape[-1:] == (1000,):
                    self.largest = max(self.largest, t.numel())
            return out

    params = [p for p in model.parameters() if p.requires_grad]
    with LargestFp32Logits() as mode:
        losses = ablation.row_losses(model, _padded_batch())
        torch.autograd.grad(losses.sum(), params)
    assert mode.largest <= 32 * 1000 < 4 * 63 * 1000  # one chunk, never the [4, 63, vocab] logits in fp32


def test_row_losses_equal_autograd_cross_entropy_losses_and_gradients(monkeypatch):
    model = _sdpa_llama()
    batch = _padded_batch()
    monkeypatch.setattr(memory, "CE_CHUNK_ELEMENTS", 32 * 1000)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = ablation.row_losses(model, batch)
    grads = torch.autograd.grad(losses.sum(), params)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=-100
    ).sum(1)
    expected = torch.autograd.grad(reference.sum(), params)
    torch.testing.assert_close(losses, reference, rtol=1e-6, atol=1e-4)
    for ours, theirs in zip(grads, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ micro-batches
@pytest.mark.parametrize("sensitivity", ["taylor", "ablation"])
def test_micro_batches_give_the_map_of_whole_batches(sensitivity):
    model = build_tiny_model("llama")
    safety, utility = labelled_batches(0, 2, rows=5), labelled_batches(50, 2, rows=5)
    options = {"progress": False, "accumulation": "exact", "sensitivity": sensitivity}
    whole = diagnose(model, None, safety, utility, max_tokens_per_pass=None, **options)
    split = diagnose(model, None, safety, utility, max_tokens_per_pass=20, **options)  # 2 rows of 10 per pass
    assert whole.metadata["options"]["tokens_per_pass"] is None
    assert split.metadata["options"]["tokens_per_pass"] == 20
    torch.testing.assert_close(split.oc, whole.oc, rtol=0, atol=1e-6)
    torch.testing.assert_close(split.fs_signed, whole.fs_signed, rtol=1e-5, atol=1e-8)
    assert split.metadata["data"] == whole.metadata["data"]  # same sizes, digests and mean losses


def test_bad_token_budget_is_refused_before_any_pass():
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="max_tokens_per_pass"):
        diagnose(model, None, labelled_batches(0, 1), labelled_batches(1, 1), max_tokens_per_pass=0)


# ------------------------------------------------------------------------------------------------ the planner
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_activations_are_what_autograd_and_the_hooks_keep(dtype):
    """Independent count: the distinct storages autograd saves for backward plus the inputs the hooks keep."""
    model = _sdpa_llama(dtype)
    batch = _padded_batch()
    geometry = AttentionGeometry.from_model(model)
    projections = hooked_projections(model, geometry)
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    def keep_input(module, args, output):
        kept[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()

    handles = [p.module.register_forward_hook(keep_input) for p in projections]
    session = HookSession(model, projections, GradAccumulator(projections, geometry), None)
    with session, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, use_cache=False).logits
    for handle in handles:
        handle.remove()
    kept.pop(logits.untyped_storage().data_ptr(), None)  # counted under "logits"
    plan = plan_diagnosis_memory(model, batch_size=4, max_length=64, accumulation="exact")
    predicted = plan.devices["cpu"].activations
    assert abs(predicted - sum(kept.values())) <= 0.1 * sum(kept.values())


@pytest.mark.parametrize("accumulation", ["exact", "sketch"])
def test_planned_weights_and_accumulators_are_the_real_tensors(accumulation):
    model = _sdpa_llama()
    geometry = AttentionGeometry.from_model(model)
    projections = hooked_projections(model, geometry)
    sketch = 16 if accumulation == "sketch" else None
    accumulator = GradAccumulator(projections, geometry, sketch_dim=sketch)
    real = 2 * sum(t.numel() * t.element_size() for t in accumulator.tensors())
    from_config = plan_diagnosis_memory(
        model.config, accumulation=accumulation, sketch_dim=16, dtype=torch.float32, device="cpu"
    ).devices["cpu"]
    assert from_config.accumulators == real
    assert from_config.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    from_model = plan_diagnosis_memory(model, accumulation=accumulation, sketch_dim=16).devices["cpu"]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary inv_freq: resident, not a weight
    assert from_model.weights == from_config.weights + buffers and from_model.accumulators == real


def test_llama_3_8b_shapes_and_the_nf4_default_fits_a_12_gib_card():
    # Llama-3-8B has 8,030,261,248 parameters (its model card); bf16 = 2 bytes each.
    bf16 = plan_diagnosis_memory(LLAMA_3_8B, accumulation="exact")
    assert bf16.devices["cuda:0"].weights == 2 * 8_030_261_248
    # exact accumulators: the attention weights in fp32, per objective (32 x 4096 x 10240 x 4 bytes x 2)
    assert bf16.devices["cuda:0"].accumulators == 2 * 4 * 32 * 4096 * (4096 + 1024 + 1024 + 4096)
    plan, fits = memory.choose_plan(
        LLAMA_3_8B,
        accumulation="auto",
        max_tokens_per_pass="auto",
        memory_budget=12 * 2**30 - plan_diagnosis_memory(LLAMA_3_8B, load_in_4bit=True).devices["cuda:0"].weights,
        batch_size=8,
        max_length=256,
        sketch_dim=512,
        offload=False,
        sensitivity="taylor",
        ablation_chunk=8,
        load_in_4bit=True,
    )
    assert fits and plan.accumulation == "sketch" and plan.peak <= 12 * 2**30


def test_auto_splits_batches_to_fit_the_budget_and_logs_the_plan(caplog):
    model = build_tiny_model("llama")
    safety, utility = labelled_batches(0, 1, rows=4), labelled_batches(50, 1, rows=4)
    whole = plan_diagnosis_memory(model, batch_size=4, max_length=10, accumulation="exact").devices["cpu"]
    single = plan_diagnosis_memory(
        model, batch_size=4, max_length=10, accumulation="exact", max_tokens_per_pass=10
    ).devices["cpu"]
    assert single.added < whole.added
    with caplog.at_level(logging.INFO, logger="cast_peft.diagnosis.run"):
        cmap = diagnose(
            model, None, safety, utility, progress=False, memory_budget=single.added, max_length=10, batch_size=4
        )
    assert cmap.metadata["options"]["accumulation_used"] == "exact"
    assert cmap.metadata["options"]["tokens_per_pass"] == 10
    assert "diagnosis memory plan" in caplog.text and "peak" in caplog.text


def test_plan_of_an_offloaded_model_counts_only_resident_weights(tmp_path):
    from accelerate import dispatch_model

    model = build_tiny_model("llama")
    resident = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    resident += sum(t.numel() * t.element_size() for t in [*model.model.norm.parameters(), *model.buffers()])
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    plan = plan_diagnosis_memory(model, batch_size=2, max_length=10, accumulation="exact")
    assert list(plan.devices) == ["cpu"]  # every layer computes on the CPU; nothing is planned on "meta"
    assert plan.devices["cpu"].weights == resident
    assert plan.devices["cpu"].activations > 0 and plan.devices["cpu"].logits > 0
