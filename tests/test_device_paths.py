"""Device paths that crashed on GPU machines (issue 14, items 1-6), each reproduced on the CPU: the 4-bit device map
under torchrun, offloaded (meta) weights, peft's low_cpu_mem_usage load, autocast around diagnosis, the staging
device of the all-reduce, and a bf16 Trainer's autocast wrapper left on the returned model (item 7b, a user's GGUF, is
tested in test_models.py, next to the GGUF it reuses)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _diag_worker import labelled_batches
from models import build_tiny_model, build_tiny_tokenizer, tiny_batch
from peft import PeftModel, get_peft_model

from cast_peft import CASTLoraConfig, models
from cast_peft.diagnosis import DiagnosisError, diagnose
from cast_peft.diagnosis import run as diagnosis_run


OPTIONS = {"kv_scoring": "separate", "progress": False, "seed": 3}


def _maps_close(got, want, **tolerance) -> None:
    want_tensors = want.tensors()
    for name, tensor in got.tensors().items():
        torch.testing.assert_close(tensor, want_tensors[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------ item 1
@pytest.mark.parametrize(("local_rank", "count", "expected"), [("0", 4, 0), ("1", 4, 1), ("3", 4, 3), ("2", 1, 0)])
def test_4bit_device_map_is_the_local_ranks_gpu(local_rank, count, expected):
    """torchrun/accelerate set LOCAL_RANK: rank r loads onto its own GPU, not GPU 0 (one visible GPU: that one)."""
    env = {"LOCAL_RANK": local_rank, "WORLD_SIZE": "4"}
    placement = models.resolve_device_and_dtype(load_in_4bit=True, gpus=[(8, 0)] * count, env=env)
    assert placement.device_map == {"": expected} and placement.dtype == torch.bfloat16


def test_local_rank_beyond_the_visible_gpus_is_a_clear_error():
    with pytest.raises(models.ModelLoadError, match="LOCAL_RANK=3.*device_map"):
        models.resolve_device_and_dtype(load_in_4bit=True, gpus=[(8, 0)] * 2, env={"LOCAL_RANK": "3"})


# ------------------------------------------------------------------------------------------------ item 2
@pytest.mark.parametrize("route", ["dispatch_model", "from_pretrained"])
@pytest.mark.parametrize("accumulation", ["exact", "sketch"])
def test_offloaded_model_gives_the_same_map(tmp_path, accumulation, route):
    """A device_map with "disk" entries leaves meta weights that accelerate's hooks move in at each forward."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    safety, utility = labelled_batches(0, 2), labelled_batches(100, 2)
    options = {**OPTIONS, "accumulation": accumulation, "sensitivity": "ablation"}
    reference = diagnose(build_tiny_model("llama"), None, safety, utility, **options)
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    offload = str(tmp_path / "offload")
    if route == "dispatch_model":
        model = dispatch_model(build_tiny_model("llama"), device_map=device_map, offload_dir=offload)
    else:
        build_tiny_model("llama").save_pretrained(tmp_path / "tiny")
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "tiny", device_map=device_map, offload_folder=offload, attn_implementation="eager"
        )
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    assert model.model.embed_tokens.weight.device.type == "meta"
    offloaded = diagnose(model, None, safety, utility, **options)
    _maps_close(offloaded, reference, rtol=1e-6, atol=1e-9)


def test_meta_weights_without_an_accelerate_hook_are_refused_up_front():
    with torch.device("meta"):
        model = build_tiny_model("llama")
    with pytest.raises(DiagnosisError, match="meta device.*real weights"):
        diagnose(model, None, labelled_batches(0, 1), labelled_batches(100, 1), **OPTIONS)


