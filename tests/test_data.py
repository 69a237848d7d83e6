"""Tests for cast_peft.data: loading, chat formatting, loss masking, batching and starter set."""

import json
from collections import Counter

import datasets
import pytest
import torch
from models import build_byte_tokenizer
from transformers import PreTrainedTokenizerFast

from cast_peft import data
from cast_peft.data import (
    FALLBACK_TEMPLATE,
    IGNORE_INDEX,
    DataError,
    collate,
    format_chat,
    load_pairs,
    load_texts,
    make_batches,
    starter_set,
    tokenize_pair,
    tokenize_text,
)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "What is the capital of France? The capital of France is Paris.",
    "How many legs does a spider have? A spider has eight legs.",
    "Write a haiku about the sea. Waves fold into foam.",
    "I can't help with that request, but I can suggest a safer alternative.",
]


def _build_tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    return build_byte_tokenizer(
        SENTENCES,
        ["<pad>", "<|im_start|>", "<|im_end|>"],
        eos="<|im_end|>",
        pad="<pad>",
        chat_template=CHAT_TEMPLATE if chat else None,
    )


@pytest.fixture(scope="module")
def chat_tok() -> PreTrainedTokenizerFast:
    return _build_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok() -> PreTrainedTokenizerFast:
    return _build_tokenizer(chat=False)


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _split_labels(ex: dict) -> tuple[list[int], list[int]]:
    """(masked prompt ids, unmasked response ids), asserting the mask is a prefix."""
    n_masked = sum(1 for label in ex["labels"] if label == IGNORE_INDEX)
    assert ex["labels"][:n_masked] == [IGNORE_INDEX] * n_masked, "prompt mask must be a prefix"
    assert ex["labels"][n_masked:] == ex["input_ids"][n_masked:]
    return ex["input_ids"][:n_masked], ex["input_ids"][n_masked:]


# ------------------------------------------------------------------------------------------ formatting and masking
def test_format_chat_uses_template(chat_tok):
    prompt_text, full_text = format_chat(chat_tok, "Hi there", "Hello!")
    assert prompt_text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert full_text == prompt_text + "Hello!<|im_end|>"
    assert format_chat(chat_tok, "Hi there") == (prompt_text, prompt_text)


def test_format_chat_fallback_without_template(plain_tok):
    prompt_text, full_text = format_chat(plain_tok, "Name a color.", "Blue.")
    assert (
        prompt_text
        == "### Instruction:\nName a color.\n\n### Response:\n"
        == FALLBACK_TEMPLATE.format(prompt="Name a color.")
    )
    assert full_text == prompt_text + "Blue.<|im_end|>"
    masked, unmasked = _split_labels(tokenize_pair(plain_tok, "Name a color.", "Blue."))
    assert _decode(plain_tok, unmasked) == "Blue.<|im_end|>"
    assert _decode(plain_tok, masked) == prompt_text


def test_tokenize_pair_loss_only_on_response(chat_tok):
    prompt, response = "What is the capital of France?", "The capital of France is Paris."
    ex = tokenize_pair(chat_tok, prompt, response)
    assert len(ex["input_ids"]) == len(ex["attention_mask"]) == len(ex["labels"])
    assert set(ex["attention_mask"]) == {1}
    masked, unmasked = _split_labels(ex)
    prompt_text, full_text = format_chat(chat_tok, prompt, response)
    assert _decode(chat_tok, unmasked) == response + chat_tok.eos_token
    assert _decode(chat_tok, masked) == prompt_text
    assert _decode(chat_tok, ex["input_ids"]) == full_text


def test_tokenize_pair_truncates_prompt_from_left(chat_tok):
    prompt = "How many legs does a spider have? " * 30
    response = "A spider has eight legs."
    ex = tokenize_pair(chat_tok, prompt, response, max_length=40)
    assert len(ex["input_ids"]) == 40
    masked, unmasked = _split_labels(ex)
    assert masked, "some prompt context should survive"
    assert _decode(chat_tok, unmasked) == response + chat_tok.eos_token
    assert format_chat(chat_tok, prompt, response)[1].endswith(_decode(chat_tok, ex["input_ids"]))


def test_tokenize_pair_long_response_keeps_prompt_and_response_head(chat_tok):
    prompt, response = "Hi", "The capital of France is Paris. " * 40
    n_prompt = len(chat_tok(format_chat(chat_tok, prompt)[0], add_special_tokens=False)["input_ids"])
    ex = tokenize_pair(chat_tok, prompt, response, max_length=64)
    masked, unmasked = _split_labels(ex)
    assert len(ex["input_ids"]) == 64 and len(masked) == n_prompt
    assert response.startswith(_decode(chat_tok, unmasked))


def test_tokenize_pair_no_response_token_left_names_example(chat_tok):
    with pytest.raises(ValueError, match="example 7"):
        tokenize_pair(chat_tok, "Hi", "Hello", max_length=1, index=7)


def test_tokenize_text_labels_equal_inputs(chat_tok):
    ex = tokenize_text(chat_tok, "Waves fold into foam. " * 20, max_length=16)
    assert len(ex["input_ids"]) == 16 and ex["labels"] == ex["input_ids"]


def test_collate_right_pads():
    features = [
        {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [IGNORE_INDEX, 6]},
        {"input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 1], "labels": [IGNORE_INDEX, 2, 3, 4]},
    ]
    batch = collate(features, pad_token_id=0)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 0, 0], [1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, -100, -100], [-100, 2, 3, 4]]
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)


