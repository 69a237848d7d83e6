"""Dense (full fine-tuning) mode: skipped heads' slices of the attention weights never move, on every architecture.

The frozen entries are computed here by hand from each architecture's documented layout (not from cast_peft's
geometry), and training runs real optimizers; so each test compares the library against an independent reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from launch import launch_two
from models import ARCHS, build_tiny_model, build_tiny_tokenizer, save_bnb_sized_llama, tiny_batch
from peft import LoraConfig, get_peft_model

from cast_peft import ConfigError, FrozenHeadsError, UnsupportedArchitectureError, freeze_heads, unfreeze_heads
from cast_peft.tuner.dense import DENSE_CONFIG_NAME, frozen_heads_of, load_dense_config


SKIP = {0: [1], 1: [2, 3]}  # under GQA with groups of 2, layer 1 freezes KV head 1 ("all" policy)


def reference_masks(model, skip, policy="all") -> dict[str, torch.Tensor]:
    """{parameter name: bool mask of its frozen entries}, from the head layout each architecture documents."""
    cfg = model.config
    n = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or n
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // n
    group = n // kv
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}

    def mark(name, rows=None, cols=None):
        if name not in params:
            return
        mask = masks.setdefault(name, torch.zeros(params[name].shape, dtype=torch.bool))
        if rows:
            mask[rows] = True
        if cols:
            mask[:, cols] = True

    for layer in range(cfg.num_hidden_layers):
        q_heads = set(skip.get(layer, []))
        rule = all if policy == "all" else any
        kv_heads = {j for j in range(kv) if rule(h in q_heads for h in range(j * group, (j + 1) * group))}
        q = [h * d + i for h in sorted(q_heads) for i in range(d)]
        k = [j * d + i for j in sorted(kv_heads) for i in range(d)]
        if cfg.model_type == "gpt2":  # Conv1D weight (in, out); c_attn outputs [Q | K | V]
            base = f"transformer.h.{layer}.attn"
            qkv = q + [n * d + r for r in k] + [2 * n * d + r for r in k]
            mark(f"{base}.c_attn.weight", cols=qkv)
            mark(f"{base}.c_attn.bias", rows=qkv)
            mark(f"{base}.c_proj.weight", rows=q)
        elif cfg.model_type == "gpt_neox":  # rows per head h: [q_h | k_h | v_h], 3d each (MHA)
            base = f"gpt_neox.layers.{layer}.attention"
            qkv = [h * 3 * d + i for h in sorted(q_heads) for i in range(3 * d)]
            mark(f"{base}.query_key_value.weight", rows=qkv)
            mark(f"{base}.query_key_value.bias", rows=qkv)
            mark(f"{base}.dense.weight", cols=q)
        elif cfg.model_type == "phi3":  # qkv_proj rows [Q | K | V]
            base = f"model.layers.{layer}.self_attn"
            mark(f"{base}.qkv_proj.weight", rows=q + [n * d + r for r in k] + [(n + kv) * d + r for r in k])
            mark(f"{base}.o_proj.weight", cols=q)
        else:
            base = f"model.layers.{layer}.self_attn"
            for proj, rows in (("q_proj", q), ("k_proj", k), ("v_proj", k)):
                mark(f"{base}.{proj}.weight", rows=rows)
                mark(f"{base}.{proj}.bias", rows=rows)
            mark(f"{base}.o_proj.weight", cols=q)
    return masks


def attention_params(model) -> list[str]:
    keys = ("self_attn.", "attn.c_", "attention.")
    return [name for name, _ in model.named_parameters() if any(key in name for key in keys)]


def train(model, steps=20, optimizer="adamw", lr=1e-2, weight_decay=0.1, seed=0):
    torch.manual_seed(seed)
    model.train()
    make = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=weight_decay),
        "adam": lambda p: torch.optim.Adam(p, lr=lr, weight_decay=weight_decay),  # L2 decay added to the gradient
        "sgd": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=weight_decay),
    }[optimizer]
    opt = make(model.parameters())
    for step in range(steps):
        loss = model(**tiny_batch(seed=step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_frozen_exact_and_rest_moved(model, base, masks):
    after = dict(model.named_parameters())
    assert masks, "the skip set froze nothing"
    for name in attention_params(model):
        mask = masks.get(name, torch.zeros(base[name].shape, dtype=torch.bool))
        now = after[name].detach()
        assert torch.equal(now[mask], base[name][mask]), f"{name}: frozen entries moved"
        # Every trained entry moved (AdamW's decay moves even an entry whose gradient is 0).
        assert bool((now[~mask] != base[name][~mask]).all()), f"{name}: some trained entries did not move"


@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_with_weight_decay_leaves_skipped_slices_bit_identical(arch):
    model = build_tiny_model(arch)
    base = snapshot(model)
    freeze_heads(model, SKIP)
    train(model, steps=20)
    assert_frozen_exact_and_rest_moved(model, base, reference_masks(model, SKIP))
    frozen_heads_of(model).verify()


@pytest.mark.parametrize(("arch", "policy"), [("llama", "any"), ("gemma3_text", "any"), ("gemma3_text", "all")])
def test_kv_head_policy_under_gqa_and_mqa(arch, policy):
    model = build_tiny_model(arch)
    base = snapshot(model)
    freeze_heads(model, {0: [1], 1: [0, 1, 2]}, kv_head_policy=policy)
    train(model, steps=20)
    masks = reference_masks(model, {0: [1], 1: [0, 1, 2]}, policy)
    assert_frozen_exact_and_rest_moved(model, base, masks)
    kv_frozen = masks["model.layers.1.self_attn.k_proj.weight"]
    # "any" freezes a KV head of layer 1; "all" under MQA (one KV head, 3 of 4 query heads skipped) keeps it training.
    assert bool(kv_frozen.any()) == (policy == "any" or arch == "llama")


def test_skip_kv_heads_given_directly():
    model = build_tiny_model("qwen2")  # has q/k/v biases
    base = snapshot(model)
    freeze_heads(model, {0: [0]}, skip_kv_heads={1: [1]})
    train(model, steps=20)
    masks = reference_masks(model, {0: [0]})  # q rows / o columns of head 0 in layer 0, no KV head by "all"
    kv = torch.zeros(base["model.layers.1.self_attn.k_proj.weight"].shape, dtype=torch.bool)
    kv[8:16] = True
    for proj in ("k_proj", "v_proj"):
        masks[f"model.layers.1.self_attn.{proj}.weight"] = kv
        masks[f"model.layers.1.self_attn.{proj}.bias"] = kv[:, 0]
    assert_frozen_exact_and_rest_moved(model, base, masks)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sgd_momentum_and_adam_l2_decay(optimizer):
    model = build_tiny_model("llama")
    base = snapshot(model)
    freeze_heads(model, SKIP)
    train(model, steps=20, optimizer=optimizer)
    assert_frozen_exact_and_rest_moved(model, base, reference_masks(model, SKIP))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_heads_skipped_is_plain_full_fine_tuning(arch):
    # Bit-identical, not allclose: with nothing frozen no hook touches any tensor, so the same kernels run on the same
    # data in the same order.
    plain = train(build_tiny_model(arch), steps=20)
    model = build_tiny_model(arch)
    freeze_heads(model, {})
    train(model, steps=20)
    for (name, p), (_, q) in zip(plain.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_trained_heads_train_as_if_the_frozen_entries_were_not_parameters():
    # Independent reference: SGD on a model in which the skipped entries' gradients are dropped by hand and the weight
    # decay (coupled, so it enters the gradient) is applied only to the trained entries.
    model = build_tiny_model("llama")
    reference = build_tiny_model("llama")
    masks = reference_masks(model, SKIP)
    freeze_heads(model, SKIP)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_params = dict(reference.named_parameters())
    for step in range(5):
        model(**tiny_batch(seed=step)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        reference(**tiny_batch(seed=step)).loss.backward()
        with torch.no_grad():
            for name, mask in masks.items():
                ref_params[name].grad[mask] = 0
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            for p in reference.parameters():
                p -= 0.05 * p.grad
                p.grad = None
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-6, atol=1e-7, msg=name)


def test_remove_leaves_a_plain_model_and_stops_freezing():
    model = build_tiny_model("llama")
    fresh = build_tiny_model("llama")
    handle = freeze_heads(model, SKIP)
    train(model, steps=3)
    handle.remove()
    assert frozen_heads_of(model) is None
    assert [(n, type(p), p.shape) for n, p in model.named_parameters()] == [
        (n, type(p), p.shape) for n, p in fresh.named_parameters()
    ]
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]
    assert all(not p._backward_hooks for p in model.parameters())
    before = snapshot(model)
    train(model, steps=2)  # now a plain model: the skipped slices train too
    masks = reference_masks(model, SKIP)
    for name, mask in masks.items():
        if mask.any():
            assert not torch.equal(model.get_parameter(name)[mask], before[name][mask]), name
    with pytest.raises(ConfigError, match="no frozen heads"):
        unfreeze_heads(model)
    freeze_heads(model, SKIP)  # can be frozen again
    unfreeze_heads(model)


def test_save_pretrained_writes_a_plain_checkpoint_and_the_skip_set(tmp_path):
    model = build_tiny_model("qwen3")
    base = snapshot(model)
    handle = freeze_heads(model, SKIP, kv_head_policy="any")
    train(model, steps=5)
    handle.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a plain transformers checkpoint
    from safetensors.torch import load_file

    on_disk = load_file(tmp_path / "out" / "model.safetensors")
    for name, mask in reference_masks(model, SKIP, "any").items():
        assert torch.equal(on_disk[name][mask], base[name][mask]), name
    for name, p in model.named_parameters():
        assert torch.equal(loaded.get_parameter(name), p.detach()), name
    saved = json.loads((tmp_path / "out" / DENSE_CONFIG_NAME).read_text())
    assert saved["skip_heads"] == {"0": [1], "1": [2, 3]} and saved["kv_head_policy"] == "any"
    assert saved["attention_geometry"]["num_kv_heads"] == 2
    # The skip set reloads onto the saved model to continue training.
    kwargs = load_dense_config(tmp_path / "out")
    freeze_heads(loaded, **kwargs)
    assert frozen_heads_of(loaded).skip_heads == {0: [1], 1: [2, 3]}
    with pytest.raises(ConfigError, match="made for"):  # same ranges, other head counts (llama: head_dim 8)
        freeze_heads(build_tiny_model("llama"), **kwargs)


def _trainer(model, tmp_path, **args):
    from cast_peft.data import starter_set
    from cast_peft.training import TokenizedDataset, _Collator

    tokenizer = build_tiny_tokenizer()
    data = starter_set("safety")[:8] + starter_set("utility")[:8]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "ckpt"), max_steps=20, learning_rate=1e-2, weight_decay=0.1,
        per_device_train_batch_size=4, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        remove_unused_columns=False, seed=0, logging_steps=100, **args,
    )  # fmt: skip
    dataset = TokenizedDataset(tokenizer, data, max_length=48)
    return transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=_Collator(0))


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_hf_trainer_adamw_weight_decay(tmp_path, gradient_checkpointing):
    model = build_tiny_model("phi3")
    base = snapshot(model)
    handle = freeze_heads(model, SKIP)
    trainer = _trainer(model, tmp_path, activation_checkpointing=gradient_checkpointing)
    trainer.train()
    assert model.is_activation_checkpointing == gradient_checkpointing
    assert trainer.optimizer.__class__.__name__ in ("AdamW", "AcceleratedOptimizer")
    assert_frozen_exact_and_rest_moved(model, base, reference_masks(model, SKIP))
    trainer.save_model(tmp_path / "model")  # the Trainer's own save: plain checkpoint; the skip set goes beside it
    handle.save_config(tmp_path / "model")
    assert load_dense_config(tmp_path / "model")["skip_heads"] == {"0": [1], "1": [2, 3]}


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from cast_peft.data import starter_set

    model = build_tiny_model("llama")
    base = snapshot(model)
    freeze_heads(model, SKIP)
    data = Dataset.from_list(
        [{"prompt": ex["prompt"], "completion": ex["response"]} for ex in starter_set("safety")[:8]]
    )
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4, learning_rate=1e-2,
                         weight_decay=0.1, report_to="none", use_cpu=True, max_length=48, disable_tqdm=True,
                         save_strategy="no")  # fmt: skip
    trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=build_tiny_tokenizer()).train()
    assert_frozen_exact_and_rest_moved(model, base, reference_masks(model, SKIP))


# ----------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("skip", "match"),
    [({2: [0]}, "2 layers x 4"), ({0: [4]}, "2 layers x 4"), ({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, "all 8"),
     ({-1: [0]}, "negative"), ("{not json", "not valid JSON")],
)  # fmt: skip
def test_bad_skip_sets_are_refused_before_anything_is_installed(skip, match):
    model = build_tiny_model("llama")
    with pytest.raises(ConfigError, match=match):
        freeze_heads(model, skip)
    assert frozen_heads_of(model) is None
    assert all(not p._backward_hooks for p in model.parameters())


def test_bad_policy_and_kv_set_are_refused():
    with pytest.raises(ConfigError, match="kv_head_policy"):
        freeze_heads(build_tiny_model("llama"), SKIP, kv_head_policy="some")
    with pytest.raises(ConfigError, match="KV heads"):
        freeze_heads(build_tiny_model("llama"), SKIP, skip_kv_heads={0: [2]})
    with pytest.raises(ConfigError, match="Pass skip_heads"):
        freeze_heads(build_tiny_model("llama"), None)


def test_unsupported_architecture_is_refused():
    config = transformers.OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                    vocab_size=64, word_embed_proj_dim=16)  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="Supported"):
        freeze_heads(transformers.OPTForCausalLM(config), {0: [0]})


def test_already_frozen_and_peft_models_are_refused():
    model = build_tiny_model("llama")
    freeze_heads(model, SKIP)
    with pytest.raises(ConfigError, match="already has frozen heads"):
        freeze_heads(model, {0: [0]})
    peft_model = get_peft_model(build_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    with pytest.raises(ConfigError, match="peft adapter layer"):
        freeze_heads(peft_model, SKIP)


def test_quantized_base_is_refused(tmp_path):
    pytest.importorskip("bitsandbytes")
    save_bnb_sized_llama(tmp_path)
    quant = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant)
    with pytest.raises(ConfigError, match="quantized"):
        freeze_heads(model, SKIP)
    assert frozen_heads_of(model) is None


def test_a_copy_of_a_frozen_model_is_a_plain_model():
    import copy

    model = build_tiny_model("llama")
    freeze_heads(model, SKIP)
    twin = copy.deepcopy(model)
    assert frozen_heads_of(twin) is None
    assert all(not p._backward_hooks for p in twin.parameters())  # torch does not copy tensor hooks
    base = snapshot(twin)
    train(twin, steps=2)  # the copy trains every head; the original's handle does not touch it
    assert not torch.equal(
        twin.model.layers[0].self_attn.q_proj.weight[8:16], base["model.layers.0.self_attn.q_proj.weight"][8:16]
    )
    freeze_heads(twin, SKIP)


def test_verify_detects_a_slice_written_outside_an_optimizer(tmp_path):
    model = build_tiny_model("llama")
    handle = freeze_heads(model, SKIP)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[8, 0] += 1  # head 1's first q row
    with pytest.raises(FrozenHeadsError, match="q_proj.weight: 1 frozen entries changed"):
        handle.verify()
    with pytest.raises(FrozenHeadsError, match="frozen entries changed"):  # checked before anything is written
        handle.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------- distributed
@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """One 2-process gloo run of tests/_dense_worker.py (DDP, FSDP2, FSDP1 in turn): its output folder."""
    out = tmp_path_factory.mktemp("dense-gloo")
    launch_two([str(Path(__file__).with_name("_dense_worker.py")), str(out)], port=29541)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "trainer"])
def test_two_process_gloo_keeps_skipped_slices_bit_identical(mode, distributed_runs):
    ranks = [torch.load(distributed_runs / f"{mode}-rank{r}.pt") for r in (0, 1)]
    base = build_tiny_model("llama")
    masks = reference_masks(base, SKIP)
    for rank in ranks:
        assert rank["world_size"] == 2
        trained = build_tiny_model("llama")
        trained.load_state_dict(rank["params"], strict=True)
        assert_frozen_exact_and_rest_moved(trained, snapshot(base), masks)
    for name in ranks[0]["params"]:  # the replicas agree (DDP all-reduce; FSDP2 gathered shards)
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name


def test_fsdp1_is_refused_before_its_first_step(distributed_runs):
    for rank in (0, 1):
        message = (distributed_runs / f"fsdp1-rank{rank}.txt").read_text()
        assert message.startswith("steps=0\n") and "use FSDP2" in message, message
