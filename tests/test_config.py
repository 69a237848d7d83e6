"""CASTLoraConfig: validation with errors that name the fix, and JSON round-trips."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import transformers
from models import build_tiny_model
from peft import LoraConfig, get_peft_model

from cast_peft import CASTLoraConfig
from cast_peft.geometry import UnsupportedArchitectureError


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"use_dora": True}, "use_dora=False"),
        ({"lora_bias": True}, "lora_bias=False"),
        ({"init_lora_weights": "pissa"}, "non-zero values or rewrites the base"),
        ({"init_lora_weights": "olora"}, "Use one of"),
        ({"init_lora_weights": "loftq"}, "Use one of"),
        ({"init_lora_weights": "corda"}, "Use one of"),
        ({"init_lora_weights": "orthogonal"}, "Use one of"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "remove target_parameters"),
        ({"kv_head_policy": "some"}, "'all' .* or 'any'"),
        ({"skip_heads": "{3: [1]"}, "not valid JSON"),
        ({"skip_heads": [1, 2]}, "must map layer index"),
        ({"skip_heads": {"x": [1]}}, "layer index -> list of head indices"),
        ({"skip_heads": {0: [-1]}}, "negative"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CASTLoraConfig(r=4, **kwargs)


def test_skip_set_out_of_range_names_the_model():
    model = build_tiny_model("llama")  # 2 layers x 4 heads
    with pytest.raises(ValueError, match="2 layers x 4 heads"):
        get_peft_model(model, CASTLoraConfig(r=4, skip_heads={0: [4]}))
    with pytest.raises(ValueError, match="2 layers x 4 heads"):
        get_peft_model(build_tiny_model("llama"), CASTLoraConfig(r=4, skip_heads={2: [0]}))
    with pytest.raises(ValueError, match="2 layers x 2 KV heads"):
        get_peft_model(build_tiny_model("llama"), CASTLoraConfig(r=4, skip_kv_heads={0: [2]}))


def test_all_heads_skipped_is_refused():
    with pytest.raises(ValueError, match="skips all 8 heads"):
        get_peft_model(build_tiny_model("llama"), CASTLoraConfig(r=4, skip_heads={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}))


def test_config_bound_to_another_model_is_refused():
    config = CASTLoraConfig(r=4, skip_heads={0: [1]})
    get_peft_model(build_tiny_model("llama"), config)
    with pytest.raises(ValueError, match="was made for .*llama.* but the model is .*qwen3"):
        get_peft_model(build_tiny_model("qwen3"), config)


def test_unsupported_architecture_is_refused():
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=32)
    )
    with pytest.raises(UnsupportedArchitectureError, match="Supported: "):
        get_peft_model(model, CASTLoraConfig(r=4))


def test_cast_on_top_of_plain_lora_is_refused():
    peft_model = get_peft_model(build_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="already wrapped by plain LoRA"):
        peft_model.add_adapter("cast", CASTLoraConfig(r=4, skip_heads={0: [1]}))


def test_json_string_keys_round_trip(tmp_path):
    config = CASTLoraConfig(r=4, skip_heads='{"1": [3, 0, 0], "0": [2]}', skip_kv_heads={"1": [0]})
    assert config.skip_heads == {0: [2], 1: [0, 3]} and config.skip_kv_heads == {1: [0]}
    get_peft_model(build_tiny_model("llama"), config)
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "cast_config.json").read_text())
    assert stored["skip_heads"] == {"0": [2], "1": [0, 3]}
    loaded = CASTLoraConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CASTLoraConfig)
    for name in ("skip_heads", "skip_kv_heads", "kv_head_policy", "attention_geometry", "r", "target_modules"):
        assert getattr(loaded, name) == getattr(config, name), name


def test_copy_deepcopy_pickle_keep_the_dispatcher():
    config = CASTLoraConfig(r=4, skip_heads={0: [1]})
    for clone in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone.skip_heads == {0: [1]} and clone._custom_modules


def test_from_pretrained_on_plain_lora_folder_says_so(tmp_path):
    LoraConfig(r=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a CAST adapter"):
        CASTLoraConfig.from_pretrained(tmp_path)


def test_corrupt_cast_config_is_a_clear_error(tmp_path):
    CASTLoraConfig(r=4).save_pretrained(tmp_path)
    (tmp_path / "cast_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CASTLoraConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_matching_lora_config_targets_the_same_modules_as_cast(arch):
    from cast_peft.tuner.config import matching_lora_config

    lora = get_peft_model(build_tiny_model(arch), matching_lora_config(build_tiny_model(arch), r=4))
    cast = get_peft_model(build_tiny_model(arch), CASTLoraConfig(r=4, skip_heads={0: [1]}))
    assert sorted(lora.base_model.targeted_module_names) == sorted(cast.base_model.targeted_module_names)
    assert lora.peft_config["default"].fan_in_fan_out == (arch == "gpt2")