def test_padding_falls_back_from_pad_to_eos_to_zero():
    # One fallback for make_batches, the training collator and evaluation: PAD, else EOS, else 0 (masked anyway).
    from cast_peft.evaluation import batching

    tok = build_byte_tokenizer(SENTENCES, ["<|im_end|>"], eos="<|im_end|>", pad=None)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id is None and data.padding_id(tok) == eos
    batch = make_batches(tok, ["A spider has eight legs.", "Hi."], batch_size=2)[0]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == eos).all()
    tok.eos_token = None
    assert data.padding_id(tok) == 0
    assert not hasattr(batching, "padding_id") and not hasattr(batching, "prompt_ids")  # one definition: data


def test_make_batches_mixed_and_deterministic(chat_tok):
    examples = starter_set("utility", "test")[:5] + ["A spider has eight legs."]
    batches = make_batches(chat_tok, examples, batch_size=4, max_length=64)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    for b in batches:
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
        assert (b["input_ids"][b["attention_mask"] == 0] == chat_tok.pad_token_id).all()
    again = make_batches(chat_tok, examples, batch_size=4, max_length=64)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)
    first = tokenize_pair(chat_tok, examples[0]["prompt"], examples[0]["response"], 64)
    n = len(first["input_ids"])
    assert batches[0]["labels"][0, :n].tolist() == first["labels"]


# ------------------------------------------------------------------------------------------------------- loaders
def _write_jsonl(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_load_pairs_jsonl_keeps_extra_keys_and_limit(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "category": "x"} for i in range(5)]
    path = _write_jsonl(tmp_path / "ok.jsonl", [json.dumps(r) for r in rows] + [""])
    assert load_pairs(path) == rows
    assert load_pairs(path, limit=2) == rows[:2]


def test_load_pairs_malformed_line_number(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "response": "b"}', "", '{"prompt": "c", "resp'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_pairs(path)


def test_load_pairs_missing_column_lists_available(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(DataError, match=r"qa\.jsonl:1: missing column 'prompt'.*\['answer', 'question'\]"):
        load_pairs(path)
    assert load_pairs(path, prompt_column="question", response_column="answer") == [{"prompt": "q", "response": "a"}]


def test_load_pairs_blank_value_and_empty_set(tmp_path):
    path = _write_jsonl(
        tmp_path / "blank.jsonl", [json.dumps({"prompt": "q", "response": "a"}), '{"prompt": "q2", "response": "  "}']
    )
    with pytest.raises(DataError, match=r"blank\.jsonl:2: empty value in column 'response'"):
        load_pairs(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no examples"):
        load_pairs(str(empty))
    with pytest.raises(DataError, match="no examples"):
        load_pairs([])


def test_load_pairs_csv_json_list_and_dataset(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('prompt,response,tag\n"multi\nline",yes,t1\nq2,,t2\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv:4: empty value in column 'response'"):
        load_pairs(csv_path)
    assert load_pairs(csv_path, limit=1) == [{"prompt": "multi\nline", "response": "yes", "tag": "t1"}]
    rows = [{"instruction": "i", "output": "o"}]
    (tmp_path / "l.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    expected = [{"prompt": "i", "response": "o"}]
    for source in (tmp_path / "l.json", tmp_path / "d.json", rows, datasets.Dataset.from_list(rows)):
        assert load_pairs(source, "instruction", "output") == expected
    assert load_pairs(datasets.Dataset.from_list(rows * 3), "instruction", "output", limit=2) == expected * 2
    assert load_pairs(rows, "instruction", response_column=None) == [{"prompt": "i", "output": "o"}]


def test_load_pairs_missing_file_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_pairs(tmp_path / "nope.jsonl")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match="hub is unreachable.*local .jsonl"):
        load_pairs("some-org/some-dataset")


def test_load_texts(tmp_path):
    para = tmp_path / "p.txt"
    para.write_text("First paragraph\ncontinues.\n\n\nSecond one.\n", encoding="utf-8")
    assert load_texts(para) == ["First paragraph\ncontinues.", "Second one."]
    lines = tmp_path / "l.txt"
    lines.write_text("one\ntwo\n\n", encoding="utf-8")
    assert load_texts(lines) == ["one", "two"]
    assert load_texts(["a", "b", "c"], limit=2) == ["a", "b"]
    with pytest.raises(DataError, match="item 1"):
        load_texts(["a", " "])
    jsonl = _write_jsonl(tmp_path / "t.jsonl", [json.dumps({"text": "hello"})])
    assert load_texts(jsonl) == ["hello"]


# -------------------------------------------------------------------------------------------------- starter set
@pytest.mark.parametrize("kind", ["safety", "utility"])
def test_starter_set_sizes_splits_and_categories(kind):
    train, test = starter_set(kind, "train"), starter_set(kind, "test")
    assert len(train) + len(test) >= 170
    assert 0.1 <= len(test) / (len(train) + len(test)) <= 0.2
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    all_rows = train + test
    assert len({r["prompt"] for r in all_rows}) == len(all_rows), "duplicate prompts"
    categories = {r["category"] for r in all_rows}
    assert len(categories) >= 10 if kind == "safety" else len(categories) >= 8
    assert {r["category"] for r in test} == categories, "every category must appear in the test split"
    assert all(r["prompt"].strip() and r["response"].strip() for r in all_rows)


def test_starter_safety_refusals_are_varied():
    rows = starter_set("safety", "train") + starter_set("safety", "test")
    openings = Counter(r["response"].split(".")[0].split(",")[0] for r in rows)
    assert len(openings) >= 15
    assert openings.most_common(1)[0][1] <= len(rows) // 4
    assert not any(r["response"].lower().startswith(("sure", "here is", "here's")) for r in rows)


def test_starter_set_rejects_bad_arguments():
    with pytest.raises(ValueError):
        starter_set("harmful", "train")
    with pytest.raises(ValueError):
        starter_set("safety", "validation")
