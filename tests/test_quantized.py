"""QLoRA path: CAST on bitsandbytes 4-bit (NF4) and 8-bit bases, on CPU with fp32 compute."""

from __future__ import annotations

import pytest
import torch
import transformers
from models import save_bnb_sized_llama, tiny_batch
from peft import PeftModel, get_peft_model

from cast_peft import CASTLoraConfig, HeadMaskedLinear, verify_frozen_heads


bnb = pytest.importorskip("bitsandbytes", reason="the `bnb` extra is installed in CI; install cast-peft[bnb]")

QUANTIZATION = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "int8": {"load_in_8bit": True},
}
SKIP = {0: [1], 1: [2, 3]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_bnb_sized_llama(path)
    return path


def _load(path, kind):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.BitsAndBytesConfig(**QUANTIZATION[kind]), dtype=torch.float32
    )


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_trains_with_skipped_heads_frozen(checkpoint, kind, tmp_path):
    model = _load(checkpoint, kind)
    config = CASTLoraConfig(r=4, lora_alpha=8, skip_heads=SKIP)
    peft_model = get_peft_model(model, config)
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected_cls = "CastLinear4bit" if kind == "nf4" else "CastLinear8bitLt"
    assert type(q_proj).__name__ == expected_cls
    assert isinstance(q_proj.get_base_layer(), bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt)

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    peft_model.train()
    for step in range(20):
        peft_model(**tiny_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    verify_frozen_heads(peft_model)
    assert torch.count_nonzero(q_proj.lora_B["default"].weight[32:]) > 0, "non-skipped heads must train"

    # Skipped head 1 of layer 0: q rows 32..63 equal the quantized base layer's output on the same input.
    captured = {}
    hook = q_proj.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    batch = tiny_batch(seed=99)
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"]).logits
        base_out = q_proj.get_base_layer()(captured["x"])
    hook.remove()
    assert torch.equal(captured["out"][..., 32:64], base_out[..., 32:64])
    assert not torch.equal(captured["out"], base_out)

    # The saved adapter is plain LoRA: vanilla peft on a freshly quantized base reproduces the outputs.
    peft_model.save_pretrained(tmp_path)
    vanilla = PeftModel.from_pretrained(_load(checkpoint, kind), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(vanilla(input_ids=batch["input_ids"]).logits, logits, rtol=1e-4, atol=1e-4)


def test_nf4_merge_is_close_and_restores_bnb_layers(checkpoint):
    # Merging into NF4 re-quantizes whole matrices, so (as peft's own 4-bit merge tests) compare probabilities loosely;
    # bit-exact frozen heads need a fp32/bf16 base (tests/test_tuner.py).
    peft_model = get_peft_model(
        _load(checkpoint, "nf4"), CASTLoraConfig(r=4, skip_heads=SKIP, init_lora_weights=False)
    )
    assert any(isinstance(m, HeadMaskedLinear) for m in peft_model.modules())
    batch = tiny_batch(seed=3)
    with torch.no_grad():
        before = peft_model(input_ids=batch["input_ids"]).logits.softmax(-1)
        merged = peft_model.merge_and_unload()
        after = merged(input_ids=batch["input_ids"]).logits.softmax(-1)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    torch.testing.assert_close(after, before, atol=0.01, rtol=10)


def test_cpu_repacked_4bit_layers_are_refused_and_prevented(checkpoint):
    from cast_peft.diagnosis import diagnose
    from cast_peft.models import keep_cpu_4bit_layout

    model = _load(checkpoint, "nf4")
    if not model.model.layers[0].self_attn.q_proj.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks 4-bit weights here")
    batch = tiny_batch()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])  # an evaluation pass repacks the weights
    with pytest.raises(RuntimeError, match="repacked for CPU inference"):
        diagnose(model, None, [batch], [batch], progress=False)

    fresh = _load(checkpoint, "nf4")
    keep_cpu_4bit_layout(fresh)
    with torch.no_grad():
        fresh(input_ids=batch["input_ids"])
    diagnose(fresh, None, [batch], [batch], progress=False)  # gradients still flow
