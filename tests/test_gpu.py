"""CUDA suite (issue 14 item 12): ``pytest -m gpu``; every test is skipped where ``torch.cuda.is_available()`` is False.

Run on a machine with one CUDA GPU (compute capability >= 8.0 for the bf16 tests): ``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
import transformers
from _diag_worker import labelled_batches
from models import build_tiny_model, save_bnb_sized_llama, tiny_batch
from peft import LoraConfig, get_peft_model

from cast_peft import CASTLoraConfig, diagnose, verify_frozen_heads
from cast_peft.diagnosis.memory import free_bytes, plan_diagnosis_memory


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on one)"),
]
CUDA = "cuda:0"
SKIP = {0: [1], 1: [0, 3]}


def _bf16_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


needs_bf16 = pytest.mark.skipif(not _bf16_capable(), reason="needs a CUDA GPU with bf16 (compute capability >= 8.0)")


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32: TF32 matmuls would make the device map differ from the CPU one by ~1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _mid_llama(dtype: torch.dtype, layers: int = 8, hidden: int = 1024) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        vocab_size=32000,
        max_position_embeddings=1024,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(CUDA)


def _random_batches(count: int, rows: int, length: int, vocab: int = 32000) -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in range(count):
        ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        mask[-1, length // 2 :] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : length // 4] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


# ------------------------------------------------------------------------------------------------ maps on device
@pytest.mark.parametrize(
    "options",
    [
        {"accumulation": "exact"},
        {"accumulation": "sketch", "sketch_dim": 64},
        {"accumulation": "exact", "sensitivity": "ablation"},
        {"accumulation": "exact", "max_tokens_per_pass": 10},
    ],
    ids=["exact", "sketch", "ablation", "micro-batches"],
)
def test_device_map_equals_cpu_map(options):
    model = build_tiny_model("llama")
    safety, utility = labelled_batches(0, 3), labelled_batches(50, 3)
    options = {**options, "hook_precision": "fp32"}  # fp32 means fp32 (the GPU's default is bf16-input GEMMs)
    on_cpu = diagnose(model, None, safety, utility, progress=False, **options)
    on_gpu = diagnose(copy.deepcopy(model).to(CUDA), None, safety, utility, progress=False, **options)
    torch.testing.assert_close(on_gpu.oc, on_cpu.oc, rtol=0, atol=1e-5)
    torch.testing.assert_close(on_gpu.fs_signed, on_cpu.fs_signed, rtol=1e-4, atol=1e-7)
    assert on_gpu.select(skip_ratio=0.25) == on_cpu.select(skip_ratio=0.25)


@needs_bf16
def test_bf16_map_is_close_to_fp32():
    model = _mid_llama(torch.float32, layers=4, hidden=512)
    safety, utility = _random_batches(2, 4, 128), _random_batches(2, 4, 128)
    fp32 = diagnose(model, None, safety, utility, progress=False, accumulation="exact")
    bf16 = diagnose(model.to(torch.bfloat16), None, safety, utility, progress=False, accumulation="exact")
    assert float((bf16.oc - fp32.oc).abs().mean()) < 0.02
    assert _spearman(bf16.score, fp32.score) > 0.9


@needs_bf16
def test_nf4_map_is_close_to_the_fp32_map_of_its_dequantized_weights(tmp_path):
    """Same function, different arithmetic: the fp32 reference runs on the NF4 weights dequantized."""
    bnb = pytest.importorskip("bitsandbytes")
    save_bnb_sized_llama(tmp_path)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    nf4 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0}
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to(CUDA)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in nf4.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                modules[name].weight.copy_(weight.float())
    safety, utility = labelled_batches(0, 4), labelled_batches(50, 4)
    ours = diagnose(nf4, None, safety, utility, progress=False, accumulation="exact")
    expected = diagnose(reference, None, safety, utility, progress=False, accumulation="exact", hook_precision="fp32")
    assert float((ours.oc - expected.oc).abs().mean()) < 0.03
    assert _spearman(ours.score, expected.score) > 0.9


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.flatten().argsort().argsort().double(), b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# ------------------------------------------------------------------------------------------------ training
@needs_bf16
def test_bf16_training_keeps_skipped_heads_and_merges_bit_exact():
    model = build_tiny_model("llama", dtype=torch.bfloat16).to(CUDA)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, CASTLoraConfig(r=4, lora_alpha=8, skip_heads=SKIP))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    for step in range(20):
        batch = {k: v.to(CUDA) for k, v in tiny_batch(seed=step).items()}
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    verify_frozen_heads(peft_model, base)
    config = peft_model.peft_config["default"]
    merged = peft_model.merge_and_unload()
    verify_frozen_heads(merged, base, config=config)  # skipped heads' base slices bit-identical after the merge
    d = model.config.hidden_size // model.config.num_attention_heads
    q = merged.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q[d : 2 * d], base["model.layers.0.self_attn.q_proj.weight"][d : 2 * d])
    assert not torch.equal(q[:d], base["model.layers.0.self_attn.q_proj.weight"][:d]), "trained heads must move"


@needs_bf16
def test_qlora_with_gradient_checkpointing(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training

    save_bnb_sized_llama(tmp_path)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0}
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    peft_model = get_peft_model(model, CASTLoraConfig(r=4, lora_alpha=8, skip_heads=SKIP))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    for step in range(5):
        batch = {k: v.to(CUDA) for k, v in tiny_batch(seed=step).items()}
        loss = peft_model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    verify_frozen_heads(peft_model)
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(q.lora_B["default"].weight) > 0


# ------------------------------------------------------------------------------------------------ memory
@needs_bf16
@pytest.mark.parametrize("accumulation", ["exact", "sketch"])
def test_planner_predicts_max_memory_allocated(accumulation):
    model = _mid_llama(torch.bfloat16)
    safety, utility = _random_batches(1, 8, 256), _random_batches(1, 8, 256)
    plan = plan_diagnosis_memory(model, batch_size=8, max_length=256, accumulation=accumulation)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    diagnose(model, None, safety, utility, progress=False, accumulation=accumulation, max_tokens_per_pass=None)
    measured = torch.cuda.max_memory_allocated() - before
    predicted = plan.devices[CUDA].added
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


@needs_bf16
def test_auto_micro_batches_keep_the_peak_within_the_budget():
    model = _mid_llama(torch.bfloat16)
    safety, utility = _random_batches(1, 8, 256), _random_batches(1, 8, 256)
    whole = plan_diagnosis_memory(model, batch_size=8, max_length=256, accumulation="sketch").devices[CUDA]
    budget = whole.accumulators + whole.sketch + (whole.activations + whole.logits) // 3  # whole batches do not fit
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    cmap = diagnose(model, None, safety, utility, progress=False, memory_budget=budget)
    assert cmap.metadata["options"]["accumulation_used"] == "sketch"
    assert cmap.metadata["options"]["tokens_per_pass"] < 8 * 256
    assert torch.cuda.max_memory_allocated() - before <= 1.15 * budget


def test_free_memory_counts_pytorchs_reusable_cache():
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device=CUDA)
    del block  # back in PyTorch's cache: reserved, not allocated, not free for CUDA
    assert torch.cuda.mem_get_info()[0] < free_before - 200 * 2**20
    assert free_bytes(CUDA) >= free_before - 16 * 2**20


# ------------------------------------------------------------------------------------------------ overhead
@needs_bf16
def test_cast_step_time_is_within_3_percent_of_lora():
    def step_times(config) -> list[float]:
        model = get_peft_model(_mid_llama(torch.bfloat16, layers=8, hidden=2048), config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batch = {k: v.to(CUDA) for k, v in _random_batches(1, 8, 512)[0].items()}
        times = []
        for step in range(30):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            torch.cuda.synchronize()
            if step >= 10:  # warm-up: kernels, allocator
                times.append(time.perf_counter() - start)
        del model, optimizer
        torch.cuda.empty_cache()
        return times

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = statistics.median(step_times(LoraConfig(r=16, lora_alpha=32, target_modules=targets)))
    cast = statistics.median(
        step_times(CASTLoraConfig(r=16, lora_alpha=32, target_modules=targets, skip_heads={0: [0, 1], 3: [5]}))
    )
    assert cast / lora <= 1.03, f"CAST step {cast * 1e3:.2f} ms vs LoRA {lora * 1e3:.2f} ms"


# ------------------------------------------------------------------------------------------------ hook GEMMs (item 9)
@needs_bf16
@pytest.mark.parametrize("accumulation", ["exact", "sketch"])
def test_bf16_hook_gemms_give_the_fp32_map_within_bf16_rounding(accumulation):
    from cast_peft.diagnosis.hooks import fp32_output_gemms

    model = build_tiny_model("qwen2").to(CUDA)
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    options = {"progress": False, "accumulation": accumulation, "sketch_dim": 64}
    fp32 = diagnose(model, None, safety, utility, hook_precision="fp32", **options)
    auto = diagnose(model, None, safety, utility, **options)  # "auto" is bf16 on a bf16-capable GPU
    assert auto.metadata["options"]["hook_precision_used"] == {CUDA: "bfloat16"}
    assert fp32_output_gemms(torch.device(CUDA))  # this torch has the bf16 -> fp32 GEMMs, not the upcast fallback
    error = float((auto.oc - fp32.oc).abs().max())
    assert 0 < error < 2e-2, error
    torch.testing.assert_close(auto.fs_signed, fp32.fs_signed, rtol=1e-4, atol=1e-7)


@needs_bf16
def test_bf16_model_maps_agree_between_bf16_and_fp32_hooks():
    # A bf16 model's x and g are bf16 already: the bf16 GEMMs only change the summation order.
    model = build_tiny_model("llama", dtype=torch.bfloat16).to(CUDA)
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    fp32 = diagnose(model, None, safety, utility, progress=False, accumulation="exact", hook_precision="fp32")
    bf16 = diagnose(model, None, safety, utility, progress=False, accumulation="exact", hook_precision="bf16")
    torch.testing.assert_close(bf16.oc, fp32.oc, rtol=0, atol=1e-4)


def test_sketch_computes_x_s_once_per_shared_input_on_cuda():
    from test_hook_precision import _CountSketchProducts

    from cast_peft.diagnosis import Diagnosis

    model = build_tiny_model("llama").to(CUDA)
    run = Diagnosis(model, progress=False, accumulation="sketch", sketch_dim=24)
    with _CountSketchProducts(model.config.hidden_size, 24) as counter:
        run.add("safety", labelled_batches(0, 1))
    assert counter.count == 2 * model.config.num_hidden_layers


@pytest.mark.parametrize("accumulation", ["exact", "sketch"])
def test_offloaded_adds_use_pinned_buffers_and_never_sync_in_a_hook(accumulation):
    from cast_peft.diagnosis import Diagnosis

    model = build_tiny_model("qwen2").to(CUDA)
    safety, utility = labelled_batches(0, 2), labelled_batches(50, 2)
    options = {"progress": False, "accumulation": accumulation, "sketch_dim": 16}
    on_device = diagnose(model, None, safety, utility, **options)
    run = Diagnosis(model, offload=True, **options)
    accumulator = run.grads["safety"]
    assert all(t.device.type == "cpu" for t in accumulator.tensors())
    add = accumulator.add
    synced: list[str] = []

    def strict_add(*args, **kwargs):  # every hook's GEMMs and copies, with CUDA's sync detector raising
        torch.cuda.set_sync_debug_mode("error")
        try:
            return add(*args, **kwargs)
        except RuntimeError as err:
            synced.append(str(err))
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")

    accumulator.add = strict_add
    run.add("safety", safety)
    del accumulator.add
    run.add("utility", utility)
    assert not synced
    offloaded = run.conflict_map()
    torch.testing.assert_close(offloaded.oc, on_device.oc, rtol=0, atol=1e-5)
    buffers = [b for acc in run.grads.values() for b in acc.host.allocated]
    assert buffers and all(b.is_pinned() for b in buffers)
    plan = plan_diagnosis_memory(model, accumulation=accumulation, sketch_dim=16, offload=True)
    pinned = sum(b.numel() * b.element_size() for b in buffers)
    accumulators = 2 * sum(t.numel() * t.element_size() for t in run.grads["safety"].tensors())
    assert accumulators + pinned <= plan.devices["cpu"].accumulators


# ------------------------------------------------------------------------------------------------ CLI defaults (item 7)
def test_cli_diagnose_runs_on_the_gpu_by_default(tmp_path, capsys):
    """`cast-peft diagnose` with no --device/--dtype: the model goes to the GPU, in bf16 where it is native."""
    from models import build_tiny_tokenizer

    from cast_peft.cli import main

    build_tiny_model("llama").save_pretrained(tmp_path / "tiny")
    build_tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    weights = sum(p.numel() for p in build_tiny_model("llama").parameters()) * 2  # bytes in 16 bits
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    argv = ["diagnose", "--model", str(tmp_path / "tiny"), "--n-calibration", "4", "--max-length", "32"]
    assert main([*argv, "--output", str(tmp_path / "d")]) == 0
    assert torch.cuda.max_memory_allocated() - before >= weights  # the weights (at least) were on the GPU
    dtype = "bfloat16" if _bf16_capable() else "float16"
    assert f"device cuda:0, dtype {dtype}" in capsys.readouterr().err  # one GPU: {"": 0}; several: "auto" from 0
    assert (tmp_path / "d" / "map" / "conflict_map.json").is_file()
