"""DESIGN.md invariants 1-4 of the head-masked LoRA tuner, on every supported architecture."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from models import ARCHS, build_tiny_model, tiny_batch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

from cast_peft import (
    CASTLoraConfig,
    FrozenHeadsError,
    HeadMaskedLinear,
    count_effective_parameters,
    verify_frozen_heads,
)
from cast_peft.geometry import AttentionGeometry


SKIP = {0: [1], 1: [0, 3]}


def _weight_out_in(module) -> torch.Tensor:
    """The base weight as [out, in] whatever the storage (Conv1D stores [in, out])."""
    weight = module.weight
    return weight.T if isinstance(module, Conv1D) else weight


def _frozen_slices(model, geometry, config):
    """{path: (side, feature indices)} of the base weight entries that skipped heads own, from geometry alone."""
    result = {}
    for layer, paths in geometry.projections(model).items():
        units = config.enabled_units(layer)
        for name, path in paths.items():
            for role in geometry.layout.projections[name]:
                frozen = (~units[role]).nonzero().flatten()
                if len(frozen):
                    index = geometry.role_index(name, role)[frozen].reshape(-1)
                    result.setdefault(path, []).append(("in" if role == "o" else "out", index))
    return result


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _train(peft_model, steps=20, lr=5e-2, seed=0):
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    for step in range(steps):
        batch = tiny_batch(seed=seed + step)
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    return peft_model


def _logits(model, batch=None):
    batch = batch or tiny_batch(seed=123)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module", params=ARCHS)
def trained(request):
    """(arch, base weights, trained CAST peft model, its config): 20 AdamW steps with weight decay."""
    arch = request.param
    model = build_tiny_model(arch)
    base = _base_weights(model)
    config = CASTLoraConfig(r=4, lora_alpha=8, skip_heads=SKIP, init_lora_weights="gaussian")
    peft_model = _train(get_peft_model(model, config))
    return arch, base, peft_model, config


def test_skipped_lora_slices_stay_exactly_zero_and_others_train(trained):
    arch, _, peft_model, config = trained
    geometry = config.geometry
    layer_modules = dict(peft_model.base_model.model.named_modules())
    trained_entries = 0
    for path, slices in _frozen_slices(peft_model.base_model.model, geometry, config).items():
        layer = layer_modules[path]
        for side, index in slices:
            factor = layer.lora_B["default"].weight if side == "out" else layer.lora_A["default"].weight
            frozen = factor[index] if side == "out" else factor[:, index]
            assert torch.count_nonzero(frozen) == 0, f"{arch} {path}: skipped slice moved"
            others = torch.ones(factor.shape[0] if side == "out" else factor.shape[1], dtype=torch.bool)
            others[index] = False
            trained_entries += int(torch.count_nonzero(factor[others] if side == "out" else factor[:, others]))
    assert trained_entries > 0, "the non-skipped heads must have been trained"
    verify_frozen_heads(peft_model)


def test_skipped_heads_outputs_equal_base_after_training(trained):
    # On the same input, the q/k/v outputs of skipped heads with the adapter equal the base layer's, bit for bit.
    arch, _, peft_model, config = trained
    model = peft_model.base_model.model
    modules = dict(model.named_modules())
    frozen = _frozen_slices(model, config.geometry, config)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        modules[path].register_forward_hook(
            lambda m, args, out, path=path: captured.__setitem__(path, (args[0].detach(), out.detach()))
        )
        for path, slices in frozen.items()
        if slices[0][0] == "out"
    ]
    _logits(peft_model, tiny_batch(seed=7))
    for hook in hooks:
        hook.remove()
    assert captured
    for path, (x, out) in captured.items():
        with torch.no_grad():
            base_out = modules[path].get_base_layer()(x)
        for _, index in frozen[path]:
            assert torch.equal(out[..., index], base_out[..., index]), f"{arch} {path}"
        assert not torch.equal(out, base_out), f"{arch} {path}: the adapter must change the non-skipped heads"


def test_merge_and_unload_matches_forward_and_keeps_skipped_heads_bit_identical(trained):
    arch, base, peft_model, config = trained
    peft_model = copy.deepcopy(peft_model)
    expected = _logits(peft_model)
    frozen = _frozen_slices(peft_model.base_model.model, config.geometry, config)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-5)
    modules = dict(merged.named_modules())
    for path, slices in frozen.items():
        weight = _weight_out_in(modules[path])
        base_weight = base[f"{path}.weight"]
        base_weight = base_weight.T if isinstance(modules[path], Conv1D) else base_weight
        for side, index in slices:
            if side == "out":
                assert torch.equal(weight[index], base_weight[index]), f"{arch} {path} rows"
            else:
                assert torch.equal(weight[:, index], base_weight[:, index]), f"{arch} {path} columns"
        assert not torch.equal(weight, base_weight), f"{arch} {path}: other heads should have merged a delta"


def test_merge_unmerge_and_disable_adapter(trained):
    arch, base, peft_model, _ = trained
    peft_model = copy.deepcopy(peft_model)
    adapted = _logits(peft_model)
    with peft_model.disable_adapter():
        disabled = _logits(peft_model)
    base_model = build_tiny_model(arch)
    torch.testing.assert_close(disabled, _logits(base_model), rtol=0, atol=0)
    assert not torch.allclose(adapted, disabled)
    peft_model.merge_adapter()
    torch.testing.assert_close(_logits(peft_model), adapted, rtol=1e-4, atol=1e-5)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(_logits(peft_model), adapted, rtol=1e-4, atol=1e-5)
    for name, param in peft_model.base_model.model.named_parameters():
        if "lora_" not in name:
            original = base[name.replace(".base_layer", "")]
            torch.testing.assert_close(param, original, rtol=0, atol=1e-5)


def test_save_load_with_vanilla_peft_and_with_cast(trained, tmp_path):
    arch, _, peft_model, config = trained
    expected = _logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and "skip_heads" not in adapter_config

    # A plain LoraConfig read from adapter_config.json (what vanilla peft builds; without cast-peft imported this is
    # tests/test_frozen_promise.py::test_vanilla_peft_without_cast_peft_opens_a_cast_folder): plain LoRA layers, no
    # warnings, same outputs.
    plain = LoraConfig(**{k: v for k, v in adapter_config.items() if k != "peft_type"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations raised inside peft
        vanilla = PeftModel.from_pretrained(build_tiny_model(arch), tmp_path, config=plain)
    assert type(vanilla.peft_config["default"]) is LoraConfig
    assert not any(isinstance(m, HeadMaskedLinear) for m in vanilla.modules())
    torch.testing.assert_close(_logits(vanilla), expected, rtol=1e-5, atol=1e-6)

    # CAST-aware reload for further training restores the masks.
    cast_config = CASTLoraConfig.from_pretrained(tmp_path)
    assert cast_config.skip_heads == config.skip_heads and cast_config.attention_geometry == config.attention_geometry
    reloaded = PeftModel.from_pretrained(build_tiny_model(arch), tmp_path, config=cast_config, is_trainable=True)
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-6)
    assert any(isinstance(m, HeadMaskedLinear) for m in reloaded.modules())
    _train(reloaded, steps=3, seed=50)
    verify_frozen_heads(reloaded)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_skipped_heads_equals_vanilla_lora(arch):
    # Same seed, same targets: CAST with an empty skip set is LoRA, in outputs and in gradients.
    results = []
    for make_config in (
        lambda regex, fan: CASTLoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"),
        lambda regex, fan: LoraConfig(
            r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=regex, fan_in_fan_out=fan
        ),
    ):
        model = build_tiny_model(arch)
        geometry = AttentionGeometry.from_model(model)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, make_config(geometry.target_modules_regex(), arch == "gpt2"))
        peft_model.train()
        loss = peft_model(**tiny_batch()).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (cast_loss, cast_grads), (lora_loss, lora_grads) = results
    assert torch.equal(cast_loss, lora_loss)
    assert cast_grads.keys() == lora_grads.keys() and len(cast_grads) == 4 * len(
        AttentionGeometry.from_model(build_tiny_model(arch)).layout.projections
    )
    for name in cast_grads:
        assert torch.equal(cast_grads[name], lora_grads[name]), name


def test_kv_head_policy_all_and_any():
    model = build_tiny_model("llama")  # 4 heads, 2 KV heads: groups {0, 1} and {2, 3}
    config = CASTLoraConfig(r=2, skip_heads={0: [0, 1, 2]})
    config.bind(model)
    units = config.enabled_units(0)
    assert units["q"].tolist() == [False, False, False, True]
    assert units["k"].tolist() == [False, True]  # group 0 fully skipped; group 1 still has head 3
    config_any = CASTLoraConfig(r=2, skip_heads={0: [0, 1, 2]}, kv_head_policy="any")
    config_any.bind(model)
    assert config_any.enabled_units(0)["v"].tolist() == [False, False]
    explicit = CASTLoraConfig(r=2, skip_heads={0: [0]}, skip_kv_heads={0: [1]})
    explicit.bind(model)
    assert explicit.enabled_units(0)["k"].tolist() == [True, False]


def test_effective_parameter_count_excludes_masked_entries():
    model = build_tiny_model("llama")  # hidden 32, 4 heads of 8, 2 KV heads
    peft_model = get_peft_model(model, CASTLoraConfig(r=4, skip_heads={0: [0, 1]}))
    counts = count_effective_parameters(peft_model)
    # layer 0: q rows 2x8, k and v rows of KV head 0 (8 each), o columns 2x8 -> (16 + 8 + 8 + 16) * r
    assert counts["masked"] == (16 + 8 + 8 + 16) * 4
    assert counts["trainable"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert counts["effective"] == counts["trainable"] - counts["masked"]


def test_two_adapters_keep_their_own_masks():
    model = build_tiny_model("llama")
    peft_model = get_peft_model(model, CASTLoraConfig(r=4, skip_heads={0: [0]}, init_lora_weights=False))
    peft_model.add_adapter("second", CASTLoraConfig(r=4, skip_heads={1: [2]}, init_lora_weights=False))
    peft_model.add_adapter("plain", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    q0 = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    q1 = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    assert isinstance(q0.lora_B["default"], HeadMaskedLinear) and not isinstance(q0.lora_B["second"], HeadMaskedLinear)
    assert isinstance(q1.lora_B["second"], HeadMaskedLinear) and not isinstance(q1.lora_B["default"], HeadMaskedLinear)
    assert not isinstance(q0.lora_B["plain"], HeadMaskedLinear)
    assert torch.count_nonzero(q0.lora_B["default"].weight[:8]) == 0
    assert torch.count_nonzero(q1.lora_B["second"].weight[16:24]) == 0
    assert torch.count_nonzero(q0.lora_B["plain"].weight[:8]) > 0
    for adapter in ("second", "default"):
        peft_model.set_adapter(adapter)
        _train(peft_model, steps=3)
    verify_frozen_heads(peft_model)


def test_a_second_adapter_on_gpt2_records_its_conv1d_layout():
    # GPT-2's attention is transformers Conv1D (weights stored (in, out)); a second adapter meets it wrapped by the
    # first one's layers and must still save fan_in_fan_out=True, as vanilla peft would need to load it alone.
    model = build_tiny_model("gpt2")
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    peft_model = get_peft_model(model, CASTLoraConfig(r=2, skip_heads={0: [1]}))
    peft_model.add_adapter("second", CASTLoraConfig(r=2, skip_heads={1: [0]}))
    assert peft_model.peft_config["default"].fan_in_fan_out and peft_model.peft_config["second"].fan_in_fan_out


def test_gradient_checkpointing_keeps_masks():
    model = build_tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    peft_model = _train(get_peft_model(model, CASTLoraConfig(r=4, skip_heads=SKIP)), steps=3)
    assert verify_frozen_heads(peft_model)["checked_factors"] > 0


def test_mlp_targets_get_plain_lora_and_attention_stays_masked():
    model = build_tiny_model("llama")
    config = CASTLoraConfig(r=4, skip_heads={0: [0]}, target_modules=["q_proj", "o_proj", "gate_proj"])
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.model.layers[0]
    assert type(layer.mlp.gate_proj).__name__ == "Linear"  # peft's own LoRA layer
    assert isinstance(layer.self_attn.o_proj.lora_A["default"], HeadMaskedLinear)


def test_verify_frozen_heads_detects_a_written_slice():
    peft_model = get_peft_model(build_tiny_model("llama"), CASTLoraConfig(r=4, skip_heads={0: [0]}))
    with torch.no_grad():
        peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] = 1.0
    with pytest.raises(FrozenHeadsError, match="non-zero"):
        verify_frozen_heads(peft_model)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_bf16_base_merge_keeps_skipped_heads_bit_identical(arch):
    model = build_tiny_model(arch, dtype=torch.bfloat16)
    base = _base_weights(model)
    config = CASTLoraConfig(r=4, skip_heads=SKIP, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    frozen = _frozen_slices(peft_model.base_model.model, config.geometry, config)
    merged = peft_model.merge_and_unload()
    modules = dict(merged.named_modules())
    for path, slices in frozen.items():
        assert modules[path].weight.dtype == torch.bfloat16
        weight = _weight_out_in(modules[path])
        base_weight = base[f"{path}.weight"]
        base_weight = base_weight.T if isinstance(modules[path], Conv1D) else base_weight
        for side, index in slices:
            kept = weight[index] if side == "out" else weight[:, index]
            assert torch.equal(kept, base_weight[index] if side == "out" else base_weight[:, index]), path
        assert not torch.equal(weight, base_weight), path


def test_same_seed_same_adapter():
    def run():
        torch.manual_seed(3)
        peft_model = get_peft_model(build_tiny_model("qwen2"), CASTLoraConfig(r=4, skip_heads=SKIP))
        _train(peft_model, steps=5)
        return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}

    first, second = run(), run()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
