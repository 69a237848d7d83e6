"""Issue 12, items 9, 10, 12 and 15 (library side): every example form TRL's SFTTrainer accepts, numbers that mean
something else, hand-edited geometry, models without an LM head or with a short context, and the prompt format."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings

import pytest
import torch
import transformers
from models import TINY_CONFIGS, build_byte_tokenizer, build_tiny_model, build_tiny_tokenizer
from peft import LoraConfig

from cast_peft import CASTLoraConfig, CastWarning, ConfigError, ConflictMapError, DataError, DiagnosisError
from cast_peft.conflict_map import ConflictMap
from cast_peft.data import (
    FALLBACK_TEMPLATE,
    IGNORE_INDEX,
    load_examples,
    load_pairs,
    load_texts,
    make_batches,
    prompt_format,
    starter_set,
)
from cast_peft.diagnosis import diagnose
from cast_peft.evaluation import generate_responses, response_nll
from cast_peft.geometry import HeadCounts
from cast_peft.training import TokenizedDataset, train_adapter
from cast_peft.tuner.config import normalize_head_map


SAFETY = starter_set("safety")[:4]
UTILITY = starter_set("utility")[:4]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _as_completion(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["response"]} for r in rows]


def _diagnose(safety, utility, tokenizer=None, model=None, **kwargs) -> ConflictMap:
    model = model if model is not None else build_tiny_model("llama")
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return diagnose(model, tokenizer, safety, utility, batch_size=2, max_length=64, progress=False, **kwargs)


@pytest.fixture(scope="module")
def chatml_tok():
    corpus = [f"{r['prompt']} {r['response']}" for r in SAFETY + UTILITY]
    return build_byte_tokenizer(corpus, ["<pad>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<pad>",
                                chat_template=CHATML)  # fmt: skip


def _scored_segments(tok, ex: dict) -> list[str]:
    """Decoded runs of consecutive scored tokens (labels != -100)."""
    runs, current = [], []
    for token, label in zip(ex["input_ids"], ex["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


# ---------------------------------------------------------------------------------------------------- item 9: forms
def test_prompt_completion_map_equals_prompt_response_map():
    pairs = _diagnose(SAFETY, UTILITY)
    completion = _diagnose(_as_completion(SAFETY), _as_completion(UTILITY))
    prompts_only = _diagnose([r["prompt"] for r in SAFETY], UTILITY)
    for name, tensor in pairs.tensors().items():
        assert torch.equal(tensor, completion.tensors()[name]), name
    assert not torch.equal(pairs.score, prompts_only.score)
    assert not torch.equal(pairs.stats["q"], prompts_only.stats["q"])


def test_train_adapter_accepts_prompt_completion(tmp_path):
    tok = build_tiny_tokenizer()
    data = _as_completion(SAFETY)
    dataset = TokenizedDataset(tok, data, max_length=4096)
    for row, feature in zip(SAFETY, dataset.features):
        # Independent rendering: the chat template's user turn + generation prompt, then response + EOS.
        prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
        ids = tok(prompt + row["response"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert feature["input_ids"] == ids
        assert feature["labels"] == [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    model = train_adapter(build_tiny_model("llama"), tok, data, CASTLoraConfig(r=2, skip_heads={0: [1]}),
                          tmp_path, max_steps=1, batch_size=2, max_length=64, disable_tqdm=True)  # fmt: skip
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert model.peft_config["default"].skip_heads == {0: [1]}


def test_messages_scores_only_assistant_turns(chatml_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    (batch,) = make_batches(chatml_tok, [{"messages": messages, "id": 3}], batch_size=1, max_length=256)
    ex = {k: batch[k][0].tolist() for k in ("input_ids", "labels")}
    full = chatml_tok.apply_chat_template(messages, tokenize=False)
    assert ex["input_ids"] == chatml_tok(full, add_special_tokens=False)["input_ids"]
    assert _scored_segments(chatml_tok, ex) == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
    # TRL's conversational prompt/completion: the loss covers the completion only (not the earlier assistant turn).
    conv = {"prompt": messages[:4], "completion": messages[4:]}
    (batch,) = make_batches(chatml_tok, [conv], batch_size=1, max_length=256)
    ex = {k: batch[k][0].tolist() for k in ("input_ids", "labels")}
    assert ex["input_ids"] == chatml_tok(full, add_special_tokens=False)["input_ids"]
    assert _scored_segments(chatml_tok, ex) == ["Rome.<|im_end|>\n"]


def test_messages_mask_equals_transformers_assistant_mask():
    # TRL's assistant_only_loss takes its mask from apply_chat_template(return_assistant_tokens_mask=True), which
    # needs {% generation %} markers; our mask needs none, and on a template that has them it must agree.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = build_byte_tokenizer(["Paris Rome capital France Italy"], ["<pad>", "<|im_start|>", "<|im_end|>"],
                               eos="<|im_end|>", pad="<pad>", chat_template=template)  # fmt: skip
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    reference = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    (batch,) = make_batches(tok, [{"messages": messages}], batch_size=1, max_length=512)
    assert batch["input_ids"][0].tolist() == reference["input_ids"]
    assert (batch["labels"][0] != IGNORE_INDEX).int().tolist() == reference["assistant_masks"]


def test_messages_without_chat_template_use_the_fallback(chatml_tok):
    plain = build_byte_tokenizer(["Paris. Rome."], ["<pad>", "<|im_end|>"], eos="<|im_end|>", pad="<pad>")
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    (batch,) = make_batches(plain, [{"messages": messages}], batch_size=1, max_length=256)
    ex = {k: batch[k][0].tolist() for k in ("input_ids", "labels")}
    text = FALLBACK_TEMPLATE.format(prompt="Capital of France?") + "Paris.<|im_end|>"
    assert ex["input_ids"] == plain(text)["input_ids"]
    assert _scored_segments(plain, ex) == ["Paris.<|im_end|>"]


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "q", "output": "a"},
        {"prompt": "q", "answer": "a"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q"},
        {"prompt": "q", "response": "a", "completion": "b"},
        {"messages": "hi"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": [{"role": "user", "content": "q"}], "completion": "a"},
        7,
    ],
)
def test_unknown_or_incomplete_forms_are_refused(row, tmp_path):
    tok = build_tiny_tokenizer()
    for call in (
        lambda: make_batches(tok, [row]),
        lambda: TokenizedDataset(tok, [row]),
        lambda: load_examples([row]),
    ):
        with pytest.raises(DataError, match="item 0|example 0") as err:
            call()
        assert "prompt" in str(err.value) and ("messages" in str(err.value) or "assistant" in str(err.value))
    model = build_tiny_model("llama")
    with pytest.raises(DataError):
        _diagnose([row], UTILITY, tok, model)
    # Nothing was trained or written on a refused training set.
    with pytest.raises(DataError):
        train_adapter(model, tok, [row], CASTLoraConfig(r=2), tmp_path / "out", max_steps=1)
    assert not (tmp_path / "out").exists()
    assert not any("lora" in name for name, _ in model.named_modules())


def test_load_examples_reads_every_form(tmp_path):
    rows = [
        {"prompt": "q", "response": "a", "category": "x"},
        {"prompt": "q", "completion": "a"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"text": "plain"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert load_examples(path) == rows
    assert load_examples(path, limit=2) == rows[:2]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q"}), encoding="utf-8")
    with pytest.raises(DataError, match=r"data.jsonl:2"):
        load_examples(path)
    # load_pairs reads pairs only; TRL's column name gets a hint instead of "missing column 'response'".
    with pytest.raises(DataError, match="response_column='completion'"):
        load_pairs([rows[1]])
    assert load_pairs([rows[1]], response_column="completion") == [{"prompt": "q", "response": "a"}]


# ----------------------------------------------------------------------------------------------- item 10: numbers
@pytest.mark.parametrize(
    "value", [{0: [1.7]}, {0: [True]}, {0: ["x"]}, {True: [1]}, {1.5: [0]}, {0: 1.0}, {"0": [None]}]
)
def test_head_maps_refuse_non_integers(value):
    with pytest.raises(ConfigError, match="skip_heads"):
        normalize_head_map(value)
    with pytest.raises(ConfigError):
        CASTLoraConfig(skip_heads=value)


def test_head_maps_still_accept_json_and_integer_likes():
    import numpy as np

    assert normalize_head_map('{"3": [0, 5], "1": 2}') == {1: [2], 3: [0, 5]}
    assert normalize_head_map({np.int64(2): (np.int64(1), 0)}) == {2: [0, 1]}


def _map(score_like: torch.Tensor | None = None, **overrides) -> ConflictMap:
    counts = HeadCounts("llama", 2, 4, 2, 8)
    gen = torch.Generator().manual_seed(0)
    stats = {r: torch.rand(2, 2 if r in "kv" else 4, 3, generator=gen) + 0.1 for r in "qkvo"}
    fs = torch.rand(2, 4, generator=gen) if score_like is None else score_like
    return ConflictMap(counts, overrides.pop("stats", stats), overrides.pop("fs", fs), **overrides)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"skip_k": 2.7},
        {"skip_k": True},
        {"skip_k": "2"},
        {"threshold": math.nan},
        {"threshold": math.inf},
        {"skip_ratio": math.nan},
        {"skip_ratio": True},
    ],
)
def test_select_refuses_numbers_that_mean_something_else(kwargs):
    cmap = _map(kv_scoring="separate")
    with pytest.raises(ConfigError):
        cmap.select(**kwargs)
    with pytest.raises(ConfigError):
        cmap.select_kv(**kwargs)


def test_map_refuses_nonfinite_kv_and_extra_tensors():
    bad = torch.zeros(2, 2)
    bad[1, 0] = math.nan
    with pytest.raises(ConflictMapError, match="fs_kv_signed"):
        _map(fs_kv_signed=bad)
    with pytest.raises(ConflictMapError, match="taylor_signed"):
        _map(extras={"taylor_signed": torch.full((2, 4), math.inf)})


def test_constant_map_warns_when_ranking():
    stats = {r: torch.ones(2, 2 if r in "kv" else 4, 3) for r in "qkvo"}
    cmap = _map(stats=stats, fs=torch.full((2, 4), 0.5))
    for policy in ("score", "oc", "fs"):
        with pytest.warns(CastWarning, match="nothing to rank"):
            cmap.select(skip_k=2, policy=policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cmap.select(skip_k=2, policy="random")
        _map().select(skip_k=2)
        cmap.select(skip_k=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_steps": 0},
        {"max_steps": -1},
        {"batch_size": 0},
        {"max_length": -5},
        {"gradient_accumulation_steps": 0},
        {"max_steps": 2.5},
        {"max_steps": True},
    ],
)
def test_train_adapter_refuses_nonpositive_counts_before_work(kwargs, tmp_path):
    model = build_tiny_model("llama")
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        train_adapter(model, build_tiny_tokenizer(), SAFETY, CASTLoraConfig(r=2), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    assert not any("lora" in name for name, _ in model.named_modules())


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"max_length": -1}, {"batch_size": 2.0}])
def test_diagnose_refuses_nonpositive_counts(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        diagnose(build_tiny_model("llama"), build_tiny_tokenizer(), SAFETY, UTILITY, progress=False, **kwargs)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_loaders_refuse_nonpositive_limit(limit):
    rows = [{"prompt": "q", "response": "a"}] * 3
    for call in (load_pairs, load_texts, load_examples):
        with pytest.raises(ConfigError, match="limit"):
            call(rows, limit=limit)


# ------------------------------------------------------------------------------------- item 12: unclear errors
@pytest.mark.parametrize(
    "edit",
    [
        {"num_heads": "4"},
        {"num_heads": 0},
        {"num_kv_heads": 3},
        {"num_layers": -2},
        {"head_dim": 2.5},
        {"num_kv_heads": True},
        {"model_type": 5},
    ],
)
def test_hand_edited_geometry_is_a_config_error(edit, tmp_path):
    good = HeadCounts("llama", 2, 4, 2, 8).to_dict()
    with pytest.raises(ConfigError, match=next(iter(edit))):
        HeadCounts.from_dict({**good, **edit})
    # The same edit in a saved adapter's cast_config.json.
    model = build_tiny_model("llama")
    from peft import get_peft_model

    get_peft_model(model, CASTLoraConfig(r=2, skip_heads={0: [1]})).save_pretrained(tmp_path)
    cast = json.loads((tmp_path / "cast_config.json").read_text())
    cast["attention_geometry"].update(edit)
    (tmp_path / "cast_config.json").write_text(json.dumps(cast))
    with pytest.raises(ConfigError):
        CASTLoraConfig.from_pretrained(str(tmp_path))


def test_model_config_with_zero_heads_is_a_config_error():
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4).to_dict()
    for edit in ({"num_attention_heads": 0}, {"num_hidden_layers": 0}, {"num_attention_heads": 5}):
        with pytest.raises(ConfigError):
            HeadCounts.from_model_config({**config, **edit})


def test_diagnose_refuses_a_model_without_lm_head():
    base = transformers.LlamaModel(TINY_CONFIGS["llama"])
    # tokenizer=None with examples would fail later: the head check comes first, before any work.
    with pytest.raises(DiagnosisError, match="AutoModelForCausalLM"):
        diagnose(base, None, SAFETY, UTILITY, progress=False)


def test_gpt2_inputs_longer_than_the_context_are_clamped(caplog, tmp_path):
    model = build_tiny_model("gpt2")  # n_positions = 64
    tok = build_tiny_tokenizer()
    long = [{"prompt": r["prompt"] * 6, "response": r["response"] * 6} for r in SAFETY]
    with caplog.at_level(logging.WARNING, logger="cast_peft"):
        cmap = diagnose(model, tok, long, long, batch_size=2, max_length=256, progress=False)
    assert cmap.metadata["data"]["safety"]["tokens"] == 4 * 64
    assert any("n_positions" in r.getMessage() for r in caplog.records)
    train_adapter(model, tok, long, CASTLoraConfig(r=2), tmp_path, max_steps=1, batch_size=2, max_length=256,
                  disable_tqdm=True)  # fmt: skip
    nll = response_nll(model, tok, long, batch_size=2, max_length=256, progress=False)
    assert nll["n_tokens"] > 0 and math.isfinite(nll["nll"])
    (text,) = generate_responses(model, tok, [long[0]["prompt"]], max_new_tokens=4, progress=False)
    assert isinstance(text, str)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_responses(model, tok, ["hi"], max_new_tokens=64, progress=False)


def test_pretokenized_batches_longer_than_the_context_are_refused():
    model = build_tiny_model("gpt2")
    batch = {"input_ids": torch.ones(1, 80, dtype=torch.long)}
    with pytest.raises(DiagnosisError, match="n_positions"):
        diagnose(model, None, [batch], [batch], progress=False)


# ------------------------------------------------------------------------------------- item 15: prompt format
def test_prompt_format_is_decided_once_and_logged_once(caplog):
    chat, plain = build_tiny_tokenizer(chat=True), build_tiny_tokenizer(chat=False)
    chat.name_or_path, plain.name_or_path = "test/chat-format-tok", "test/plain-format-tok"
    with caplog.at_level(logging.INFO, logger="cast_peft"):
        for _ in range(3):
            assert prompt_format(plain) == "fallback:instruction"
            expected = "chat_template:" + hashlib.sha256(chat.chat_template.encode()).hexdigest()
            assert prompt_format(chat) == expected
    messages = [r.getMessage() for r in caplog.records]
    assert sum("plain-format-tok" in m and "### Instruction:" in m for m in messages) == 1
    assert sum("chat-format-tok" in m and "chat template" in m for m in messages) == 1


def test_map_and_adapter_record_the_prompt_format(tmp_path):
    chat, plain = build_tiny_tokenizer(chat=True), build_tiny_tokenizer(chat=False)
    cmap = _diagnose(SAFETY, UTILITY, chat)
    assert cmap.metadata["prompt_format"] == prompt_format(chat)
    cmap.save(tmp_path / "map")
    assert ConflictMap.load(tmp_path / "map").metadata["prompt_format"] == prompt_format(chat)
    assert _diagnose(SAFETY, UTILITY, plain).metadata["prompt_format"] == "fallback:instruction"

    config = CASTLoraConfig.from_conflict_map(cmap, skip_k=2, r=2)
    assert config.source_map["prompt_format"] == prompt_format(chat)
    kwargs = dict(max_steps=1, batch_size=2, max_length=64, disable_tqdm=True)
    with pytest.warns(CastWarning, match="fallback:instruction"):
        train_adapter(build_tiny_model("llama"), plain, SAFETY, config, tmp_path / "a", **kwargs)
    saved = json.loads((tmp_path / "a" / "adapter" / "cast_config.json").read_text())
    assert saved["source_map"]["train_prompt_format"] == "fallback:instruction"
    assert saved["source_map"]["prompt_format"] == prompt_format(chat)

    with warnings.catch_warnings():
        warnings.simplefilter("error", CastWarning)
        # Unrelated to the prompt format: the GQA skip set here freezes no KV head (issue 12 item 14 warns).
        warnings.filterwarnings("ignore", message="The skip set freezes no KV head", category=CastWarning)
        config = CASTLoraConfig.from_conflict_map(cmap, skip_k=2, r=2)
        train_adapter(build_tiny_model("llama"), chat, SAFETY, config, tmp_path / "b", **kwargs)
        # Plain texts are not rendered with any prompt format, so nothing to compare; plain LoRA has no source map.
        config = CASTLoraConfig.from_conflict_map(cmap, skip_k=2, r=2)
        train_adapter(build_tiny_model("llama"), plain, ["some text"] * 2, config, tmp_path / "c", **kwargs)
        lora = LoraConfig(r=2, target_modules=["q_proj"])
        train_adapter(build_tiny_model("llama"), plain, SAFETY, lora, tmp_path / "d", **kwargs)