# ------------------------------------------------------------------------------------------------ item 3
def test_low_cpu_mem_usage_load_equals_the_normal_load(tmp_path):
    config = CASTLoraConfig(r=4, lora_alpha=8, skip_heads={0: [1, 2], 1: [0]}, init_lora_weights="gaussian")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(build_tiny_model("llama"), config)
    with torch.no_grad():  # non-zero B everywhere, also in skipped rows (the post-load hook must zero them)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    peft_model.save_pretrained(tmp_path)
    batch = tiny_batch(7)
    inputs = {"input_ids": batch["input_ids"]}
    loaded = {}
    for low in (False, True):
        cast_config = CASTLoraConfig.from_pretrained(tmp_path)
        model = PeftModel.from_pretrained(
            build_tiny_model("llama"), tmp_path, config=cast_config, low_cpu_mem_usage=low
        )
        assert not [n for n, t in model.state_dict().items() if t.device.type == "meta"]
        masks = [m.weight_mask for m in model.modules() if hasattr(m, "weight_mask")]
        assert masks and all(m.device.type == "cpu" for m in masks)
        with torch.no_grad():
            loaded[low] = model(**inputs).logits
        skipped_rows = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[8:24]
        assert torch.equal(skipped_rows, torch.zeros_like(skipped_rows))  # heads 1, 2 of 4 (head_dim 8)
    torch.testing.assert_close(loaded[True], loaded[False], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ item 4
@pytest.mark.parametrize("accumulation", ["exact", "sketch"])
def test_diagnosis_under_cpu_autocast(accumulation):
    """Inside ``torch.autocast`` (as inside ``accelerator.autocast()``) the hooks still add in fp32.

    The forward/backward themselves run in bf16 there (the caller's choice), so the map is that of a bf16 model and
    differs from the fp32 one by bf16 rounding of activations and gradients (8 significant bits: 2^-8 = 0.4% per op,
    compounded over two layers), not by anything in the fp32 accumulators. Measured here: sums within 1.3% of each
    role's largest, OC within 0.0008 (cosine units), FS within 0.5%; the bounds below leave about 2-6x margin."""
    safety, utility = labelled_batches(0, 2), labelled_batches(100, 2)
    options = {**OPTIONS, "accumulation": accumulation}
    model = build_tiny_model("llama")
    reference = diagnose(model, None, safety, utility, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = diagnose(model, None, safety, utility, **options)
    for role, stats in mixed.stats.items():
        want = reference.stats[role]
        assert stats.dtype == torch.float64
        scale = want.abs().amax(dim=(0, 1))  # per (⟨G_s,G_s⟩, ⟨G_u,G_u⟩, ⟨G_s,G_u⟩)
        assert ((stats - want).abs().amax(dim=(0, 1)) <= 0.03 * scale).all(), role
    assert (mixed.oc - reference.oc).abs().max() <= 0.005
    assert (mixed.fs - reference.fs).abs().max() <= 0.02 * reference.fs.abs().max()


# ------------------------------------------------------------------------------------------------ item 5
def test_staging_device_follows_the_tensors(monkeypatch):
    """NCCL needs the rank's own GPU: the accumulators' device, else LOCAL_RANK's; gloo reduces in place."""
    cuda1, cuda3, cpu = torch.device("cuda", 1), torch.device("cuda", 3), torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert diagnosis_run._staging_device("gloo", [cpu, cpu]) is None
    assert diagnosis_run._staging_device("nccl", [cpu, cuda3, cuda1]) == cuda3
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert diagnosis_run._staging_device("nccl", [cpu]) == cuda1  # offloaded accumulators: never cuda:0 implicitly


# ------------------------------------------------------------------------------------------------ item 6
def test_bf16_training_returns_a_model_without_autocast(tmp_path):
    from cast_peft.data import starter_set
    from cast_peft.training import train_adapter

    data = starter_set("safety")[:4] + starter_set("utility")[:4]
    config = CASTLoraConfig(r=4, lora_alpha=8, skip_heads={0: [1]})
    kwargs = {"max_steps": 2, "batch_size": 4, "max_length": 32, "disable_tqdm": True, "bf16": True}
    model = train_adapter(build_tiny_model("llama"), build_tiny_tokenizer(), data, config, tmp_path, **kwargs)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 was autocast only
    inputs = {"input_ids": tiny_batch(3)["input_ids"]}
    with torch.no_grad():
        got = model(**inputs).logits
        reference = type(model).forward(model, **inputs).logits  # the class's forward: plain fp32, no wrapper
        bf16 = reference.to(torch.bfloat16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
    assert not torch.equal(bf16.float(), reference)  # the check could tell bf16 from fp32
