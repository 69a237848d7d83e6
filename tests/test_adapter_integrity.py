"""A CAST adapter folder whose weights and `cast_config.json` come from different saves is refused on every path that
opens it (CASTLoraConfig.from_pretrained, and peft's own loaders through cast-peft's config shim)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from models import build_tiny_model
from peft import PeftModel, get_peft_model

from cast_peft import AdapterError, CASTLoraConfig


def _saved_pair(tmp_path):
    """Two saves of one CAST adapter with different LoRA weights, as folders ``a`` and ``b``."""
    model = get_peft_model(
        build_tiny_model("llama"), CASTLoraConfig(r=2, skip_heads={0: [1]}, init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.add_(1.0)
    model.save_pretrained(tmp_path / "b")
    return tmp_path / "a", tmp_path / "b"


def test_the_recorded_hash_is_the_weights_files(tmp_path):
    folder, _ = _saved_pair(tmp_path)
    recorded = json.loads((folder / "cast_config.json").read_text())["adapter_weights_sha256"]
    assert recorded == hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "open_folder",
    [
        lambda folder: CASTLoraConfig.from_pretrained(folder),
        lambda folder: PeftModel.from_pretrained(build_tiny_model("llama"), folder),
        lambda folder: PeftModel.from_pretrained(build_tiny_model("llama"), folder, is_trainable=True),
    ],
    ids=["CASTLoraConfig.from_pretrained", "PeftModel.from_pretrained", "is_trainable"],
)
def test_weights_from_another_save_are_refused(tmp_path, open_folder):
    a, b = _saved_pair(tmp_path)
    open_folder(a)  # a complete folder opens
    shutil.copyfile(b / "adapter_model.safetensors", a / "adapter_model.safetensors")  # new weights, old config
    with pytest.raises(AdapterError, match="different saves"):
        open_folder(a)


def test_load_adapter_refuses_weights_from_another_save(tmp_path):
    a, b = _saved_pair(tmp_path)
    shutil.copyfile(b / "adapter_model.safetensors", a / "adapter_model.safetensors")
    peft_model = PeftModel.from_pretrained(build_tiny_model("llama"), b)
    with pytest.raises(AdapterError, match="different saves"):
        peft_model.load_adapter(a, adapter_name="other")
